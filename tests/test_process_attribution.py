"""Every connect and DNS event names the process inside (issue 13 point 1).

The sandboxed programs here are small Python scripts (written to a temp dir and run by
path, so their script name shows in the ancestry); the tests read ``process`` off the
``--events`` records.
"""

import json
import os
import subprocess
import textwrap

import pytest

from corral.net import owner
from net_support import PY, corral
from world import ECHO_V4, ECHO_V6, HTTP_V4, PORT_ECHO

pytestmark = pytest.mark.network


def run(world, tmp_path, options, argv, **kw):
    """`corral run` with the test's temp dir visible (read-only) inside."""
    return corral(world, tmp_path, ["--ro", str(tmp_path), *options], argv, **kw)


def script(tmp_path, name, code):
    path = tmp_path / name
    path.write_text(textwrap.dedent(code))
    path.chmod(0o755)
    return str(path)


CONNECT = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
s.sendall(b"x")
s.recv(10)
s.close()
"""


def test_connect_event_names_the_process_and_its_ancestry(world, tmp_path):
    child = script(tmp_path, "fetch.py", CONNECT)
    parent = script(tmp_path, "install.py", f"""
        import subprocess, sys
        sys.exit(subprocess.call([{PY!r}, {child!r}, {ECHO_V4!r}, "{PORT_ECHO}"]))
    """)
    out = run(world, tmp_path, ["--allow", ECHO_V4], ["sh", "-c", f"{PY} {parent}"])
    assert out.proc.returncode == 0, out.dump()
    ev = out.connect(dst_ip=ECHO_V4)
    proc = ev["process"]
    assert proc is not None, out.dump()
    assert proc["argv"] == [PY, child, ECHO_V4, str(PORT_ECHO)]
    assert proc["exe"].rsplit("/", 1)[-1].startswith("python")
    assert proc["ancestry"][0] in ("sh", "dash")
    print(json.dumps(ev))
    assert [a.split(" ")[-1] for a in proc["ancestry"][1:]] == ["install.py", "fetch.py"]
    assert proc["pid"] > 1 and proc["ppid"] > 1
    assert proc["cwd"]


TAGGED = """
import json, os, socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
# one write(2) of less than PIPE_BUF: lines of concurrent writers never interleave
os.write(1, (json.dumps({"tag": sys.argv[3], "port": s.getsockname()[1]}) + "\\n").encode())
s.sendall(b"x")
s.recv(10)
s.close()
"""


def test_many_processes_connecting_at_once_each_get_their_own(world, tmp_path):
    child = script(tmp_path, "tagged.py", TAGGED)
    parent = script(tmp_path, "fan.py", f"""
        import subprocess
        procs = [subprocess.Popen([{PY!r}, {child!r}, {ECHO_V4!r}, "{PORT_ECHO}", "t%d" % i])
                 for i in range(12)]
        for p in procs:
            p.wait()
    """)
    out = run(world, tmp_path, ["--allow", ECHO_V4], [PY, parent])
    assert out.proc.returncode == 0, out.dump()
    tags = {line["port"]: line["tag"] for line in map(json.loads, out.proc.stdout.splitlines())}
    assert len(tags) == 12
    for ev in out.connects(dst_ip=ECHO_V4):
        assert ev["process"] and ev["process"]["argv"][-1] == tags[ev["src_port"]], out.dump()
    assert len({ev["process"]["pid"] for ev in out.connects(dst_ip=ECHO_V4)}) == 12, out.dump()


def test_threads_of_one_process_name_that_process(world, tmp_path):
    prog = script(tmp_path, "threads.py", f"""
        import json, os, socket, threading
        def go():
            s = socket.create_connection(({ECHO_V4!r}, {PORT_ECHO}), timeout=5)
            s.sendall(b"x"); s.recv(10); s.close()
        ts = [threading.Thread(target=go) for _ in range(8)]
        [t.start() for t in ts]
        [t.join() for t in ts]
        print(json.dumps({{"pid": os.getpid()}}))
    """)
    out = run(world, tmp_path, ["--allow", ECHO_V4], [PY, prog])
    assert out.proc.returncode == 0, out.dump()
    pid = json.loads(out.proc.stdout.splitlines()[-1])["pid"]
    events = out.connects(dst_ip=ECHO_V4)
    assert len(events) == 8
    assert {ev["process"]["pid"] for ev in events} == {pid}


PASS_SOCKET = f"""
import os, socket, subprocess, sys
s = socket.socket()
s.set_inheritable(True)
child = subprocess.Popen([{PY!r}, "-c", '''
import os, socket, sys
s = socket.socket(fileno=int(sys.argv[1]))
s.settimeout(5)
s.connect((sys.argv[2], int(sys.argv[3])))
s.sendall(b"x"); s.recv(10)
print(os.getpid(), flush=True)
''', str(s.fileno()), {ECHO_V4!r}, "{PORT_ECHO}"], pass_fds=[s.fileno()])
if sys.argv[1] == "close":
    s.close()
child.wait()
print(os.getpid(), flush=True)
"""


def test_socket_passed_to_a_child_names_the_child(world, tmp_path):
    prog = script(tmp_path, "passer.py", PASS_SOCKET)
    out = run(world, tmp_path, ["--allow", ECHO_V4], [PY, prog, "close"])
    assert out.proc.returncode == 0, out.dump()
    child_pid, parent_pid = map(int, out.proc.stdout.split())
    proc = out.connect(dst_ip=ECHO_V4)["process"]
    assert proc["pid"] == child_pid and proc["ppid"] == parent_pid
    assert "others" not in proc


def test_socket_still_held_by_the_parent_names_both(world, tmp_path):
    prog = script(tmp_path, "passer.py", PASS_SOCKET)
    out = run(world, tmp_path, ["--allow", ECHO_V4], [PY, prog, "keep"])
    assert out.proc.returncode == 0, out.dump()
    child_pid, parent_pid = map(int, out.proc.stdout.split())
    proc = out.connect(dst_ip=ECHO_V4)["process"]
    assert proc["pid"] == child_pid
    assert [o["pid"] for o in proc["others"]] == [parent_pid]


def test_short_lived_udp_sender_is_named_or_says_why(world, tmp_path):
    """A sender that closes its socket right after sendto() may be gone before the
    lookup: then the event says so; it is never attributed to another process."""
    prog = script(tmp_path, "burst.py", f"""
        import socket, sys
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.sendto(b"x", ({ECHO_V4!r}, {PORT_ECHO}))
        if sys.argv[1] == "wait":
            s.settimeout(5); s.recv(10)
    """)
    for mode in ("exit", "wait"):
        out = run(world, tmp_path, ["--allow", ECHO_V4], [PY, prog, mode])
        assert out.proc.returncode == 0, out.dump()
        ev = out.connect(dst_ip=ECHO_V4, proto="udp")
        if ev["process"] is None:
            assert mode == "exit" and ev["process_unknown"] in (owner.GONE, owner.ORPHAN), out.dump()
        else:
            assert ev["process"]["argv"][1:] == [prog, mode], out.dump()


def test_dns_query_names_the_process(world, tmp_path):
    prog = script(tmp_path, "resolve.py", """
        import socket
        socket.getaddrinfo("www.corral.test", 80, socket.AF_INET, socket.SOCK_STREAM)
    """)
    out = run(world, tmp_path, ["--allow", "www.corral.test"], ["sh", "-c", f"{PY} {prog}"])
    assert out.proc.returncode == 0, out.dump()
    queries = out.dns(qname="www.corral.test")
    assert queries, out.dump()
    for q in queries:
        assert q["process"]["argv"] == [PY, prog], out.dump()
        assert q["process"]["ancestry"][-1] == "%s resolve.py" % q["process"]["exe"].rsplit("/", 1)[-1]


def test_icmp_echo_has_no_process_and_says_why(world, tmp_path):
    prog = script(tmp_path, "ping.py", f"""
        import socket
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
        s.settimeout(3)
        s.sendto(b"\\x08\\x00\\x00\\x00\\x00\\x01\\x00\\x01ping", ({ECHO_V4!r}, 0))
        s.recv(100)
    """)
    out = run(world, tmp_path, ["--allow", ECHO_V4], [PY, prog])
    ev = out.connect(dst_ip=ECHO_V4, proto="icmp")
    assert ev["process"] is None and ev["process_unknown"] == owner.ICMP


def test_audit_report_groups_by_process_and_flags_an_address_another_tree_resolved(world, tmp_path):
    """resolve.py looks www.corral.test up; its sibling connect.py dials the address it
    printed: the report names both processes, and connect.py's flow is raw-ip."""
    resolve = script(tmp_path, "resolve.py", """
        import socket
        print(socket.getaddrinfo("www.corral.test", 80, socket.AF_INET, socket.SOCK_STREAM)[0][4][0])
    """)
    dial = script(tmp_path, "dial.py", """
        import socket, sys
        socket.create_connection((sys.stdin.read().strip(), 80), timeout=5).close()
    """)
    report = tmp_path / "report.json"
    proc = world.run([PY, "-m", "corral", "audit", "--ro", str(tmp_path), "--report", str(report), "--",
                      "sh", "-c", f"{PY} {resolve} | {PY} {dial}"],
                     capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(report.read_text())
    programs = {p["program"].rsplit(" ", 1)[-1]: p for p in data["processes"]}
    assert programs["resolve.py"]["queries_total"] >= 1 and programs["resolve.py"]["connections_total"] == 0
    assert programs["dial.py"]["connections"][0]["dst_ip"] == HTTP_V4
    raw = [f for f in data["flags"] if f["kind"] == "raw-ip" and f["subject"] == f"tcp {HTTP_V4}:80"]
    assert raw and "dial.py" in raw[0]["detail"] and "resolve.py" in raw[0]["detail"], data["flags"]
    assert "BY PROCESS" in proc.stderr and "dial.py [pid" in proc.stderr


def test_ipv6_and_dual_stack_sockets_are_named(world, tmp_path):
    """An AF_INET6 socket to a v6 address, and one dialing a v4 address as ::ffff:a.b.c.d."""
    prog = script(tmp_path, "six.py", f"""
        import socket
        for host in ({ECHO_V6!r}, "::ffff:{ECHO_V4}"):
            s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            s.settimeout(5)
            s.connect((host, {PORT_ECHO}))
            s.sendall(b"x"); s.recv(1); s.close()
    """)
    out = run(world, tmp_path, ["--allow", ECHO_V4, "--allow", ECHO_V6], [PY, prog])
    assert out.proc.returncode == 0, out.dump()
    for dst in (ECHO_V6, ECHO_V4):
        assert out.connect(dst_ip=dst)["process"]["argv"] == [PY, prog], out.dump()


def test_no_attribution_leaves_the_process_out_and_says_why(world, tmp_path):
    child = script(tmp_path, "fetch.py", CONNECT)
    out = run(world, tmp_path, ["--allow", ECHO_V4, "--no-attribution"],
              [PY, child, ECHO_V4, str(PORT_ECHO)])
    assert out.proc.returncode == 0, out.dump()
    ev = out.connect(dst_ip=ECHO_V4)
    assert ev["process"] is None and ev["process_unknown"] == owner.OFF, out.dump()


def test_no_attribution_with_a_rule_scoped_to_a_program_is_refused(world, tmp_path):
    # A scoped deny would never match without the process: refusing the pair fails closed.
    out = run(world, tmp_path, ["--deny", f"{ECHO_V4}@curl", "--no-attribution"], ["true"])
    assert out.proc.returncode == 2, out.dump()
    assert "needs process attribution" in out.proc.stderr and "--no-attribution" in out.proc.stderr


CROWD = """
import os, socket, sys, time
s = socket.socket()
kids = []
for _ in range(int(sys.argv[3])):
    pid = os.fork()
    if pid == 0:
        time.sleep(3)  # holds the inherited socket while the parent connects
        os._exit(0)
    kids.append(pid)
s.settimeout(5)
s.connect((sys.argv[1], int(sys.argv[2])))
s.sendall(b"x")
s.recv(10)
for pid in kids:
    os.kill(pid, 9)
"""


@pytest.mark.parametrize("option", [[], ["--allow", f"{ECHO_V4}@python3"]])  # plain, and exact mode
def test_a_socket_held_by_many_processes_names_every_one(world, tmp_path, option):
    # More holders than the first pass has room for: none may be left out (a scoped
    # allow needs every holder in scope).
    prog = script(tmp_path, "crowd.py", CROWD)
    out = run(world, tmp_path, ["--allow", ECHO_V4, *option], [PY, prog, ECHO_V4, str(PORT_ECHO), "20"])
    assert out.proc.returncode == 0, out.dump()
    proc = out.connect(dst_ip=ECHO_V4)["process"]
    assert 1 + len(proc["others"]) == 21, out.dump()


def test_a_kept_proc_fd_of_an_ended_process_does_not_hide_the_process_now_at_its_pid():
    # Owners keeps an fd of /proc/PID per process; once that process has ended, the pid
    # the walk finds may be another process's: it is read, not reported unknown.
    gone = subprocess.Popen(["true"])
    stale = os.open("/proc/%d" % gone.pid, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    gone.wait()
    owners = owner.Owners(None, lambda: None)
    owners._dirs[os.getpid()] = stale  # as if kept for an earlier process with our pid
    try:
        nspid, exe, argv, _cwd = owners._read_static(os.getpid())
        assert exe == os.readlink("/proc/self/exe") and argv and nspid > 0
    finally:
        owners.close()
