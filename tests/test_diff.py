"""`corral diff OLD.json NEW.json` and `corral audit --baseline` (issue 13 point 4)."""

import json

from hypothesis import given
from hypothesis import strategies as st

from corral.events.diff import CATEGORIES, diff_reports, render_diff
from corral.events.report import build_report


def proc(pid, program):
    return {"pid": pid, "ppid": 1, "exe": "/usr/bin/" + program, "argv": [program], "cwd": "/",
            "ancestry": ["sh", program], "ancestry_exe": ["/bin/sh", "/usr/bin/" + program],
            "ancestry_pids": [2, pid]}


def connect(fid, ip, port, proto, name, process):
    return {"type": "connect", "id": fid, "proto": proto, "src_ip": "10.0.2.100", "src_port": 1000 + fid,
            "dst_ip": ip, "dst_port": port, "names": [name] if name else [], "verdict": "allow",
            "rule": "audit-allow", "ts": float(fid), "process": process}


def query(name, ip, process):
    return {"type": "dns", "query_id": 1, "qname": name, "qtype": "A", "transport": "udp", "verdict": "allow",
            "rule": "audit-allow", "rcode": "NOERROR", "ts": 0.5, "process": process,
            "answers": [{"name": name, "type": "A", "value": ip, "ttl": 60}]}


def files(*changes):
    return {"changes": [{"path": p, "change": c, "kind": "file", "size": 1, "host_size": None, "mode": "0644",
                         "executable": False, "link_target": None} for p, c in changes]}


names = st.sampled_from(["a.test", "b.test", "c.test", None])
flows = st.lists(st.tuples(st.integers(1, 3), st.sampled_from([80, 443, 53]), st.sampled_from(["tcp", "udp"]),
                           names, st.sampled_from(["curl", "pip", "node"])), max_size=8)
paths = st.lists(st.tuples(st.sampled_from(["/h/.bashrc", "/h/a", "/h/b"]),
                           st.sampled_from(["created", "modified"])), max_size=3, unique_by=lambda t: t[0])


def events_of(spec, base=0):
    evs = []
    for i, (host, port, proto, name, program) in enumerate(spec, base + 1):
        ip = f"203.0.113.{host}"
        p = proc({"curl": 10, "pip": 11, "node": 12, "evil": 13}[program], program)
        if name:
            evs.append(query(name, ip, p))
        evs.append(connect(i, ip, port, proto, name, p))
    return evs


@given(flows, paths)
def test_diff_of_a_report_with_itself_is_empty(spec, changed):
    report = build_report(events_of(spec), changes=files(*changed), generated=1.0)
    d = diff_reports(report, report)
    assert d["count"] == 0 and all(d["added"][c] == [] for c in CATEGORIES)
    assert render_diff(d) == "corral diff: nothing new\n"


@given(flows, paths)
def test_everything_added_shows_up(spec, changed):
    old = build_report(events_of(spec), changes=files(*changed), generated=1.0)
    extra = events_of([(9, 8443, "tcp", "exfil.test", "evil")], base=100)
    new = build_report(events_of(spec) + extra, changes=files(*changed, ("/h/.ssh/rc", "created")),
                       generated=1.0)
    d = diff_reports(old, new)
    added = d["added"]
    assert {"name": "exfil.test", "ips": ["203.0.113.9"]} in added["destinations"]
    assert {"ip": "203.0.113.9", "name": "exfil.test"} in added["destinations"]
    assert {"destination": "exfil.test", "proto": "tcp", "port": 8443} in added["endpoints"]
    assert [p["program"] for p in added["processes"]] == ["sh > evil"]
    assert {"path": "/h/.ssh/rc", "change": "created", "kind": "file"} in added["files"]
    assert any(f["subject"] == "/h/.ssh/rc" for f in added["flags"])  # persistence
    assert d["count"] == sum(len(v) for v in added.values())
    assert diff_reports(new, new)["count"] == 0
    text = render_diff(d)
    assert "NEW DESTINATIONS\n  + exfil.test -> 203.0.113.9" in text and "NEW PROCESSES" in text


def write(tmp_path, name, report):
    path = tmp_path / name
    path.write_text(json.dumps(report))
    return str(path)


def test_cli_exit_codes_and_json(cli, tmp_path):
    old = build_report(events_of([(1, 443, "tcp", "a.test", "pip")]), generated=1.0)
    new = build_report(events_of([(1, 443, "tcp", "a.test", "pip"), (2, 443, "tcp", "b.test", "curl")]),
                       generated=1.0)
    a, b = write(tmp_path, "a.json", old), write(tmp_path, "b.json", new)
    same = cli("diff", a, a)
    assert (same.returncode, same.stdout) == (0, b"corral diff: nothing new\n")
    grown = cli("diff", a, b)
    assert grown.returncode == 1 and b"+ b.test" in grown.stdout
    as_json = cli("diff", "--json", a, b)
    assert as_json.returncode == 1
    assert json.loads(as_json.stdout)["added"]["processes"][0]["program"] == "sh > curl"
    assert cli("diff", b, a).returncode == 0  # something gone is not something new


def test_cli_unreadable_input_is_exit_2_with_one_line(cli, tmp_path):
    good = write(tmp_path, "good.json", build_report([], generated=1.0))
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "other.json").write_text('{"schema": "something/1"}')
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "broken.json").write_text('{"schema": "corral.audit/2", "destinations": [{"x": 1}]}')
    (tmp_path / "deep.json").write_text("[" * 100000)
    for name in ("missing.json", "bad.json", "other.json", "list.json", "broken.json", "deep.json"):
        for args in ((str(tmp_path / name), good), (good, str(tmp_path / name))):
            r = cli("diff", *args)
            assert r.returncode == 2, (name, r.stderr)
            assert r.stdout == b"" and len(r.stderr.decode().strip().splitlines()) == 1, (name, r.stderr)


def test_audit_baseline_reports_what_is_new(cli, home, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    old = tmp_path / "old.json"
    first = cli("audit", "--net", "none", "--report", str(old), "--", "sh", "-c", "true", cwd=str(work))
    assert first.returncode == 0, first.stderr
    same = cli("audit", "--net", "none", "--baseline", str(old), "--", "sh", "-c", "true", cwd=str(work))
    assert same.returncode == 0 and b"corral diff: nothing new" in same.stderr, same.stderr
    grown = cli("audit", "--net", "none", "--baseline", str(old), "--", "sh", "-c",
                "echo evil >> ~/.bashrc", cwd=str(work))
    assert grown.returncode == 1, grown.stderr
    assert b"NEW FILE CHANGES" in grown.stderr and b".bashrc" in grown.stderr
    bad = cli("audit", "--net", "none", "--baseline", str(tmp_path / "nope.json"), "--", "true", cwd=str(work))
    assert bad.returncode == 2 and b"--baseline" in bad.stderr
    run = cli("run", "--net", "none", "--baseline", str(old), "--", "true", cwd=str(work))
    assert run.returncode == 2 and b"corral audit --baseline" in run.stderr
