"""Issue 9, class 5: the command cannot plant code that the host runs later — shell
startup files, git hooks, git config — through a writable directory, and the audit
reports every such attempt as persistence, blocked or not.

End to end through the CLI, as the unprivileged user (``corral run --report``,
``corral audit``), plus the pure mount plan on a fake host for the bounds.
"""

import json
import os
import subprocess
import time

import pytest

from conftest import corral
from corral.fs import persist
from corral.fs.plan import FsSpec, HostFs, Stat, build_plan

GIT_ENV = {
    "GIT_CONFIG_NOSYSTEM": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
    "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com",
}


def _env(home):
    return dict(os.environ, HOME=str(home), **GIT_ENV)


def _git(cwd, *args):
    subprocess.run(["git", "-c", "protocol.file.allow=always", "-c", "init.defaultBranch=main", *args],
                   cwd=cwd, check=True, capture_output=True, env=dict(os.environ, **GIT_ENV))


def _report(path):
    report = json.loads(path.read_text())
    return report, {f["subject"]: f for f in report["flags"] if f["kind"] == "persistence"}


def _notices(stderr):
    return [line for line in stderr.decode().splitlines() if line.startswith("corral: ")]


# ------------------------------------------------------------------ $HOME as cwd


@pytest.mark.namespaces
def test_bashrc_append_run_from_home_is_discarded_with_one_notice_and_flagged(home, tmp_path):
    (home / ".bashrc").write_text("original\n")
    report = tmp_path / "report.json"
    result = corral("run", "--net", "none", "--report", str(report), "--", "sh", "-c",
                    "echo evil >> ~/.bashrc && echo note > ~/notes && cat ~/.bashrc",
                    cwd=home, env=_env(home))
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"original\nevil\n"  # the write worked inside...
    assert (home / ".bashrc").read_text() == "original\n"  # ...and never reached the host
    assert not (home / "notes").exists()  # the whole home is an overlay, not only .bashrc
    (notice,) = _notices(result.stderr)
    assert "holds your home directory" in notice and "--rw" in notice
    _, flags = _report(report)
    assert flags[str(home / ".bashrc")]["severity"] == "high"


@pytest.mark.namespaces
def test_bashrc_append_under_corral_audit_from_home_is_flagged(home):
    (home / ".bashrc").write_text("original\n")
    result = corral("audit", "--net", "none", "--", "sh", "-c", "echo evil >> ~/.bashrc",
                    cwd=home, env=_env(home))
    assert result.returncode == 0, result.stderr
    assert (home / ".bashrc").read_text() == "original\n"
    text = result.stderr.decode()
    assert "persistence" in text and str(home / ".bashrc") in text
    assert "0 file changes" not in text


@pytest.mark.namespaces
def test_bashrc_append_with_explicit_rw_home_reaches_the_host_and_is_flagged(home, tmp_path):
    (home / ".bashrc").write_text("original\n")
    report = tmp_path / "report.json"
    result = corral("run", "--net", "none", "--rw", str(home), "--report", str(report), "--",
                    "sh", "-c", "echo evil >> ~/.bashrc; echo x > ~/.bash_login", cwd=home, env=_env(home))
    assert result.returncode == 0, result.stderr
    assert (home / ".bashrc").read_text() == "original\nevil\n"  # the user asked for it
    (notice,) = _notices(result.stderr)
    assert "whole home directory is writable, startup files included" in notice
    _, flags = _report(report)
    assert "modified" in flags[str(home / ".bashrc")]["detail"]
    assert "created" in flags[str(home / ".bash_login")]["detail"]


@pytest.mark.namespaces
def test_autostart_entry_planted_from_dot_config_cwd_is_discarded_and_flagged(home, tmp_path):
    (home / ".config" / "autostart").mkdir(parents=True)
    report = tmp_path / "report.json"
    result = corral("run", "--net", "none", "--report", str(report), "--", "sh", "-c",
                    "echo '[Desktop Entry]' > autostart/evil.desktop; mkdir -p systemd/user; "
                    "echo '[Service]' > systemd/user/evil.service", cwd=home / ".config", env=_env(home))
    assert result.returncode == 0, result.stderr
    assert not (home / ".config" / "autostart" / "evil.desktop").exists()
    assert not (home / ".config" / "systemd").exists()
    (notice,) = _notices(result.stderr)
    assert "files the host runs at login" in notice
    _, flags = _report(report)
    assert str(home / ".config" / "autostart" / "evil.desktop") in flags
    assert str(home / ".config" / "systemd" / "user" / "evil.service") in flags


@pytest.mark.namespaces
def test_root_as_cwd_is_the_overlay_view_with_one_notice(home):
    result = corral("run", "--net", "none", "--", "sh", "-c",
                    "echo evil >> %s/.bashrc && cat %s/.bashrc" % (home, home), cwd="/", env=_env(home))
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"evil\n"
    assert not (home / ".bashrc").exists()
    (notice,) = _notices(result.stderr)
    assert "working directory is /" in notice


# ------------------------------------------------------------------ git repositories


@pytest.fixture
def repo(tmp_path):
    """A repository with a submodule (gitdir in .git/modules/lib, a nested submodule
    below it) and a nested plain repository, each with a commit."""
    inner, lib, proj = tmp_path / "inner-src", tmp_path / "lib-src", tmp_path / "proj"
    for path in (inner, lib, proj):
        path.mkdir()
        _git(path, "init", "-q")
        (path / "README").write_text(path.name + "\n")
        _git(path, "add", "README")
        _git(path, "commit", "-qm", "initial")
    _git(lib, "submodule", "add", "-q", str(inner), "inner")
    _git(lib, "commit", "-qm", "inner")
    _git(proj, "submodule", "add", "-q", str(lib), "lib")
    _git(proj, "submodule", "update", "--init", "--recursive", "-q")
    _git(proj, "commit", "-qm", "lib")
    plain = proj / "vendor" / "plain"
    plain.mkdir(parents=True)
    _git(plain, "init", "-q")
    assert (proj / "lib" / ".git").is_file()
    assert (proj / ".git" / "modules" / "lib" / "modules" / "inner" / "config").is_file()
    return proj


def _git_targets(proj):
    """Every gitdir of ``proj``, its hooks dir and config, and the .git files."""
    gitdirs = [proj / ".git", proj / ".git/modules/lib", proj / ".git/modules/lib/modules/inner",
               proj / "vendor/plain/.git"]
    return gitdirs, [proj / "lib/.git", proj / "lib/inner/.git"]


ATTACK = r"""
set -u
for g in .git .git/modules/lib .git/modules/lib/modules/inner vendor/plain/.git; do
  printf '#!/bin/sh\necho pwned\n' > $g/hooks/pre-commit; chmod +x $g/hooks/pre-commit
  printf '[core]\n\tfsmonitor = echo pwned\n' >> $g/config
done
git config core.pager 'echo pwned' 2>/dev/null
printf 'gitdir: ../evil\n' > lib/.git
printf 'gitdir: ../evil\n' > lib/inner/.git
mv .git .git-old 2>/dev/null && echo MOVED
mv .git/hooks .git/hooks-old 2>/dev/null && echo MOVED
rm .git/config 2>/dev/null && echo REMOVED
mkdir -p vendor/planted && git -C vendor/planted init -q
echo ../../evil > .git/commondir
echo ok
"""


def _snapshot(proj):
    gitdirs, files = _git_targets(proj)
    snap = {}
    for g in gitdirs:
        snap[g / "config"] = (g / "config").read_bytes()
        snap[g / "hooks"] = sorted(os.listdir(g / "hooks"))
    for f in files:
        snap[f] = f.read_bytes()
    return snap


def _current(snap):
    return {p: (sorted(os.listdir(p)) if p.is_dir() else p.read_bytes()) for p in snap}


@pytest.mark.namespaces
def test_git_hooks_and_config_planted_in_repo_submodules_and_nested_repo_stay_off_the_host(
        repo, home, tmp_path):
    before = _snapshot(repo)
    report = tmp_path / "report.json"
    result = corral("run", "--net", "none", "--report", str(report), "--", "sh", "-c", ATTACK,
                    cwd=repo, env=_env(home))
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"ok\n"  # no MOVED: .git cannot be swapped for another one
    assert _current(before) == before
    assert _notices(result.stderr) == []
    _, flags = _report(report)
    gitdirs, files = _git_targets(repo)
    for g in gitdirs:
        assert str(g / "hooks" / "pre-commit") in flags, g
        assert str(g / "config") in flags, g
    for f in files:
        assert str(f) in flags, f
    # a new repository or a commondir redirecting git's config cannot be forbidden
    # (their names did not exist), but they are reported
    assert flags[str(repo / "vendor" / "planted" / ".git")]["severity"] == "medium"
    assert flags[str(repo / ".git" / "commondir")]["severity"] == "high"


@pytest.mark.namespaces
def test_git_hooks_and_config_with_allow_persist_reach_the_host_and_are_flagged(repo, home, tmp_path):
    before = _snapshot(repo)
    report = tmp_path / "report.json"
    result = corral("run", "--net", "none", "--allow-persist", "--report", str(report), "--", "sh", "-c",
                    ATTACK.replace("mv .git", ": mv").replace("rm .git", ": rm"), cwd=repo, env=_env(home))
    assert result.returncode == 0, result.stderr
    after = _current(before)
    assert all(after[p] != before[p] for p in before)
    assert b"pager = echo pwned" in (repo / ".git" / "config").read_bytes()
    _, flags = _report(report)
    gitdirs, files = _git_targets(repo)
    for g in gitdirs:
        assert str(g / "hooks" / "pre-commit") in flags, g
        assert str(g / "config") in flags, g
    for f in files:
        assert str(f) in flags, f


@pytest.mark.namespaces
def test_normal_work_in_a_protected_repo_edit_add_commit_reaches_the_host(repo, home):
    script = ("echo change >> README && git add README && git commit -qm inside && "
              "cd lib && echo sub >> README && git commit -qam 'inside lib' && git status --short")
    result = corral("run", "--net", "none", "--", "sh", "-c", script, cwd=repo, env=_env(home))
    assert result.returncode == 0, result.stderr
    log = subprocess.run(["git", "log", "--format=%s"], cwd=repo, capture_output=True, check=True)
    assert log.stdout.splitlines()[0] == b"inside"
    log = subprocess.run(["git", "log", "--format=%s"], cwd=repo / "lib", capture_output=True, check=True)
    assert log.stdout.splitlines()[0] == b"inside lib"


@pytest.mark.namespaces
def test_git_hooks_in_an_rw_option_repo_are_protected_too(repo, home, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    result = corral("run", "--net", "none", "--rw", str(repo), "--", "sh", "-c",
                    "echo evil > %s/.git/hooks/post-checkout; echo x > %s/new" % (repo, repo),
                    cwd=work, env=_env(home))
    assert result.returncode == 0, result.stderr
    assert not (repo / ".git" / "hooks" / "post-checkout").exists()
    assert (repo / "new").read_text() == "x\n"


# ------------------------------------------------------------------ the plan (pure)


class Tree:
    """A fake host: path -> Stat."""

    def __init__(self, paths):
        self.tree = {"/": Stat("dir")}
        for path, st in paths.items():
            parent = path
            while parent != "/":
                parent = os.path.dirname(parent)
                self.tree.setdefault(parent, Stat("dir"))
            self.tree[path] = st

    def lstat(self, path):
        return self.tree.get(path)

    def readlink(self, path):
        raise OSError(path)

    def listdir(self, path):
        prefix = path.rstrip("/") + "/"
        return sorted({p[len(prefix):].split("/")[0] for p in self.tree if p.startswith(prefix) and p != path})

    def uid(self):
        return 1000

    def unix_sockets(self):  # no host sockets in this fake
        return []

    def find_sockets(self, top, limit):
        return [], True


def _plan(tree, cwd="/home/u/proj", paths=(), allow_persist=False):
    spec = FsSpec(cwd=cwd, home="/home/u", scratch="/tmp/corral-1000/sb-1", paths=paths,
                  allow_persist=allow_persist)
    return build_plan(spec, "27 1 254:0 / / rw - ext4 /dev/vda rw\n", Tree(tree))


def _repo_tree(root):
    return {root + "/.git/config": Stat("file"), root + "/.git/HEAD": Stat("file"),
            root + "/.git/hooks": Stat("dir")}


def test_plan_protects_gitdir_then_config_copy_then_hooks_overlay():
    ops = _plan({**_repo_tree("/home/u/proj"), "/tmp/corral-1000/sb-1": Stat("dir")}).to_json()
    where = {(o["op"], o.get("path")): i for i, o in enumerate(ops)}
    cwd = where[("bind", "/home/u/proj")]
    keep = where[("bind", "/home/u/proj/.git")]
    assert cwd < keep < where[("protect_file", "/home/u/proj/.git/config")]
    assert keep < where[("overlay", "/home/u/proj/.git/hooks")]


def test_plan_user_option_on_a_protected_path_wins():
    tree = {**_repo_tree("/home/u/proj"), "/tmp/corral-1000/sb-1": Stat("dir")}
    ops = _plan(tree, paths=(("rw", "/home/u/proj/.git/hooks"),)).to_json()
    assert not [o for o in ops if o["op"] == "overlay" and o["path"] == "/home/u/proj/.git/hooks"]
    (watch,) = [o for o in ops if o["op"] == "watch"]
    assert "/home/u/proj/.git/hooks" in watch["paths"]  # still flagged by the audit
    ops = _plan(tree, paths=(("ro", "/home/u/proj/.git"),)).to_json()
    assert not [o for o in ops if o["op"] == "protect_file"]  # read-only already


def test_plan_cwd_inside_a_git_dir_or_a_bare_repo_is_protected():
    tree = {**_repo_tree("/home/u/proj"), "/home/u/proj/.git/objects": Stat("dir"),
            "/home/u/proj/.git/refs": Stat("dir"), "/tmp/corral-1000/sb-1": Stat("dir")}
    ops = _plan(tree, cwd="/home/u/proj/.git").to_json()
    assert [o for o in ops if o["op"] == "protect_file" and o["path"] == "/home/u/proj/.git/config"]
    ops = _plan(tree, cwd="/home/u/proj/.git/hooks").to_json()
    assert [o for o in ops if o["op"] == "overlay" and o["path"] == "/home/u/proj/.git/hooks"]
    assert not [o for o in ops if o["op"] == "bind" and o["path"] == "/home/u/proj/.git/hooks"]
    bare = {"/home/u/proj/remote.git/" + name: Stat(kind) for name, kind in
            (("HEAD", "file"), ("config", "file"), ("objects", "dir"), ("refs", "dir"), ("hooks", "dir"))}
    ops = _plan({**bare, "/tmp/corral-1000/sb-1": Stat("dir")}).to_json()
    assert [o for o in ops if o["op"] == "protect_file" and o["path"] == "/home/u/proj/remote.git/config"]
    assert [o for o in ops if o["op"] == "overlay" and o["path"] == "/home/u/proj/remote.git/hooks"]


def test_plan_missing_hooks_dir_is_created_as_an_overlay():
    tree = {"/home/u/proj/.git/config": Stat("file"), "/tmp/corral-1000/sb-1": Stat("dir")}
    (hooks,) = [o for o in _plan(tree).to_json() if o.get("path") == "/home/u/proj/.git/hooks"]
    assert hooks["op"] == "overlay" and hooks["create"]


def test_plan_allow_persist_watches_instead_of_protecting():
    tree = {**_repo_tree("/home/u/proj"), "/tmp/corral-1000/sb-1": Stat("dir")}
    ops = _plan(tree, allow_persist=True).to_json()
    assert not [o for o in ops if o["op"] in ("protect_file", "overlay") and "/.git" in o["path"]]
    (watch,) = [o for o in ops if o["op"] == "watch"]
    assert set(watch["paths"]) == {"/home/u/proj/.git/config", "/home/u/proj/.git/hooks",
                                   "/home/u/proj/.git/commondir"}


def test_plan_repo_search_is_bounded_by_depth_and_directories():
    tree = {**_repo_tree("/home/u/proj/a/b"), **_repo_tree("/home/u/proj/a/b/c"),
            "/tmp/corral-1000/sb-1": Stat("dir")}
    paths = {o.get("path") for o in _plan(tree).to_json()}
    assert "/home/u/proj/a/b/.git/config" in paths  # 2 levels below cwd
    assert "/home/u/proj/a/b/c/.git/config" not in paths
    tree = {"/home/u/proj/d%03d/x" % i: Stat("file") for i in range(persist.SCAN_DIRS + 50)}
    fs = Tree(tree)
    read = []
    listdir = fs.listdir
    fs.listdir = lambda path: read.append(path) or listdir(path)
    persist.protect(fs, ["/home/u/proj"], "/home/u", False)
    assert len(read) == persist.SCAN_DIRS


def test_plan_repo_search_skips_dependency_trees():
    tree = {**_repo_tree("/home/u/proj/node_modules/x"), "/tmp/corral-1000/sb-1": Stat("dir")}
    assert not [o for o in _plan(tree).to_json() if o["op"] == "protect_file"]


def test_plan_home_cwd_is_an_overlay_unless_named_rw():
    tree = {"/home/u/.bashrc": Stat("file"), "/tmp/corral-1000/sb-1": Stat("dir")}
    plan = _plan(tree, cwd="/home/u")
    assert [o for o in plan.to_json() if o["op"] == "overlay" and o["path"] == "/home/u"]
    assert len(plan.warnings) == 1 and "holds your home directory" in plan.warnings[0]
    plan = _plan(tree, cwd="/home/u", paths=(("rw", "/home/u"),))
    assert [o for o in plan.to_json() if o["op"] == "bind" and o["path"] == "/home/u" and not o["ro"]]
    assert len(plan.warnings) == 1 and "writable, startup files included" in plan.warnings[0]
    (watch,) = [o for o in plan.to_json() if o["op"] == "watch"]
    assert "/home/u/.bashrc" in watch["paths"] and "/home/u/.bash_login" in watch["paths"]


def test_repo_search_in_a_tree_of_thousands_of_files_is_fast(tmp_path):
    for i in range(60):
        d = tmp_path / ("pkg%d" % i) / "sub" / "deeper"
        d.mkdir(parents=True)
        for j in range(80):
            (d.parent / ("f%d.py" % j)).write_text("")
            (d / ("g%d.py" % j)).write_text("")
    (tmp_path / ".git" / "hooks").mkdir(parents=True)
    (tmp_path / ".git" / "config").write_text("")
    (tmp_path / "pkg0" / "sub" / ".git" / "hooks").mkdir(parents=True)  # a nested repo
    (tmp_path / "pkg0" / "sub" / ".git" / "config").write_text("")
    fs = HostFs()
    persist.protect(fs, [str(tmp_path)], "/nonexistent-home", False)  # warm the dentry cache
    start = time.perf_counter()
    found = persist.protect(fs, [str(tmp_path)], "/nonexistent-home", False)
    elapsed = time.perf_counter() - start
    assert (str(tmp_path / ".git" / "config"), persist.COPY, "file") in found.items
    assert (str(tmp_path / "pkg0" / "sub" / ".git" / "config"), persist.COPY, "file") in found.items
    assert elapsed < 0.05, elapsed  # 10,000 files: ~1 ms on a quiet 2-core VM
