"""Run an ASGI app's blocking endpoints on worker threads, so one slow request never stalls the others.

MONAI Label declares its endpoints ``async`` but does the work in them synchronously: an inference (image loading,
encoding), an upload copied to disk, a datastore listing all run on the server's one event loop, and every other
request, ``/info`` and the clicks of other users included, waits until it ends. :class:`ThreadedPaths` runs
requests on a pool of threads, each running its own event loop for the thread's whole life under one root task;
the client's ``receive`` and ``send`` stay on the server's loop and are called through it. Paths that never block
(``/info``, static files) are served on the server's loop as before.

Why one root task per thread: AnyIO, under Starlette's background tasks and synchronous dependencies, keeps its
helper threads for as long as the loop's root task lives. With a loop run per request (``run_until_complete`` of
the request) every request was a root task of its own, and every click started a new helper thread to delete its
result file (about a millisecond on two cores).

Nothing here imports the server.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


class LoopThread:
    """A daemon thread running an event loop until the process ends, with one root task for all its work."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(started,), name=name, daemon=True)
        self.thread.start()
        started.wait()

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)

        async def root() -> None:
            started.set()
            await asyncio.Event().wait()  # forever: the work comes through submit()

        self.loop.run_until_complete(root())

    def submit(self, coroutine: Coroutine[Any, Any, Any]) -> concurrent.futures.Future:
        """Run ``coroutine`` on this thread's loop, from any thread."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)


class ThreadedPaths:
    """ASGI middleware: HTTP requests run on up to ``threads`` worker threads (one request each at a time; started
    as needed, the most recently used first), except those under ``direct`` prefixes.

    Args:
        app: the wrapped ASGI app.
        direct: path prefixes served on the server's loop (quick endpoints: ``/info``, static files).
        threads: requests served at once; more wait for a free thread (the event loop stays free meanwhile).
    """

    def __init__(self, app: ASGIApp, direct: Sequence[str], threads: int) -> None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        self.app = app
        self.direct = tuple(direct)
        self.threads = threads
        self._started = 0
        self._idle: list[LoopThread] = []
        self._waiting: list[asyncio.Future] = []

    async def _acquire(self) -> LoopThread:
        if self._idle:
            return self._idle.pop()
        if self._started < self.threads:
            self._started += 1
            return LoopThread(f"request_{self._started - 1}")
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        return await waiter

    def _release(self, worker: LoopThread) -> None:
        """Hand ``worker`` to the first request still waiting, or keep it idle (on the server's loop)."""
        while self._waiting:
            waiter = self._waiting.pop(0)
            if not waiter.done():
                waiter.set_result(worker)
                return
        self._idle.append(worker)

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Any]], send: Callable) -> None:
        if scope["type"] != "http" or scope.get("path", "").startswith(self.direct):
            await self.app(scope, receive, send)
            return
        server_loop = asyncio.get_running_loop()

        def on_server_loop(function: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
            async def call(*args: Any) -> Any:
                return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(function(*args), server_loop))

            return call

        worker = await self._acquire()
        done = worker.submit(self.app(scope, on_server_loop(receive), on_server_loop(send)))
        try:
            await asyncio.wrap_future(done)
        finally:
            # A request whose client went away still runs to its end on the worker: the thread is free after that.
            if done.done():
                self._release(worker)
            else:
                done.add_done_callback(lambda _: server_loop.call_soon_threadsafe(self._release, worker))
