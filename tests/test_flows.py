"""The flow state machine (corral.net._flows), with no I/O: no namespaces, no Go, no trio.

Events go in, actions come out.  The ClientHellos are real: made by Python's ssl (a
MemoryBIO handshake), OpenSSL's ``s_client`` and curl (each connecting to a plain
listener on 127.0.0.1 in this process, which reads the hello and hangs up), Go's
crypto/tls (a tiny program handshaking into a net.Pipe), and a Chrome-shaped one built
by hand (GREASE extensions, an ECH outer extension, a post-quantum-sized key share).
Every split point, and (hypothesis) every chunking with pauses: a pause is the stack's
bound on reading the first message running out, which it reports as the last FlowData.
"""

import ipaddress
import os
import shutil
import socket
import struct
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral import policy as pol
from corral.events import CloseEvent, ConnectEvent, PolicyErrorEvent
from corral.net import _flows
from corral.net._flows import (
    Answer,
    Ask,
    CallbackDone,
    Emit,
    FlowClosed,
    FlowData,
    FlowMachine,
    NewFlow,
)
from test_sniff import build_hello, client_hello, parse_hello, sni_ext, split_records

DST = "198.51.100.10"
DENIED = "pastebin.test"
ALLOWED = "files.corral.test"
BOUND = 1.0  # the stack's bound from the first byte (corral.net.service.PEEK_TIMEOUT)
ATTACK_POLICY = pol.Policy(allow=[DST], deny=[DENIED])  # --allow 198.51.100.10 --deny pastebin.test


# -- real first messages -------------------------------------------------------------


def _capture_hello(argv_for_port, timeout=10.0):
    """Run a TLS client against a listener on 127.0.0.1 here; return its first record(s)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(timeout)
    port = srv.getsockname()[1]
    proc = subprocess.Popen(argv_for_port(port), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        conn, _ = srv.accept()
        with conn:
            conn.settimeout(timeout)
            data = b""
            while len(data) < 5 or len(data) < 5 + struct.unpack("!H", data[3:5])[0]:
                chunk = conn.recv(65536)
                assert chunk, "the client hung up before its ClientHello"
                data += chunk
            return data
    finally:
        srv.close()
        proc.kill()
        proc.wait()


GO_HELLO = """package main

import (
	"crypto/tls"
	"net"
	"os"
)

func main() {
	c, s := net.Pipe()
	go tls.Client(c, &tls.Config{ServerName: os.Args[1], InsecureSkipVerify: true}).Handshake()
	buf := make([]byte, 1<<16)
	n, _ := s.Read(buf)
	os.Stdout.Write(buf[:n])
}
"""


def go_hello(name, tmp_path_factory):
    go = shutil.which("go") or "/usr/local/go/bin/go"
    assert os.path.exists(go), "Go is needed to build corral; it makes a crypto/tls ClientHello here"
    src = tmp_path_factory.mktemp("gohello") / "hello.go"
    src.write_text(GO_HELLO)
    env = dict(os.environ, GO111MODULE="off", CGO_ENABLED="0")
    return subprocess.run([go, "run", str(src), name], capture_output=True, check=True, timeout=300,
                          env=env).stdout


def chrome_shaped_hello(name):
    """Python's hello reshaped like Chrome's: GREASE first and last, an ECH outer
    extension, a ~1.2 KB (X25519MLKEM768-sized) GREASE key share, padding."""
    fixed, exts = parse_hello(client_hello(name))
    exts = [(t, d) for t, d in exts if t != 0x0000]
    ech = b"\x00" + b"\x00\x01\x00\x01" + b"\x2a" + struct.pack("!H", 32) + os.urandom(32) + \
        struct.pack("!H", 200) + os.urandom(200)
    return build_hello(fixed, [
        (0x3A3A, b""), (0x0000, sni_ext(name.encode())), *exts, (0xFE0D, ech),
        (0x4A4A, os.urandom(1216)), (0x0015, b"\x00" * 40), (0x1A1A, b"\x00"),
    ])


@pytest.fixture(scope="module")
def hellos(tmp_path_factory):
    """name -> {source: ClientHello bytes naming it}."""
    out = {}
    for name in (DENIED, ALLOWED):
        out[name] = {
            "python-tls1.3": client_hello(name),
            "python-tls1.2": client_hello(name, tls12_only=True),
            "python-7-byte-records": split_records(client_hello(name), 7),
            "openssl": _capture_hello(lambda port: ["openssl", "s_client", "-connect", f"127.0.0.1:{port}",
                                                    "-servername", name]),
            "curl": _capture_hello(lambda port: ["curl", "-sk", "--max-time", "10", "--resolve",
                                                 f"{name}:{port}:127.0.0.1", f"https://{name}:{port}/"]),
            "go-crypto-tls": go_hello(name, tmp_path_factory),
            "chrome-shaped": chrome_shaped_hello(name),
        }
    return out


HELLO_SOURCES = ["python-tls1.3", "python-tls1.2", "python-7-byte-records", "openssl", "curl",
                 "go-crypto-tls", "chrome-shaped"]


def http_heads(name):
    return {
        "origin-form": f"GET /simple/ HTTP/1.1\r\nHost: {name}\r\nUser-Agent: pip\r\n\r\n".encode(),
        "curl-shaped": f"GET /x HTTP/1.1\r\nHost: {name}:80\r\nUser-Agent: curl/8\r\nAccept: */*\r\n\r\n".encode(),
        "absolute-form": f"GET http://{name}/x HTTP/1.1\r\nHost: {name}\r\n\r\n".encode(),
        "connect": f"CONNECT {name}:443 HTTP/1.1\r\nHost: {name}:443\r\n\r\n".encode(),
        "http/1.0": f"POST /up HTTP/1.0\r\nContent-Length: 0\r\nHost: {name}\r\n\r\n".encode(),
        # servers skip empty lines before the request line (RFC 9112 2.2): so must corral
        "leading-crlf": f"\r\n\r\nGET / HTTP/1.1\r\nHost: {name}\r\n\r\n".encode(),
    }


# -- driving the machine -------------------------------------------------------------


def new_flow(fid=1, port=443, proto="tcp", names=(), **kw):
    return NewFlow(id=fid, proto=proto, src=(ipaddress.ip_address("10.0.2.100"), 40000 + fid),
                   dst=(ipaddress.ip_address(DST), port), names=tuple(names), **kw)


def answers(actions):
    return [a.action for a in actions if isinstance(a, Answer)]


def connects(actions):
    return [a.event for a in actions if isinstance(a, Emit) and isinstance(a.event, ConnectEvent)]


def held(machine, fid=1, **kw):
    acts = machine.handle(new_flow(fid, **kw))
    assert answers(acts) == ["peek"], acts
    return acts


def feed(machine, chunks, fid=1, last_after=None):
    """Feed chunks as the stack would, answering 'more' until a final verdict; the
    chunk at index ``last_after`` (if any) carries last=True.  Returns all actions."""
    out = []
    for i, chunk in enumerate(chunks):
        acts = machine.handle(FlowData(id=fid, data=chunk, last=i == last_after))
        out += acts
        if answers(acts) != ["more"]:
            break
    return out


def final(actions):
    (event,) = connects(actions)
    verdicts = [a for a in answers(actions) if a != "more"]
    assert len(verdicts) <= 1, actions
    return event, (verdicts[0] if verdicts else None)


# -- every split point ---------------------------------------------------------------


@pytest.mark.parametrize("source", HELLO_SOURCES)
def test_split_client_hello_at_every_byte_is_named_and_denied(hellos, source):
    hello = hellos[DENIED][source]
    for i in range(1, len(hello)):
        m = FlowMachine(policy=ATTACK_POLICY)
        held(m)
        assert answers(m.handle(FlowData(id=1, data=hello[:i]))) == ["more"], (source, i)
        ev, verdict = final(m.handle(FlowData(id=1, data=hello[i:])))
        assert (verdict, ev.verdict, ev.rule, ev.sni) == ("deny", "deny", DENIED, DENIED), (source, i)


@pytest.mark.parametrize("source", HELLO_SOURCES)
def test_split_client_hello_of_an_allowed_name_is_allowed_byte_by_byte(hellos, source):
    hello = hellos[ALLOWED][source]
    m = FlowMachine(policy=ATTACK_POLICY)
    held(m)
    ev, verdict = final(feed(m, [hello[i:i + 1] for i in range(len(hello))]))
    assert (verdict, ev.rule, ev.sni) == ("allow", DST, ALLOWED)


@pytest.mark.parametrize("shape", list(http_heads(DENIED)))
def test_split_http_head_at_every_byte_is_named_and_denied(shape):
    head = http_heads(DENIED)[shape]
    for i in range(1, len(head)):
        m = FlowMachine(policy=ATTACK_POLICY)
        held(m, port=80)
        assert answers(m.handle(FlowData(id=1, data=head[:i]))) == ["more"], (shape, i)
        ev, verdict = final(m.handle(FlowData(id=1, data=head[i:])))
        assert (verdict, ev.rule, ev.http_host) == ("deny", DENIED, DENIED), (shape, i)


# -- any chunking, any pauses (hypothesis) -------------------------------------------


def simulate_stack(machine, data, cuts, pauses, bound=BOUND, fid=1):
    """The stack's side of a held flow: pieces of ``data`` cut at ``cuts``, each after
    its pause; once more than ``bound`` seconds passed since the first byte the stack
    stops reading and sends what it has with last=True (corral's Go peek loop)."""
    cuts = sorted(set(c for c in cuts if 0 < c < len(data)))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
    elapsed, acts = None, []
    for piece, pause in zip(pieces, pauses + [0.0] * len(pieces)):
        if elapsed is not None:
            elapsed += pause
            if elapsed > bound:
                return acts + machine.handle(FlowData(id=fid, last=True))
        else:
            elapsed = 0.0  # the bound starts at the first byte
        step = machine.handle(FlowData(id=fid, data=piece))
        acts += step
        if answers(step) != ["more"]:
            return acts
    return acts + machine.handle(FlowData(id=fid, last=True, eof=True))


@settings(max_examples=300, deadline=None)
@given(data=st.data(), name=st.sampled_from([DENIED, ALLOWED]),
       source=st.sampled_from(HELLO_SOURCES + ["http:" + k for k in http_heads(DENIED)]))
def test_any_chunking_and_pauses_never_let_a_denied_name_through(hellos, data, name, source):
    if source.startswith("http:"):
        message, port = http_heads(name)[source[5:]], 80
    else:
        message, port = hellos[name][source], 443
    cuts = data.draw(st.lists(st.integers(1, len(message) - 1), max_size=12))
    pauses = data.draw(st.lists(st.floats(0, 0.8), max_size=12))
    m = FlowMachine(policy=ATTACK_POLICY)
    held(m, port=port)
    ev, verdict = final(simulate_stack(m, message, cuts, pauses))
    assert verdict == ev.verdict  # what the stack is told is what the event says
    if ev.rule == _flows.CLAIM_INCOMPLETE:
        assert verdict == "deny" and "no complete first message" in ev.reason
    elif name == DENIED:
        assert (verdict, ev.rule) == ("deny", DENIED) and DENIED in (ev.sni, ev.http_host)
    else:
        assert (verdict, ev.rule) == ("allow", DST) and ALLOWED in (ev.sni, ev.http_host)


# -- the bounds and the unreadable ---------------------------------------------------


def test_bound_running_out_mid_hello_is_denied_as_claim_incomplete(hellos):
    hello = hellos[DENIED]["python-tls1.3"]
    m = FlowMachine(policy=ATTACK_POLICY, peek_timeout=BOUND)
    held(m)
    assert answers(m.handle(FlowData(id=1, data=hello[:3]))) == ["more"]
    ev, verdict = final(m.handle(FlowData(id=1, last=True)))
    assert (verdict, ev.rule, ev.sni) == ("deny", "claim-incomplete", None)
    assert "within 1 s of its first byte (3 bytes came)" in ev.reason


def test_client_closing_mid_hello_is_claim_incomplete_and_silent_close_claims_nothing(hellos):
    m = FlowMachine(policy=ATTACK_POLICY)
    held(m)
    ev, verdict = final(m.handle(FlowData(id=1, data=hellos[DENIED]["curl"][:40], last=True, eof=True)))
    assert (verdict, ev.rule) == ("deny", "claim-incomplete") and "closed after 40 bytes" in ev.reason
    m = FlowMachine(policy=ATTACK_POLICY)
    held(m)
    ev, verdict = final(m.handle(FlowData(id=1, last=True, eof=True)))
    assert (verdict, ev.rule, ev.sni) == ("allow", DST, None)


def test_hello_larger_than_16_kib_is_claim_incomplete():
    fixed, exts = parse_hello(client_hello(DENIED))
    big = build_hello(fixed, [(0x0015, b"\x00" * 17000), *exts])  # padding before the SNI
    m = FlowMachine(policy=ATTACK_POLICY)
    held(m)
    ev, verdict = final(feed(m, [big[i:i + 1400] for i in range(0, len(big), 1400)]))
    assert (verdict, ev.rule) == ("deny", "claim-incomplete") and "16 KiB" in ev.reason


@pytest.mark.parametrize("first", [
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",  # h2c prior knowledge: :authority is HPACK-coded
    b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: " + DENIED.encode() + b"\r\n\r\n",  # two Hosts
    # an allowed name in the target, the denied one in Host: servers differ on which routes
    b"GET http://" + ALLOWED.encode() + b"/ HTTP/1.1\r\nHost: " + DENIED.encode() + b"\r\n\r\n",
])
def test_unreadable_first_message_is_denied_when_a_name_could_matter(first):
    m = FlowMachine(policy=ATTACK_POLICY)
    held(m, port=80)
    ev, verdict = final(feed(m, [first]))
    assert (verdict, ev.rule) == ("deny", "claim-unreadable")


def test_not_tls_nor_http_claims_nothing_and_keeps_its_allow():
    m = FlowMachine(policy=ATTACK_POLICY)
    held(m, port=2222)
    ev, verdict = final(feed(m, [b"SSH-2.0-OpenSSH_9.6\r\n"]))
    assert (verdict, ev.rule, ev.sni) == ("allow", DST, None)


def test_no_name_rule_means_observed_not_held(hellos):
    m = FlowMachine(policy=pol.Policy(allow=[DST]))
    assert answers(m.handle(new_flow())) == ["observe"]
    ev, verdict = final(m.handle(FlowData(id=1, data=hellos[ALLOWED]["curl"][:20])))
    assert (verdict, ev.verdict, ev.sni) == (None, "allow", None)  # names only; nothing to answer


def test_server_first_port_and_udp_are_never_held():
    m = FlowMachine(policy=ATTACK_POLICY)
    assert answers(m.handle(new_flow(1, port=22))) == ["allow"]
    assert answers(m.handle(new_flow(2, port=53, proto="udp"))) == ["allow"]


def test_rules_denying_at_connect_time_are_final_without_a_read():
    m = FlowMachine(policy=pol.Policy(deny=[DST]), on_claim=True)
    acts = m.handle(new_flow())
    assert answers(acts) == ["deny"] and connects(acts)[0].rule == DST


# -- callbacks -----------------------------------------------------------------------


def test_on_claim_callback_denies_by_sni(hellos):
    """No rule decides; on_claim sees req.sni after the (split) hello and denies it."""
    m = FlowMachine(policy=pol.Policy(), on_claim=True)
    held(m)
    hello = hellos[DENIED]["chrome-shaped"]
    (ask,) = feed(m, [hello[:3], hello[3:]])[-1:]
    assert isinstance(ask, Ask) and ask.callback == "on_claim" and ask.req.sni == DENIED
    ev, verdict = final(m.handle(CallbackDone(id=1, callback="on_claim", result=pol.deny("no paste sites"))))
    assert (verdict, ev.rule, ev.reason, ev.sni) == ("deny", "callback", "no paste sites", DENIED)

    m = FlowMachine(policy=pol.Policy(), on_claim=True)
    held(m, fid=2)
    (ask,) = feed(m, [hellos[ALLOWED]["go-crypto-tls"]], fid=2)
    assert ask.req.sni == ALLOWED
    ev, verdict = final(m.handle(CallbackDone(id=2, callback="on_claim", result=pol.ALLOW)))
    assert (verdict, ev.rule, ev.sni) == ("allow", "callback", ALLOWED)


def test_on_claim_is_not_asked_when_a_rule_decides_the_name(hellos):
    m = FlowMachine(policy=pol.Policy(deny=[DENIED]), on_claim=True)
    held(m)
    ev, verdict = final(feed(m, [hellos[DENIED]["openssl"]]))
    assert (verdict, ev.rule) == ("deny", DENIED)


def test_on_connect_then_claimed_names(hellos):
    """on_connect allows at connect time (with the DNS names); a deny rule on the
    claimed name still resets the flow afterwards."""
    m = FlowMachine(policy=pol.Policy(deny=[DENIED]), on_connect=True)
    (ask,) = m.handle(new_flow(names=["cdn.corral.test"]))
    assert (ask.callback, ask.req.name) == ("on_connect", "cdn.corral.test")
    assert answers(m.handle(CallbackDone(id=1, callback="on_connect", result=pol.ALLOW))) == ["peek"]
    ev, verdict = final(feed(m, [hellos[DENIED]["python-tls1.2"]]))
    assert (verdict, ev.rule, ev.sni) == ("deny", DENIED, DENIED)


def test_on_connect_deny_is_immediate():
    m = FlowMachine(policy=pol.Policy(), on_connect=True)
    m.handle(new_flow())
    ev, verdict = final(m.handle(CallbackDone(id=1, callback="on_connect", result=pol.deny("nope"))))
    assert (verdict, ev.rule, ev.reason) == ("deny", "callback", "nope")


@pytest.mark.parametrize("done,error", [
    (dict(result=None), "callback returned NoneType, not a corral.Verdict"),
    (dict(result=True), "callback returned bool, not a corral.Verdict"),
    (dict(error="ValueError: boom"), "ValueError: boom"),
    (dict(error="did not return within 2s", timed_out=True), "did not return within 2s"),
])
def test_failing_callback_denies_with_a_policy_error_naming_the_flow(done, error):
    m = FlowMachine(policy=pol.Policy(), on_connect=True)
    m.handle(new_flow(fid=7))
    acts = m.handle(CallbackDone(id=7, callback="on_connect", **done))
    (perr,) = [a.event for a in acts if isinstance(a, Emit) and isinstance(a.event, PolicyErrorEvent)]
    assert (perr.callback, perr.subject, perr.error) == ("on_connect", "7", error)
    assert perr.timed_out == done.get("timed_out", False)
    ev, verdict = final(acts)
    assert (verdict, ev.rule) == ("deny", "callback-error")


# -- the end of a flow ---------------------------------------------------------------


def test_every_flow_gets_one_connect_and_one_close_even_when_ended_early():
    m = FlowMachine(policy=ATTACK_POLICY, on_connect=True)
    held(m, 1)
    m.handle(FlowData(id=1, data=b"\x16\x03"))
    acts = m.handle(FlowClosed(id=1, reason="reset", bytes_out=0))
    ev = connects(acts)[0]
    assert (ev.verdict, ev.rule) == ("allow", DST)  # closed by the client under its allow so far
    assert [type(a.event) for a in acts] == [ConnectEvent, CloseEvent]
    m.handle(new_flow(2, port=8080, names=()))  # default: asks on_connect
    m.handle(new_flow(3, port=8081))
    acts = m.handle(FlowClosed(id=2, reason="policy-timeout")) + m.shutdown()
    kinds = [(type(a.event).__name__, a.event.id) for a in acts]
    assert kinds == [("ConnectEvent", 2), ("CloseEvent", 2), ("ConnectEvent", 3), ("CloseEvent", 3)]
    assert len(m) == 0
    # a late callback result changes nothing
    assert m.handle(CallbackDone(id=2, callback="on_connect", result=pol.ALLOW)) == []


def test_max_conns_denies_beyond_the_limit():
    m = FlowMachine(policy=pol.Policy(allow=[DST]), max_conns=1)
    assert answers(m.handle(new_flow(1, port=2222))) == ["observe"]
    ev, verdict = final(m.handle(new_flow(2, port=2222)))
    assert (verdict, ev.rule) == ("deny", "limit:max-conns")


def test_machine_rejects_unknown_events():
    with pytest.raises(TypeError, match="cannot handle"):
        FlowMachine(policy=ATTACK_POLICY).handle(object())


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(st.tuples(
    st.sampled_from(["new", "data", "last", "eof", "connect-ok", "connect-no", "claim-ok", "claim-no",
                     "claim-junk", "close", "close-denied"]),
    st.integers(1, 4), st.sampled_from([80, 443, 22, 2222])), max_size=40),
    on_connect=st.booleans(), on_claim=st.booleans(),
    rules=st.sampled_from([ATTACK_POLICY, pol.Policy(), pol.Policy(allow=[DST]), pol.Policy(mode="audit")]))
def test_any_event_order_gives_each_flow_one_connect_one_close_and_one_final_answer(
        steps, on_connect, on_claim, rules):
    head = f"GET / HTTP/1.1\r\nHost: {DENIED}\r\n\r\n".encode()
    m = FlowMachine(policy=rules, on_connect=on_connect, on_claim=on_claim)
    opened, acts, finals = set(), [], {}
    for kind, fid, port in steps:
        if kind == "new":
            if fid in opened:
                continue
            opened.add(fid)
            finals[fid] = 0
            ev = new_flow(fid, port=port)
        elif kind in ("data", "last", "eof"):
            ev = FlowData(id=fid, data=head[:20] if kind == "data" else head[20:], last=kind != "data",
                          eof=kind == "eof")
        elif kind.startswith("connect") or kind.startswith("claim"):
            result = {"ok": pol.ALLOW, "no": pol.deny("no"), "junk": "junk"}[kind.split("-")[1]]
            ev = CallbackDone(id=fid, callback="on_connect" if kind.startswith("connect") else "on_claim",
                              result=result)
        else:
            if fid not in opened:
                continue
            opened.discard(fid)
            ev = FlowClosed(id=fid, reason="denied" if kind == "close-denied" else "eof")
        step = m.handle(ev)
        for a in step:
            if isinstance(a, Answer):
                # answers only for a flow that is open (or closing with this very event)
                assert a.id == fid and (fid in opened or isinstance(ev, FlowClosed)), (a, ev)
                if a.action in ("allow", "deny"):
                    finals[fid] += 1
                    assert finals[fid] == 1, "two final answers for one flow"
        acts += step
    acts += m.shutdown()
    assert len(m) == 0
    events = [a.event for a in acts if isinstance(a, Emit)]
    for fid in {e.id for e in events if isinstance(e, (ConnectEvent, CloseEvent))}:
        mine = [type(e).__name__ for e in events if isinstance(e, (ConnectEvent, CloseEvent)) and e.id == fid]
        # each life of a flow id: exactly one connect, then exactly one close
        assert mine == ["ConnectEvent", "CloseEvent"] * (len(mine) // 2) and len(mine) % 2 == 0, mine
