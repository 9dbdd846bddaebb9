"""Event records, the JSONL sink and the EventStream fan-out."""

import json

import pytest
import trio
import trio.testing

from corral.errors import ConfigError
from corral.events import (
    CloseEvent,
    ConnectEvent,
    DnsEvent,
    EventStream,
    EventsDroppedEvent,
    JsonlSink,
    LimitEvent,
    ListSink,
    PolicyErrorEvent,
    SandboxExitEvent,
    SandboxStartEvent,
)
from corral.policy import Answer, ConnectRequest, DnsQuery, Policy, decide_connect, decide_dns

# The documented field names (docs/events.md). Adding a field is fine; renaming one breaks users.
FIELDS = {
    "dns": ["type", "query_id", "qname", "qtype", "transport", "src_ip", "src_port", "verdict", "rule",
            "reason", "rcode", "answers", "answers_cut", "upstream", "process", "process_unknown", "ts"],
    "connect": ["type", "id", "proto", "src_ip", "src_port", "dst_ip", "dst_port", "name", "names", "sni",
                "http_host", "http_method", "http_path", "verdict", "rule", "reason", "dial", "process",
                "process_unknown", "ts"],
    "close": ["type", "id", "bytes_out", "bytes_in", "duration", "reason", "ts"],
    "policy_error": ["type", "callback", "subject", "error", "timed_out", "ts"],
    "sandbox_start": ["type", "argv", "pid", "sandbox_id", "mode", "env_dropped", "ts"],
    "sandbox_exit": ["type", "exit_code", "signal", "sandbox_id", "ts"],
    "limit": ["type", "limit", "action", "detail", "count", "since", "ts"],
    "events_dropped": ["type", "count", "by_type", "ts"],
}


def sample_events():
    req = ConnectRequest(id=3, proto="tcp", src_ip="10.0.2.100", src_port=40000, dst_ip="10.0.2.2",
                         dst_port=8080, names=("host.test",))
    q = DnsQuery(id=0x1234, qname="example.com", qtype="AAAA", transport="tcp", src_ip="fd00::100", src_port=999)
    return [
        DnsEvent.from_decision(q, decide_dns(Policy(allow=["example.com"]), q), rcode="NOERROR",
                               answers=(Answer(name="example.com", rtype="AAAA", value="2001:db8::7", ttl=60),),
                               upstream="198.51.100.53:53", ts=1.0),
        ConnectEvent.from_decision(req, decide_connect(Policy(host_ports=[8080]), req), ts=2.0),
        CloseEvent(id=3, bytes_out=10, bytes_in=20, duration=0.5, reason="eof", ts=3.0),
        PolicyErrorEvent(callback="on_connect", subject="3", error="TooSlowError()", timed_out=True, ts=4.0),
        SandboxStartEvent(argv=["pip", "download", "six"], pid=42, sandbox_id="3f2a", mode="run", ts=0.5),
        SandboxExitEvent(exit_code=137, signal=9, sandbox_id="3f2a", ts=5.0),
        LimitEvent(limit="max-dns-rate", action="REFUSED", detail="more than 200 DNS queries per second",
                   count=990, since=5.0, ts=6.0),
        EventsDroppedEvent(count=7, by_type={"dns": 7}, ts=7.0),
    ]


def test_to_dict_field_names_are_stable_and_json_ready():
    for ev in sample_events():
        d = ev.to_dict()
        assert list(d) == FIELDS[d["type"]]
        assert json.loads(json.dumps(d)) == d


def test_connect_event_carries_the_decision():
    d = sample_events()[1].to_dict()
    assert d["verdict"] == "allow" and d["rule"] == "allow-host-port:8080" and d["dial"] == "127.0.0.1:8080"
    assert d["dst_ip"] == "10.0.2.2" and d["name"] == "host.test" and d["names"] == ["host.test"]
    denied = ConnectEvent.from_decision(
        ConnectRequest(id=4, proto="udp", src_ip="fd00::100", src_port=1, dst_ip="::1", dst_port=53),
        decide_connect(Policy(), ConnectRequest(id=4, proto="udp", src_ip="fd00::100", src_port=1, dst_ip="::1", dst_port=53)),
    ).to_dict()
    assert denied["verdict"] == "deny" and denied["rule"] == "always-denied:loopback" and "loopback" in denied["reason"]


def test_dns_event_answers():
    d = sample_events()[0].to_dict()
    assert d["answers"] == [{"name": "example.com", "type": "AAAA", "value": "2001:db8::7", "ttl": 60}]
    assert d["verdict"] == "allow" and d["rule"] == "example.com" and d["query_id"] == 0x1234


def test_events_are_frozen():
    with pytest.raises(AttributeError):
        sample_events()[2].bytes_in = 0


def test_jsonl_sink_writes_and_flushes_each_line(tmp_path):
    path = tmp_path / "events.jsonl"
    sink = JsonlSink.open(path)
    events = sample_events()
    for i, ev in enumerate(events, 1):
        sink.write(ev)
        # flushed: another reader sees the line before the sink is closed
        lines = path.read_text().splitlines()
        assert len(lines) == i and json.loads(lines[-1]) == ev.to_dict()
    sink.close()


def test_stream_batch_flushes_a_jsonl_sink_once_at_the_end(tmp_path):
    path = tmp_path / "events.jsonl"
    sink = JsonlSink.open(path)
    stream = EventStream()
    stream.add_sink(sink)
    stream.add_sink(ListSink())  # a sink without flush() takes plain writes
    flushes = []
    real_flush = sink.flush
    sink.flush = lambda: (flushes.append(1), real_flush())
    events = sample_events()
    with stream.batch():
        for ev in events:
            stream.emit(ev)
    assert len(flushes) == 1
    assert [json.loads(line) for line in path.read_text().splitlines()] == [ev.to_dict() for ev in events]
    stream.emit(events[0])  # outside a batch: written and flushed at once
    assert len(path.read_text().splitlines()) == len(events) + 1
    sink.close()


def test_jsonl_sink_dash_is_stderr(capsys):
    sink = JsonlSink.open("-")
    sink.write(sample_events()[2])
    sink.close()  # does not close stderr
    err = capsys.readouterr().err
    assert json.loads(err) == sample_events()[2].to_dict()


def test_jsonl_sink_bad_path(tmp_path):
    with pytest.raises(ConfigError, match="--events .*missing-dir.*no such directory"):
        JsonlSink.open(tmp_path / "missing-dir" / "e.jsonl")


async def test_stream_fans_out_to_sinks_and_iterators_in_order():
    stream = EventStream()
    sink = ListSink()
    stream.add_sink(sink)
    events = sample_events()
    got = {"a": [], "b": []}

    async def reader(name, receive):
        async for ev in receive:
            got[name].append(ev)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader, "a", stream.subscribe())
        nursery.start_soon(reader, "b", stream.__aiter__())
        await trio.testing.wait_all_tasks_blocked()
        for ev in events:
            stream.emit(ev)
        stream.close()
    assert sink.events == events
    assert got["a"] == events and got["b"] == events


async def test_late_subscriber_gets_the_history_and_ends_after_close():
    stream = EventStream()
    events = sample_events()
    for ev in events[:3]:
        stream.emit(ev)
    receive = stream.subscribe()
    for ev in events[3:]:
        stream.emit(ev)
    stream.close()
    assert [ev async for ev in receive] == events
    assert [ev async for ev in stream.subscribe(replay=False)] == []
    assert [ev async for ev in stream] == events  # after close: history, then the end


async def test_never_drops_under_a_burst_with_a_slow_reader():
    stream = EventStream(keep_history=False)
    n = 20000
    receive = stream.subscribe()
    for i in range(n):
        stream.emit(CloseEvent(id=i, ts=0.0))
    stream.close()
    ids = [ev.id async for ev in receive]
    assert ids == list(range(n))
    assert stream.history == []


async def test_a_reader_that_leaves_does_not_break_the_stream():
    stream = EventStream()
    gone = stream.subscribe()
    stay = stream.subscribe()
    await gone.aclose()
    stream.emit(CloseEvent(id=1, ts=0.0))
    stream.close()
    assert [ev.id async for ev in stay] == [1]
    assert "closed" in repr(stream)


def test_failing_sink_is_detached_and_others_continue(caplog):
    class Broken:
        def write(self, event):
            raise OSError(28, "No space left on device")

    stream = EventStream()
    good = ListSink()
    stream.add_sink(Broken())
    stream.add_sink(good)
    stream.emit(CloseEvent(id=1, ts=0.0))
    stream.emit(CloseEvent(id=2, ts=0.0))
    assert [e.id for e in good.events] == [1, 2]
    assert "detaching" in caplog.text


def test_emit_after_close_is_a_bug():
    stream = EventStream()
    stream.close()
    stream.close()
    with pytest.raises(RuntimeError, match="after the stream was closed"):
        stream.emit(CloseEvent(id=1))
