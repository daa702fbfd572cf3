"""Requests on worker threads (:class:`lib.guard.asgi_threads.ThreadedPaths`): blocking endpoints run off the server's
loop, at most ``threads`` at once, and the helper threads Starlette's background tasks run on are kept from one
request to the next (each click's result file is deleted by one; a new thread per click cost about a millisecond)."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.responses import JSONResponse
from starlette.routing import Route

from lib.guard.asgi_threads import ThreadedPaths


def _app(background_threads: list[threading.Thread]) -> Starlette:
    async def blocking(request):
        time.sleep(float(request.query_params.get("sleep", 0)))  # as MONAI Label's endpoints block
        task = BackgroundTask(lambda: background_threads.append(threading.current_thread()))
        return JSONResponse({"thread": threading.current_thread().name}, background=task)

    return Starlette(routes=[Route("/infer", blocking, methods=["POST"])])


def _serve(app, threads: int, batches: list[list[dict]]) -> tuple[list[dict], list[float]]:
    """Serve ``batches`` through one ``ThreadedPaths``, the requests of a batch at once, batch after batch."""

    async def main():
        transport = httpx.ASGITransport(app=ThreadedPaths(app, ["/info"], threads))
        answers, seconds = [], []
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            for batch in batches:
                start = time.perf_counter()
                answers += [a.json() for a in await asyncio.gather(*(client.post("/infer", params=p) for p in batch))]
                seconds.append(time.perf_counter() - start)
        return answers, seconds

    return asyncio.run(main())


def test_background_helper_threads_are_kept_across_requests():
    background: list[threading.Thread] = []
    answers, _ = _serve(_app(background), 2, [[{}]] * 8)
    assert len(background) == 8
    assert len({id(thread) for thread in background}) == 1, "a new helper thread per request"
    assert len(answers) == 8 and {a["thread"] for a in answers} == {"request_0"}  # the idle thread is reused


def test_blocking_requests_run_side_by_side_up_to_the_thread_bound():
    slow = [{"sleep": 0.3}, {"sleep": 0.3}]
    answers, (two_threads,) = _serve(_app([]), 2, [slow])
    assert {a["thread"] for a in answers} == {"request_0", "request_1"}
    assert two_threads < 0.55
    answers, (one_thread,) = _serve(_app([]), 1, [slow])
    assert {a["thread"] for a in answers} == {"request_0"} and one_thread >= 0.6
