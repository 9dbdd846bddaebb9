"""corral for asyncio programs: :func:`run`, :func:`open_sandbox`, :class:`Sandbox`,
:class:`Process` with the same shape as the trio API in :mod:`corral.api`.

    import asyncio, corral, corral.aio

    async def on_connect(req):            # an asyncio coroutine function
        return corral.ALLOW if req.name == "pypi.org" else corral.deny("no")

    async def main():
        async with corral.aio.open_sandbox(on_connect=on_connect) as box:
            proc = await box.start(["pip", "download", "six"])
            async for event in box.events():
                print(event)
            print(await proc.wait())

    asyncio.run(main())

How: corral's supervisor is trio code. The first sandbox opened from an asyncio loop
starts trio in *guest mode* on that loop (``trio.lowlevel.start_guest_run``): trio's
tasks run as callbacks of the asyncio loop, in the same thread, and trio waits for I/O
in a helper thread. Every sandbox of the loop shares that one guest run (a loop can host
only one); it stops when the last sandbox closes. Each method here runs the matching
trio method of the public API (:func:`corral.open_sandbox`, ``Sandbox.start``,
``Process.wait``...) as a trio task and awaits its result; cancelling the asyncio task
cancels the trio call. Leaving the ``async with`` block, by an exception or by
cancellation, kills whatever still runs inside, as with trio.

``on_connect`` / ``on_dns`` run as asyncio tasks on the caller's loop (await asyncio
things in them, not trio things); ``on_packet`` is a plain function, as with trio.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import weakref
from typing import Any, AsyncIterator, Awaitable, Callable

import attrs
import trio

from . import api
from .errors import CorralError, PolicyError
from .launch import Result
from .policy import check_callbacks

__all__ = ["Process", "Sandbox", "open_sandbox", "run"]

_bridges: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # asyncio loop -> _Bridge


class _Bridge:
    """The one trio guest run on an asyncio loop, shared by its sandboxes (refcounted)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._users = 0
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._stop: trio.Event | None = None
        self._ready: asyncio.Future = loop.create_future()  # trio runs and takes calls
        self._done: asyncio.Future = loop.create_future()  # the guest run has ended

    @classmethod
    async def acquire(cls) -> _Bridge:
        loop = asyncio.get_running_loop()
        while True:
            bridge = _bridges.get(loop)
            if bridge is None or bridge._done.done():
                break
            if bridge._users > 0:  # starting or running
                bridge._users += 1
                try:
                    await bridge._wait_ready()
                except BaseException:
                    await bridge.release()
                    raise
                return bridge
            await asyncio.shield(bridge._done)  # stopping: wait for it to end
        bridge = _bridges[loop] = cls(loop)
        bridge._users = 1
        trio.lowlevel.start_guest_run(
            bridge._main,
            run_sync_soon_threadsafe=loop.call_soon_threadsafe,
            run_sync_soon_not_threadsafe=loop.call_soon,
            done_callback=bridge._finished,
            host_uses_signal_set_wakeup_fd=True,
        )
        try:
            await bridge._wait_ready()
        except BaseException:
            await bridge.release()
            raise
        return bridge

    async def _wait_ready(self) -> None:
        await asyncio.wait([self._ready, self._done], return_when=asyncio.FIRST_COMPLETED)
        if not self._ready.done():
            self._done.result().unwrap()  # trio could not start: raise why
            raise CorralError("corral.aio: trio stopped before it started")

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._ready.set_result(None)  # guest tasks run in the loop's thread
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def _finished(self, outcome: Any) -> None:
        if not self._done.done():
            self._done.set_result(outcome)

    async def release(self) -> None:
        self._users -= 1
        if self._users == 0:
            if self._ready.done():
                self._token.run_sync_soon(self._stop.set)
            (await asyncio.shield(self._done)).unwrap()

    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any,
              scope: trio.CancelScope | None = None) -> asyncio.Future:
        """Start ``await fn(*args)`` as a trio task; the future gets its result or error.

        If the task is cancelled (``scope``, or the bridge stopping), the future gets
        ``asyncio.CancelledError``.
        """
        future = self._loop.create_future()
        scope = scope or trio.CancelScope()

        async def task() -> None:
            result: tuple[bool, Any] = (False, asyncio.CancelledError())
            try:
                with scope:
                    try:
                        result = (True, await fn(*args))
                    except Exception as exc:
                        result = (False, exc)
            finally:
                if not future.done():
                    ok, value = result
                    future.set_result(value) if ok else future.set_exception(value)

        if self._done.done():
            raise CorralError("corral.aio: the trio side of this event loop has stopped")
        self._token.run_sync_soon(self._nursery.start_soon, task)
        return future

    async def call(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """``await fn(*args)`` in trio. Cancelling the caller cancels the trio call and
        waits for it to unwind (so nothing it started outlives the cancellation)."""
        scope = trio.CancelScope()
        future = self.spawn(fn, *args, scope=scope)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            if not future.done():
                self._token.run_sync_soon(scope.cancel)
                with contextlib.suppress(BaseException):
                    await future
            raise

    async def run_asyncio(self, func: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """From trio: run the asyncio coroutine function ``func(*args)`` as an asyncio
        task on the host loop and return its result. A trio cancellation (the policy
        timeout) cancels the asyncio task."""
        task = self._loop.create_task(func(*args))
        done = trio.Event()
        token = self._token
        task.add_done_callback(lambda _: token.run_sync_soon(done.set))
        try:
            await done.wait()
        except trio.Cancelled:
            task.cancel()
            raise
        if task.cancelled():
            raise PolicyError("%s was cancelled" % getattr(func, "__name__", "the callback"))
        return task.result()


def _for_trio(bridge: _Bridge, func: Callable | None) -> Callable | None:
    if func is None:
        return None

    @functools.wraps(func)
    async def call(arg):
        return await bridge.run_asyncio(func, arg)

    return call


@attrs.define(eq=False)
class _Stream:
    """A pipe to or from the command (``subprocess.PIPE``), asyncio side."""

    _bridge: _Bridge
    _stream: Any

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        return await self._bridge.call(self._stream.receive_some, max_bytes)

    async def send_all(self, data: bytes) -> None:
        await self._bridge.call(self._stream.send_all, data)

    async def aclose(self) -> None:
        await self._bridge.call(self._stream.aclose)


@attrs.define(eq=False)
class Process:
    """The command running in a :class:`Sandbox` (asyncio side of :class:`corral.Process`)."""

    _bridge: _Bridge
    _proc: Any
    stdin: _Stream | None = None
    stdout: _Stream | None = None
    stderr: _Stream | None = None

    def __repr__(self) -> str:
        return repr(self._proc)

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    @property
    def result(self) -> Result | None:
        return self._proc.result

    async def wait(self) -> int:
        """Wait for the command; its exit code (128+N for signal N)."""
        return await self._bridge.call(self._proc.wait)

    async def communicate(self, input: bytes | None = None) -> tuple[bytes | None, bytes | None]:
        """Feed ``input`` to stdin, read stdout/stderr to the end."""
        return await self._bridge.call(self._proc.communicate, input)

    def send_signal(self, sig: int) -> None:
        self._proc.send_signal(sig)

    def terminate(self) -> None:
        self._proc.terminate()

    def kill(self) -> None:
        self._proc.kill()


@attrs.define(eq=False)
class Sandbox:
    """A sandbox opened by :func:`open_sandbox` (asyncio side of :class:`corral.Sandbox`)."""

    _bridge: _Bridge
    _box: Any
    process: Process | None = None

    def __repr__(self) -> str:
        return repr(self._box)

    @property
    def id(self) -> str | None:
        return self._box.id

    @property
    def config(self):
        return self._box.config

    @property
    def network(self):
        return self._box.network

    @property
    def recorded_events(self) -> list:
        return self._box.recorded_events

    @property
    def report(self) -> dict | None:
        return self._box.report

    async def start(self, argv, *, stdin=None, stdout=None, stderr=None) -> Process:
        """Start ``argv`` inside; return its :class:`Process` once it runs."""
        proc = await self._bridge.call(functools.partial(self._box.start, argv, stdin=stdin, stdout=stdout,
                                                         stderr=stderr))
        streams = {name: _Stream(self._bridge, getattr(proc, name)) for name in ("stdin", "stdout", "stderr")
                   if getattr(proc, name) is not None}
        self.process = Process(self._bridge, proc, **streams)
        return self.process

    async def events(self) -> AsyncIterator[Any]:
        """Every event of this sandbox, from the first; ends when the sandbox ends."""
        agen = None

        async def first():
            nonlocal agen
            agen = self._box.events()
            return await agen.__anext__()

        try:
            event = await self._bridge.call(first)
            while True:
                yield event
                event = await self._bridge.call(agen.__anext__)
        except StopAsyncIteration:
            return
        finally:
            if agen is not None and not self._bridge._done.done():
                await self._bridge.call(agen.aclose)

    async def aclose(self) -> None:
        """Kill whatever still runs inside and release everything (idempotent)."""
        await self._bridge.call(self._box.aclose)


@contextlib.asynccontextmanager
async def open_sandbox(config=None, *, on_connect=None, on_dns=None, on_packet=None,
                       on_claim=None, **options) -> AsyncIterator[Sandbox]:
    """``async with corral.aio.open_sandbox(config) as box:`` — :func:`corral.open_sandbox`
    for asyncio. Leaving the block (normally, by an exception or by cancellation) kills
    whatever still runs inside before it returns."""
    check_callbacks(on_connect=on_connect, on_dns=on_dns, on_packet=on_packet, on_claim=on_claim)
    bridge = await _Bridge.acquire()
    try:
        loop = asyncio.get_running_loop()
        opened = loop.create_future()
        leave = trio.Event()

        async def hold():
            async with api.open_sandbox(config, on_connect=_for_trio(bridge, on_connect),
                                        on_claim=_for_trio(bridge, on_claim),
                                        on_dns=_for_trio(bridge, on_dns), on_packet=on_packet,
                                        **options) as box:
                if not opened.done():
                    opened.set_result(box)
                await leave.wait()

        finished = bridge.spawn(hold)
        try:
            await asyncio.wait([opened, finished], return_when=asyncio.FIRST_COMPLETED)
            if not opened.done():
                finished.result()  # it failed before opening: raise why
            yield Sandbox(bridge, opened.result())
        finally:
            bridge._token.run_sync_soon(leave.set)
            try:
                await asyncio.shield(finished)
            except asyncio.CancelledError:
                if not finished.done():  # cancelled again while closing: still wait for the kill
                    with contextlib.suppress(BaseException):
                        await finished
                    raise
    finally:
        await bridge.release()


async def run(argv, *, config=None, capture_output: bool = False, input: bytes | None = None,
              on_connect=None, on_dns=None, on_packet=None, on_claim=None, **options) -> Result:
    """:func:`corral.run` for asyncio: run ``argv`` in a sandbox, wait, return a ``Result``."""
    import subprocess

    pipe = subprocess.PIPE if capture_output else None
    async with open_sandbox(config, on_connect=on_connect, on_dns=on_dns, on_packet=on_packet,
                            on_claim=on_claim, **options) as box:
        proc = await box.start(argv, stdin=subprocess.PIPE if input is not None else None,
                               stdout=pipe, stderr=pipe)
        out, err = await proc.communicate(input)
        await proc.wait()
    return attrs.evolve(proc.result, stdout=out, stderr=err, events=tuple(box.recorded_events),
                        report=box.report)
