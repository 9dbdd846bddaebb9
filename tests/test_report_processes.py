"""The audit report per process (issue 13 point 3), from synthetic events."""

import jsonschema

from corral.events.report import build_report, load_schema, render_allowlist, render_text
from corral.policy import load_allow_file


def proc(pid, *chain, exe=None, argv=None, pids=None):
    """A process dict as events carry it; ``chain`` = ancestry labels, ending in this one."""
    pids = pids or list(range(2, 2 + len(chain) - 1)) + [pid]
    last = chain[-1].split(" ")
    exe = exe or ("/usr/bin/" + last[0])
    argv = argv or ([exe, "/pkg/" + last[1]] if len(last) > 1 else [exe])
    return {"pid": pid, "ppid": pids[-2] if len(pids) > 1 else 1, "exe": exe, "argv": argv, "cwd": "/w",
            "ancestry": list(chain), "ancestry_exe": ["/usr/bin/" + c.split(" ")[0] for c in chain],
            "ancestry_pids": pids}


PIP = proc(3, "dash", "python3 pip", pids=[2, 3])
CURL = proc(5, "dash", "python3 pip", "dash", "curl", pids=[2, 3, 4, 5])
STRANGER = proc(9, "dash", "node evil.js", pids=[2, 9])


def dns(qname, ip, process, ts=1.0):
    return {"type": "dns", "query_id": 1, "qname": qname, "qtype": "A", "transport": "udp", "verdict": "allow",
            "rule": "audit-allow", "rcode": "NOERROR", "upstream": "198.51.100.53:53", "ts": ts,
            "answers": [{"name": qname, "type": "A", "value": ip, "ttl": 60}], "process": process}


def conn(fid, ip, port, names, process, ts=2.0, unknown=None):
    return {"type": "connect", "id": fid, "proto": "tcp", "src_ip": "10.0.2.100", "src_port": 40000 + fid,
            "dst_ip": ip, "dst_port": port, "names": names, "verdict": "allow", "rule": "audit-allow", "ts": ts,
            "process": process, "process_unknown": unknown}


def events():
    return [
        {"type": "sandbox_start", "argv": ["pip", "install", "x"], "pid": 2, "mode": "audit", "ts": 0.0},
        dns("pypi.org", "203.0.113.1", PIP),
        conn(1, "203.0.113.1", 443, ["pypi.org"], PIP),
        conn(2, "203.0.113.1", 443, ["pypi.org"], CURL),  # pip resolved it: same tree
        conn(3, "203.0.113.1", 80, ["pypi.org"], STRANGER),  # another tree: raw-ip
        conn(4, "203.0.113.2", 443, [], None, unknown="the socket was closed before it could be looked up"),
        {"type": "sandbox_exit", "exit_code": 0, "ts": 3.0},
    ]


def test_report_lists_every_process_with_its_flows_and_queries():
    report = build_report(events(), generated=1.0, suggest_scope="program")
    jsonschema.validate(report, load_schema())
    by_pid = {p["pid"]: p for p in report["processes"]}
    assert set(by_pid) == {3, 5, 9, None}
    assert [c["id"] for c in by_pid[3]["connections"]] == [1] and by_pid[3]["queries_total"] == 1
    assert by_pid[5]["program"] == "dash > python3 pip > dash > curl"
    assert by_pid[None]["unknown_reasons"] == ["the socket was closed before it could be looked up"]
    assert report["dns"][0]["pid"] == 3
    pypi = next(d for d in report["destinations"] if d["name"] == "pypi.org")
    assert len(pypi["programs"]) == 3


def test_raw_ip_is_judged_per_process_tree():
    flags = [f for f in build_report(events(), generated=1.0)["flags"] if f["kind"] == "raw-ip"]
    subjects = {f["subject"]: f["detail"] for f in flags}
    assert "tcp 203.0.113.1:80" in subjects  # the stranger used an address pip resolved
    assert "node evil.js" in subjects["tcp 203.0.113.1:80"] and "python3 pip" in subjects["tcp 203.0.113.1:80"]
    assert "tcp 203.0.113.1:443" not in subjects  # pip, and the curl pip started
    assert "tcp 203.0.113.2:443" in subjects  # never resolved at all


def test_audit_text_groups_destinations_by_process():
    text = render_text(build_report(events(), generated=1.0))
    section = text.split("BY PROCESS\n", 1)[1]
    assert "dash > python3 pip [pid 3]: 1 conn; 1 DNS queries -> pypi.org" in section
    assert "dash > node evil.js [pid 9]: 1 conn -> pypi.org" in section
    assert "(unknown process: the socket was closed" in section


def test_suggest_scope_program_scopes_each_rule(tmp_path):
    report = build_report(events()[:3] + events()[-1:], generated=1.0, suggest_scope="program")
    rules = [r["rule"] for r in report["suggested_allowlist"]["rules"]]
    assert rules == ["pypi.org:443/tcp@pip"]
    path = tmp_path / "allow.txt"
    path.write_text(render_allowlist(report))
    assert [str(r.scope) for r in load_allow_file(path)] == ["@pip"]


def test_suggest_scope_hostile_program_name_cannot_inject_a_rule(tmp_path):
    """A script named "x\\n203.0.113.0" (or with '#', '@', spaces) must not become a
    second line of the allowlist: the rule stays unscoped and a note says why."""
    for name in ("x\n203.0.113.0", "x #", "a@b", "a b", "x\r*.evil.example", "x\x1b[2J"):
        evil = proc(7, "dash", "python3 p", argv=["/usr/bin/python3", "/pkg/" + name])
        evs = [dns("pypi.org", "203.0.113.1", evil), conn(1, "203.0.113.1", 443, ["pypi.org"], evil)]
        report = build_report(evs, generated=1.0, suggest_scope="program")
        path = tmp_path / "allow.txt"
        path.write_text(render_allowlist(report))
        assert [r.label for r in load_allow_file(path)] == ["pypi.org:443/tcp"], name
        assert any("no program scope" in n for n in report["suggested_allowlist"]["notes"])
