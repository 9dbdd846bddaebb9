"""DnsService decisions that never reach an upstream, and upstream configuration parsing.

Forwarding itself is tested inside the world (test_dns_world.py)."""

import dns.message
import dns.rcode
import pytest
import trio

from corral.errors import ConfigError
from corral.events import DnsEvent, ListSink, PolicyErrorEvent
from corral.net.dns import DnsService, host_upstreams, parse_dns_upstream, parse_resolv_conf
from corral.policy import ALLOW, NameTable, Policy, deny


def service(policy=None, *, on_dns=None, upstreams=(), **kw):
    sink = ListSink()
    svc = DnsService(policy=policy or Policy(), names=NameTable(), upstreams=list(upstreams),
                     emit=sink.write, on_dns=on_dns, **kw)
    return svc, sink.events


def wire(name="example.com", rdtype="A", **kw):
    return dns.message.make_query(name, rdtype, **kw).to_wire()


def rcode(answer):
    return dns.rcode.to_text(dns.message.from_wire(answer).rcode())


async def test_denied_query_is_refused_with_an_event():
    svc, events = service(Policy(allow=["pypi.org"]))
    q = wire("evil.test", "TXT")
    answer = await svc.handle(q, transport="udp", src_ip="10.0.2.100", src_port=4444)
    resp = dns.message.from_wire(answer)
    assert resp.id == dns.message.from_wire(q).id and rcode(answer) == "REFUSED"
    [ev] = events
    assert isinstance(ev, DnsEvent)
    assert (ev.qname, ev.qtype, ev.verdict, ev.rule, ev.rcode, ev.upstream) == (
        "evil.test", "TXT", "deny", "default-deny", "REFUSED", None)
    assert ev.src_ip == "10.0.2.100" and ev.src_port == 4444 and ev.transport == "udp"


async def test_deny_rcode_nxdomain():
    svc, events = service(deny_rcode="NXDOMAIN")
    assert rcode(await svc.handle(wire())) == "NXDOMAIN"
    assert events[0].rcode == "NXDOMAIN"


async def test_deny_rule_beats_callback():
    called = []

    async def on_dns(query):
        called.append(query)
        return ALLOW

    svc, events = service(Policy(mode="audit", deny=["*.evil.test"]), on_dns=on_dns)
    assert rcode(await svc.handle(wire("x.evil.test"))) == "REFUSED"
    assert called == [] and events[0].rule == "*.evil.test"


async def test_callback_decides_when_no_rule_did():
    seen = []

    async def on_dns(query):
        seen.append(query)
        return deny("not today")

    svc, events = service(on_dns=on_dns)
    assert rcode(await svc.handle(wire("who.test", "AAAA"), transport="tcp", src_ip="fd00::100", src_port=1)) == "REFUSED"
    [q] = seen
    assert (q.qname, q.qtype, q.transport, str(q.src_ip)) == ("who.test", "AAAA", "tcp", "fd00::100")
    assert events[0].rule == "callback" and events[0].reason == "not today"


async def test_callback_allow_then_no_upstream_is_servfail():
    async def on_dns(query):
        return ALLOW

    svc, events = service(on_dns=on_dns)
    assert rcode(await svc.handle(wire())) == "SERVFAIL"
    [ev] = events
    assert ev.verdict == "allow" and ev.rule == "callback" and ev.rcode == "SERVFAIL"


@pytest.mark.parametrize(
    ("behaviour", "expect"),
    [("raise", "ZeroDivisionError"), ("return", "returned str"), ("hang", "did not return within 2 s")],
)
async def test_failing_callback_is_a_deny_and_an_event(behaviour, expect, autojump_clock):
    async def on_dns(query):
        if behaviour == "raise":
            return 1 / 0
        if behaviour == "return":
            return "yes"
        await trio.sleep_forever()

    svc, events = service(on_dns=on_dns)
    start = trio.current_time()
    assert rcode(await svc.handle(wire("cb.test"))) == "REFUSED"
    assert trio.current_time() - start <= 2.0 + 1e-6
    err, dns_ev = events
    assert isinstance(err, PolicyErrorEvent)
    assert err.callback == "on_dns" and err.subject == "cb.test" and expect in err.error
    assert err.timed_out is (behaviour == "hang")
    assert dns_ev.verdict == "deny" and dns_ev.rule == "callback-error" and expect in dns_ev.reason


@pytest.mark.parametrize(
    "bad",
    [b"", b"\x01\x02", b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xff"],
)
async def test_malformed_queries_get_formerr_or_silence(bad):
    svc, events = service(Policy(mode="audit"))
    answer = await svc.handle(bad)
    if len(bad) < 12:
        assert answer is None
    else:
        assert rcode(answer) == "FORMERR"
    assert events == []


async def test_responses_are_never_answered():
    svc, events = service(Policy(mode="audit"))
    assert await svc.handle(dns.message.make_response(dns.message.make_query("a.test", "A")).to_wire()) is None


async def test_non_query_opcode_is_notimp():
    msg = dns.message.make_query("a.test", "A")
    msg.set_opcode(dns.opcode.NOTIFY)
    svc, events = service(Policy(mode="audit"))
    assert rcode(await svc.handle(msg.to_wire())) == "NOTIMP"


# -- upstream configuration ------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("198.51.100.53", ("198.51.100.53", 53)),
        ("198.51.100.53:5353", ("198.51.100.53", 5353)),
        ("2001:db8::53", ("2001:db8::53", 53)),
        ("[2001:DB8::53]:5353", ("2001:db8::53", 5353)),
        ("[2001:db8::53]", ("2001:db8::53", 53)),
        (" 127.0.0.53 ", ("127.0.0.53", 53)),
    ],
)
def test_parse_dns_upstream(text, expected):
    assert parse_dns_upstream(text) == expected


@pytest.mark.parametrize("text", ["", "dns.google", "198.51.100.53:0", "198.51.100.53:99999", "[2001:db8::53",
                                  "[2001:db8::53]x", "198.51.100.53:dns", "1.2.3"])
def test_parse_dns_upstream_rejects(text):
    with pytest.raises(ConfigError, match="--dns-upstream"):
        parse_dns_upstream(text)


def test_parse_resolv_conf():
    text = (
        "# generated\n"
        "nameserver 127.0.0.53\n"
        "options edns0 trust-ad\n"
        "search example.com\n"
        "nameserver 2001:db8::53 ; comment\n"
        "nameserver fe80::1%eth0\n"
        "nameserver not-an-ip\n"
        "nameserver 127.0.0.53\n"
        "nameserver\n"
    )
    assert parse_resolv_conf(text) == [("127.0.0.53", 53), ("2001:db8::53", 53), ("fe80::1%eth0", 53)]


def test_host_upstreams(tmp_path, caplog):
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 127.0.0.53\n")
    with caplog.at_level("INFO", logger="corral.dns"):
        assert host_upstreams(None, str(conf)) == [("127.0.0.53", 53)]
    assert "local stub" in caplog.text  # reported, still used: it is reachable from the host namespace
    assert host_upstreams(["198.51.100.53", "[2001:db8::53]:53"], str(conf)) == [
        ("198.51.100.53", 53), ("2001:db8::53", 53)]
    conf.write_text("search example.com\n")
    with pytest.raises(ConfigError, match="no nameserver .*--dns-upstream"):
        host_upstreams(None, str(conf))
    with pytest.raises(ConfigError, match="cannot read .*--dns-upstream"):
        host_upstreams(None, str(tmp_path / "missing"))
