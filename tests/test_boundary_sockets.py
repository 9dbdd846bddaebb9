"""Issue 9, class 4: no mode lets the command connect() to a unix socket of the
host, unless the user names it with --allow-socket.

Run as the unprivileged user, through the CLI.  Host listeners live in
throw-away directories under the user's home and /var/tmp (host directories
the sandbox sees), and inside the working directory (a writable bind).
"""

import os
import shutil
import socket
import sys
import tempfile

import pytest

from conftest import corral

pytestmark = pytest.mark.namespaces

PY = os.path.realpath(sys.executable)  # under /usr: visible with --ro /usr in hermetic mode
PROBE = r"""
import socket, sys
for path in sys.argv[1:]:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path.replace("@", "\0", 1) if path.startswith("@") else path)
        print("connected", path)
    except OSError as e:
        print("refused", path, e.errno)
"""


class Host:
    """Listening sockets under $HOME, under /var/tmp and in the cwd."""

    def __init__(self):
        self.home_dir = tempfile.mkdtemp(prefix="corral-sock-test-", dir=os.path.expanduser("~"))
        self.var_dir = tempfile.mkdtemp(prefix="corral-sock-test-", dir="/var/tmp")
        self.cwd = os.path.join(self.var_dir, "proj")
        os.makedirs(os.path.join(self.cwd, "run"))
        self.sockets = {
            "home": os.path.join(self.home_dir, "agent.sock"),
            "var_tmp": os.path.join(self.var_dir, "agent.sock"),
            "cwd": os.path.join(self.cwd, "run", "agent.sock"),
        }
        self.servers = []
        for path in self.sockets.values():
            self.listen(path)

    def listen(self, address):
        server = socket.socket(socket.AF_UNIX)
        server.bind(address)
        server.listen(8)
        self.servers.append(server)
        return server

    def probe(self, *options, paths=None, env=None):
        paths = list(self.sockets.values()) if paths is None else paths
        result = corral("run", "--net", "none", *options, "--", PY, "-I", "-c", PROBE, *paths,
                        cwd=self.cwd, env=env)
        assert result.returncode == 0, result.stderr.decode()
        return {line.split()[1]: line.split()[0] for line in result.stdout.decode().splitlines()}

    def close(self):
        for server in self.servers:
            server.close()
        shutil.rmtree(self.home_dir, ignore_errors=True)
        shutil.rmtree(self.var_dir, ignore_errors=True)


@pytest.fixture
def host():
    h = Host()
    yield h
    h.close()


HOME = os.path.expanduser("~")
MODES = {
    "default": [],
    "readonly": ["--mode", "readonly"],
    "hermetic-ro-home": ["--mode", "hermetic", "--ro", "/usr", "--ro", HOME],
    "hermetic-ro-var-tmp": ["--mode", "hermetic", "--ro", "/usr", "--ro", "/var/tmp"],
    "default-ro-home": ["--ro", HOME],
    "default-rw-var-tmp": ["--rw", "/var/tmp"],
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_host_agent_socket_is_unreachable_in_every_mode(host, mode):
    verdicts = host.probe(*MODES[mode])
    assert verdicts == {path: "refused" for path in host.sockets.values()}


def test_socket_bound_by_relative_path_in_cwd_is_unreachable(host):
    # /proc/net/unix shows such a socket by the relative path it was bound to
    here = os.getcwd()
    os.chdir(host.cwd)
    try:
        host.listen("rel.sock")
    finally:
        os.chdir(here)
    path = os.path.join(host.cwd, "rel.sock")
    assert host.probe("--mode", "readonly", paths=[path]) == {path: "refused"}


def test_allow_socket_makes_only_the_named_socket_reachable(host):
    named = host.sockets["home"]
    for options in ([], ["--mode", "readonly"], ["--mode", "hermetic", "--ro", "/usr"]):
        verdicts = host.probe("--allow-socket", named, *options)
        assert verdicts.pop(named) == "connected", options
        assert set(verdicts.values()) == {"refused"}, options


def test_allow_socket_inside_the_working_directory(host):
    named = host.sockets["cwd"]
    verdicts = host.probe("--mode", "readonly", "--allow-socket", named)
    assert verdicts.pop(named) == "connected"
    assert set(verdicts.values()) == {"refused"}


def test_allow_socket_that_is_not_a_socket_is_a_usage_error(host):
    result = corral("run", "--net", "none", "--allow-socket", host.cwd, "--", "true", cwd=host.cwd)
    assert result.returncode == 2
    assert b"not a socket" in result.stderr and b"\n" not in result.stderr.rstrip()


@pytest.mark.parametrize("action", ["ro", "rw", "overlay"])
def test_naming_a_socket_with_a_path_option_is_refused(host, action):
    result = corral("run", "--net", "none", "--" + action, host.sockets["home"], "--", "true",
                    cwd=host.cwd)
    assert result.returncode == 2
    assert b"--allow-socket" in result.stderr


def test_ssh_auth_sock_stays_hidden(host):
    agent = host.sockets["home"]
    env = dict(os.environ, SSH_AUTH_SOCK=agent)
    for options in ([], ["--mode", "readonly"]):
        assert host.probe(*options, paths=[agent], env=env) == {agent: "refused"}


@pytest.mark.parametrize("net", ["none", "filtered"])
def test_host_abstract_socket_is_unreachable(host, net):
    name = "@corral-test-abstract-%d" % os.getpid()
    host.listen("\0" + name[1:])
    result = corral("run", "--net", net, "--", PY, "-I", "-c", PROBE, name, cwd=host.cwd)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().split()[0] == "refused"


def _landlock_abi():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(444, None, 0, 1)  # landlock_create_ruleset(NULL, 0, VERSION)


@pytest.mark.skipif(_landlock_abi() < 6, reason="needs Landlock ABI 6 (abstract socket scoping)")
def test_host_abstract_socket_is_unreachable_with_net_host_via_landlock(host):
    name = "@corral-test-abstract-host-%d" % os.getpid()
    host.listen("\0" + name[1:])
    result = corral("run", "--net", "host", "--", PY, "-I", "-c", PROBE, name, cwd=host.cwd)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().split()[0] == "refused"
    # the command's own abstract sockets still work inside
    own = ("import socket, os; name = '\\0corral-own-%d' % os.getpid(); "
           "a = socket.socket(socket.AF_UNIX); a.bind(name); a.listen(1); "
           "b = socket.socket(socket.AF_UNIX); b.connect(name); print('ok')")
    result = corral("run", "--net", "host", "--", PY, "-I", "-c", own, cwd=host.cwd)
    assert result.stdout == b"ok\n", result.stderr.decode()


def test_doctor_reports_which_socket_layers_are_active():
    result = corral("doctor", text=True)
    (line,) = [line for line in result.stdout.splitlines() if "unix sockets" in line]
    assert "host sockets: the mount layer" in line
    if _landlock_abi() >= 6:
        assert line.startswith("ok") and "Landlock scope (ABI %d)" % _landlock_abi() in line


def test_doctor_warns_when_landlock_cannot_scope_abstract_sockets(monkeypatch):
    from corral import doctor
    from corral.spawn import harden

    monkeypatch.setattr(harden, "landlock_abi", lambda: (0, "not built into this kernel"))
    (check,) = [c for c in doctor.checks() if c.name == "unix sockets"]
    assert check.status == "warn"
    assert "network namespace only" in check.detail and "--net host" in check.detail


def test_masked_socket_in_cwd_cannot_be_moved_linked_or_unmasked(host):
    sock = host.sockets["cwd"]
    script = ("rm -f run/agent.sock 2>/dev/null; mv run/agent.sock run/moved 2>/dev/null; "
              "ln run/agent.sock run/hl 2>/dev/null; mv run r2 2>/dev/null; "
              "umount run/agent.sock 2>/dev/null; "
              "%s -I -c '%s' run/agent.sock run/moved run/hl r2/agent.sock" % (PY, PROBE))
    result = corral("run", "--net", "none", "--", "sh", "-c", script, cwd=host.cwd)
    assert result.returncode == 0, result.stderr.decode()
    assert "connected" not in result.stdout.decode()
    assert os.path.exists(sock) or os.path.exists(os.path.join(host.cwd, "r2", "agent.sock"))


def test_overlay_that_falls_back_to_a_bind_masks_the_sockets_it_carries(tmp_path):
    from test_fs_mounts import Box, ok

    box = Box("/var/tmp", tmp_path)
    try:
        data = box.path("data")
        os.mkdir(data)
        sock = os.path.join(data, "agent.sock")
        server = socket.socket(socket.AF_UNIX)
        server.bind(sock)
        server.listen(2)
        plan = box.plan().to_json()
        plan.insert(-1, {"op": "overlay", "path": data, "upper": "/proc/nope/upper",
                         "work": "/proc/nope/work", "sockets": [sock]})
        out = ok(box.run('"%s" -I -c \'%s\' "%s"' % (PY, PROBE, sock), plan=plan))
        assert out.startswith("refused"), out
        assert data in box.manifest()["fallbacks"]
        server.close()
    finally:
        shutil.rmtree(box.home, ignore_errors=True)
