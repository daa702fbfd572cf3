"""Run an ASGI app's blocking endpoints on worker threads, so one slow request never stalls the others.

MONAI Label declares its endpoints ``async`` but does the work in them synchronously: an inference (image loading,
encoding), an upload copied to disk, a datastore listing all run on the server's one event loop, and every other
request, ``/info`` and the clicks of other users included, waits until it ends. :class:`ThreadedPaths` runs
requests on a pool of threads, each thread with its own event loop, kept for the thread's life (a new loop per
request would also start new helper threads for the app's synchronous parts: about a millisecond per click); the
client's ``receive`` and ``send`` stay on the server's loop and are called through it. Paths that never block
(``/info``, static files) are served on the server's loop as before.

Nothing here imports the server.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


class ThreadedPaths:
    """ASGI middleware: HTTP requests run on ``threads`` worker threads, except those under ``direct`` prefixes.

    Args:
        app: the wrapped ASGI app.
        direct: path prefixes served on the server's loop (quick endpoints: ``/info``, static files).
        threads: requests served at once; more wait for a free thread (the event loop stays free meanwhile).
    """

    def __init__(self, app: ASGIApp, direct: Sequence[str], threads: int) -> None:
        self.app = app
        self.direct = tuple(direct)
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="request")
        self._thread_loops = threading.local()

    def _thread_loop(self) -> asyncio.AbstractEventLoop:
        """The calling worker thread's event loop, made on its first request."""
        loop = getattr(self._thread_loops, "loop", None)
        if loop is None:
            loop = self._thread_loops.loop = asyncio.new_event_loop()
        return loop

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Any]], send: Callable) -> None:
        if scope["type"] != "http" or scope.get("path", "").startswith(self.direct):
            await self.app(scope, receive, send)
            return
        server_loop = asyncio.get_running_loop()

        def on_server_loop(function: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
            async def call(*args: Any) -> Any:
                return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(function(*args), server_loop))

            return call

        def serve() -> None:
            self._thread_loop().run_until_complete(self.app(scope, on_server_loop(receive), on_server_loop(send)))

        await server_loop.run_in_executor(self.pool, serve)
