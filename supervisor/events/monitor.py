"""The live monitor: ``corral run --monitor`` and ``corral top ID``.

Three layers:

- :class:`MonitorState` is the pure model. ``apply(event)`` takes an event (object or
  ``to_dict()`` form) and keeps per-connection rows, recent DNS queries, policy errors
  and the totals. No I/O, no clock: everything time-dependent takes ``now``.
- :func:`render` turns a state into a rich renderable (header, connections table,
  DNS table, policy errors); :func:`format_event` is the one-line form of one event.
  rich is imported inside them, so importing this module stays cheap.
- :func:`run_monitor` (a task fed by an :class:`EventStream`) and :func:`top` (a task
  fed by a growing ``events.jsonl`` file, read by :class:`FileTail`) draw them.

Drawing policy (``--monitor``): the sandboxed command writes to the same stdout and
stderr as corral, and a view redrawn in place would fight it. So:

- if neither the command's stdout nor its stderr is a terminal and corral has a
  controlling terminal, the live view is drawn on ``/dev/tty`` (its last frame stays on
  the screen when the sandbox ends);
- otherwise events are printed one line each on corral's stderr (denials in red when
  stderr is a terminal), which interleaves cleanly with the command's own output; for
  the live view, redirect the command's output or run ``corral top ID`` elsewhere.

Byte counts: the netstack reports a flow's bytes when it closes, so open flows show
their age, closed flows their average rate, and the header rate spreads each closed
flow's bytes over its lifetime (see :meth:`MonitorState.rates`). Live counters for open
flows would need a periodic per-flow stats record from the netstack (bytes so far, by
flow id).
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import os
import shlex
import time
from typing import Any, Callable

import attrs

from corral.errors import ConfigError

__all__ = [
    "FileTail",
    "MonitorState",
    "choose_view",
    "format_event",
    "render",
    "run_monitor",
    "top",
]

log = logging.getLogger("corral.events")

RATE_WINDOW = 5.0  # seconds: the header rate is the bytes of this window
REFRESH = 0.25  # seconds between redraws of the live view (at most)
POLL = 0.2  # seconds between reads of a followed events file
END_GRACE = 2.0  # seconds a cancelled monitor waits for the stream's last events
KEEP_FINISHED = 500  # closed/denied rows kept for display (totals count every flow)
KEEP_DNS = 200
KEEP_ERRORS = 50


def _as_dict(event: Any) -> dict:
    return event.to_dict() if hasattr(event, "to_dict") else dict(event)


def _clean(text: Any, limit: int = 200) -> str:
    """Names come from the sandbox (DNS, SNI, Host): never let them drive the terminal.

    Control and format characters (escapes, bidi overrides, zero-width) are shown as
    ``\\xNN`` / ``\\uNNNN``. The result is still rich *markup* if handed to rich as a
    ``str``: pass it as :func:`_plain` ``Text`` (a table cell given as a str is parsed).
    """
    if text is None:
        return ""
    text = str(text)[:limit]
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(ord(c)) for c in text)


def _escape(code: int) -> str:
    if code < 0x100:
        return "\\x%02x" % code
    return "\\u%04x" % code if code < 0x10000 else "\\U%08x" % code


def _plain(text: str, style: str = ""):
    """A rich ``Text`` cell: shown as written, never parsed as markup or emoji codes."""
    from rich.text import Text

    return Text(text, style=style)


def _addr(ip: str | None, port: int | None) -> str:
    ip = ip or "?"
    if port is None:
        return ip
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def size(n: float) -> str:
    """Bytes for humans: ``512 B``, ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _seconds(s: float) -> str:
    if s < 60:
        return f"{s:.1f}s"
    m, s = divmod(int(s), 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


@attrs.define
class Flow:
    """One connection row. ``state``: ``open``, ``closed`` or ``denied``."""

    id: int
    proto: str = "?"
    dst: str = "?"
    name: str | None = None
    state: str = "open"
    verdict: str = "allow"
    rule: str | None = None
    reason: str | None = None
    opened: float | None = None
    closed: float | None = None
    bytes_out: int | None = None
    bytes_in: int | None = None
    duration: float | None = None
    close_reason: str | None = None

    def rate(self) -> float | None:
        """Average bytes/s both ways over the flow's life (known once closed)."""
        if self.bytes_out is None or not self.duration:
            return None
        return (self.bytes_out + (self.bytes_in or 0)) / self.duration


@attrs.frozen
class DnsRow:
    qname: str
    qtype: str
    verdict: str
    rcode: str | None
    answers: tuple[str, ...]
    rule: str | None
    ts: float


@attrs.frozen
class ErrorRow:
    callback: str
    subject: str
    error: str
    timed_out: bool
    ts: float


@attrs.define
class MonitorState:
    """What the monitor shows, built from events alone (sans-io)."""

    title: str | None = None
    argv: tuple[str, ...] = ()
    sandbox_id: str | None = None
    pid: int | None = None
    started: float | None = None
    ended: float | None = None
    exit_code: int | None = None
    flows: dict[int, Flow] = attrs.field(factory=dict)
    dns: collections.deque = attrs.field(factory=lambda: collections.deque(maxlen=KEEP_DNS))
    errors: collections.deque = attrs.field(factory=lambda: collections.deque(maxlen=KEEP_ERRORS))
    connections: int = 0
    denied: int = 0
    dns_queries: int = 0
    dns_denied: int = 0
    policy_errors: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    events: int = 0
    _finished: collections.deque = attrs.field(factory=collections.deque, repr=False)
    _recent: collections.deque = attrs.field(factory=collections.deque, repr=False)

    @property
    def open(self) -> int:
        return sum(1 for f in self.flows.values() if f.state == "open")

    def apply(self, event: Any) -> None:
        """Take one event (an Event or its dict); unknown types are ignored."""
        d = _as_dict(event)
        kind = d.get("type")
        ts = d.get("ts")
        self.events += 1
        if kind == "connect":
            self._connect(d, ts)
        elif kind == "close":
            self._close(d, ts)
        elif kind == "dns":
            self.dns_queries += 1
            if d.get("verdict") == "deny":
                self.dns_denied += 1
            answers = tuple(str(a.get("value")) for a in d.get("answers") or () if isinstance(a, dict))
            self.dns.append(DnsRow(qname=d.get("qname") or "?", qtype=d.get("qtype") or "?",
                                   verdict=d.get("verdict") or "?", rcode=d.get("rcode"),
                                   answers=answers, rule=d.get("rule"), ts=ts or 0.0))
        elif kind == "policy_error":
            self.policy_errors += 1
            self.errors.append(ErrorRow(callback=d.get("callback") or "?", subject=str(d.get("subject")),
                                        error=d.get("error") or "?", timed_out=bool(d.get("timed_out")),
                                        ts=ts or 0.0))
        elif kind == "sandbox_start":
            self.argv = tuple(d.get("argv") or ())
            self.pid = d.get("pid")
            self.sandbox_id = d.get("sandbox_id") or self.sandbox_id
            self.started = ts
        elif kind == "sandbox_exit":
            self.exit_code = d.get("exit_code")
            self.sandbox_id = d.get("sandbox_id") or self.sandbox_id
            self.ended = ts
            for flow in self.flows.values():
                if flow.state == "open":
                    flow.state, flow.closed = "closed", ts
                    flow.close_reason = flow.close_reason or "sandbox-exit"

    def _connect(self, d: dict, ts: float | None) -> None:
        self.connections += 1
        flow = Flow(id=d.get("id", -self.connections), proto=d.get("proto") or "?",
                    dst=_addr(d.get("dst_ip"), d.get("dst_port")),
                    name=d.get("name") or d.get("sni") or d.get("http_host"),
                    verdict=d.get("verdict") or "?", rule=d.get("rule"), reason=d.get("reason"),
                    opened=ts)
        if flow.verdict != "allow":
            self.denied += 1
            flow.state = "denied"
            self._retire(flow.id)
        self.flows[flow.id] = flow

    def _close(self, d: dict, ts: float | None) -> None:
        flow = self.flows.get(d.get("id"))
        if flow is None:  # its connect was not seen (a late reader without history)
            flow = self.flows[d.get("id")] = Flow(id=d.get("id"))
        denied = flow.state == "denied"  # the netstack closes refused flows too (0 bytes)
        if not denied:
            flow.state = "closed"
        flow.closed = ts
        flow.bytes_out = int(d.get("bytes_out") or 0)
        flow.bytes_in = int(d.get("bytes_in") or 0)
        flow.duration = float(d.get("duration") or 0.0)
        flow.close_reason = d.get("reason")
        self.bytes_out += flow.bytes_out
        self.bytes_in += flow.bytes_in
        if ts is not None:
            self._recent.append((ts - flow.duration, ts, flow.bytes_out, flow.bytes_in))
        if not denied:
            self._retire(flow.id)

    def _retire(self, flow_id: int) -> None:
        self._finished.append(flow_id)
        while len(self._finished) > KEEP_FINISHED:
            self.flows.pop(self._finished.popleft(), None)

    def elapsed(self, now: float) -> float:
        if self.started is None:
            return 0.0
        return max(0.0, (self.ended if self.ended is not None else now) - self.started)

    def rates(self, now: float, window: float = RATE_WINDOW) -> tuple[float, float]:
        """(up, down) bytes/s over the last ``window`` seconds.

        Each closed flow's bytes are spread evenly over its lifetime and the part that
        falls inside the window counts; flows still open count nothing yet.
        """
        start = now - window
        while self._recent and self._recent[0][1] < start:
            self._recent.popleft()
        up = down = 0.0
        for begin, end, out, inn in self._recent:
            if end <= begin:
                share = 1.0 if start <= end <= now else 0.0
            else:
                share = max(0.0, min(end, now) - max(begin, start)) / (end - begin)
            up += out * share
            down += inn * share
        span = window if self.started is None else max(min(window, now - self.started), 1e-3)
        return up / span, down / span

    def rows(self) -> list[Flow]:
        """Connections to show: denials first, then open flows, then closed; newest first."""
        order = {"denied": 0, "open": 1, "closed": 2}
        return sorted(self.flows.values(),
                      key=lambda f: (order.get(f.state, 3), -(f.closed or f.opened or 0.0), -f.id))

    def command(self) -> str:
        if self.title:
            return self.title
        return shlex.join(self.argv) if self.argv else "corral"


# -- rendering ----------------------------------------------------------------------------

DENY_STYLE = "bold red"


def _header(state: MonitorState, now: float):
    from rich.text import Text

    up, down = state.rates(now)
    text = Text()
    text.append("corral ", style="bold")
    if state.sandbox_id:
        text.append(f"{_clean(state.sandbox_id)} ", style="cyan")
    text.append(_clean(state.command(), 120), style="bold")
    text.append("\n")
    if state.ended is not None:
        text.append(f"exited {state.exit_code}", style="bold")
    else:
        text.append("running", style="green")
    text.append(f" {_seconds(state.elapsed(now))}")
    if state.pid:
        text.append(f"  pid {state.pid}")
    text.append(f"  conns {state.connections} ({state.open} open, ")
    text.append(f"{state.denied} denied", style=DENY_STYLE if state.denied else "")
    text.append(f")  dns {state.dns_queries} (")
    text.append(f"{state.dns_denied} denied", style=DENY_STYLE if state.dns_denied else "")
    text.append(f")  up {size(state.bytes_out)} down {size(state.bytes_in)}"
                f"  rate up {size(up)}/s down {size(down)}/s")
    if state.policy_errors:
        text.append(f"  policy errors {state.policy_errors}", style=DENY_STYLE)
    return text


def _flow_state(flow: Flow, now: float) -> str:
    if flow.state == "open" and flow.opened is not None:
        return f"open {_seconds(max(0.0, now - flow.opened))}"
    if flow.state == "closed" and flow.close_reason:
        return f"closed {_clean(flow.close_reason, 16)}"
    return _clean(flow.state, 8)


def render(state: MonitorState, *, now: float | None = None, max_flows: int = 20,
           max_dns: int = 8, max_errors: int = 3):
    """The whole view as one rich renderable (header, connections, DNS, policy errors)."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    now = time.time() if now is None else now
    parts: list[Any] = [_header(state, now)]

    rows = state.rows()
    conns = Table(box=box.SIMPLE_HEAD, expand=True, pad_edge=False, show_edge=False, title_justify="left",
                  title=f"connections ({len(rows)} shown of {state.connections})")
    conns.add_column("id", justify="right", no_wrap=True)
    conns.add_column("state", no_wrap=True)
    conns.add_column("proto", no_wrap=True)
    conns.add_column("destination", no_wrap=True, overflow="ellipsis")
    conns.add_column("name", no_wrap=True, overflow="ellipsis", ratio=1)
    conns.add_column("up", justify="right", no_wrap=True)
    conns.add_column("down", justify="right", no_wrap=True)
    conns.add_column("rate", justify="right", no_wrap=True)
    conns.add_column("verdict", no_wrap=True, overflow="ellipsis")
    for flow in rows[:max_flows]:
        denied = flow.state == "denied"
        rate = flow.rate()
        cells = (
            _clean(flow.id, 12), _flow_state(flow, now), _clean(flow.proto, 8), _clean(flow.dst, 48),
            _clean(flow.name), "" if flow.bytes_out is None else size(flow.bytes_out),
            "" if flow.bytes_in is None else size(flow.bytes_in),
            "" if rate is None else f"{size(rate)}/s",
            f"{_clean(flow.verdict, 8)} {_clean(flow.rule, 60)}".strip(),
        )
        conns.add_row(*map(_plain, cells), style=DENY_STYLE if denied else None)
    if len(rows) > max_flows:
        conns.caption = f"… {len(rows) - max_flows} more"
    parts.append(conns)

    dns = Table(box=box.SIMPLE_HEAD, expand=True, pad_edge=False, show_edge=False, title_justify="left",
                title=f"DNS ({state.dns_queries} queries)")
    dns.add_column("name", no_wrap=True, overflow="ellipsis", ratio=2)
    dns.add_column("type", no_wrap=True)
    dns.add_column("verdict", no_wrap=True, overflow="ellipsis")
    dns.add_column("answers", no_wrap=True, overflow="ellipsis", ratio=1)
    for row in list(state.dns)[::-1][:max_dns]:
        denied = row.verdict != "allow"
        answers = ", ".join(_clean(a, 64) for a in row.answers) or _clean(row.rcode)
        verdict = _clean(row.verdict, 8) if not denied else f"{_clean(row.verdict, 8)} {_clean(row.rule, 60)}"
        dns.add_row(*map(_plain, (_clean(row.qname), _clean(row.qtype, 12), verdict, answers)),
                    style=DENY_STYLE if denied else None)
    parts.append(dns)

    if state.errors:
        errors = Text(f"policy errors ({state.policy_errors})\n", style="bold")
        for row in list(state.errors)[::-1][:max_errors]:
            what = "timed out" if row.timed_out else _clean(row.error, 120)
            errors.append(f"  {_clean(row.callback, 16)} {_clean(row.subject, 80)}: {what}\n",
                          style=DENY_STYLE)
        parts.append(errors)
    return Group(*parts)


def format_event(event: Any):
    """One event as one line of rich Text (``None`` for events not worth a line)."""
    from rich.text import Text

    d = _as_dict(event)
    kind = d.get("type")
    if kind == "connect":
        name = d.get("name") or d.get("sni") or d.get("http_host")
        where = _addr(d.get("dst_ip"), d.get("dst_port")) + (f" ({_clean(name)})" if name else "")
        if d.get("verdict") == "allow":
            return Text(f"corral: [{d.get('id')}] allow {_clean(d.get('proto'))} {where}"
                        f" by {_clean(d.get('rule'))}")
        reason = f": {_clean(d.get('reason'))}" if d.get("reason") else ""
        return Text(f"corral: [{d.get('id')}] DENY {_clean(d.get('proto'))} {where}"
                    f" by {_clean(d.get('rule'))}{reason}", style=DENY_STYLE)
    if kind == "close":
        return Text(f"corral: [{d.get('id')}] closed up {size(d.get('bytes_out') or 0)}"
                    f" down {size(d.get('bytes_in') or 0)} in {_seconds(d.get('duration') or 0.0)}"
                    f" ({_clean(d.get('reason'))})", style="dim")
    if kind == "dns":
        answers = ", ".join(_clean(a.get("value"), 64) for a in d.get("answers") or ()
                            if isinstance(a, dict)) or _clean(d.get("rcode"))
        if d.get("verdict") == "allow":
            return Text(f"corral: dns {_clean(d.get('qtype'))} {_clean(d.get('qname'))} -> {answers}")
        return Text(f"corral: dns DENY {_clean(d.get('qtype'))} {_clean(d.get('qname'))}"
                    f" by {_clean(d.get('rule'))}", style=DENY_STYLE)
    if kind == "policy_error":
        what = "timed out" if d.get("timed_out") else _clean(d.get("error"))
        return Text(f"corral: policy error in {_clean(d.get('callback'))} for"
                    f" {_clean(d.get('subject'))}: {what} (denied)", style=DENY_STYLE)
    return None


def summary_line(state: MonitorState) -> str:
    return (f"corral: {state.connections} connections ({state.denied} denied), "
            f"{state.dns_queries} DNS queries ({state.dns_denied} denied), "
            f"up {size(state.bytes_out)} down {size(state.bytes_in)}"
            + (f", {state.policy_errors} policy errors" if state.policy_errors else ""))


# -- drawing ------------------------------------------------------------------------------


def choose_view(command_fds=(1, 2)) -> tuple[str, Any]:
    """Where ``--monitor`` draws: ``("live", tty_file)`` or ``("lines", None)``.

    Live only when none of ``command_fds`` (the command's inherited stdout/stderr) is
    a terminal and ``/dev/tty`` opens; the caller closes the returned file.
    """
    for fd in command_fds:
        try:
            if os.isatty(fd):
                return "lines", None
        except OSError:
            continue
    try:
        return "live", open("/dev/tty", "w", encoding="utf-8")  # noqa: SIM115 - returned
    except OSError:
        return "lines", None


class _LiveView:
    def __init__(self, console, state: MonitorState, refresh: float) -> None:
        from rich.live import Live

        self._console = console
        self._state = state
        self._refresh = refresh
        self._drawn = -1.0
        self._live = Live(console=console, auto_refresh=False, transient=False,
                          redirect_stdout=False, redirect_stderr=False, vertical_overflow="crop")
        self._live.start()

    def apply(self, event: Any) -> None:
        self._state.apply(event)

    def tick(self, *, force: bool = False) -> None:
        mono = time.monotonic()
        if not force and mono - self._drawn < self._refresh:
            return
        self._drawn = mono
        try:  # follow the terminal's size (rich asks stdin/stdout/stderr, not our file)
            self._console.size = os.get_terminal_size(self._console.file.fileno())
        except (AttributeError, OSError, ValueError):
            pass
        height = self._console.size.height
        room = max(4, height - 12)  # header 2, two tables' titles/heads/blank lines ~10
        self._live.update(render(self._state, max_flows=max(2, room * 2 // 3),
                                 max_dns=max(1, room - room * 2 // 3)), refresh=True)

    def close(self) -> None:
        self.tick(force=True)
        self._live.stop()


class _LineView:
    def __init__(self, console, state: MonitorState) -> None:
        self._console = console
        self._state = state
        self._hinted = False

    def apply(self, event: Any) -> None:
        self._state.apply(event)
        d = _as_dict(event)
        if d.get("type") == "sandbox_start" and self._console.is_terminal and not self._hinted:
            self._hinted = True
            target = f"corral top {self._state.sandbox_id}" if self._state.sandbox_id else "corral top ID"
            self._console.print(
                "corral: --monitor: the command writes to this terminal, so events are listed one "
                f"per line; for the live view redirect its output, or run `{target}` in another "
                "terminal", style="dim", highlight=False, markup=False, soft_wrap=True)
        line = format_event(d)
        if line is not None:
            self._console.print(line, highlight=False, soft_wrap=True)

    def tick(self, *, force: bool = False) -> None:
        pass

    def close(self) -> None:
        self._console.print(summary_line(self._state), highlight=False, markup=False, soft_wrap=True)


def _view(console, mode: str, state: MonitorState, refresh: float):
    if mode == "live":
        return _LiveView(console, state, refresh)
    return _LineView(console, state)


class _Isolated:
    """A view whose failure ends the display and nothing else.

    The monitor runs in the sandbox's nursery: an exception escaping it would cancel
    the sandbox. A broken terminal or a rendering bug must not do that, nor stop the
    event log: the first error is logged once, the view is closed (best effort) and
    ``failed`` tells the caller to stop reading.
    """

    def __init__(self, make: Callable[[], Any]) -> None:
        self.failed: BaseException | None = None
        self._view = None
        self._call(lambda: setattr(self, "_view", make()))

    def _call(self, fn: Callable[[], Any]) -> None:
        if self.failed is not None:
            return
        try:
            fn()
        except Exception as exc:
            self.failed = exc
            log.warning("corral: the monitor stopped drawing (%s: %s); the sandbox and its events go on",
                        type(exc).__name__, _clean(exc, 200))
            if self._view is not None:
                try:
                    self._view.close()
                except Exception:
                    log.debug("closing the failed monitor view failed too", exc_info=True)

    def apply(self, event: Any) -> None:
        self._call(lambda: self._view.apply(event))

    def tick(self, *, force: bool = False) -> None:
        self._call(lambda: self._view.tick(force=force))

    def close(self) -> None:
        self._call(self._view.close if self._view is not None else lambda: None)


async def run_monitor(stream, *, console=None, title: str | None = None, mode: str | None = None,
                      command_fds=(1, 2), refresh: float = REFRESH) -> MonitorState:
    """Draw the events of ``stream`` (an :class:`EventStream`) until it closes.

    Run it as a task in the sandbox's nursery. ``mode`` is ``"live"`` (redrawn view) or
    ``"lines"`` (one line per event); by default it follows the drawing policy in the
    module docstring (:func:`choose_view`) when ``console`` is not given, or is live
    exactly when ``console`` is a terminal. Cancelling it still draws the last frame
    with every event already emitted. Returns the final state.
    """
    import trio
    from rich.console import Console

    tty = None
    if console is None:
        chosen, tty = choose_view(command_fds) if mode is None else (mode, None)
        if chosen == "live" and tty is None:
            tty = open("/dev/tty", "w", encoding="utf-8")  # noqa: SIM115 - closed below
        console = Console(file=tty) if tty is not None else Console(stderr=True)
        mode = chosen
    elif mode is None:
        mode = "live" if console.is_terminal else "lines"
    state = MonitorState(title=title)
    receive = stream.subscribe(replay=True)
    view = _Isolated(lambda: _view(console, mode, state, refresh))
    try:
        ended = False
        while not ended and view.failed is None:
            with trio.move_on_after(refresh):
                try:
                    view.apply(await receive.receive())
                except trio.EndOfChannel:
                    ended = True
            ended = _drain(receive, view) or ended
            view.tick()
    finally:
        # Cancelled on the way out of the sandbox: the exit record may still be coming
        # (the network closes first); wait a bounded moment so the last frame has it.
        if view.failed is None:
            with trio.CancelScope(shield=True), trio.move_on_after(END_GRACE):
                async for event in receive:
                    view.apply(event)
                    if view.failed is not None:
                        break
            _drain(receive, view)
        receive.close()  # a failed view stops reading: the stream drops this reader
        try:
            view.close()
        finally:
            if tty is not None:
                tty.close()
    return state


def _drain(receive, view) -> bool:
    """Apply what is already queued; True when the stream has ended."""
    import trio

    while not getattr(view, "failed", None):
        try:
            view.apply(receive.receive_nowait())
        except trio.WouldBlock:
            return False
        except (trio.EndOfChannel, trio.ClosedResourceError):
            return True
    return False


# -- following a file (corral top) --------------------------------------------------------


class FileTail:
    """Reads the complete JSON lines appended to a file since the last call.

    ``read()`` never blocks: it returns the new records (a partial last line waits for
    its newline) and sets ``gone`` once the file was removed or replaced.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        try:
            self._file = open(self.path, "rb")  # noqa: SIM115 - closed by close()
        except OSError as e:
            raise ConfigError(f"cannot read events file {self.path!r}: {e.strerror}. "
                              "Fix: check the sandbox id with `corral ps`") from None
        self._inode = os.fstat(self._file.fileno()).st_ino
        self._partial = b""
        self.gone = False

    def read(self) -> list[dict]:
        data = self._file.read()
        if data:
            self._partial += data
        records = []
        *lines, self._partial = self._partial.split(b"\n")
        for line in lines:
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError:
                log.warning("skipping a malformed events line in %s: %.80r", self.path, line)
        if not data:
            try:
                self.gone = os.stat(self.path).st_ino != self._inode
            except FileNotFoundError:
                self.gone = True
        return records

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> FileTail:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


async def top(events_path: str | os.PathLike, *, console=None, mode: str | None = None,
              alive: Callable[[], bool] | None = None, poll: float = POLL,
              refresh: float = REFRESH) -> MonitorState:
    """``corral top ID``: the monitor for a sandbox running elsewhere, from its events file.

    Live on a terminal (stdout by default), one line per event otherwise. Ends when the
    file records ``sandbox_exit``, disappears, or (with ``alive``, e.g. the registry's
    ``supervisor_alive``) when nothing new comes and its writer is gone; returns the
    final state.
    """
    import trio
    from rich.console import Console

    console = Console() if console is None else console
    mode = mode or ("live" if console.is_terminal else "lines")
    state = MonitorState()
    with FileTail(events_path) as tail:
        view = _view(console, mode, state, refresh)
        try:
            while True:
                records = tail.read()
                for record in records:
                    view.apply(record)
                view.tick()
                if state.ended is not None or tail.gone:
                    return state
                if not records and alive is not None and not alive():
                    for record in tail.read():  # what it wrote before it went
                        view.apply(record)
                    return state
                await trio.sleep(poll)
        finally:
            view.close()


def main_top(sandbox_id: str, say: Callable[[str], None]) -> int:
    """``corral top ID`` for the CLI: find the running sandbox, follow its events."""
    import trio

    from corral import state
    from corral.errors import CorralError

    try:
        entry = state.find(sandbox_id)
        trio.run(functools.partial(top, entry.events_path, alive=entry.supervisor_alive))
    except ConfigError as exc:
        say(str(exc))
        return 2
    except CorralError as exc:
        say(str(exc))
        return 125
    except KeyboardInterrupt:
        return 130
    return 0
