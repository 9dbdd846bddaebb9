"""EventStream: one producer side (``emit``), many sinks and async iterators."""

from __future__ import annotations

import collections
import contextlib
import logging

import trio

from ._sinks import Sink
from ._types import Event, EventsDroppedEvent

__all__ = ["EventStream"]

log = logging.getLogger("corral.events")


class _Reader:
    """One subscriber's bounded channel, and what it missed while it was full."""

    __slots__ = ("send", "missed", "missed_ts")

    def __init__(self, send: trio.MemorySendChannel[Event]) -> None:
        self.send = send
        self.missed: collections.Counter[str] = collections.Counter()
        self.missed_ts = 0.0

    def offer(self, event: Event) -> None:
        """Queue *event*; when full, count it instead.  Raises when the reader is gone."""
        send = self.send
        if self.missed:
            # One slot stays free for the record of what was missed.
            if send.statistics().current_buffer_used >= send.statistics().max_buffer_size - 1:
                self._miss(event)
                return
            send.send_nowait(EventsDroppedEvent(count=sum(self.missed.values()), by_type=dict(self.missed),
                                                ts=self.missed_ts))
            self.missed.clear()
        try:
            send.send_nowait(event)
        except trio.WouldBlock:
            self._miss(event)

    def _miss(self, event: Event) -> None:
        self.missed[event.TYPE] += 1
        self.missed_ts = getattr(event, "ts", self.missed_ts)


class EventStream:
    """Fans every event out to sinks (synchronously, in order) and to subscribers.

    ``emit`` never blocks, and memory stays bounded whatever the sandbox does:

    - a subscriber's channel holds at most ``reader_buffer`` events; a reader that falls
      that far behind misses the next ones and then gets one ``events_dropped`` record
      (:class:`EventsDroppedEvent`) counting them, in their place;
    - ``history`` (when ``keep_history``) keeps the first ``history_limit`` events, and
      ``history_dropped`` counts the rest.  ``subscribe(replay=True)`` first delivers
      that history (then one ``events_dropped`` record if it was cut), so a reader that
      starts late still sees how the run began.

    Sinks get every event (a JSONL sink: the complete record on disk).  Iterators end
    when the stream is closed.  A sink that raises is logged and detached (the other
    sinks and readers keep getting events).
    """

    HISTORY_LIMIT = 10_000
    READER_BUFFER = 32_768  # more than one wake-up of the network service emits (Go queues <= 16384)

    def __init__(self, *, keep_history: bool = True, history_limit: int = HISTORY_LIMIT,
                 reader_buffer: int = READER_BUFFER) -> None:
        if reader_buffer < 2:
            raise ValueError(f"reader_buffer must be at least 2, not {reader_buffer!r}")
        self._sinks: list[Sink] = []
        self._subscribers: list[_Reader] = []
        self._keep_history = keep_history
        self._history_limit = history_limit
        self._reader_buffer = reader_buffer
        self.history: list[Event] = []
        self.history_dropped = 0
        self._history_dropped_ts = 0.0
        self.closed = False
        self._batching = False

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return (f"<EventStream {state} events={len(self.history) + self.history_dropped} "
                f"sinks={len(self._sinks)} readers={len(self._subscribers)}>")

    def add_sink(self, sink: Sink) -> None:
        self._sinks.append(sink)

    def emit(self, event: Event) -> None:
        """Deliver *event* everywhere. Sync, never blocks. Must not be called after close()."""
        if self.closed:
            raise RuntimeError(f"event emitted after the stream was closed: {event!r}")
        if self._keep_history:
            if len(self.history) < self._history_limit:
                self.history.append(event)
            else:
                self.history_dropped += 1
                self._history_dropped_ts = getattr(event, "ts", self._history_dropped_ts)
        for sink in list(self._sinks):
            try:
                if self._batching and hasattr(sink, "flush"):
                    sink.write(event, flush=False)
                else:
                    sink.write(event)
            except Exception:
                log.exception("event sink %r failed; detaching it", sink)
                self._sinks.remove(sink)
        for reader in list(self._subscribers):
            try:
                reader.offer(event)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.remove(reader)

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

        With *replay*, starts with the events already emitted (the kept history, then
        an ``events_dropped`` record if it was cut). Close the returned channel (or
        leave its ``async with``) to unsubscribe.
        """
        replayed = self.history if replay else []
        extra = 1 if replay and self.history_dropped else 0
        # Room for the replay on top of the live buffer: the replay is bounded by history_limit.
        send, receive = trio.open_memory_channel[Event](len(replayed) + extra + self._reader_buffer)
        for event in replayed:
            send.send_nowait(event)
        if extra:
            send.send_nowait(EventsDroppedEvent(count=self.history_dropped, ts=self._history_dropped_ts))
        if self.closed:
            send.close()
        else:
            self._subscribers.append(_Reader(send))
        return receive

    def __aiter__(self) -> trio.MemoryReceiveChannel[Event]:
        return self.subscribe()

    def close(self) -> None:
        """End every iterator (after they drain what is queued) and close the sinks. Idempotent."""
        if self.closed:
            return
        self.closed = True
        for reader in self._subscribers:
            reader.send.close()
        self._subscribers.clear()
        for sink in self._sinks:
            close = getattr(sink, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    log.exception("closing event sink %r failed", sink)
        self._sinks.clear()
