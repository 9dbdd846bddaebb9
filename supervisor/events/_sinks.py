"""Event sinks. A sink is any object with ``write(event)`` and optionally ``close()``."""

from __future__ import annotations

import collections
import json
import os
import sys
from typing import IO, Protocol

from ._types import Event, EventsDroppedEvent

__all__ = ["JsonlSink", "ListSink", "Sink"]


class Sink(Protocol):
    def write(self, event: Event) -> None: ...


class JsonlSink:
    """JSON lines: one ``event.to_dict()`` per line, flushed after every line so that
    ``tail -f`` and a crashed supervisor both see every event written so far.

    Inside :meth:`EventStream.batch` (the network service's handling of one wake-up's
    events) lines are flushed once, when the batch ends: still before the supervisor
    waits for anything, so nothing is held back, at one write per batch."""

    def __init__(self, file: IO[str], *, owned: bool = False) -> None:
        self._file = file
        self._owned = owned

    @classmethod
    def open(cls, path: str | os.PathLike) -> JsonlSink:
        """``--events FILE``: ``-`` is stderr; otherwise a new file replaces whatever is at
        FILE, never through a link (:class:`corral.fs.outputs.OutputFile`)."""
        if os.fspath(path) == "-":
            return cls(sys.stderr)
        from corral.fs.outputs import OutputFile

        output = OutputFile.prepare(path, "--events")
        try:
            fd = output.open()
        finally:
            output.close()
        return cls(open(fd, "w", encoding="utf-8"), owned=True)  # noqa: SIM115 - owned by the sink

    def write(self, event: Event, *, flush: bool = True) -> None:
        self._file.write(json.dumps(event.to_dict(), separators=(",", ":"), ensure_ascii=False) + "\n")
        if flush:
            self._file.flush()

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if self._owned:
            self._file.close()

    def __repr__(self) -> str:
        return f"<JsonlSink {getattr(self._file, 'name', '?')}>"


class ListSink:
    """Keeps the events of a run in memory, in ``events`` (``corral.run(...).events``), bounded.

    A run with at most ``limit`` events keeps them all.  Beyond that ``events`` holds the
    first ``limit // 2`` and the latest ones — how the run began and how it ended (its
    ``limit`` and ``sandbox_exit`` records) — and between them one
    :class:`EventsDroppedEvent` counting, by type, what was left out: a flood inside costs
    no more memory than ``limit`` events.  ``limit=None``: keep everything.  The JSONL
    sinks (``--events FILE``, ``corral logs``) always get every event.
    """

    DEFAULT_LIMIT = 20_000

    def __init__(self, limit: int | None = DEFAULT_LIMIT) -> None:
        if limit is not None and limit < 2:
            raise ValueError(f"ListSink limit must be at least 2 or None, not {limit!r}")
        self._limit = limit
        self.events: list[Event] = []
        self._dropped: collections.Counter[str] = collections.Counter()

    def __repr__(self) -> str:
        return f"<ListSink kept={len(self.events)} dropped={self.dropped}>"

    @property
    def dropped(self) -> int:
        """How many events were left out."""
        return sum(self._dropped.values())

    def write(self, event: Event) -> None:
        events = self.events
        if self._limit is None or len(events) < self._limit:
            events.append(event)
            return
        # events = head (limit // 2) + [gap] + the latest: the oldest of those makes room.
        gap_at = self._limit // 2
        out = events.pop(gap_at + 1) if self._dropped else events[gap_at]
        self._dropped[out.TYPE] += 1
        events[gap_at] = EventsDroppedEvent(count=self.dropped, by_type=dict(self._dropped), ts=out.ts)
        events.append(event)
