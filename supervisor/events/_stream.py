"""EventStream: one producer side (``emit``), many sinks and async iterators."""

from __future__ import annotations

import contextlib
import logging
import math

import trio

from ._sinks import Sink
from ._types import Event

__all__ = ["EventStream"]

log = logging.getLogger("corral.events")


class EventStream:
    """Fans every event out to sinks (synchronously, in order) and to subscribers.

    Subscribers get an unbounded memory channel: ``emit`` never blocks and never drops;
    a slow reader only costs memory. ``subscribe(replay=True)`` first delivers every
    event emitted so far (when ``keep_history``), so a reader that starts late still sees
    the whole run. Iterators end when the stream is closed. A sink that raises is logged
    and detached (the other sinks and readers keep getting events).
    """

    def __init__(self, *, keep_history: bool = True) -> None:
        self._sinks: list[Sink] = []
        self._subscribers: list[trio.MemorySendChannel[Event]] = []
        self._keep_history = keep_history
        self.history: list[Event] = []
        self.closed = False
        self._batching = False

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<EventStream {state} events={len(self.history)} sinks={len(self._sinks)} readers={len(self._subscribers)}>"

    def add_sink(self, sink: Sink) -> None:
        self._sinks.append(sink)

    def emit(self, event: Event) -> None:
        """Deliver *event* everywhere. Sync, never blocks. Must not be called after close()."""
        if self.closed:
            raise RuntimeError(f"event emitted after the stream was closed: {event!r}")
        if self._keep_history:
            self.history.append(event)
        for sink in list(self._sinks):
            try:
                if self._batching and hasattr(sink, "flush"):
                    sink.write(event, flush=False)
                else:
                    sink.write(event)
            except Exception:
                log.exception("event sink %r failed; detaching it", sink)
                self._sinks.remove(sink)
        for send in list(self._subscribers):
            try:
                send.send_nowait(event)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.remove(send)

    @contextlib.contextmanager
    def batch(self):
        """Emit several events with one flush per sink at the end (sinks that have a
        ``flush()`` take ``write(event, flush=False)`` meanwhile).  For a burst
        handled without yielding to the event loop; not reentrant."""
        self._batching = True
        try:
            yield
        finally:
            self._batching = False
            for sink in list(self._sinks):
                flush = getattr(sink, "flush", None)
                if flush is None:
                    continue
                try:
                    flush()
                except Exception:
                    log.exception("event sink %r failed; detaching it", sink)
                    self._sinks.remove(sink)

    def subscribe(self, *, replay: bool = True) -> trio.MemoryReceiveChannel[Event]:
        """An async iterator of events (``async for ev in stream.subscribe()``).

        With *replay*, starts with the events already emitted. Close the returned
        channel (or leave its ``async with``) to unsubscribe.
        """
        send, receive = trio.open_memory_channel[Event](math.inf)
        if replay:
            for event in self.history:
                send.send_nowait(event)
        if self.closed:
            send.close()
        else:
            self._subscribers.append(send)
        return receive

    def __aiter__(self) -> trio.MemoryReceiveChannel[Event]:
        return self.subscribe()

    def close(self) -> None:
        """End every iterator (after they drain what is queued) and close the sinks. Idempotent."""
        if self.closed:
            return
        self.closed = True
        for send in self._subscribers:
            send.close()
        self._subscribers.clear()
        for sink in self._sinks:
            close = getattr(sink, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    log.exception("closing event sink %r failed", sink)
        self._sinks.clear()
