"""The audit report (corral.events.report) against a scripted tool whose behaviour is known.

The events are made the way the supervisor makes them: DnsEvent/ConnectEvent.from_decision
over the real policy's decisions, so the report sees exactly what ``--events`` writes.
"""

import json

import jsonschema
import pytest

from corral.events import CloseEvent, ConnectEvent, DnsEvent, PolicyErrorEvent, SandboxExitEvent, SandboxStartEvent
from corral.events.report import (
    ENTROPY_BITS,
    SCHEMA,
    build_report,
    label_entropy,
    load_schema,
    render_allowlist,
    render_text,
)
from corral.fs.changes import ChangeSet, FileChange
from corral.policy import (
    Answer,
    ConnectRequest,
    DnsQuery,
    Policy,
    decide_connect,
    decide_dns,
    load_allow_file,
)

EXFIL = "mzxw6ytboi4dmnzyhe3dcmrtgq2tmnzyhe3dcmrtgq2tmnzyhe3dcmrtgq2tmnz.t.exfil.example"
HEXY = "a43b0119bfe06c16737d4571d1722708.c2.example"


class Tool:
    """A scripted tool: what an installer did, as the supervisor would record it."""

    def __init__(self, policy):
        self.policy = policy
        self.events = []
        self.ts = 100.0
        self.ids = iter(range(1, 1000))

    def tick(self):
        self.ts += 1.0
        return self.ts

    def dns(self, qname, qtype="A", answers=()):
        q = DnsQuery(id=next(self.ids), qname=qname, qtype=qtype, src_ip="10.0.2.100", src_port=5000)
        d = decide_dns(self.policy, q)
        ans = tuple(Answer(name=qname, rtype=qtype, value=v, ttl=60) for v in answers) if d.allowed else ()
        self.events.append(DnsEvent.from_decision(
            q, d, rcode="NOERROR" if d.allowed else "REFUSED", answers=ans,
            upstream="198.51.100.53:53" if d.allowed else None, ts=self.tick()))
        return d

    def connect(self, dst, port, *, proto="tcp", names=(), sni=None, host=None, up=0, down=0, **extra):
        req = ConnectRequest(id=next(self.ids), proto=proto, src_ip="10.0.2.100", src_port=40000,
                             dst_ip=dst, dst_port=port, names=names, sni=sni, http_host=host)
        d = decide_connect(self.policy, req)
        ev = ConnectEvent.from_decision(req, d, ts=self.tick()).to_dict()
        ev.update(extra)  # http_method/http_path: fields the supervisor is to add
        self.events.append(ev)
        if d.allowed:
            self.events.append(CloseEvent(id=req.id, bytes_out=up, bytes_in=down, duration=0.5, reason="eof",
                                          ts=self.tick()))
        return req, d


def installer(policy):
    """Resolves and contacts a few names, DNS-exfil labels, a raw IP, metadata, loopback,
    its own resolver, a webhook service, a second stage; writes ~/.bashrc."""
    t = Tool(policy)
    t.events.append(SandboxStartEvent(argv=["sh", "install.sh"], pid=4242, sandbox_id="3f2a", mode=policy.mode, ts=100.0))
    t.dns("pypi.example.org", answers=["203.0.113.10"])
    t.dns("files.example.org", "AAAA", answers=["2001:db8::20"])
    t.dns("cdn.example.net", answers=["203.0.113.30"])  # resolved, never contacted
    t.dns(EXFIL, "TXT")
    t.dns(HEXY)
    t.dns("webhook.site", answers=["198.51.100.77"])
    t.connect("203.0.113.10", 443, names=("pypi.example.org",), sni="pypi.example.org", up=500, down=40_000)
    t.connect("203.0.113.10", 443, names=("pypi.example.org",), sni="pypi.example.org", up=300, down=20_000)
    t.connect("2001:db8::20", 443, names=("files.example.org",), sni="mirror.example.org", up=100, down=9_000)
    t.connect("203.0.113.10", 80, names=("pypi.example.org",), host="pypi.example.org",
              http_method="GET", http_path="/simple/six/", up=80, down=1_000)
    t.connect("198.51.100.99", 8080, host="198.51.100.99:8080", http_method="GET", http_path="/stage2.sh?x=1",
              up=90, down=5_000)
    t.connect("169.254.169.254", 80)
    t.connect("127.0.0.1", 22)
    t.connect("198.51.100.53", 53, proto="udp", up=40, down=0)
    t.connect("10.0.2.3", 53, proto="udp")  # corral's own resolver: not a destination
    t.connect("198.51.100.77", 443, names=("webhook.site",), sni="webhook.site", up=2_000, down=100)
    t.events.append(PolicyErrorEvent(callback="on_connect", subject="99", error="ValueError('boom')", ts=t.tick()))
    t.events.append(SandboxExitEvent(exit_code=0, sandbox_id="3f2a", ts=t.tick()))
    return t.events


CHANGES = ChangeSet(changes=(
    FileChange(path="/home/u/.bashrc", change="modified", kind="file", size=120, host_size=100, mode="0644",
               content_changed=True),
    FileChange(path="/home/u/.local/bin/helper", change="created", kind="file", size=5000, mode="0755",
               executable=True),
    FileChange(path="/etc/hosts", change="deleted", kind="file", host_size=200),
))


@pytest.fixture
def report():
    return build_report(installer(Policy(mode="audit")), changes=CHANGES, generated=1.0)


def test_report_validates_against_its_schema(report):
    jsonschema.validate(report, load_schema())
    assert report["schema"] == SCHEMA == "corral.audit/2"
    assert json.loads(json.dumps(report)) == report
    bare = build_report([], generated=1.0)  # nothing happened, no file record
    jsonschema.validate(bare, load_schema())
    assert bare["files"] is None and bare["summary"]["connections"] == 0
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**report, "schema": "corral.audit/1"}, load_schema())


def test_summary_and_sandbox(report):
    s, box = report["summary"], report["sandbox"]
    assert box == {"id": "3f2a", "argv": ["sh", "install.sh"], "mode": "audit", "pid": 4242, "started": 100.0,
                   "ended": box["ended"], "duration": box["ended"] - 100.0, "exit_code": 0, "signal": None}
    assert s["dns_queries"] == 6 and s["dns_denied"] == 0
    assert s["connections"] == 9 and s["connections_denied"] == 2  # metadata, loopback; corral DNS not counted
    assert s["bytes_out"] == 500 + 300 + 100 + 80 + 90 + 40 + 2000
    assert s["policy_errors"] == 1 and s["files_changed"] == 3
    assert build_report(installer(Policy(mode="audit")), exit_code=3)["sandbox"]["exit_code"] == 3


def test_destinations_grouped_by_name(report):
    by = {d["name"] or d["ips"][0]: d for d in report["destinations"]}
    pypi = by["pypi.example.org"]
    assert pypi["connections"] == 3 and pypi["bytes_in"] == 61_000 and pypi["allowed"] == 3
    assert [(e["proto"], e["port"], e["connections"]) for e in pypi["endpoints"]] == [("tcp", 80, 1), ("tcp", 443, 2)]
    assert pypi["http_requests"] == ["GET /simple/six/"] and pypi["rules"] == ["audit-allow"]
    assert pypi["first"] < pypi["last"]
    assert by["files.example.org"]["sni"] == ["mirror.example.org"]
    assert "10.0.2.3" not in by
    # denied destinations come first
    assert [d["denied"] > 0 for d in report["destinations"]][:2] == [True, True]
    assert report["destinations"][2]["denied"] == 0


def test_names_denials_dns_and_policy_errors(report):
    names = {n["name"]: n for n in report["names"]}
    assert names["pypi.example.org"]["answers"] == [{"type": "A", "value": "203.0.113.10"}]
    assert names["files.example.org"]["types"] == ["AAAA"]
    assert len(report["dns"]) == 6 and report["dns"][0]["upstream"] == "198.51.100.53:53"
    denials = report["denials"]
    assert [(d["subject"], d["rule"]) for d in denials] == [
        ("tcp 169.254.169.254:80", "always-denied:metadata"), ("tcp 127.0.0.1:22", "always-denied:loopback")]
    assert "always denied" in denials[0]["reason"]
    assert report["policy_errors"][0]["error"] == "ValueError('boom')"


def test_flags(report):
    flags = {(f["kind"], f["subject"]): f for f in report["flags"]}
    assert flags[("dns-exfil", EXFIL)]["severity"] == "high"  # 63-character label
    assert "high-entropy" in flags[("dns-exfil", HEXY)]["detail"]
    assert flags[("always-denied", "tcp 169.254.169.254:80")]["severity"] == "high"
    assert ("always-denied", "tcp 127.0.0.1:22") in flags
    assert flags[("foreign-resolver", "udp 198.51.100.53:53")]["severity"] == "high"
    assert ("raw-ip", "tcp 198.51.100.99:8080") in flags
    assert "webhook" in flags[("watched-service", "webhook.site")]["detail"]
    assert flags[("watched-service", "webhook.site")]["count"] == 2  # resolved and contacted
    assert ("second-stage", "198.51.100.99/stage2.sh?x=1") in flags
    assert flags[("persistence", "/home/u/.bashrc")]["severity"] == "high"
    assert ("executable-written", "/home/u/.local/bin/helper") in flags
    # nothing about the well-behaved names, nor about corral's own resolver
    subjects = " ".join(f["subject"] for f in report["flags"])
    assert "pypi.example.org" not in subjects and "10.0.2.3" not in subjects
    severities = [f["severity"] for f in report["flags"]]
    assert severities == sorted(severities, key=["high", "medium", "low"].index)
    assert report["summary"]["flags"]["high"] == severities.count("high")


def test_entropy_thresholds():
    assert label_entropy("") == 0.0 and label_entropy("aaaa") == 0.0
    assert label_entropy("ab") == 1.0
    assert label_entropy("googleusercontent") < ENTROPY_BITS
    rep = build_report([DnsEvent(query_id=1, qname=f"{i}x.burst.example", qtype="A", transport="udp",
                                 verdict="allow", rule="audit-allow", ts=float(i)) for i in range(30)])
    assert [f["subject"] for f in rep["flags"]] == ["*.burst.example"]


def test_text_summary_denials_first(report):
    text = render_text(report)
    assert text.startswith("corral audit: `sh install.sh` exited 0")
    order = [text.index(h) for h in ("DENIED", "FLAGS", "DESTINATIONS", "NAMES RESOLVED", "POLICY ERRORS",
                                      "FILES CHANGED")]
    assert order == sorted(order)
    assert "169.254.169.254:80" in text.split("FLAGS")[0]
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("pypi.example.org") and "conn" in ln)
    assert "80/tcp,443/tcp" in line and "3 conn" in line and "59.6 KB down" in line
    assert "modified  /home/u/.bashrc" in text
    assert text.isascii()


def test_suggested_allowlist_round_trip(report, tmp_path):
    """Fed back to `corral run`, the allowlist allows every flow the run made, nothing else."""
    text = render_allowlist(report)
    path = tmp_path / "allow.txt"
    path.write_text(text)
    rules = load_allow_file(path)
    assert {r.label for r in rules} == {
        "pypi.example.org:443/tcp", "pypi.example.org:80/tcp", "files.example.org:443/tcp",
        "198.51.100.99:8080/tcp", "198.51.100.53:53/udp", "webhook.site:443/tcp"}
    assert "never connected" in text and "cdn.example.net" in text
    assert "# note: the client named 'mirror.example.org'" in text  # a claimed name is no rule
    strict = Policy(mode="run", allow=rules)
    replay = installer(strict)
    audit = [e for e in installer(Policy(mode="audit")) if isinstance(e, dict) or e.TYPE == "connect"]
    for before, after in zip(audit, [e for e in replay if isinstance(e, dict) or e.TYPE == "connect"]):
        if before["dst_ip"] == "10.0.2.3":
            continue
        if before.get("sni") == "mirror.example.org":  # fronting: not allowed until the user says so
            assert after["rule"] == "claimed-name-not-allowed"
            continue
        assert after["verdict"] == before["verdict"], (before, after)
    dns_verdicts = {e.qname: e.verdict for e in replay if getattr(e, "TYPE", None) == "dns"}
    assert dns_verdicts["pypi.example.org"] == "allow" and dns_verdicts["webhook.site"] == "allow"
    assert dns_verdicts[EXFIL] == "deny" and dns_verdicts["cdn.example.net"] == "deny"

    def allowed(dst, port, proto="tcp", names=(), sni=None):
        req = ConnectRequest(id=1, proto=proto, src_ip="10.0.2.100", src_port=1, dst_ip=dst, dst_port=port,
                             names=names, sni=sni)
        return decide_connect(strict, req).allowed

    assert not allowed("203.0.113.10", 22, names=("pypi.example.org",))  # another port
    assert not allowed("203.0.113.10", 443, proto="udp", names=("pypi.example.org",))  # QUIC: not seen
    assert not allowed("203.0.113.11", 443)  # no name
    assert not allowed("203.0.113.10", 443, names=("pypi.example.org",), sni="evil.example")  # fronting
    assert not allowed("169.254.169.254", 80) and not allowed("127.0.0.1", 22)


def test_allowlist_in_run_mode_leaves_out_the_denied(tmp_path):
    policy = Policy(mode="run", allow=["pypi.example.org:443"], host_ports=[8080])
    events = installer(policy)
    t = Tool(policy)
    t.connect("10.0.2.2", 8080, up=1, down=1)
    t.connect("203.0.113.10", 0, proto="icmp", names=("pypi.example.org",))
    rep = build_report(events + t.events)
    text = render_allowlist(rep)
    path = tmp_path / "a.txt"
    path.write_text(text)
    assert [r.label for r in load_allow_file(path)] == ["pypi.example.org:443/tcp"]
    assert "--allow-host-port 8080" in text
    assert rep["summary"]["connections_denied"] == 8  # icmp too: a port rule never matches it
    assert rep["summary"]["dns_denied"] == 5
    assert {d["rule"] for d in rep["denials"]} >= {"default-deny", "always-denied:metadata"}
    jsonschema.validate(rep, load_schema())


def test_hostile_names_cannot_break_the_allowlist(tmp_path):
    t = Tool(Policy(mode="audit"))
    t.connect("203.0.113.5", 443, sni="x\n203.0.113.0/24 # evil", up=1)
    rep = build_report(t.events)
    text = render_allowlist(rep)
    path = tmp_path / "a.txt"
    path.write_text(text)
    assert [r.label for r in load_allow_file(path)] == ["203.0.113.5:443/tcp"]
    assert "\n203.0.113.0/24" not in text
