"""Event sinks. A sink is any object with ``write(event)`` and optionally ``close()``."""

from __future__ import annotations

import json
import os
import sys
from typing import IO, Protocol

from ._types import Event

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
    """Keeps every event in ``events`` (``corral.run(...).events``)."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def write(self, event: Event) -> None:
        self.events.append(event)
