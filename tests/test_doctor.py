"""`corral doctor` (issue 2 item 8): passes here, and names the fix when a
check fails."""

import os
import subprocess
import sys

import pytest

from conftest import corral

pytestmark = pytest.mark.namespaces


def test_doctor_passes_on_a_working_machine():
    result = corral("doctor", text=True)
    assert result.returncode == 0, result.stdout
    assert "all required checks passed" in result.stdout
    for name in ("user namespace", "uid_map", "overlayfs in a user namespace", "/dev/net/tun",
                 "netstack library", "kernel"):
        assert name in result.stdout


def test_doctor_fails_with_the_fix_when_user_namespaces_are_exhausted():
    # A user namespace whose user.max_user_namespaces is 0 cannot create more:
    # exactly what a machine with the sysctl at 0 looks like from inside.
    script = (
        "echo 0 > /proc/sys/user/max_user_namespaces && "
        "exec %s -m corral doctor" % sys.executable
    )
    result = subprocess.run(["unshare", "-Ur", "sh", "-c", script],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    failing = [line for line in lines if line.startswith("FAIL")]
    assert any("user.max_user_namespaces" in line for line in failing)
    assert any("user namespace" in line for line in failing)
    assert "fix: sudo sysctl -w user.max_user_namespaces=" in result.stdout
    assert "check(s) failed" in lines[-1]


def test_doctor_reports_an_unusable_tun_device(tmp_path):
    from corral import doctor

    real_access = os.access

    def no_tun(path, mode, **kw):
        return False if path == "/dev/net/tun" else real_access(path, mode, **kw)

    os.access, saved = no_tun, os.access
    try:
        checks = {c.name: c for c in doctor.checks()}
    finally:
        os.access = saved
    tun = checks["/dev/net/tun"]
    assert not tun.ok and "chmod 666 /dev/net/tun" in tun.fix


def test_doctor_says_warn_not_ok_for_an_optional_feature_it_lacks():
    """A check that is not available is not "ok" (issue 12 point 9): cgroup v2
    delegation is optional, so it is `warn` with what it costs, and the exit
    status stays 0."""
    from corral import doctor

    real = doctor.checks

    lacking = doctor.Check(name="cgroup v2 delegation", ok=False, optional=True,
                           detail="not available (cgroup v1): rlimits only")
    assert lacking.status == "warn"
    assert doctor.Check(name="x", ok=False, detail="broken").status == "FAIL"
    assert doctor.Check(name="x", ok=True, detail="fine").status == "ok"
    cgroup = {c.name: c for c in real()}["cgroup v2 delegation"]
    if not cgroup.ok:  # this host (cgroup v1 hybrid): must say warn and what it costs
        assert cgroup.status == "warn" and "rlimits" in cgroup.detail
    result = corral("doctor", text=True)
    line = next(l for l in result.stdout.splitlines() if "cgroup v2 delegation" in l)
    assert not line.startswith("ok") or cgroup.ok
    assert result.returncode == 0
