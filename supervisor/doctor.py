"""`corral doctor`: can this machine run sandboxes?  Each check that fails says
exactly how to fix it; the exit status is 0 only when every check passes.

Checks that need namespaces run in a forked child, so the doctor itself stays
untouched.
"""

import os
import platform
import sys
import tempfile

import attrs

from .spawn import libc, stage1

MIN_KERNEL = (5, 11)  # overlayfs in user namespaces


@attrs.frozen(kw_only=True)
class Check:
    """One line of the doctor's report.  A required check that fails is
    ``FAIL`` (and the exit status 1); an ``optional`` one that is not
    available is ``warn``: corral runs, and ``detail`` says what it costs."""

    name: str
    ok: bool
    detail: str
    fix: str | None = None
    optional: bool = False

    @property
    def status(self):
        if self.ok:
            return "ok"
        return "warn" if self.optional else "FAIL"


def _in_child(func):
    """Run ``func()`` in a forked child; return None on success or its error text."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        code = 0
        try:
            func()
        except BaseException as exc:  # report, never raise out of the child
            os.write(w, (getattr(exc, "strerror", None) and "%s (errno %s)" % (exc, exc.errno)
                         or repr(exc)).encode()[:2000])
            code = 1
        os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        text = f.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) == 0:
        return None
    return text or "failed with status %d" % status


def _read_int(path):
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _userns():
    libc.unshare(libc.CLONE_NEWUSER)


def _map_self():
    uid, gid = os.getuid(), os.getgid()
    libc.unshare(libc.CLONE_NEWUSER)
    for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", "%d %d 1" % (uid, uid)),
                       ("/proc/self/gid_map", "%d %d 1" % (gid, gid))):
        with open(path, "w") as f:
            f.write(text)


def _overlay():
    with tempfile.TemporaryDirectory(prefix="corral-doctor-") as tmp:
        for sub in ("lower", "upper", "work", "merged"):
            os.mkdir(os.path.join(tmp, sub))
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _map_self()
                libc.unshare(libc.CLONE_NEWNS)
                libc.mount("overlay", os.path.join(tmp, "merged"), "overlay", 0,
                           "lowerdir=%s/lower,upperdir=%s/upper,workdir=%s/work" % (tmp, tmp, tmp))
                with open(os.path.join(tmp, "merged", "probe"), "w") as f:
                    f.write("ok")
            except BaseException as exc:
                sys.stderr.write("%s\n" % exc)
                code = 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        # The work dir is left mode 000 by overlayfs; make it removable.
        os.chmod(os.path.join(tmp, "work"), 0o700)
        for name in os.listdir(os.path.join(tmp, "work")):
            os.chmod(os.path.join(tmp, "work", name), 0o700)
        if os.waitstatus_to_exitcode(status) != 0:
            raise OSError("mounting overlayfs inside a user namespace failed")


def checks():
    """Run every check; return a list of :class:`Check`."""
    results = []

    release = platform.release()
    try:
        version = tuple(int(p) for p in release.split("-")[0].split(".")[:2])
    except ValueError:
        version = (0, 0)
    results.append(Check(
        name="kernel", ok=version >= MIN_KERNEL, detail="Linux %s" % release,
        fix="corral needs Linux >= %d.%d (overlayfs in user namespaces)" % MIN_KERNEL,
    ))

    max_ns = _read_int("/proc/sys/user/max_user_namespaces")
    results.append(Check(
        name="user.max_user_namespaces", ok=max_ns is None or max_ns > 0,
        detail="%s" % max_ns,
        fix="sudo sysctl -w user.max_user_namespaces=15000 (and persist it in /etc/sysctl.d/)",
    ))
    clone = _read_int("/proc/sys/kernel/unprivileged_userns_clone")
    if clone is not None:
        results.append(Check(
            name="kernel.unprivileged_userns_clone", ok=clone == 1, detail=str(clone),
            fix="sudo sysctl -w kernel.unprivileged_userns_clone=1",
        ))
    for name in ("apparmor_restrict_unprivileged_userns", "apparmor_restrict_unprivileged_unconfined"):
        value = _read_int("/proc/sys/kernel/" + name)
        if value is not None:
            results.append(Check(
                name="kernel." + name, ok=value == 0, detail=str(value),
                fix="Ubuntu 24.04+ restricts user namespaces: sudo sysctl -w kernel.%s=0, or "
                "install an AppArmor profile granting `userns` to the corral interpreter "
                "(see docs/troubleshooting.md)" % name,
            ))

    error = _in_child(_userns)
    results.append(Check(
        name="user namespace", ok=error is None, detail=error or "can create one",
        fix=stage1.FIXES["unshare"],
    ))
    error = _in_child(_map_self)
    results.append(Check(
        name="uid_map", ok=error is None, detail=error or "can map uid %d to itself" % os.getuid(),
        fix="writing /proc/self/uid_map failed: check that no LSM blocks it, and run as a "
        "normal user (not setuid)",
    ))
    error = _in_child(_overlay)
    results.append(Check(
        name="overlayfs in a user namespace", ok=error is None, detail=error or "works",
        fix="needs Linux >= 5.11 with CONFIG_OVERLAY_FS; without it use --mode readonly",
    ))

    tun = "/dev/net/tun"
    if not os.path.exists(tun):
        results.append(Check(name="/dev/net/tun", ok=False, detail="missing",
                             fix="sudo modprobe tun (needed for --net filtered)"))
    else:
        ok = os.access(tun, os.R_OK | os.W_OK)
        mode = oct(os.stat(tun).st_mode & 0o777)
        results.append(Check(
            name="/dev/net/tun", ok=ok, detail="mode %s, %s" % (mode, "usable" if ok else "not usable"),
            fix="sudo chmod 666 /dev/net/tun (the default on most desktops; needed for "
            "--net filtered) — or use --net none",
        ))

    from .hardening import cgroup_delegation

    delegated, detail = cgroup_delegation()
    results.append(Check(
        name="cgroup v2 delegation", ok=delegated, optional=True,
        detail=detail if delegated else "not available (%s): --memory, --pids and --cpu-time "
        "are per-process rlimits, not a limit on the whole sandbox" % detail,
        fix="run under systemd with user delegation (systemd-run --user --scope -p Delegate=yes "
        "corral …) on a cgroup v2 host",
    ))

    from .spawn.harden import LANDLOCK_SCOPE_ABI, landlock_abi

    abi, why = landlock_abi()
    scoped = abi >= LANDLOCK_SCOPE_ABI
    results.append(Check(  # optional: the network namespace already separates abstract sockets
        name="unix sockets", ok=scoped, optional=True,
        detail="host sockets: the mount layer (overlays, sockets in binds masked); abstract "
        "sockets: network namespace + Landlock scope (ABI %d)" % abi if scoped else
        "host sockets: the mount layer (overlays, sockets in binds masked); abstract sockets: "
        "network namespace only (Landlock %s): under --net host the command can reach the "
        "host's abstract sockets" % ("ABI %d < %d" % (abi, LANDLOCK_SCOPE_ABI) if abi else why),
        fix="Linux >= 6.12 with Landlock enabled (lsm=...,landlock)",
    ))

    from .warm import client as warm_client
    from .warm import server as warm_server

    try:
        answer = warm_server.request("status")
        running, detail = True, "running: " + answer.partition(b"\0")[2].decode("utf-8", "replace")
    except (warm_client.Refused, OSError) as exc:
        running, detail = False, "not serving this shell (%s): each run starts cold" % exc
    results.append(Check(name="warm server", ok=running, optional=True, detail=detail,
                         fix="`corral warm start` (many short runs: each starts 2.4-3.7x faster)"))

    try:
        from .bindings import load

        _, lib = load()
        results.append(Check(name="netstack library", ok=True,
                             detail="ABI %d" % lib.corral_abi_version()))
    except ImportError as exc:
        results.append(Check(name="netstack library", ok=False, detail=str(exc),
                             fix="pip install --force-reinstall --no-deps . (needs Go)"))
    return results


def main():
    results = checks()
    width = max(len(c.name) for c in results)
    for c in results:
        sys.stdout.write("%-4s  %-*s  %s\n" % (c.status, width, c.name, c.detail))
        if not c.ok and c.fix:
            sys.stdout.write("      %*s  fix: %s\n" % (width, "", c.fix))
    failed = [c for c in results if c.status == "FAIL"]
    warned = [c for c in results if c.status == "warn"]
    if failed:
        summary = "%d check(s) failed" % len(failed)
    else:
        summary = "all required checks passed"
    if warned:
        summary += "; %d optional feature(s) unavailable (warn)" % len(warned)
    sys.stdout.write(summary + "\n")
    return 1 if failed else 0
