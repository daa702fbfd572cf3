"""The server's front door, one ASGI middleware in front of every endpoint: shared token, CORS allow-list, body bound.

- Shared token (``token``): every request must carry ``Authorization: Bearer <token>``; without it the answer is
  401, except ``GET /info/``, which answers a health record (name and status, nothing else) so monitors and the
  launcher can tell the server is up. CORS preflights carry no credentials by design and are not checked.
- Origins: a request whose ``Origin`` is neither this server (OHIF served here is same-origin) nor in ``origins`` is
  refused with 403 before any endpoint runs. Refusing, rather than only withholding the CORS headers, matters: a
  page may send a form POST (an upload, a training run) without a preflight, and the browser only hides the answer.
- Body bound: a body over ``max_body_bytes`` is refused with 413 from its ``Content-Length`` before it is read; a
  body without a length (chunked) is refused with 411, so the bound holds without buffering.
- Body checks: ``body_checks`` maps a path prefix to a function that inspects a (small) JSON body and raises
  :class:`RequestError`; the body is read once (at most 1 MB), checked, and replayed to the endpoint.

Nothing here imports the server; ``apps/sam_med2d/monailabel_private.py`` puts it in front of the running app.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from lib.common.settings import RequestError

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MAX_CHECKED_BODY = 2**20
HEALTH_PATHS = ("/info", "/info/")


@dataclasses.dataclass(frozen=True)
class GuardPolicy:
    """What the guard enforces.

    Attributes:
        token: the shared token; empty: no token required (loopback-only use).
        origins: cross-origin callers allowed (``https://viewer.example.org``), exact scheme://host[:port].
        max_body_bytes: largest request body.
        health: the record ``GET /info/`` answers without the token.
        body_checks: path prefix -> check of the JSON body of a POST/PUT to it.
    """

    token: str = ""
    origins: tuple[str, ...] = ()
    max_body_bytes: int = 2048 * 2**20
    health: Mapping[str, Any] = dataclasses.field(default_factory=lambda: {"status": "ok"})
    body_checks: Mapping[str, Callable[[str, Any], None]] = dataclasses.field(default_factory=dict)


class HttpGuard:
    """ASGI middleware enforcing a :class:`GuardPolicy` (see the module docstring)."""

    def __init__(self, app: ASGIApp, policy: GuardPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        method = scope.get("method", "GET")
        path = scope.get("path", "")
        origin = headers.get("origin")
        if origin is not None and not self._origin_allowed(origin, scope, headers):
            await _answer(send, 403, f"cross-origin requests from {origin} are not allowed (--conf cors_origins)")
            return
        preflight = method == "OPTIONS" and "access-control-request-method" in headers
        if self.policy.token and not preflight and not self._has_token(headers):
            if method == "GET" and path in HEALTH_PATHS:
                await _answer(send, 200, dict(self.policy.health))
                return
            await _answer(
                send,
                401,
                "this server needs its token: send 'Authorization: Bearer <token>'",
                {"WWW-Authenticate": "Bearer"},
            )
            return
        if method in ("POST", "PUT", "PATCH"):
            length = headers.get("content-length")
            if length is None and "chunked" in headers.get("transfer-encoding", ""):
                await _answer(send, 411, "request bodies need a Content-Length")
                return
            if length is not None and (not length.isdigit() or int(length) > self.policy.max_body_bytes):
                limit_mb = self.policy.max_body_bytes / 2**20
                await _answer(send, 413, f"request body over {limit_mb:g} MB (--conf max_upload_mb)")
                return
            check = next((c for prefix, c in self.policy.body_checks.items() if path.startswith(prefix)), None)
            if check is not None:
                try:
                    receive = await _checked_body(path, receive, check, int(length or 0))
                except RequestError as exc:
                    await _answer(send, exc.status, str(exc))
                    return
        await self.app(scope, receive, send)

    def _has_token(self, headers: Mapping[str, str]) -> bool:
        scheme, _, value = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), self.policy.token.encode())

    def _origin_allowed(self, origin: str, scope: Scope, headers: Mapping[str, str]) -> bool:
        if origin.rstrip("/") in self.policy.origins:
            return True
        scheme = scope.get("scheme", "http")
        return origin == f"{scheme}://{headers.get('host', '')}"  # same origin: a page this server served


async def _checked_body(path: str, receive: Receive, check: Callable[[str, Any], None], length: int) -> Receive:
    """Read the whole (small) body, check it, and return a ``receive`` that replays it."""
    if length > MAX_CHECKED_BODY:
        raise RequestError(f"request body over {MAX_CHECKED_BODY // 1024} KB", 413)
    body = b""
    more = True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            raise RequestError("the client went away", 400)
        body += message.get("body", b"")
        more = message.get("more_body", False)
    try:
        payload = json.loads(body) if body.strip() else None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(f"the body is not JSON: {exc}", 422) from exc
    check(path, payload)
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _answer(
    send: Send, status: int, detail: str | Mapping[str, Any], extra: Mapping[str, str] | None = None
) -> None:
    """A JSON answer in FastAPI's error shape (``{"detail": ...}``), or the given record."""
    payload = detail if isinstance(detail, Mapping) else {"detail": detail}
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
