"""The mount plan, pure: a fake host (mountinfo text + a dict filesystem)."""

import json

import pytest

from corral.errors import ConfigError
from corral.fs import plan as fsplan
from corral.fs.plan import FsSpec, Stat, build_plan, parse_mountinfo, visible_mounts

MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
23 27 0:22 / /sys rw,relatime - sysfs sysfs rw
24 27 0:6 / /dev rw,relatime - devtmpfs devtmpfs rw,mode=755
26 24 0:24 / /dev/pts rw,relatime - devpts devpts rw,mode=600
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - cgroup2 cgroup2 rw
40 27 0:40 / /tmp rw,nosuid,nodev - tmpfs tmpfs rw
41 27 0:41 / /mnt/nfs\\040share rw - nfs4 server:/export rw
42 27 0:42 / /run rw,nosuid - tmpfs tmpfs rw
43 42 0:43 / /run/user/1000 rw,nosuid - tmpfs tmpfs rw
44 27 0:44 / /srv/binfmt rw - binfmt_misc binfmt_misc rw
"""

HOME = "/home/u"


class FakeFs:
    """``tree``: path -> Stat or ("symlink", target)."""

    def __init__(self, tree, bound=()):
        self.bound = bound  # what /proc/net/unix lists
        self.tree = {"/": Stat("dir")}
        for path, entry in tree.items():
            parent = path
            while parent != "/":
                parent = parent.rsplit("/", 1)[0] or "/"
                self.tree.setdefault(parent, Stat("dir"))
            self.tree[path] = entry

    def lstat(self, path):
        entry = self.tree.get(path)
        if isinstance(entry, tuple):
            return Stat("symlink")
        return entry

    def readlink(self, path):
        return self.tree[path][1]

    def listdir(self, path):
        prefix = path.rstrip("/") + "/"
        return sorted({p[len(prefix):].split("/")[0] for p in self.tree
                       if p.startswith(prefix) and p != path})

    def uid(self):
        return 1000

    def unix_sockets(self):
        return list(self.bound)

    def find_sockets(self, top, limit):
        found = [p for p, e in self.tree.items() if e == Stat("socket") and p.startswith(top + "/")]
        return found[:limit], len(found) <= limit


def host(**extra):
    tree = {
        "/bin": ("symlink", "usr/bin"),
        "/lib64": ("symlink", "usr/lib64"),
        "/usr/bin/sh": Stat("file"),
        "/usr/lib64": Stat("dir"),
        "/etc/passwd": Stat("file"),
        "/etc/resolv.conf": ("symlink", "../run/resolv.conf"),
        "/run/resolv.conf": Stat("file"),
        "/run/user/1000/bus": Stat("other"),
        "/run/docker.sock": Stat("other"),
        "/mnt/nfs share/data": Stat("dir"),
        "/srv/binfmt": Stat("dir"),
        "/swapfile": Stat("file"),
        "/proc/1": Stat("dir"),
        "/sys/fs/cgroup": Stat("dir"),
        "/dev/null": Stat("other"),
        "/tmp/corral-1000/sb-1": Stat("dir"),
        HOME + "/.bashrc": Stat("file"),
        HOME + "/.ssh/id_ed25519": Stat("file"),
        HOME + "/.netrc": Stat("file"),
        HOME + "/.config/gh/hosts.yml": Stat("file"),
        HOME + "/proj/.git/config": Stat("file"),
        HOME + "/proj/src": Stat("dir"),
        HOME + "/link-to-proj": ("symlink", "proj"),
    }
    tree.update(extra)
    return FakeFs(tree)


def spec(**kw):
    kw.setdefault("cwd", HOME + "/proj")
    kw.setdefault("home", HOME)
    kw.setdefault("scratch", "/tmp/corral-1000/sb-1")
    return FsSpec(**kw)


def plan_of(fs=None, mountinfo=MOUNTINFO, **kw):
    return build_plan(spec(**kw), mountinfo, fs or host())


def ops(plan, op=None, path=None):
    return [o for o in plan.to_json() if (op is None or o["op"] == op)
            and (path is None or o.get("path") == path)]


def index(plan, op, path):
    for i, o in enumerate(plan.to_json()):
        if o["op"] == op and o.get("path") == path:
            return i
    raise AssertionError("no %s %s in plan" % (op, path))


# ------------------------------------------------------------------ mountinfo


def test_mountinfo_unescapes_octal_paths():
    points = [m.point for m in parse_mountinfo(MOUNTINFO)]
    assert "/mnt/nfs share" in points


def test_covered_mount_and_its_children_are_not_visible():
    text = (
        "1 0 0:1 / / rw - ext4 a rw\n"
        "2 1 0:2 / /x rw - tmpfs t rw\n"
        "3 2 0:3 / /x/y rw - tmpfs t rw\n"  # under the covered /x
        "4 2 0:4 / /x rw - tmpfs t rw\n"  # covers 2
    )
    visible = [m.id for m in visible_mounts(parse_mountinfo(text))]
    assert visible == [1, 4]


# ------------------------------------------------------------------ default


def test_default_mode_overlays_every_host_directory_without_mounts_below():
    plan = plan_of()
    overlaid = {o["path"] for o in ops(plan, "overlay")}
    assert {"/usr", "/etc", "/home", "/srv"} - {"/srv"} <= overlaid
    for o in ops(plan, "overlay"):
        assert o["upper"].startswith("/tmp/corral-1000/sb-1/upper/")
        assert o["work"].startswith("/tmp/corral-1000/sb-1/work/")
    uppers = [o["upper"] for o in ops(plan, "overlay")]
    assert len(set(uppers)) == len(uppers)


def test_directory_holding_mounts_is_split_into_its_entries():
    plan = plan_of()
    # / and /run hold mounts: never an overlay's lower layer (locked mounts)
    assert not ops(plan, "overlay", "/")
    assert not ops(plan, "overlay", "/run")
    assert ops(plan, "mkdir", "/run")
    assert ops(plan, "overlay", "/run/user/1000")
    assert index(plan, "mkdir", "/run") < index(plan, "overlay", "/run/user/1000")
    # entries of a split directory: symlinks copied, files bound read-only,
    # sockets left out
    assert ops(plan, "symlink", "/bin") == [{"op": "symlink", "path": "/bin", "target": "usr/bin"}]
    (swap,) = ops(plan, "bind", "/swapfile")
    assert swap["ro"] and not swap["dir"]
    assert not ops(plan, path="/run/docker.sock") or ops(plan, "hide_file", "/run/docker.sock")


def test_fresh_and_pseudo_mounts_are_not_shown_from_the_host():
    plan = plan_of()
    for path in ("/proc", "/sys", "/dev", "/tmp", "/sys/fs/cgroup", "/dev/pts"):
        assert not ops(plan, "overlay", path) and not ops(plan, "bind", path)
    assert ops(plan, "mkdir", "/srv/binfmt") and not ops(plan, "overlay", "/srv/binfmt")
    names = [o["op"] for o in plan.to_json()]
    assert {"proc", "dev", "sys", "tmp"} <= set(names)


def test_nfs_is_bound_read_only_not_overlaid():
    plan = plan_of()
    (nfs,) = ops(plan, "bind", "/mnt/nfs share")
    assert nfs["ro"]
    assert not ops(plan, "overlay", "/mnt/nfs share")


def test_cwd_is_a_writable_bind_after_the_base_view():
    plan = plan_of()
    (cwd,) = ops(plan, "bind", HOME + "/proj")
    assert cwd["ro"] is False and cwd["src"] == HOME + "/proj"
    assert index(plan, "tmp", None) < index(plan, "bind", HOME + "/proj")
    assert plan.to_json()[-1] == {"op": "enter", "cwd": HOME + "/proj"}
    assert plan.warnings == ()


@pytest.mark.parametrize("access, op, ro", [("ro", "overlay", True), ("overlay", "overlay", None)])
def test_cwd_access(access, op, ro):
    plan = plan_of(cwd_access=access)
    (cwd,) = ops(plan, op, HOME + "/proj")
    if ro is not None:
        assert cwd["ro"] is ro


def test_cwd_is_home_is_an_overlay_with_one_notice():
    plan = plan_of(cwd=HOME)
    assert ops(plan, "overlay", HOME) and not ops(plan, "bind", HOME)
    (notice,) = plan.warnings
    assert "holds your home directory" in notice
    assert ops(plan, "hide_file", HOME + "/.netrc")  # secrets still hidden


def test_cwd_through_a_symlink_is_mounted_at_its_real_path():
    plan = plan_of(cwd=HOME + "/link-to-proj")
    assert ops(plan, "bind", HOME + "/proj")
    assert plan.to_json()[-1]["cwd"] == HOME + "/proj"


def test_scratch_outside_tmp_is_hidden_from_the_sandbox():
    fs = host(**{HOME + "/.cache/corral/sb-2": Stat("dir")})
    plan = plan_of(fs, scratch=HOME + "/.cache/corral/sb-2")
    (hide,) = ops(plan, "tmpfs", HOME + "/.cache/corral/sb-2")
    assert hide["ro"]
    assert not ops(plan_of(), "tmpfs", "/tmp/corral-1000/sb-1")


# ------------------------------------------------------------------ secrets


def test_existing_secrets_are_hidden_dirs_as_tmpfs_files_as_empty_files():
    plan = plan_of()
    (ssh,) = ops(plan, "tmpfs", HOME + "/.ssh")
    assert ssh["ro"] and ssh["mode"] == 0o700
    assert ops(plan, "hide_file", HOME + "/.netrc")
    assert ops(plan, "tmpfs", HOME + "/.config/gh")
    assert not ops(plan, path=HOME + "/.aws")  # not there: nothing to hide
    assert ops(plan, "tmpfs", "/run/user/1000")  # the runtime dir: session bus, agents
    assert ops(plan, "hide_file", "/run/docker.sock")


def test_hidden_extra_socket_is_hidden():
    fs = host(**{"/var/agent.sock": Stat("other")})
    plan = plan_of(fs, hidden_extra=("/var/agent.sock",))
    assert ops(plan, "hide_file", "/var/agent.sock")


def test_secrets_can_be_left_visible():
    plan = plan_of(hide_secrets=False)
    assert not ops(plan, path=HOME + "/.ssh")


def test_user_option_on_a_secret_wins():
    plan = plan_of(paths=(("ro", HOME + "/.ssh"),))
    assert ops(plan, "overlay", HOME + "/.ssh")[0]["ro"]
    assert not ops(plan, "tmpfs", HOME + "/.ssh")  # covered anyway: not mounted


def test_rw_home_does_not_uncover_secrets():
    plan = plan_of(paths=(("rw", HOME),))
    assert index(plan, "bind", HOME) < index(plan, "tmpfs", HOME + "/.ssh")
    assert index(plan, "bind", HOME) < index(plan, "hide_file", HOME + "/.netrc")
    assert fsplan.HOME_WRITABLE in plan.warnings


def test_hidden_dir_with_a_mount_inside_is_sealed_read_only_at_the_end():
    plan = plan_of(paths=(("ro", HOME + "/.ssh/id_ed25519"),))
    (ssh,) = ops(plan, "tmpfs", HOME + "/.ssh")
    assert ssh["ro"] is False
    (bind,) = ops(plan, "bind", HOME + "/.ssh/id_ed25519")
    assert bind["create"]  # the mount point is made on the (empty) tmpfs
    assert index(plan, "remount_ro", HOME + "/.ssh") > index(plan, "bind", HOME + "/.ssh/id_ed25519")


def test_secrets_not_visible_in_hermetic_mode_are_not_mounted():
    plan = plan_of(mode="hermetic")
    assert not ops(plan, path=HOME + "/.ssh")


# ------------------------------------------------------------------ options


def test_later_option_wins_for_the_same_path():
    plan = plan_of(paths=(("ro", HOME + "/proj/src"), ("rw", HOME + "/proj/src")))
    (bind,) = ops(plan, "bind", HOME + "/proj/src")
    assert bind["ro"] is False
    plan = plan_of(paths=(("rw", HOME + "/proj/src"), ("hide", HOME + "/proj/src")))
    assert not ops(plan, "bind", HOME + "/proj/src")
    assert ops(plan, "tmpfs", HOME + "/proj/src")


def test_same_path_through_a_symlink_is_the_same_path():
    plan = plan_of(paths=(("ro", HOME + "/link-to-proj"), ("overlay", HOME + "/proj")), cwd=HOME)
    assert ops(plan, "overlay", HOME + "/proj")
    assert not ops(plan, "bind", HOME + "/proj")


def test_parent_before_child_whatever_the_order():
    plan = plan_of(paths=(("ro", HOME + "/proj/.git"), ("rw", HOME + "/proj")), cwd=HOME)
    assert index(plan, "bind", HOME + "/proj") < index(plan, "overlay", HOME + "/proj/.git")


@pytest.mark.parametrize("action, op", [("rw", "bind"), ("ro", "overlay"), ("overlay", "overlay"),
                                        ("tmpfs", "tmpfs"), ("hide", "tmpfs")])
def test_each_action(action, op):
    (o,) = ops(plan_of(paths=((action, "/etc"),)), op, "/etc")[-1:]
    if action in ("rw", "ro"):
        assert o["ro"] is (action == "ro")
        assert "upper" not in o
    if action == "hide":
        assert o["ro"]


def test_hide_a_file_and_tmpfs_a_missing_dir():
    plan = plan_of(paths=(("hide", "/etc/passwd"), ("tmpfs", "/opt/new")))
    assert ops(plan, "hide_file", "/etc/passwd")
    (tmp,) = ops(plan, "tmpfs", "/opt/new")
    assert tmp["create"] and not tmp["ro"]


@pytest.mark.parametrize("kw, words", [
    ({"paths": (("rw", "/nope"),)}, ["--rw /nope", "no such file"]),
    ({"paths": (("ro", "/nope/x"),)}, ["--ro /nope/x"]),
    ({"paths": (("overlay", "/nope"),)}, ["--overlay /nope"]),
    ({"paths": (("hide", "/nope"),)}, ["--hide /nope"]),
    ({"paths": (("rw", "relative/dir"),)}, ["relative/dir", "absolute"]),
    ({"paths": (("rw", "/"),)}, ["--rw /"]),
    ({"paths": (("bogus", "/etc"),)}, ["bogus"]),
    ({"paths": (("ro", "/proc/1"),)}, ["/proc"]),
    ({"paths": (("tmpfs", "/etc/passwd"),)}, ["not a directory"]),
    ({"cwd": "/does/not/exist"}, ["/does/not/exist", "--cwd"]),
    ({"cwd": "proj"}, ["absolute"]),
    ({"cwd": "/", "mode": "readonly"}, ["whole host"]),
])
def test_bad_input_is_a_one_line_config_error(kw, words):
    with pytest.raises(ConfigError) as info:
        plan_of(**kw)
    message = str(info.value)
    assert "\n" not in message and "Fix:" in message
    for word in words:
        assert word in message


def test_symlink_loop_is_a_config_error():
    fs = host(**{"/loop": ("symlink", "/loop")})
    with pytest.raises(ConfigError, match="symbolic links"):
        plan_of(fs, paths=(("ro", "/loop"),))


# ------------------------------------------------------------------ modes


def test_readonly_mode_has_only_read_only_overlays_and_still_hides_secrets():
    plan = plan_of(mode="readonly")
    assert plan.to_json()[0] == {"op": "root", "scratch": "/tmp/corral-1000/sb-1", "mode": "readonly"}
    overlays = ops(plan, "overlay")
    persist_overlays = [o["path"] for o in overlays if o["path"].startswith(HOME + "/proj/")]
    assert persist_overlays == [HOME + "/proj/.git/hooks"]  # persist.py
    assert {"/usr", "/etc", "/home"} <= {o["path"] for o in overlays}
    # nothing writable...
    assert all(o["ro"] and "upper" not in o for o in overlays if o["path"] not in persist_overlays)
    assert [o["path"] for o in ops(plan, "bind")  # ...but cwd (and its .git pinned: persist.py)
            if not o["ro"] and o["path"] != HOME + "/proj/.git"] == [HOME + "/proj"]
    assert ops(plan, "tmpfs", HOME + "/.ssh")
    assert ops(plan, "bind", HOME + "/proj")[0]["ro"] is False


def test_hermetic_mode_shows_only_what_is_named():
    plan = plan_of(mode="hermetic", paths=(("ro", "/bin"), ("ro", "/lib64")))
    assert not ops(plan, "sys")
    persist_overlays = [o["path"] for o in ops(plan, "overlay") if o["path"].startswith(HOME + "/proj/")]
    assert persist_overlays == [HOME + "/proj/.git/hooks"]  # persist.py
    shown = {o["path"]: o for o in ops(plan, "bind") + ops(plan, "overlay")
             if not o["path"].startswith(HOME + "/proj/.git")}  # persist.py
    assert set(shown) == {"/usr/bin", "/usr/lib64", HOME + "/proj"}
    assert all(o["create"] for o in shown.values())
    assert all(o["ro"] for o in ops(plan, "overlay") if o["path"] not in persist_overlays)
    # the symlinks on the way are recreated so that /bin/sh still works
    assert ops(plan, "symlink", "/bin") and ops(plan, "symlink", "/lib64")


def test_resolv_conf_goes_to_the_real_path_of_etc_resolv_conf():
    plan = plan_of(resolv_conf="nameserver 10.0.2.3\n")
    (f,) = ops(plan, "file")
    assert f == {"op": "file", "path": "/run/resolv.conf", "content": "nameserver 10.0.2.3\n"}
    assert index(plan, "file", "/run/resolv.conf") == len(plan.to_json()) - 2
    assert ops(plan_of(mode="hermetic", resolv_conf="x"), "file", "/etc/resolv.conf")


def test_plan_is_json():
    plan = plan_of(paths=(("overlay", "/etc"),), resolv_conf="nameserver 10.0.2.3\n")
    assert json.loads(plan.dumps()) == plan.to_json()


def test_spec_validates_mode():
    with pytest.raises(ValueError):
        spec(mode="bogus")


def test_home_and_var_tmp_get_overlays_of_their_own():
    # copy-up of a root-owned parent fails in a user namespace: an overlay
    # rooted at a directory the user owns makes writes below it work
    fs = host(**{"/var/tmp/x": Stat("file", 0o644)})
    fs.tree["/var/tmp"] = Stat("dir", 0o1777)
    plan = plan_of(fs)
    (home,) = ops(plan, "overlay", HOME)
    (var_tmp,) = ops(plan, "overlay", "/var/tmp")
    assert var_tmp["mode"] == 0o1777
    assert index(plan, "overlay", "/var") < index(plan, "overlay", "/var/tmp")
    assert index(plan, "overlay", HOME) < index(plan, "bind", HOME + "/proj")
    # not when the user's options cover home
    assert not ops(plan_of(paths=(("rw", "/home"),)), "overlay", HOME)
    assert len(ops(plan_of(cwd=HOME), "overlay", HOME)) == 1  # the cwd's own
    assert not ops(plan_of(mode="readonly"), "overlay", HOME)


# ------------------------------------------------------------------ host sockets (issue 9)

SOCK = Stat("socket")


def test_host_sockets_below_a_bind_are_masked_and_allowed_ones_are_bound():
    a, b = HOME + "/proj/run/a.sock", HOME + "/proj/run/b.sock"
    fs = FakeFs(host(**{a: SOCK, b: SOCK}).tree, bound=(a, b, "@abstract", HOME + "/gone.sock"))
    plan = plan_of(fs, allow_sockets=(b,))
    (cwd,) = ops(plan, "bind", HOME + "/proj")
    assert cwd["sockets"] == [a]
    (allowed,) = ops(plan, "bind", b)
    assert allowed["src"] == b and allowed["dir"] is False
    assert index(plan, "bind", HOME + "/proj") < index(plan, "bind", b)
    # nor carried by the overlays of the base view (masked if they fall back)
    c = "/etc/c.sock"
    fs = FakeFs(host(**{c: SOCK}).tree, bound=(c,))
    assert ops(plan_of(fs), "overlay", "/etc")[0]["sockets"] == [c]
    assert "sockets" not in ops(plan_of(fs, allow_sockets=(c,)), "overlay", "/etc")[0]


def test_host_socket_through_a_symlinked_directory_is_found_at_its_real_path():
    a = HOME + "/proj/run/a.sock"
    fs = FakeFs(host(**{a: SOCK}).tree, bound=(HOME + "/link-to-proj/run/a.sock",))
    assert ops(plan_of(fs), "bind", HOME + "/proj")[0]["sockets"] == [a]


def test_socket_of_another_user_is_skipped_not_a_crash():
    class Denied(FakeFs):
        def lstat(self, path):
            if path.startswith("/var/tmp/other"):
                raise PermissionError(13, "Permission denied", path)
            return super().lstat(path)

    fs = Denied(host().tree, bound=("/var/tmp/other/x.sock",))
    assert "sockets" not in ops(plan_of(fs, mode="readonly"), "bind", HOME + "/proj")[0]


def test_socket_bound_by_relative_path_triggers_a_bounded_walk(monkeypatch):
    a = HOME + "/proj/deep/er/rel.sock"
    fs = FakeFs(host(**{a: SOCK}).tree, bound=("rel.sock",))
    plan = plan_of(fs)
    assert ops(plan, "bind", HOME + "/proj")[0]["sockets"] == [a]
    assert plan.warnings == ()
    monkeypatch.setattr(fsplan, "SCAN_LIMIT", 0)
    (warning,) = plan_of(fs).warnings
    assert HOME + "/proj has more than 0 entries" in warning


def test_read_only_views_are_overlays_and_binds_that_stay_carry_their_sockets():
    run_sock, nfs_sock, etc_sock = "/run/x.sock", "/mnt/nfs share/data/y.sock", "/etc/z.sock"
    fs = FakeFs(host(**{run_sock: SOCK, nfs_sock: SOCK, etc_sock: SOCK}).tree,
                bound=(run_sock, nfs_sock, etc_sock))
    # /run holds a mount (/run/user/1000): a recursive read-only bind, sockets masked
    plan = plan_of(fs, paths=(("ro", "/run"),))
    (run,) = ops(plan, "bind", "/run")
    assert run["ro"] and run["sockets"] == [run_sock]
    # nfs cannot be overlaid: a read-only bind, sockets masked
    plan = plan_of(fs, mode="readonly")
    (nfs,) = ops(plan, "bind", "/mnt/nfs share")
    assert nfs["ro"] and nfs["sockets"] == [nfs_sock]
    # an overlay carries its sockets, masked if it falls back to a bind
    (etc,) = ops(plan, "overlay", "/etc")
    assert etc["ro"] and etc["sockets"] == [etc_sock]
    # a directory split into its entries leaves the host's sockets out
    assert not ops(plan, path=run_sock)


@pytest.mark.parametrize("action", ["ro", "rw", "overlay"])
def test_a_socket_named_by_a_path_option_is_refused(action):
    fs = host(**{HOME + "/agent.sock": SOCK})
    with pytest.raises(ConfigError, match="--allow-socket"):
        plan_of(fs, paths=((action, HOME + "/agent.sock"),))


def test_allow_socket_must_name_a_socket():
    with pytest.raises(ConfigError, match="not a socket"):
        plan_of(allow_sockets=(HOME + "/.bashrc",))


def test_allow_socket_in_the_hidden_runtime_dir_is_bound_and_the_dir_sealed():
    fs = host(**{"/run/user/1000/bus": SOCK})
    plan = plan_of(fs, allow_sockets=("/run/user/1000/bus",), runtime_dir="/run/user/1000")
    (runtime,) = ops(plan, "tmpfs", "/run/user/1000")
    (bus,) = ops(plan, "bind", "/run/user/1000/bus")
    assert bus["create"] and index(plan, "tmpfs", "/run/user/1000") < index(plan, "bind", bus["path"])
    assert runtime["ro"] is False and ops(plan, "remount_ro", "/run/user/1000")


# ------------------------------------------------------------------ plan size (issue 11)

def _snaps(n, opts="ro,nodev,relatime", superopts="ro"):
    """mountinfo lines and tree entries for ``n`` snap-like mounts /snap/appN/N."""
    lines, tree = [], {}
    for i in range(n):
        point = "/snap/app%d/%d" % (i, 100 + i)
        lines.append("%d 27 7:%d / %s %s - squashfs /dev/loop%d %s\n"
                     % (100 + i, i, point, opts, i, superopts))
        tree[point + "/bin/tool"] = Stat("file")
    return "".join(lines), tree


def test_sixty_read_only_host_mounts_add_at_most_a_handful_of_operations():
    lines, tree = _snaps(60)
    before = plan_of(host(**{"/snap/README": Stat("file")}))
    after = plan_of(host(**tree), mountinfo=MOUNTINFO + lines)
    assert len(after.ops) <= len(before.ops) + 3
    (snap,) = ops(after, "bind", "/snap")  # one recursive read-only bind carries them all
    assert snap["ro"] and snap["dir"]
    assert not [o for o in after.to_json() if o.get("path", "").startswith("/snap/")]


RESOLV_BIND = "90 27 0:40 /netns/resolv.conf /etc/resolv.conf rw,relatime - tmpfs tmpfs rw\n"
NETNS_ETC = {"/etc/resolv.conf": Stat("file"), "/etc/ssl/certs/a.pem": Stat("file"),
             "/etc/hosts": Stat("file"), "/etc/profile.d/x.sh": Stat("file")}


def test_a_bind_mounted_file_keeps_its_directory_writable():
    # what `ip netns exec` and every container do to /etc/resolv.conf: overlayfs refuses
    # /etc as a lower layer then, and a read-only bind would make /etc unwritable
    # (an installer's write to /etc/profile.d would fail instead of being recorded)
    plan = plan_of(host(**NETNS_ETC), mountinfo=MOUNTINFO + RESOLV_BIND)
    assert not ops(plan, "bind", "/etc") and not ops(plan, "mkdir", "/etc")
    (etc,) = ops(plan, "snapshot", "/etc")  # a writable overlay of a private copy
    assert etc["upper"].startswith("/tmp/corral-1000/sb-1/upper/")
    assert etc["work"].startswith("/tmp/corral-1000/sb-1/work/")
    # ...and the split, for a copy over its bounds
    split = {(o["op"], o["path"]) for o in etc["split"]}
    assert {("mkdir", "/etc"), ("overlay", "/etc/ssl"), ("bind", "/etc/hosts")} <= split


def test_a_bind_mounted_file_under_etc_adds_at_most_a_handful_of_operations():
    before = plan_of(host(**NETNS_ETC))
    after = plan_of(host(**NETNS_ETC), mountinfo=MOUNTINFO + RESOLV_BIND)
    assert len(after.ops) <= len(before.ops) + 3
    assert not [o for o in after.to_json() if o.get("path", "").startswith("/etc/")]
    # the change report reads every upper layer the plan may mount, the split's too
    pairs = fsplan.overlays_of(after.to_json())
    hosts = [host for _, host in pairs]
    assert "/etc" in hosts and "/etc/ssl" in hosts
    assert len({upper for upper, _ in pairs}) == len(pairs)


def test_a_copy_stops_where_it_would_cost_more_than_the_split():
    # a bind-mounted file in a directory of few entries over a big tree (/usr): the
    # split is a few mounts, so the copy may only look at a few entries before giving up
    line = "90 27 0:40 /x /usr/lib/os-release rw - tmpfs tmpfs rw\n"
    fs = host(**{"/usr/lib/os-release": Stat("file"), "/usr/share/doc/a": Stat("file")})
    (usr,) = ops(plan_of(fs, mountinfo=MOUNTINFO + line), "snapshot", "/usr")
    assert fs.listdir("/usr") == ["bin", "lib", "lib64", "share"]
    assert usr["max_entries"] == fsplan.SNAPSHOT_ENTRIES_PER_SPLIT_ENTRY * 4
    (etc,) = ops(plan_of(host(**NETNS_ETC), mountinfo=MOUNTINFO + RESOLV_BIND), "snapshot", "/etc")
    assert etc["max_entries"] <= fsplan.SNAPSHOT_ENTRIES


def test_a_directory_over_a_directory_mount_or_read_only_is_still_split():
    # a mounted directory could hold anything (a copy is for files), and a read-only
    # view's lowerdir-only overlays cost less than a copy
    dir_mount = "91 27 0:41 / /etc/ssl/certs rw - tmpfs tmpfs rw\n"
    plan = plan_of(host(**NETNS_ETC), mountinfo=MOUNTINFO + RESOLV_BIND + dir_mount)
    assert not ops(plan, "snapshot") and ops(plan, "mkdir", "/etc")
    plan = plan_of(host(**NETNS_ETC), mountinfo=MOUNTINFO + RESOLV_BIND, mode="readonly")
    assert not ops(plan, "snapshot") and ops(plan, "mkdir", "/etc")
    assert all(o.get("ro") for o in ops(plan, "overlay") if o["path"].startswith("/etc/"))


@pytest.mark.parametrize("where", ["home", "cwd"])
def test_a_directory_meant_to_be_written_is_never_a_copy(where):
    top = {"home": HOME, "cwd": HOME + "/proj"}[where]
    line = "90 27 0:40 /x %s/bound.conf rw - tmpfs tmpfs rw\n" % top
    plan = plan_of(host(**{top + "/bound.conf": Stat("file")}), mountinfo=MOUNTINFO + line,
                   cwd_access="overlay")
    assert not ops(plan, "snapshot")


@pytest.mark.parametrize("where", ["home", "cwd", "/var/tmp"])
def test_a_directory_meant_to_be_written_stays_writable_over_sealed_mounts(where):
    top = {"home": HOME, "cwd": HOME + "/proj", "/var/tmp": "/var/tmp"}[where]
    line = "90 27 7:9 / %s/iso ro - iso9660 /dev/loop9 ro\n" % top
    fs = host(**{top + "/iso/README": Stat("file"), "/var/tmp/x": Stat("file")})
    plan = plan_of(fs, mountinfo=MOUNTINFO + line, cwd_access="overlay")
    assert not [o for o in ops(plan, "bind", top) if o["ro"]]
    assert ops(plan, path=top + "/iso")  # the mount itself, on its own


@pytest.mark.parametrize("opts,superopts", [("ro", "rw"), ("rw", "ro"), ("rw", "rw")])
def test_a_directory_over_a_mount_that_can_still_get_sockets_is_split(opts, superopts):
    # a read-only bind of a writable filesystem (or a writable mount) can get new host
    # sockets bound elsewhere: a bind would let connect() through, so no bind of its parent
    lines, tree = _snaps(2, opts=opts, superopts=superopts)
    plan = plan_of(host(**tree), mountinfo=MOUNTINFO + lines)
    assert not ops(plan, "bind", "/snap")
    assert ops(plan, "mkdir", "/snap") and ops(plan, "overlay", "/snap/app0/100")


def test_host_sockets_in_a_bound_directory_holding_mounts_are_masked():
    lines, tree = _snaps(3)
    fs = host(**tree, **{"/snap/ctl.sock": Stat("socket")})
    fs.bound = ("/snap/ctl.sock",)
    plan = plan_of(fs, mountinfo=MOUNTINFO + lines)
    (snap,) = ops(plan, "bind", "/snap")
    assert snap["sockets"] == ["/snap/ctl.sock"]


def test_a_directory_holding_corral_state_is_never_one_bind():
    lines = "90 27 0:40 /x /var/lib/thing ro - tmpfs tmpfs ro\n"
    fs = host(**{"/var/lib/thing/f": Stat("file"), "/var/lib/corral/state/x": Stat("dir")})
    plan = plan_of(fs, mountinfo=MOUNTINFO + lines, protect=("/var/lib/corral",))
    assert not ops(plan, "bind", "/var/lib") and not ops(plan, "bind", "/var")
    assert ops(plan, "tmpfs", "/var/lib/corral")
