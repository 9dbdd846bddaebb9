"""Run one command under one of the comparison sandboxes: ``sandboxes.py KIND -- CMD...``.

Used by the benchmarks, run *inside* a test world (never on the host's network).  KIND:

- ``slirp4netns``: CMD in ``unshare -Urn --fork``, networked by slirp4netns 1.2 with MTU
  65520 and ``--disable-host-loopback`` (ulimit -n raised first: at 1024 it answers new
  connections with "Network is unreachable" under load).
- ``pasta``: the flags that work with the old Debian build in a lo-only namespace, with its
  paths to host loopback closed (``--no-map-gw -T none -U none``).
- ``minitapbox``: pyminisandbox's tap mode, allowing each ``--allow-ip`` (repeatable;
  its subnet rules, ``mini_sandbox_allow_ipv4_subnet``, are accepted but match nothing in
  1.1.16: connections time out).
- ``minisandbox``: pyminisandbox without network (start-up benchmark).

The exit status is CMD's, except for the mini-sandbox kinds: their fork loses the child's
status and the original process exits 0, so callers judge CMD by its output.  Only the
stdlib (and pyminisandbox) is imported.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

GATEWAY = "10.0.2.2"
SANDBOX_ADDR = "10.0.2.100"
_READY_TIMEOUT = 10.0


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _slirp4netns(cmd: list[str]) -> int:
    _raise_nofile()
    own_ns = os.readlink("/proc/self/ns/net")
    with tempfile.TemporaryDirectory(prefix="bench-slirp-") as tmp:
        ready = os.path.join(tmp, "ready")
        # The child waits (bounded: 1000 x 10 ms) until the tap is configured.
        waiter = 'i=0; while [ ! -e "$0" ] && [ $i -lt 1000 ]; do sleep 0.01; i=$((i+1)); done; exec "$@"'
        child = subprocess.Popen(["unshare", "-Urn", "--fork", "sh", "-c", waiter, ready, *cmd])
        deadline = time.monotonic() + _READY_TIMEOUT
        # Join only once unshare has left our namespace, or slirp4netns would configure ours.
        while os.readlink(f"/proc/{child.pid}/ns/net") == own_ns:
            if time.monotonic() > deadline or child.poll() is not None:
                child.kill()
                sys.exit("sandboxes: unshare did not create a network namespace")
            time.sleep(0.002)
        r, w = os.pipe()
        slirp = subprocess.Popen(
            ["slirp4netns", "--configure", "--mtu=65520", "--disable-host-loopback",
             f"--ready-fd={w}", str(child.pid), "tap0"],
            pass_fds=(w,), stdout=subprocess.DEVNULL,
        )
        os.close(w)
        if os.read(r, 1) != b"1":
            child.kill()
            slirp.kill()
            sys.exit("sandboxes: slirp4netns did not become ready")
        os.close(r)
        open(ready, "w").close()
        try:
            return child.wait()
        finally:
            slirp.terminate()
            slirp.wait(timeout=10)


def _pasta(cmd: list[str], resolver: str) -> int:
    return subprocess.call([
        "pasta", "-f", "-q", "-4", "-i", "lo", "-I", "tap0", "-a", SANDBOX_ADDR, "-n", "24",
        "-g", GATEWAY, "-M", "02:00:00:00:00:01", "-D", resolver, "--config-net",
        "--no-map-gw", "-T", "none", "-U", "none", "--", *cmd,
    ])


def _minisandbox(cmd: list[str], tap: bool, ips: list[str]) -> int:
    # On a machine with /.dockerenv mini-sandbox silently does nothing unless told.
    os.environ["MINI_SANDBOX_DOCKER_PRIVILEGED"] = "1"
    if tap:
        from pyminisandbox import pyminitapbox as ms
    else:
        from pyminisandbox import pyminisandbox as ms
    if ms.mini_sandbox_setup_default() != 0:
        sys.exit(f"sandboxes: mini_sandbox_setup_default: {ms.mini_sandbox_get_last_error_msg()}")
    for ip in ips:
        if ms.mini_sandbox_allow_ipv4(ip) != 0:
            sys.exit(f"sandboxes: allow {ip}: {ms.mini_sandbox_get_last_error_msg()}")
    own_ns = os.readlink("/proc/self/ns/net")
    before = set(os.listdir("/tmp"))
    rc = ms.mini_sandbox_start()
    if rc == 0:
        # The sandboxed child: refuse to run unsandboxed, run CMD, exit with its status.
        if os.readlink("/proc/self/ns/net") == own_ns:
            print("sandboxes: mini-sandbox did not create a network namespace", file=sys.stderr)
            os._exit(125)
        try:
            status = subprocess.call(cmd)
        except OSError as exc:
            print(f"sandboxes: {cmd[0]}: {exc}", file=sys.stderr)
            status = 127
        sys.stdout.flush()
        os._exit(status)
    if rc == -1:
        # The original process, after the child ended (its status is lost): clean up what
        # mini-sandbox leaves in /tmp and stop here, outside the sandbox.
        _remove_new_tmp_files(before)
        os._exit(0)
    sys.exit(f"sandboxes: mini_sandbox_start: {rc} {ms.mini_sandbox_get_last_error_msg()}")


def _remove_new_tmp_files(before: set[str]) -> None:
    """Each mini-sandbox start leaves /tmp/<n>.rules and /tmp/temp_<n>/ behind."""
    for name in set(os.listdir("/tmp")) - before:
        if not (name.endswith(".rules") or name.startswith("temp_")):
            continue
        path = os.path.join("/tmp", name)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=("slirp4netns", "pasta", "minitapbox", "minisandbox"))
    parser.add_argument("--resolver", default="198.51.100.53")
    parser.add_argument("--allow-ip", action="append", default=[])
    parser.add_argument("cmd", nargs="+")
    args = parser.parse_args()
    if args.kind == "slirp4netns":
        sys.exit(_slirp4netns(args.cmd))
    if args.kind == "pasta":
        sys.exit(_pasta(args.cmd, args.resolver))
    _minisandbox(args.cmd, args.kind == "minitapbox", args.allow_ip)


if __name__ == "__main__":
    main()
