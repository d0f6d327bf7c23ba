"""The guard in front of every route: auth, availability, draining, admission and body limits.

:class:`Guard` is a plain ASGI middleware. A request passes, in order: the API key (401; every path but
``/health``, and ``/metrics`` with ``--metrics-public``) -> draining / engine state (503) -> body
size, whether announced or streamed (413) -> JSON nesting depth (422) -> the app, run as a task that
is cancelled the moment the client goes away, so a disconnect aborts the engine request instead of
generating tokens for nobody.

:class:`Admission` bounds the requests in flight. The request lifecycle takes a slot before it plans
(tokenizes, compiles), so compile work is bounded on every route; above the bound the answer is 429 at
once instead of an unbounded queue. The guard releases every slot a request took when the request ends,
however it ends. Draining (SIGTERM, or the app's shutdown) also lives here: new engine requests get 503
while admitted ones finish.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import hmac
import itertools
import logging
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from types import TracebackType
from typing import Any

from starlette.datastructures import Headers

from modal_service.engine.engine import Engine
from modal_service.errors import ApiError
from modal_service.http import request_id
from modal_service.http.errors import engine_unavailable, error_response, unexpected_error_response

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Paths answered without an API key: liveness/readiness only (it reveals the model name and load).
OPEN_PATHS = frozenset({"/health"})
#: Paths that need a ready engine (503 while it loads, after it failed, and while draining).
ENGINE_PATHS = ("/generate_api", "/v1/")


class ApiKey:
    """The bearer key, hashed once; checks compare digests in constant time."""

    def __init__(self, key: str | None) -> None:
        self._digest = _digest(key.encode()) if key else None

    def authorized(self, headers: Headers) -> bool:
        """Constant time: both sides are hashed to one length, then compared with hmac."""
        if self._digest is None:
            return True
        scheme, _, token = headers.get("authorization", "").partition(" ")
        given = _digest(token.strip().encode("latin-1", "replace"))
        return scheme.lower() == "bearer" and hmac.compare_digest(given, self._digest)


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


def unauthorized() -> ApiError:
    return ApiError(
        401,
        "unauthorized",
        "missing or invalid API key (Authorization: Bearer ...)",
        headers={"WWW-Authenticate": "Bearer"},
    )


# ----------------------------------------------------------------------------------- admission
#: The admission slots a request holds; set per request by :class:`Guard`, which releases them.
_REQUEST_SLOTS: contextvars.ContextVar[list[Slot] | None] = contextvars.ContextVar(
    "ananke_request_slots", default=None
)


class Slot:
    """One unit of the in-flight budget. Releasing is idempotent."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._held = False

    def __enter__(self) -> Slot:
        self._admission.acquire()
        self._held = True
        held = _REQUEST_SLOTS.get()
        if held is not None:
            held.append(self)
        return self

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.release()

    def release(self) -> None:
        if self._held:
            self._held = False
            self._admission.inflight -= 1


class Admission:
    """A bounded in-flight counter, and the drain state."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.inflight = 0
        self.draining = False
        self._drain_deadline = 0.0
        self.refused = {"overloaded": 0, "shutting_down": 0}
        """Requests refused so far, by reason (read by ``/metrics``)."""

    def acquire(self) -> None:
        if self.draining:
            self.refused["shutting_down"] += 1
            raise ApiError(503, "shutting_down", "server is shutting down", headers={"Retry-After": "5"})
        if self.inflight >= self.limit:
            self.refused["overloaded"] += 1
            raise ApiError(
                429,
                "overloaded",
                f"{self.inflight} requests in flight (limit {self.limit})",
                headers={"Retry-After": "1"},
            )
        self.inflight += 1

    def slot(self) -> Slot:
        """A context manager holding one slot (also released when the request ends)."""
        return Slot(self)

    def begin_drain(self, seconds: float) -> None:
        """Refuse new requests from now on; admitted ones get up to ``seconds`` to finish. Safe to
        call from a signal handler (it only sets fields); a drain already begun keeps its deadline."""
        if not self.draining:
            self.draining = True
            self._drain_deadline = time.monotonic() + seconds

    def drain_over(self) -> bool:
        """Whether the drain has nothing left to wait for: no request in flight, or time is up."""
        return self.draining and (self.inflight == 0 or time.monotonic() >= self._drain_deadline)

    async def drain(self, seconds: float) -> None:
        """:meth:`begin_drain`, then wait until :meth:`drain_over`."""
        self.begin_drain(seconds)
        while not self.drain_over():  # noqa: ASYNC110 - polled: slots are released from many places
            await asyncio.sleep(0.1)


# ------------------------------------------------------------------------------- the guard
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_DEPTH_STEP = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")


def json_depth_exceeds(body: bytes, limit: int) -> bool:
    """Whether JSON ``body`` nests deeper than ``limit``: linear time, no recursion, no parsing.

    Strings are dropped, every bracket becomes +1 / -1, and the running sum's maximum is the depth.
    """
    skeleton = _JSON_STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    steps = memoryview(skeleton.translate(_DEPTH_STEP)).cast("b")
    return max(itertools.accumulate(steps), default=0) > limit


async def _depth_exceeds(body: bytes, limit: int) -> bool:
    if len(body) < 64 * 1024:
        return json_depth_exceeds(body, limit)
    return await asyncio.to_thread(json_depth_exceeds, body, limit)  # up to ~0.2 s for 2 MiB


class _TooLarge(Exception):
    pass


class Guard:
    """Auth, availability, body limits and disconnect handling, before any route runs."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        api_key: ApiKey,
        engine: Engine,
        admission: Admission,
        max_body_bytes: int,
        max_json_depth: int,
        open_paths: frozenset[str] = OPEN_PATHS,
    ) -> None:
        self.app = app
        self.open_paths = open_paths
        self.api_key = api_key
        self.engine = engine
        self.admission = admission
        self.max_body_bytes = max_body_bytes
        self.max_json_depth = max_json_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        headers = Headers(scope=scope)
        refusal = self._refusal(path, headers)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        try:
            body = await self._read_body(receive)
        except _TooLarge:
            await _limit_error(self.max_body_bytes)(scope, receive, send)
            return
        if body is None:  # the client left before sending its body
            _mark_disconnected()
            return
        if body and await _depth_exceeds(body, self.max_json_depth):
            await error_response(422, "too_deep", f"JSON nests deeper than {self.max_json_depth} levels")(
                scope, receive, send
            )
            return
        await self._run(scope, body, receive, send)

    def _refusal(self, path: str, headers: Headers) -> Any:
        if path not in self.open_paths and not self.api_key.authorized(headers):
            error = unauthorized()
            return error_response(error.status, error.code, error.message, headers=error.headers)
        if path.startswith(ENGINE_PATHS):
            if self.admission.draining:
                self.admission.refused["shutting_down"] += 1
                return error_response(
                    503, "shutting_down", "server is shutting down", headers={"Retry-After": "5"}
                )
            if self.engine.state != "ok" or self.engine.is_dead:
                return engine_unavailable(self.engine)
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return _limit_error(self.max_body_bytes, length)
        return None

    async def _read_body(self, receive: Receive) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _run(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> None:
        """Run the app with the body replayed; cancel it if the client disconnects first."""
        disconnected = asyncio.Event()
        replayed = False
        started = complete = False
        cancelled_for_disconnect = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        async def tracked_send(message: Message) -> None:
            nonlocal complete, started
            started = True
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                complete = True
            await send(message)

        slots: list[Slot] = []
        token = _REQUEST_SLOTS.set(slots)
        try:
            app_task = asyncio.ensure_future(self.app(scope, replay, tracked_send))
        finally:
            _REQUEST_SLOTS.reset(token)

        async def watch() -> None:
            nonlocal cancelled_for_disconnect
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    disconnected.set()
                    if not complete and not app_task.done():
                        cancelled_for_disconnect = True
                        app_task.cancel()
                    return

        watcher = asyncio.ensure_future(watch())
        try:
            await app_task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not cancelled_for_disconnect or (current is not None and current.cancelling()):
                raise
            _client_left(scope)
        except Exception as exc:
            # Answered here rather than by Starlette's outermost handler, which re-raises after
            # answering: uvicorn would then log a traceback and reset the keep-alive connection.
            if started:
                log.exception("request failed after its response started")
            else:
                await unexpected_error_response(exc, self.engine)(scope, replay, send)
        finally:
            watcher.cancel()
            for slot in slots:
                slot.release()


def _mark_disconnected() -> None:
    context = request_id.current()
    if context is not None:
        context.disconnected = True


def _client_left(scope: Scope) -> None:
    """The client went away mid-request and the request was cancelled."""
    _mark_disconnected()
    log.info("client disconnected; request cancelled (%s %s)", scope["method"], scope["path"])


def _limit_error(limit: int, length: str | None = None) -> Any:
    size = f"body is {length} bytes" if length and length.isdigit() else "body is too large"
    return error_response(413, "body_too_large", f"{size}; the limit is {limit}")
