"""The DNS forwarder and DnsService against real DNS servers, inside the world (DESIGN §8).

The outer test runs this same file with pytest *inside* the world's network namespace
(CORRAL_DNS_IN_WORLD=1), where the world's DNS server answers at 198.51.100.53 /
2001:db8::53 and the tests start their own misbehaving server on 203.0.113.3:5353.
Nothing here can reach a real resolver: the world has no route anywhere else.
"""

import os
import struct
import sys
from pathlib import Path

import pytest

IN_WORLD = os.environ.get("CORRAL_DNS_IN_WORLD") == "1"

if not IN_WORLD:

    @pytest.mark.network
    def test_dns_inside_the_world(world):
        world.clear_events()
        env = dict(os.environ, CORRAL_DNS_IN_WORLD="1")
        env.pop("PYTEST_ADDOPTS", None)
        result = world.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", __file__],
            env=env, cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=300,
        )
        assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
        assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]
        qnames = {q.get("qname") for q in world.dns_queries()}
        assert "www.corral.test." in qnames and "alias.corral.test." in qnames, "allowed queries were forwarded"
        assert not any(q and "leak" in q for q in qnames), f"a denied query reached the upstream: {qnames}"

else:
    import dns.message
    import dns.rcode
    import dns.rrset
    import trio

    from corral.events import DnsEvent, ListSink
    from corral.net.dns import DnsService, forward
    from corral.policy import NameTable, Policy
    from corral.world.addresses import DNS_V4, DNS_V6, HTTP_V4, HTTP_V6, OTHER_V4

    FAKE = (OTHER_V4[2], 5353)
    WORLD = (DNS_V4, 53)
    WORLD6 = (DNS_V6, 53)
    RAW_TYPE = 65280

    def q(name, rdtype="A", **kw):
        return dns.message.make_query(name, rdtype, **kw)

    class FakeUpstream:
        """UDP+TCP DNS server with scripted misbehaviour, keyed by qname."""

        def __init__(self):
            self.queries = []  # (transport, qname)

        def reply(self, wire, transport):
            msg = dns.message.from_wire(wire)
            name = msg.question[0].name.to_text().lower()
            self.queries.append((transport, name))
            resp = dns.message.make_response(msg)
            if name == "silent.fake.test.":
                return []
            if name == "big.fake.test.":
                if transport == "udp":
                    resp.flags |= dns.flags.TC
                else:
                    ips = [f"203.0.113.{i}" for i in range(1, 61)]
                    resp.answer.append(dns.rrset.from_text(name, 30, "IN", "A", *ips))
                return [resp.to_wire()]
            if name == "raw.fake.test.":
                resp.answer.append(dns.rrset.from_text(name, 30, "IN", f"TYPE{RAW_TYPE}", r"\# 4 deadbeef"))
                resp.additional.append(dns.rrset.from_text("x.fake.test.", 30, "IN", "TXT", '"extra"'))
                return [resp.to_wire() + b"trailing-bytes-kept"]
            if name == "spoof.fake.test.":
                wrong = dns.message.make_response(msg)
                wrong.id = (msg.id + 1) % 65536
                wrong.answer.append(dns.rrset.from_text(name, 30, "IN", "A", "192.0.2.66"))
                resp.answer.append(dns.rrset.from_text(name, 30, "IN", "A", "203.0.113.2"))
                return [wrong.to_wire(), resp.to_wire()]
            resp.set_rcode(dns.rcode.NXDOMAIN)
            return [resp.to_wire()]

        async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED):
            udp = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
            await udp.bind(FAKE)
            tcp = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
            tcp.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
            await tcp.bind(FAKE)
            tcp.listen(16)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._udp, udp)
                nursery.start_soon(trio.serve_listeners, self._tcp, [trio.SocketListener(tcp)])
                task_status.started()

        async def _udp(self, sock):
            while True:
                data, peer = await sock.recvfrom(65535)
                for out in self.reply(data, "udp"):
                    await sock.sendto(out, peer)

        async def _tcp(self, stream):
            buf = b""
            while len(buf) < 2 or len(buf) < 2 + struct.unpack("!H", buf[:2])[0]:
                chunk = await stream.receive_some()
                if not chunk:
                    return
                buf += chunk
            for out in self.reply(buf[2:], "tcp"):
                await stream.send_all(struct.pack("!H", len(out)) + out)

    @pytest.fixture
    async def fake(nursery):
        server = FakeUpstream()
        await nursery.start(server.serve)
        return server

    @pytest.mark.parametrize("upstream", [WORLD, WORLD6])
    @pytest.mark.parametrize("tcp", [False, True])
    async def test_forward_to_the_world_resolver(upstream, tcp):
        query = q("www.corral.test", "AAAA" if upstream == WORLD6 else "A")
        answer = dns.message.from_wire(await forward(query.to_wire(), upstream, 5.0, tcp=tcp))
        assert query.is_response(answer)
        assert {rd.address for rd in answer.answer[0]} == {HTTP_V6 if upstream == WORLD6 else HTTP_V4}

    async def test_any_record_type_passes_through_byte_for_byte(fake):
        query = q("raw.fake.test", f"TYPE{RAW_TYPE}")
        answer = await forward(query.to_wire(), FAKE, 5.0)
        [expected] = FakeUpstream().reply(query.to_wire(), "udp")
        assert answer == expected  # unknown type, extra section, even trailing bytes: untouched

    async def test_truncated_udp_answer_is_retried_over_tcp(fake):
        query = q("big.fake.test", use_edns=0, payload=4096)
        answer = await forward(query.to_wire(), FAKE, 5.0, max_udp=4096)
        msg = dns.message.from_wire(answer)
        assert not msg.flags & dns.flags.TC and len(msg.answer[0]) == 60
        assert fake.queries == [("udp", "big.fake.test."), ("tcp", "big.fake.test.")]

    async def test_truncated_answer_kept_when_full_one_exceeds_client_size(fake):
        query = q("big.fake.test")
        answer = await forward(query.to_wire(), FAKE, 5.0, max_udp=512)
        assert dns.message.from_wire(answer).flags & dns.flags.TC  # client retries over TCP itself

    async def test_silent_upstream_times_out(fake):
        start = trio.current_time()
        with pytest.raises(TimeoutError, match="did not answer within 0.3 s"):
            await forward(q("silent.fake.test").to_wire(), FAKE, 0.3)
        assert trio.current_time() - start < 2

    async def test_answer_with_the_wrong_id_is_ignored(fake):
        query = q("spoof.fake.test")
        answer = dns.message.from_wire(await forward(query.to_wire(), FAKE, 5.0))
        assert answer.id == query.id and [rd.address for rd in answer.answer[0]] == ["203.0.113.2"]

    async def test_refused_port_is_an_oserror():
        with pytest.raises(OSError):
            await forward(q("a.test").to_wire(), (OTHER_V4[2], 5399), 5.0)

    def make_service(policy, upstreams):
        sink = ListSink()
        names = NameTable()
        svc = DnsService(policy=policy, names=names, upstreams=upstreams, emit=sink.write, upstream_timeout=1.0)
        return svc, names, sink.events

    async def test_service_forwards_allowed_and_learns_names():
        svc, names, events = make_service(Policy(allow=["*.corral.test"]), [WORLD])
        query = q("alias.corral.test")
        answer = await svc.handle(query.to_wire(), transport="udp", src_ip="10.0.2.100", src_port=5000)
        msg = dns.message.from_wire(answer)
        assert query.is_response(msg) and msg.rcode() == dns.rcode.NOERROR
        assert names.names_for(HTTP_V4, trio.current_time()) == ("alias.corral.test", "www.corral.test")
        [ev] = events
        assert isinstance(ev, DnsEvent)
        assert (ev.verdict, ev.rule, ev.rcode, ev.upstream) == ("allow", "*.corral.test", "NOERROR", "198.51.100.53:53")
        assert [(a.rtype, a.value) for a in ev.answers] == [("CNAME", "www.corral.test"), ("A", HTTP_V4)]

    async def test_service_tcp_and_txt():
        svc, names, events = make_service(Policy(allow=["txt.corral.test"]), [WORLD6])
        answer = await svc.handle(q("txt.corral.test", "TXT").to_wire(), transport="tcp")
        msg = dns.message.from_wire(answer)
        assert b"corral world says hi" in msg.answer[0][0].strings[0]
        assert events[0].upstream == "[2001:db8::53]:53" and events[0].answers == ()

    async def test_service_denied_query_never_reaches_upstream(fake):
        svc, names, events = make_service(Policy(allow=["corral.test"]), [FAKE, WORLD])
        answer = await svc.handle(q("leak.fake.test").to_wire())
        assert dns.message.from_wire(answer).rcode() == dns.rcode.REFUSED
        answer = await svc.handle(q("exfil-leak.corral.test", "TXT").to_wire())
        assert dns.message.from_wire(answer).rcode() == dns.rcode.REFUSED
        assert fake.queries == []
        assert [e.verdict for e in events] == ["deny", "deny"]

    async def test_service_fails_over_to_the_next_upstream(fake):
        svc, names, events = make_service(Policy(mode="audit"), [(OTHER_V4[2], 5399), WORLD])
        answer = await svc.handle(q("www.corral.test").to_wire())
        assert dns.message.from_wire(answer).answer
        assert events[0].upstream == "198.51.100.53:53"

    async def test_service_servfail_when_every_upstream_fails(fake):
        svc, names, events = make_service(Policy(mode="audit"), [FAKE])
        answer = await svc.handle(q("silent.fake.test").to_wire())
        assert dns.message.from_wire(answer).rcode() == dns.rcode.SERVFAIL
        assert events[0].rcode == "SERVFAIL" and events[0].verdict == "allow"
