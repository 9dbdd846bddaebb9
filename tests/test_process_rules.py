"""Rules scoped to a program, and callbacks that see the process (issue 13 point 2)."""

import json
import textwrap

import pytest

from corral.errors import ConfigError
from corral.policy import ConnectRequest, DnsQuery, Policy, Process, Rule, decide_connect, decide_dns
from net_support import PY, corral
from world import ECHO_V4, HTTP_V4, PORT_ECHO

PIP = Process(pid=5, ppid=2, exe="/usr/bin/python3.11", argv=("python3", "/usr/bin/pip", "install", "x"),
              ancestry=("bash", "python3.11 pip"), ancestry_exe=("/usr/bin/bash", "/usr/bin/python3.11"))
CURL = Process(pid=9, ppid=8, exe="/usr/bin/curl", argv=("curl", "http://x"),
               ancestry=("bash", "python3.11 pip", "dash", "curl"),
               ancestry_exe=("/usr/bin/bash", "/usr/bin/python3.11", "/usr/bin/dash", "/usr/bin/curl"))


def req(process, dst="203.0.113.9", names=("pypi.org",)):
    return ConnectRequest(id=1, proto="tcp", src_ip="10.0.2.100", src_port=4000, dst_ip=dst, dst_port=443,
                          names=names, process=process)


@pytest.mark.parametrize("text, program, within", [
    ("pypi.org@pip", "pip", False),
    ("pypi.org:443/tcp@/usr/bin/pip", "/usr/bin/pip", False),
    ("*.pypi.org@within:pip", "pip", True),
    ("203.0.113.0/24@curl", "curl", False),
])
def test_scoped_rules_parse(text, program, within):
    rule = Rule.parse(text)
    assert (rule.scope.program, rule.scope.within) == (program, within)
    assert str(rule).endswith(str(rule.scope))


@pytest.mark.parametrize("text, problem", [
    ("pypi.org@", "no program after '@'"),
    ("pypi.org@bin/pip", "must be absolute"),
    ("pypi.org@pi*p", "may not contain"),
    ("pypi.org@a@b", "may not contain"),
    ("pypi.org@within:", "no program after '@'"),
    ("@pip", "the rule is empty"),
])
def test_bad_scopes_are_clear_errors(text, problem):
    with pytest.raises(ConfigError, match=problem):
        Rule.parse(text)


def test_pip_may_reach_the_index_a_curl_it_started_may_not():
    policy = Policy(allow=["pypi.org@pip"])
    assert decide_connect(policy, req(PIP)).allowed
    assert not decide_connect(policy, req(CURL)).allowed
    assert not decide_connect(policy, req(None)).allowed  # unknown: a scoped allow never opens it
    within = Policy(allow=["pypi.org@within:pip"])
    assert decide_connect(within, req(CURL)).allowed
    full = Policy(allow=["pypi.org@/usr/bin/pip"])
    assert decide_connect(full, req(PIP)).allowed and not decide_connect(full, req(CURL)).allowed


def test_scoped_allow_needs_every_holder_of_the_socket_in_scope():
    """A process must not borrow pip's rule by sharing its socket with pip."""
    policy = Policy(allow=["pypi.org@pip"])
    assert not decide_connect(policy, req(PIP.with_others((CURL,)))).allowed
    assert not decide_connect(policy, req(CURL.with_others((PIP,)))).allowed


def test_scoped_deny_applies_to_any_holder_and_to_unknown_processes():
    policy = Policy(mode="audit", deny=["pypi.org@curl"])
    assert not decide_connect(policy, req(CURL)).allowed
    assert not decide_connect(policy, req(PIP.with_others((CURL,)))).allowed
    assert not decide_connect(policy, req(None)).allowed
    assert decide_connect(policy, req(PIP)).allowed


def test_scoped_rules_decide_dns_by_the_asking_process():
    policy = Policy(allow=["pypi.org@pip"])
    q = DnsQuery(id=1, qname="pypi.org", qtype="A", process=PIP)
    assert decide_dns(policy, q).allowed
    assert not decide_dns(policy, DnsQuery(id=1, qname="pypi.org", qtype="A", process=CURL)).allowed


# -- in the test world ------------------------------------------------------------

def script(tmp_path, name, code):
    path = tmp_path / name
    path.write_text(textwrap.dedent(code))
    return str(path)


@pytest.mark.network
def test_scoped_rule_in_a_sandbox_pip_yes_its_curl_no(world, tmp_path):
    pip = script(tmp_path, "pip", f"""
        import socket, subprocess, sys
        s = socket.create_connection(("www.corral.test", 80), timeout=5)
        s.sendall(b"GET / HTTP/1.0\\r\\nHost: www.corral.test\\r\\n\\r\\n")
        print("pip:", s.recv(15).decode(), flush=True)
        rc = subprocess.call(["sh", "-c", "curl -sS -m 5 -o /dev/null http://{HTTP_V4}/"])
        print("curl:", rc, flush=True)
    """)
    out = corral(world, tmp_path, ["--ro", str(tmp_path), "--allow", "www.corral.test@pip"], [PY, pip])
    assert "200 OK" in out.proc.stdout, out.dump()
    assert "curl: 0" not in out.proc.stdout, out.dump()
    ok = out.connect(dst_ip=HTTP_V4, verdict="allow")
    assert ok["rule"] == "www.corral.test@pip" and ok["process"]["ancestry"][-1].endswith(" pip")
    denied = out.connect(dst_ip=HTTP_V4, verdict="deny")
    assert denied["process"]["ancestry"][-1] == "curl"


@pytest.mark.network
def test_on_connect_and_on_dns_see_the_process(world, tmp_path):
    seen = tmp_path / "seen.jsonl"
    policy = script(tmp_path, "policy.py", f"""
        import json
        import corral

        def _log(kind, p):
            with open({str(seen)!r}, "a") as f:
                f.write(json.dumps([kind, p.pid if p else None, list(p.ancestry) if p else None]) + "\\n")

        async def on_connect(req):
            _log("connect", req.process)
            return corral.ALLOW if req.process and req.process.ancestry[-1].endswith("fetch.py") else corral.deny("no")

        async def on_dns(query):
            _log("dns", query.process)
            return corral.ALLOW
    """)
    prog = script(tmp_path, "fetch.py", f"""
        import socket
        socket.getaddrinfo("echo.corral.test", 7, socket.AF_INET, socket.SOCK_STREAM)
        s = socket.create_connection(({ECHO_V4!r}, {PORT_ECHO}), timeout=5)
        s.sendall(b"x"); print(s.recv(1).decode())
    """)
    out = corral(world, tmp_path, ["--ro", str(tmp_path), "--policy", policy], [PY, prog])
    assert out.proc.returncode == 0 and out.proc.stdout.strip() == "x", out.dump()
    lines = [json.loads(x) for x in seen.read_text().splitlines()]
    assert {kind for kind, _, _ in lines} == {"connect", "dns"}
    for _kind, pid, ancestry in lines:
        assert pid and ancestry[-1].endswith("fetch.py")


@pytest.mark.network
def test_attack_sharing_a_socket_with_pip_does_not_borrow_its_scope(world, tmp_path):
    """evil.py hands a copy of its socket to a sleeping `pip` child, then connects
    itself: the flow is held by both, so `@pip` does not cover it."""
    pip = script(tmp_path, "pip", "import time; time.sleep(5)\n")
    evil = script(tmp_path, "evil.py", f"""
        import socket, subprocess, time
        s = socket.socket()
        s.set_inheritable(True)
        child = subprocess.Popen([{PY!r}, {pip!r}], pass_fds=[s.fileno()])
        time.sleep(0.5)
        s.settimeout(5)
        try:
            s.connect(({ECHO_V4!r}, {PORT_ECHO}))
            print("connected")
        except OSError as exc:
            print("refused", exc.errno)
        child.kill()
    """)
    out = corral(world, tmp_path, ["--ro", str(tmp_path), "--allow", f"{ECHO_V4}@pip"], [PY, evil])
    assert out.proc.stdout.startswith("refused"), out.dump()
    ev = out.connect(dst_ip=ECHO_V4)
    assert ev["verdict"] == "deny"
    assert ev["process"]["ancestry"][-1].endswith("evil.py") or any(
        o["ancestry"][-1].endswith("evil.py") for o in ev["process"]["others"])


@pytest.mark.network
def test_attack_exec_after_a_lookup_does_not_keep_pips_identity(world, tmp_path):
    """`pip` connects (allowed by @pip), then exec()s evil.py in the same pid: the
    second flow is evil.py's, not pip's (no identity cached across an exec)."""
    evil = script(tmp_path, "evil.py", f"""
        import socket
        try:
            socket.create_connection(({ECHO_V4!r}, {PORT_ECHO}), timeout=5).close()
            print("evil connected")
        except OSError as exc:
            print("evil refused", exc.errno)
    """)
    pip = script(tmp_path, "pip", f"""
        import os, socket
        socket.create_connection(({ECHO_V4!r}, {PORT_ECHO}), timeout=5).close()
        print("pip connected", flush=True)
        os.execv({PY!r}, [{PY!r}, {evil!r}])
    """)
    out = corral(world, tmp_path, ["--ro", str(tmp_path), "--allow", f"{ECHO_V4}@pip"], [PY, pip])
    assert out.proc.stdout.splitlines() == ["pip connected", "evil refused 111"], out.dump()
    first, second = out.connects(dst_ip=ECHO_V4)
    assert first["process"]["pid"] == second["process"]["pid"]
    assert second["process"]["ancestry"][-1].endswith("evil.py") and second["verdict"] == "deny"
