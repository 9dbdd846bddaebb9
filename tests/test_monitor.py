"""The live monitor (issue 4, item 3): the pure model against a scripted run, the rendered
view, the line form, following an events file (`corral top`), and `corral run --monitor`
in a real terminal (tmux) — both drawing modes, with a real network in the test world."""

import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest
import trio
from rich.console import Console

from corral.events import (
    CloseEvent,
    ConnectEvent,
    DnsEvent,
    EventStream,
    PolicyErrorEvent,
    SandboxExitEvent,
    SandboxStartEvent,
)
from corral.events import monitor
from corral.events.monitor import FileTail, MonitorState, format_event, render
from corral.policy import Answer

T0 = 1_700_000_000.0


def connect(id, dst, port=80, *, verdict="allow", rule="default-deny", name=None, proto="tcp", ts):
    return ConnectEvent(id=id, proto=proto, src_ip="10.0.2.100", src_port=40000 + id, dst_ip=dst,
                        dst_port=port, name=name, verdict=verdict, rule=rule, ts=T0 + ts)


def scripted():
    """A run whose outcome is known: one DNS answer, one allowed flow that moves bytes,
    one denied flow, one flow still open, one denied query, one policy error."""
    return [
        SandboxStartEvent(argv=["sh", "-c", "fetch"], pid=4242, sandbox_id="3f2a", mode="run", ts=T0),
        DnsEvent(query_id=1, qname="www.corral.test", qtype="A", transport="udp", verdict="allow",
                 rule="www.corral.test", rcode="NOERROR",
                 answers=[Answer(name="www.corral.test", rtype="A", value="198.51.100.10", ttl=60)],
                 ts=T0 + 0.1),
        connect(1, "198.51.100.10", name="www.corral.test", rule="www.corral.test", ts=0.2),
        connect(2, "198.51.100.7", verdict="deny", ts=0.3),
        CloseEvent(id=1, bytes_out=1000, bytes_in=9000, duration=2.0, reason="eof", ts=T0 + 2.2),
        connect(3, "2001:db8::7", 7, proto="udp", rule="2001:db8::/32", ts=2.5),
        DnsEvent(query_id=2, qname="leak.corral.test", qtype="TXT", transport="udp", verdict="deny",
                 rule="default-deny", rcode="REFUSED", ts=T0 + 2.6),
        PolicyErrorEvent(callback="on_connect", subject="4", error="RuntimeError('boom')", ts=T0 + 2.7),
        connect(4, "203.0.113.1", 443, verdict="deny", rule="callback-error", ts=2.7),
    ]


def applied(events):
    state = MonitorState()
    for event in events:
        state.apply(event)
    return state


# ------------------------------------------------------------------------ the model


def test_model_counts_and_totals():
    state = applied(scripted())
    assert (state.connections, state.denied, state.open) == (4, 2, 1)
    assert (state.dns_queries, state.dns_denied, state.policy_errors) == (2, 1, 1)
    assert (state.bytes_out, state.bytes_in) == (1000, 9000)
    assert state.argv == ("sh", "-c", "fetch") and state.pid == 4242 and state.sandbox_id == "3f2a"
    assert state.elapsed(T0 + 3) == pytest.approx(3.0)


def test_model_rows_denials_first_then_open_then_closed():
    rows = applied(scripted()).rows()
    assert [(f.id, f.state) for f in rows] == [(4, "denied"), (2, "denied"), (3, "open"), (1, "closed")]
    closed = rows[-1]
    assert (closed.dst, closed.name, closed.bytes_out, closed.bytes_in) == (
        "198.51.100.10:80", "www.corral.test", 1000, 9000)
    assert closed.rate() == pytest.approx(5000.0)  # 10000 bytes over 2 s
    assert rows[2].dst == "[2001:db8::7]:7" and rows[2].rate() is None


def test_model_accepts_jsonl_dicts_like_objects():
    from_dicts = applied([json.loads(json.dumps(e.to_dict())) for e in scripted()])
    from_objects = applied(scripted())
    assert [(f.id, f.state, f.dst, f.bytes_in) for f in from_dicts.rows()] == [
        (f.id, f.state, f.dst, f.bytes_in) for f in from_objects.rows()]
    assert list(from_dicts.dns)[0].answers == ("198.51.100.10",)


def test_rate_spreads_closed_bytes_over_their_lifetime():
    state = applied(scripted()[:5])  # flow 1: 1000 up / 9000 down from T0+0.2 to T0+2.2
    up, down = state.rates(T0 + 2.2, window=5.0)
    assert up == pytest.approx(1000 / 2.2) and down == pytest.approx(9000 / 2.2)  # run is 2.2 s old
    up, down = state.rates(T0 + 6.2, window=5.0)  # window [1.2, 6.2]: half the flow's life
    assert up == pytest.approx(500 / 5.0) and down == pytest.approx(4500 / 5.0)
    assert state.rates(T0 + 60) == (0.0, 0.0)


def test_exit_closes_open_rows_and_late_close_is_kept():
    state = applied(scripted() + [SandboxExitEvent(exit_code=3, sandbox_id="3f2a", ts=T0 + 4)])
    assert state.exit_code == 3 and state.open == 0
    assert state.flows[3].state == "closed" and state.flows[3].close_reason == "sandbox-exit"
    state.apply(CloseEvent(id=99, bytes_out=5, bytes_in=7, duration=1.0, ts=T0 + 5))  # no connect seen
    assert state.flows[99].state == "closed" and state.bytes_in == 9007


def test_a_denied_flow_stays_denied_when_the_netstack_closes_it():
    state = applied(scripted()[:4] + [CloseEvent(id=2, reason="denied", ts=T0 + 0.3)])
    assert state.flows[2].state == "denied" and state.rows()[0].id == 2
    assert state.denied == 1 and state.open == 1 and state.flows[2].bytes_out == 0


def test_a_burst_keeps_every_count_but_bounded_rows():
    state = MonitorState()
    for i in range(10_000):
        state.apply(connect(i, "198.51.100.10", rule="x", ts=i * 1e-4))
        state.apply(CloseEvent(id=i, bytes_out=1, bytes_in=2, duration=0.001, ts=T0 + i * 1e-4))
    assert (state.connections, state.bytes_out, state.bytes_in) == (10_000, 10_000, 20_000)
    assert len(state.flows) == monitor.KEEP_FINISHED


# ------------------------------------------------------------------------ rendering


def screen(renderable, width=140, color=False):
    console = Console(record=True, width=width, file=io.StringIO(), force_terminal=color,
                      color_system="standard" if color else None)
    console.print(renderable)
    return console.export_text(styles=color)


def line_with(text, needle):
    lines = [line for line in text.splitlines() if needle in line]
    assert len(lines) == 1, text
    return lines[0]


def test_render_shows_rows_names_bytes_and_verdicts():
    text = screen(render(applied(scripted()), now=T0 + 3))
    assert "corral 3f2a sh -c fetch" in text
    assert "running 3.0s" in text and "conns 4 (1 open, 2 denied)" in text
    allowed = line_with(text, "198.51.100.10:80")
    assert re.search(r"closed eof\s+tcp\s+198\.51\.100\.10:80\s+www\.corral\.test\s+1000 B\s+8\.8 KiB"
                     r"\s+4\.9 KiB/s\s+allow www\.corral\.test", allowed), allowed
    assert re.search(r"denied\s+tcp\s+198\.51\.100\.7:80.*deny default-deny", line_with(text, "198.51.100.7"))
    assert "open 0.5s" in line_with(text, "[2001:db8::7]:7")
    assert re.search(r"www\.corral\.test\s+A\s+allow\s+198\.51\.100\.10", text)
    assert re.search(r"leak\.corral\.test\s+TXT\s+deny default-deny\s+REFUSED", text)
    assert "on_connect 4: RuntimeError('boom')" in text
    rows = [line for line in text.splitlines() if re.match(r"\s+\d+\s+(denied|open|closed)", line)]
    assert [r.split()[1] for r in rows] == ["denied", "denied", "open", "closed"]  # denials first


def test_render_highlights_denials_in_red():
    text = screen(render(applied(scripted()), now=T0 + 3), color=True)
    red = "\x1b[1;31m"
    assert red in line_with(text, "198.51.100.7:80")
    assert red in line_with(text, "leak.corral.test")
    assert red not in line_with(text, "198.51.100.10:80")


def test_render_after_exit_and_row_limit():
    events = scripted() + [SandboxExitEvent(exit_code=0, ts=T0 + 4)]
    text = screen(render(applied(events), now=T0 + 100, max_flows=2))
    assert "exited 0 4.0s" in text  # elapsed stops at the exit
    assert "… 2 more" in text and "198.51.100.10:80" not in text


def test_names_from_the_sandbox_cannot_drive_the_terminal():
    hostile = "evil\x1b]0;pwned\x07\x1b[2J.example"
    state = applied([connect(1, "198.51.100.10", name=hostile, rule="x", ts=0)])
    for text in (screen(render(state, now=T0), color=True),
                 screen(format_event(connect(1, "198.51.100.10", name=hostile, rule="x", ts=0)))):
        assert "\x07" not in text and "pwned\x07" not in text and "\x1b[2J" not in text
        assert "evil\\x1b]0;pwned\\x07\\x1b[2J.example" in text


def test_one_line_per_event():
    lines = [format_event(e) for e in scripted()]
    assert lines[0] is None  # sandbox_start: the view's header, not a line
    plain = [line.plain if line is not None else None for line in lines]
    assert plain[1] == "corral: dns A www.corral.test -> 198.51.100.10"
    assert plain[2] == "corral: [1] allow tcp 198.51.100.10:80 (www.corral.test) by www.corral.test"
    assert plain[3] == "corral: [2] DENY tcp 198.51.100.7:80 by default-deny"
    assert plain[4] == "corral: [1] closed up 1000 B down 8.8 KiB in 2.0s (eof)"
    assert plain[6] == "corral: dns DENY TXT leak.corral.test by default-deny"
    assert plain[7] == "corral: policy error in on_connect for 4: RuntimeError('boom') (denied)"
    assert "red" in str(lines[3].style) and "red" not in str(lines[2].style)


# ------------------------------------------------------------------------ drawing from a stream


def recording(width=140, terminal=False):
    return Console(record=True, width=width, height=40, file=io.StringIO(), force_terminal=terminal)


async def test_run_monitor_lines_until_the_stream_closes():
    stream, console = EventStream(), recording()
    events = scripted()
    stream.emit(events[0])  # emitted before the monitor starts: replayed

    async with trio.open_nursery() as nursery:
        done = trio.Event()

        async def watch():
            monitor_state = await monitor.run_monitor(stream, console=console, refresh=0.05)
            assert monitor_state.connections == 4
            done.set()

        nursery.start_soon(watch)
        for event in events[1:]:
            stream.emit(event)
            await trio.sleep(0)
        stream.emit(SandboxExitEvent(exit_code=0, ts=T0 + 5))
        stream.close()
        with trio.fail_after(5):
            await done.wait()
    text = console.export_text()
    assert "corral: [2] DENY tcp 198.51.100.7:80 by default-deny" in text
    assert text.rstrip().endswith(
        "corral: 4 connections (2 denied), 2 DNS queries (1 denied), up 1000 B down 8.8 KiB, 1 policy errors")


async def test_run_monitor_live_draws_the_last_frame_when_cancelled():
    stream, console = EventStream(), recording(terminal=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: monitor.run_monitor(stream, console=console, refresh=0.05))
        await trio.sleep(0)
        for event in scripted():
            stream.emit(event)
        stream.close()
        nursery.cancel_scope.cancel()  # as open_sandbox does on the way out: no time to redraw
    text = console.export_text()
    assert "conns 4 (1 open, 2 denied)" in text and "198.51.100.7:80" in text


async def test_run_monitor_cancelled_before_the_exit_record_still_shows_it():
    # open_sandbox cancels its nursery while the network is still closing; the exit
    # record comes after that, and the last frame must have it.
    stream, console = EventStream(), recording(terminal=True)
    stream.emit(scripted()[0])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: monitor.run_monitor(stream, console=console, refresh=0.05))
        await trio.sleep(0.1)
        nursery.cancel_scope.cancel()

        async def later():
            with trio.CancelScope(shield=True):
                await trio.sleep(0.2)
            stream.emit(SandboxExitEvent(exit_code=9, ts=T0 + 1))
            stream.close()

        nursery.start_soon(later)
    assert "exited 9 1.0s" in console.export_text()


# ------------------------------------------------------------------------ following a file


def test_file_tail_reads_complete_lines_and_notices_removal(tmp_path):
    path = tmp_path / "events.jsonl"
    lines = [json.dumps(e.to_dict()) + "\n" for e in scripted()]
    path.write_text(lines[0] + lines[1][:10])
    with FileTail(path) as tail:
        assert [r["type"] for r in tail.read()] == ["sandbox_start"]
        with path.open("a") as f:
            f.write(lines[1][10:] + lines[2])
        assert [r["type"] for r in tail.read()] == ["dns", "connect"]
        assert tail.read() == [] and not tail.gone
        path.unlink()
        assert tail.read() == [] and tail.gone


def test_a_missing_events_file_is_a_config_error(tmp_path):
    from corral.errors import ConfigError

    with pytest.raises(ConfigError, match="corral ps"):
        FileTail(tmp_path / "nope.jsonl")


async def test_top_follows_a_growing_file_until_exit(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text("")
    console = recording(terminal=True)
    events = scripted() + [SandboxExitEvent(exit_code=7, ts=T0 + 4)]
    async with trio.open_nursery() as nursery:
        result = {}

        async def run_top():
            result["state"] = await monitor.top(path, console=console, poll=0.01, refresh=0.01)

        nursery.start_soon(run_top)
        with path.open("a") as f:
            for event in events:
                f.write(json.dumps(event.to_dict()) + "\n")
                f.flush()
                await trio.sleep(0.02)
    state = result["state"]
    assert state.exit_code == 7 and state.connections == 4
    assert "exited 7" in console.export_text()


async def test_top_ends_when_the_file_disappears(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text(json.dumps(scripted()[0].to_dict()) + "\n")
    console = recording()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: monitor.top(path, console=console, poll=0.01))
            await trio.sleep(0.05)
            path.unlink()
    assert "0 connections" in console.export_text()


async def test_top_ends_when_the_writer_is_gone(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(e.to_dict()) + "\n" for e in scripted()))
    with trio.fail_after(5):
        state = await monitor.top(path, console=recording(), alive=lambda: False, poll=0.01)
    assert state.connections == 4 and state.exit_code is None


# ------------------------------------------------------------------------ a real terminal

needs_tmux = pytest.mark.skipif(shutil.which("tmux") is None and os.environ.get("CORRAL_MUST_WORK") != "1",
                                reason="tmux not installed")




def corral_run(options, script):
    return shlex.join([sys.executable, "-m", "corral", "run", "--monitor", *options,
                       "--", "sh", "-c", script])


NET_SCRIPT = ("curl -s http://www.corral.test/ >/dev/null; curl -s -m 5 http://198.51.100.7/; "
              "echo curl-$((6*7)); sleep 3")


@needs_tmux
@pytest.mark.namespaces
def test_terminal_lines_when_the_command_shares_it(tmux):
    # --net none: start and exit only; the command's output is on the terminal, so the
    # monitor prints lines (the hint, then the summary) and never redraws over it.
    command = corral_run(["--net", "none"], "echo from-the-command; exit 5") + "; echo rc=$?; sleep 30"
    tmux.start(command)
    screen = tmux.wait_for("rc=5")
    assert "from-the-command" in screen
    assert "events are listed one per line" in screen and "corral top" in screen
    assert "corral: 0 connections (0 denied), 0 DNS queries (0 denied)" in screen


@needs_tmux
@pytest.mark.network
def test_terminal_live_view_in_the_world(world, tmux, tmp_path):
    # The command's output goes to a file: the live view owns the terminal (/dev/tty).
    out = tmp_path / "out"
    run = corral_run(["--allow", "www.corral.test"], NET_SCRIPT)
    command = shlex.join(world.argv(["sh", "-c", f"{run} >{out} 2>&1; echo rc=$?; sleep 30"],
                                    cwd=str(tmp_path)))
    tmux.start(command)
    live = tmux.wait_for("running", "www.corral.test", "198.51.100.7:80", "deny default-deny")
    assert "curl-42" not in live  # the command's output went to its file, not over the view
    denied = line_with(live, "198.51.100.7:80")
    assert "denied" in denied and "deny default-deny" in denied
    allowed = [line for line in live.splitlines() if "www.corral.test" in line and ":80" in line]
    assert allowed and "allow www.corral.test" in allowed[0], live
    colored = tmux.screen(escapes=True)
    assert re.search(r"\x1b\[[0-9;]*31m[^\n]*198\.51\.100\.7:80", colored), colored

    final = tmux.wait_for("rc=0", "exited 0")
    assert "running" not in final  # the last frame stayed on the screen, updated to the exit
    assert "deny default-deny" in line_with(final, "198.51.100.7:80")
    assert "curl-42" in out.read_text()


@needs_tmux
@pytest.mark.network
def test_terminal_lines_in_the_world(world, tmux, tmp_path):
    run = corral_run(["--allow", "www.corral.test"], NET_SCRIPT)
    command = shlex.join(world.argv(["sh", "-c", f"{run}; echo rc=$?; sleep 30"], cwd=str(tmp_path)))
    tmux.start(command)
    screen = tmux.wait_for("rc=0")
    assert "curl-42" in screen
    assert re.search(r"corral: \[\d+\] allow tcp \S+ \(www\.corral\.test\) by www\.corral\.test", screen), screen
    assert re.search(r"corral: \[\d+\] DENY tcp 198\.51\.100\.7:80 by default-deny", screen), screen
    assert "corral: dns A www.corral.test -> 198.51.100.10" in screen
    colored = tmux.screen(escapes=True)
    assert re.search(r"\x1b\[[0-9;]*31m[^\n]*DENY tcp 198\.51\.100\.7:80", colored), colored


@needs_tmux
@pytest.mark.network
def test_top_in_a_second_terminal(world, tmux, tmp_path):
    # The sandbox runs elsewhere (its output to a file); `corral top ID` follows it live.
    runtime = tmp_path / "xdg"
    runtime.mkdir(mode=0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}
    script = "sleep 1; " + NET_SCRIPT
    with open(tmp_path / "out", "w") as out:
        box = world.popen([sys.executable, "-m", "corral", "run", "--allow", "www.corral.test",
                           "--", "sh", "-c", script], cwd=str(tmp_path), env=env, stdout=out,
                          stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while True:
        ps = world.run([sys.executable, "-m", "corral", "ps", "--json"], env=env,
                       capture_output=True, text=True, cwd=str(tmp_path))
        running = json.loads(ps.stdout or "[]")
        if running:
            break
        assert box.poll() is None and time.monotonic() < deadline, (ps, (tmp_path / "out").read_text())
        time.sleep(0.1)
    (entry,) = running
    top = shlex.join(["env", f"XDG_RUNTIME_DIR={runtime}", *world.argv(
        [sys.executable, "-m", "corral", "top", entry["id"][:6]], cwd=str(tmp_path))])
    tmux.start(f"{top}; echo top-rc=$?; sleep 30")
    live = tmux.wait_for("running", "www.corral.test", "198.51.100.7:80")
    assert entry["id"] in live and "deny default-deny" in line_with(live, "198.51.100.7:80")
    try:
        final = tmux.wait_for("exited 0", "top-rc=0")
    except AssertionError:
        raise AssertionError((box.poll(), (tmp_path / "out").read_text(), list(runtime.rglob("*")),
                              [p.read_text() for p in runtime.rglob("events.jsonl")]))
    assert "conns 2 (0 open, 1 denied)" in final or "1 denied" in final, final
    assert box.wait(timeout=30) == 0
