"""Rich markup in names from the sandbox is shown as text, never interpreted, and a
display failure never touches the sandbox or its event log (issue 14, class 3)."""

import io
import shlex
import sys

import pytest
import trio
from rich.console import Console

from corral.events import (
    ConnectEvent,
    DnsEvent,
    EventStream,
    ListSink,
    PolicyErrorEvent,
    SandboxExitEvent,
    SandboxStartEvent,
)
from corral.events import monitor
from corral.events.monitor import MonitorState, format_event, render
from corral.policy import Answer

from test_monitor import needs_tmux

T0 = 1_700_000_000.0
LINK = "[link=https://evil.example/]www.github.com[/link]"
CONCEAL = "[conceal]hidden.example[/conceal]"
BROKEN = "x[/bold]y"
HOSTILE = [LINK, CONCEAL, BROKEN, "[bold red]DENY[/]", "[/]", "[on red]", ":warning:"]


def hostile_events(name):
    return [
        SandboxStartEvent(argv=["sh", "-c", name], pid=1, sandbox_id="ab12", mode="run", ts=T0),
        DnsEvent(query_id=1, qname=name, qtype="A", transport="udp", verdict="allow", rule=name,
                 rcode="NOERROR", answers=[Answer(name=name, rtype="CNAME", value=name, ttl=1)], ts=T0),
        ConnectEvent(id=1, proto="tcp", src_ip="10.0.2.100", src_port=4000, dst_ip="198.51.100.10", dst_port=443,
                     name=name, sni=name, verdict="allow", rule=name, ts=T0 + 0.1),
        ConnectEvent(id=2, proto="tcp", src_ip="10.0.2.100", src_port=4001, dst_ip="198.51.100.11", dst_port=80,
                     name=name, verdict="deny", rule="default-deny", reason=f"no rule allows {name}", ts=T0 + 0.2),
        DnsEvent(query_id=2, qname=name, qtype="TXT", transport="udp", verdict="deny", rule=name,
                 rcode="REFUSED", ts=T0 + 0.3),
        PolicyErrorEvent(callback="on_dns", subject=name, error=f"ValueError({name!r})", ts=T0 + 0.4),
    ]


def draw(renderable):
    out = io.StringIO()
    console = Console(file=out, width=400, height=60, force_terminal=True, color_system="truecolor",
                      legacy_windows=False)
    console.print(renderable)
    return out.getvalue()


@pytest.mark.parametrize("name", HOSTILE)
def test_monitor_markup_in_sandbox_names_is_shown_verbatim(name):
    state = MonitorState()
    for event in hostile_events(name):
        state.apply(event)
    screen = draw(render(state, now=T0 + 1))
    assert "\x1b]8;" not in screen  # no OSC 8 hyperlink
    assert "\x1b[8m" not in screen  # no concealed text
    # every cell that carries the name shows it as the sandbox wrote it
    text = draw_plain(render(state, now=T0 + 1))
    assert text.count(name) >= 4, text


def draw_plain(renderable):
    console = Console(record=True, width=400, height=60, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def test_monitor_spoofed_hyperlink_is_not_a_link():
    state = MonitorState()
    for event in hostile_events(LINK):
        state.apply(event)
    console = Console(record=True, width=400, file=io.StringIO(), force_terminal=True)
    console.print(render(state, now=T0 + 1))
    html = console.export_html()
    assert "evil.example" in html and 'href="https://evil.example/"' not in html


@pytest.mark.parametrize("name", HOSTILE)
def test_monitor_markup_in_one_line_events_is_shown_verbatim(name):
    for event in hostile_events(name):
        line = format_event(event)
        if line is not None:
            assert "\x1b]8;" not in draw(line)
            assert name in line.plain or event.TYPE == "sandbox_start"


class Exploding:
    """A console whose terminal went away or whose renderer broke: every draw fails."""

    is_terminal = False

    def print(self, *args, **kwargs):
        raise RuntimeError("display broke")


async def test_monitor_display_failure_never_touches_the_stream_or_other_readers():
    stream = EventStream()
    sink = ListSink()
    stream.add_sink(sink)
    events = hostile_events(BROKEN)
    async with trio.open_nursery() as nursery:
        done = trio.Event()
        result = {}

        async def watch():
            result["state"] = await monitor.run_monitor(stream, console=Exploding(), mode="lines", refresh=0.01)
            done.set()

        nursery.start_soon(watch)
        reader = stream.subscribe(replay=True)
        for event in events:
            stream.emit(event)
            await trio.sleep(0.02)
        with trio.fail_after(5):
            await done.wait()  # the monitor gave up quietly ...
        stream.emit(SandboxExitEvent(exit_code=0, ts=T0 + 5))  # ... and the stream goes on
        stream.close()
        seen = [e async for e in reader]
    assert len(seen) == len(events) + 1 and len(sink.events) == len(events) + 1


class BrokenLive(Console):
    def print(self, *args, **kwargs):
        raise RuntimeError("renderer broke")


async def test_monitor_live_view_failure_is_isolated():
    stream = EventStream()
    console = BrokenLive(file=io.StringIO(), force_terminal=True, width=100)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: monitor.run_monitor(stream, console=console, mode="live", refresh=0.01))
            for event in hostile_events(LINK):
                stream.emit(event)
                await trio.sleep(0.02)
            stream.emit(SandboxExitEvent(exit_code=0, ts=T0 + 5))
            stream.close()


@needs_tmux
@pytest.mark.network
def test_monitor_markup_error_name_does_not_kill_the_sandbox(world, tmux, tmp_path):
    """A DNS query for 'x[/bold]y.test' used to raise MarkupError in --monitor and kill the run."""
    query = ("import socket,struct;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.settimeout(3);"
             "q=b''.join(bytes([len(l)])+l for l in [b'x[/bold]y',b'[link=https://evil.example/]a[/link]',b'test'])"
             "+b'\\0';s.sendto(struct.pack('>6H',7,256,1,0,0,0)+q+struct.pack('>2H',1,1),('10.0.2.3',53));"
             "print('answered', len(s.recv(512)))")
    script = f"{shlex.quote(sys.executable)} -c {shlex.quote(query)}; sleep 1; echo still-alive"
    out = tmp_path / "out"
    run = shlex.join([sys.executable, "-m", "corral", "audit", "--monitor", "--", "sh", "-c", script])
    command = shlex.join(world.argv(["sh", "-c", f"{run} >{out} 2>&1; echo rc=$?; sleep 30"], cwd=str(tmp_path)))
    tmux.start(command)
    final = tmux.wait_for("rc=", "exited")
    assert "rc=0" in final, (final, out.read_text())
    assert "still-alive" in out.read_text()
    assert "x[/bold]y" in final
