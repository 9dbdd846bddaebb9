"""Events: the records of what the sandbox did, and where they go."""

from ._sinks import JsonlSink as JsonlSink
from ._sinks import ListSink as ListSink
from ._sinks import Sink as Sink
from ._stream import EventStream as EventStream
from ._types import CloseEvent as CloseEvent
from ._types import ConnectEvent as ConnectEvent
from ._types import DnsEvent as DnsEvent
from ._types import Event as Event
from ._types import EventsDroppedEvent as EventsDroppedEvent
from ._types import LimitEvent as LimitEvent
from ._types import PolicyErrorEvent as PolicyErrorEvent
from ._types import SandboxExitEvent as SandboxExitEvent
from ._types import SandboxStartEvent as SandboxStartEvent

__all__ = [
    "CloseEvent",
    "ConnectEvent",
    "DnsEvent",
    "Event",
    "EventStream",
    "EventsDroppedEvent",
    "JsonlSink",
    "LimitEvent",
    "ListSink",
    "PolicyErrorEvent",
    "SandboxExitEvent",
    "SandboxStartEvent",
    "Sink",
]
