"""The FastAPI app factory, shared by ``ananke serve`` and the Modal app.

Importable with no GPU and no Modal: the engine is built in the app's lifespan, in the background, so
``/health`` answers ``loading`` until it is ready. Every non-2xx answer is one
:class:`~langchain_ananke.protocol.ErrorBody`.

Requests flow through :class:`_Guard` (a plain ASGI middleware) first: API key (401; every path but
``/health``) -> draining / engine state (503) -> body size, whether announced or streamed (413) ->
JSON nesting depth (422) -> the app, run as a task that is cancelled the moment the client goes away,
so a disconnect aborts the engine request instead of generating tokens for nobody. Inside the app:
cheap bounds (:class:`Prechecks`: prompt characters vs the context, constraint shape; 422 before
anything is tokenized or compiled) -> admission (in-flight bound, 429 above it) ->
:class:`~modal_service.generation.Generator` -> JSON or Server-Sent Events. The request's deadline
(``timeout_s``) covers planning and generation; when it passes, a non-streaming request is a 504
``timeout`` and a stream ends with an ``error`` event of that code. Every admission slot is released
when its request ends, however it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import hmac
import itertools
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from types import TracebackType
from typing import Any

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from langchain_ananke.protocol import (
    BatchGenerateResponse,
    ErrorBody,
    ErrorDetail,
    GenerateRequest,
    GenerateResponse,
    HealthResponse,
    StreamEvent,
)
from modal_service.engine import Engine, EngineNotReady
from modal_service.generation import ApiError, Generator, Limits
from modal_service.schema_tools import ShapeLimits, shape_error

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
#: Default bound on JSON nesting in a request body; deeper bodies are answered 422 before parsing.
MAX_JSON_DEPTH = 100

_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        400: "Malformed request body",
        401: "Missing or wrong API key",
        413: "Request body too large",
        422: "Invalid request or constraint",
        429: "Too many requests in flight; see Retry-After",
        503: "Engine loading, failed or shutting down; see Retry-After",
        504: "Request timed out",
    }.items()
}


def error_response(
    status: int, code: str, message: str, detail: Any = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The one error body shape."""
    body = ErrorBody(error=ErrorDetail(code=code, message=message, detail=detail))
    return JSONResponse(body.model_dump(mode="json"), status_code=status, headers=headers)


def _is_engine_dead(exc: BaseException) -> bool:
    """vLLM's ``EngineDeadError`` (matched by name: this module must import without vLLM)."""
    return any(type(e).__name__ == "EngineDeadError" for e in (exc, exc.__cause__) if e is not None)


def _is_engine_rejection(exc: BaseException) -> bool:
    """vLLM refused the request's parameters (``VLLMValidationError``): the client's fault, a 422."""
    return any(type(e).__name__ == "VLLMValidationError" for e in (exc, exc.__cause__) if e is not None)


# ----------------------------------------------------------------------------------- admission
#: The admission slots a request holds; set per request by :class:`_Guard`, which releases them.
_REQUEST_SLOTS: contextvars.ContextVar[list[_Slot] | None] = contextvars.ContextVar(
    "ananke_request_slots", default=None
)


class _Slot:
    """One unit of the in-flight budget. Releasing is idempotent."""

    def __init__(self, admission: _Admission) -> None:
        self._admission = admission
        self._held = False

    def __enter__(self) -> _Slot:
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


class _Admission:
    """A bounded in-flight counter: above the bound, 429 at once instead of an unbounded queue."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.inflight = 0
        self.draining = False

    def acquire(self) -> None:
        if self.draining:
            raise ApiError(503, "shutting_down", "server is shutting down", headers={"Retry-After": "5"})
        if self.inflight >= self.limit:
            raise ApiError(
                429,
                "overloaded",
                f"{self.inflight} requests in flight (limit {self.limit})",
                headers={"Retry-After": "1"},
            )
        self.inflight += 1

    def slot(self) -> _Slot:
        """A context manager holding one slot (also released when the request ends)."""
        return _Slot(self)


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


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


class _TooLarge(Exception):
    pass


class _Guard:
    """Auth, availability, body limits and disconnect handling, before any route runs."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        api_key: str | None,
        engine: Engine,
        admission: _Admission,
        max_body_bytes: int,
        max_json_depth: int,
    ) -> None:
        self.app = app
        self._key_digest = _digest(api_key.encode()) if api_key else None
        self.engine = engine
        self.admission = admission
        self.max_body_bytes = max_body_bytes
        self.max_json_depth = max_json_depth

    def authorized(self, headers: Headers) -> bool:
        """Constant time: both sides are hashed to one length, then compared with hmac."""
        if self._key_digest is None:
            return True
        scheme, _, token = headers.get("authorization", "").partition(" ")
        given = _digest(token.strip().encode("latin-1", "replace"))
        return scheme.lower() == "bearer" and hmac.compare_digest(given, self._key_digest)

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
            return
        if body and await _depth_exceeds(body, self.max_json_depth):
            await error_response(422, "too_deep", f"JSON nests deeper than {self.max_json_depth} levels")(
                scope, receive, send
            )
            return
        await self._run(scope, body, receive, send)

    def _refusal(self, path: str, headers: Headers) -> JSONResponse | None:
        if path not in OPEN_PATHS and not self.authorized(headers):
            return error_response(
                401,
                "unauthorized",
                "missing or invalid API key (Authorization: Bearer ...)",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if path.startswith(ENGINE_PATHS):
            if self.admission.draining:
                return error_response(
                    503, "shutting_down", "server is shutting down", headers={"Retry-After": "5"}
                )
            if self.engine.state != "ok" or self.engine.is_dead:
                return _engine_unavailable(self.engine)
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

        slots: list[_Slot] = []
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
            log.info("client disconnected; request cancelled (%s %s)", scope["method"], scope["path"])
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


def _limit_error(limit: int, length: str | None = None) -> JSONResponse:
    size = f"body is {length} bytes" if length and length.isdigit() else "body is too large"
    return error_response(413, "body_too_large", f"{size}; the limit is {limit}")


def _engine_unavailable(engine: Engine) -> JSONResponse:
    """503; Retry-After only while loading (a failed or dead engine needs a restart, not a retry)."""
    if engine.state == "ok":  # it started, then died
        return error_response(503, "engine_unavailable", "the engine process has died; restart the service")
    message = engine.error or f"engine is {engine.state}"
    if engine.state == "error":
        return error_response(503, "engine_unavailable", f"the engine failed to start: {message}")
    return error_response(503, "engine_unavailable", message, headers={"Retry-After": "5"})


class _ClosingStream(StreamingResponse):
    """A streaming response that always closes its iterator (so the engine request is aborted)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._content = content
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await _aclose(self._content)
            self._on_close()


# ------------------------------------------------------------------------- bounds and deadline
class Prechecks:
    """Cheap bounds, checked before planning (which tokenizes prompts and compiles constraints).

    - Prompt characters: a token covers at most as many characters as its longest vocabulary
      entry has (byte-level BPE and SentencePiece spell every byte or character out), so a prompt of
      more than ``room * that`` characters cannot fit and is refused without tokenizing it (1.9 MB
      took 3.6-10 s to tokenize on 2 shared cores).
    - Constraint shape: :func:`~modal_service.schema_tools.shape_error` (choice entries,
      ``anyOf``/``oneOf`` branches, ``enum`` values, schema nodes), so an oversized constraint is a
      422 in milliseconds instead of a compile of seconds.
    """

    def __init__(self, generator: Generator, shapes: ShapeLimits) -> None:
        self.generator = generator
        self.engine = generator.engine
        self.shapes = shapes
        self._chars_per_token: int | None = None

    def __call__(self, req: GenerateRequest) -> None:
        """Raise :class:`ApiError` (422) when ``req`` breaks a bound."""
        self.generator.check_max_tokens(req)  # first: the prompt bound below depends on it
        self.check_shape(req)
        self.check_prompt_chars(req)

    def check_shape(self, req: GenerateRequest) -> None:
        c = req.constraints
        if c is not None:
            choices = len(c.choice or c.regex_patterns or ())
            schemas = [c.json_schema] if c.json_schema is not None else []
        else:
            choices, schemas = 0, [t.function.parameters for t in req.tools or ()]
        problem = shape_error(self.shapes, choices=choices, schemas=schemas)
        if problem is not None:
            raise ApiError(422, "invalid_constraint", problem[0], problem[1])

    def chars_per_token(self) -> int | None:
        """Most characters one token can stand for (computed once); None when unknown.

        A normalizer may shorten the text before tokenizing: NFC composes at most 3 characters into
        1 (Hangul jamo), so the bound triples; with any other normalizer there is no bound.
        """
        if self._chars_per_token is None:
            tokenizer = self.engine.tokenizer
            if tokenizer is None:
                return None
            backend = getattr(tokenizer, "backend_tokenizer", None)
            normalizer = type(getattr(backend, "normalizer", None)).__name__
            factor = {"NoneType": 1, "NFC": 3}.get(normalizer)
            if factor is None:
                self._chars_per_token = 0
            else:
                self._chars_per_token = factor * max(len(t) for t in tokenizer.get_vocab())
        return self._chars_per_token or None

    def check_prompt_chars(self, req: GenerateRequest) -> None:
        per_token = self.chars_per_token()
        if per_token is None:
            return
        if req.messages is not None:
            texts = [sum(len(m.content) for m in req.messages)]
        else:
            texts = [len(p) for p in (req.prompt if isinstance(req.prompt, list) else [req.prompt or ""])]
        context = self.engine.config.max_model_len
        room = max(context - req.max_tokens, 0)
        for i, chars in enumerate(texts):
            if chars > room * per_token:
                raise ApiError(
                    422,
                    "context_length_exceeded",
                    f"prompt {i} has {chars} characters, so at least {-(-chars // per_token)} tokens (a "
                    f"token covers at most {per_token} characters); with max_tokens {req.max_tokens} it "
                    f"exceeds the model's context of {context} tokens",
                    {"characters": chars, "max_tokens": req.max_tokens, "context": context},
                )


def request_timeout(generator: Generator, req: GenerateRequest) -> float:
    """The request's deadline in seconds: ``timeout_s``, or the server's default."""
    return req.timeout_s or generator.limits.default_timeout_s


def within_deadline(generator: Generator, req: GenerateRequest, started: float) -> GenerateRequest:
    """``req`` with ``timeout_s`` set to what its deadline leaves after planning (which began at
    ``started``, a :func:`time.monotonic` reading); a 504 when nothing is left."""
    timeout = request_timeout(generator, req)
    left = timeout - (time.monotonic() - started)
    if left <= 0:  # planning (tokenize, compile) took it all
        raise timeout_error(timeout, 0)
    return req.model_copy(update={"timeout_s": left})


def timeout_error(timeout: float, tokens: int | None) -> ApiError:
    """504 ``timeout``: the deadline passed and the engine request was aborted.

    ``tokens``: how many were generated (streamed) before; None when unknown (a non-streaming request
    asks the engine for its final output only, so an aborted one reports none).
    """
    done = "before any output" if tokens == 0 else f"after {tokens} generated tokens" if tokens else ""
    return ApiError(
        504,
        "timeout",
        f"the request's timeout of {timeout:g} s passed and it was aborted in the engine {done}".rstrip()
        + " (raise timeout_s, or ask for fewer max_tokens)",
        {"timeout_s": timeout, "tokens_generated": tokens},
    )


def timeout_event(error: ApiError) -> StreamEvent:
    """The last frame of a stream whose deadline passed."""
    return StreamEvent(
        event="error", error=ErrorDetail(code=error.code, message=error.message, detail=error.detail)
    )


async def answer(generator: Generator, req: GenerateRequest, plan: Any, started: float) -> GenerateResponse:
    """One non-streaming answer; a deadline that passes is a 504, never a 200 with partial output."""
    resp = await generator.complete_verified(within_deadline(generator, req, started), plan)
    if resp.finish_reason == "timeout":
        raise timeout_error(request_timeout(generator, req), resp.tokens_generated or None)
    return resp


# ------------------------------------------------------------------------------------- app
def create_app(
    engine: Engine,
    *,
    api_key: str | None = None,
    limits: Limits | None = None,
    start_engine: bool = True,
    drain_seconds: float = 30.0,
    max_json_depth: int = MAX_JSON_DEPTH,
    shapes: ShapeLimits | None = None,
) -> FastAPI:
    """Build the service around ``engine`` (started in the background unless ``start_engine=False``).

    With ``api_key`` set, every path but ``/health`` needs ``Authorization: Bearer <key>`` (the
    OpenAPI document and ``/docs`` included).
    """
    limits = limits or Limits()
    generator = Generator(engine, limits)
    precheck = Prechecks(generator, shapes or ShapeLimits())
    admission = _Admission(limits.max_inflight)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(engine.start()) if start_engine else None
        yield
        admission.draining = True
        for _tick in range(int(drain_seconds * 10)):
            if admission.inflight == 0:
                break
            await asyncio.sleep(0.1)
        if task is not None:
            await task
        engine.shutdown()

    app = FastAPI(
        title="Ananke constrained generation",
        version="0.1.0",
        description="vLLM + llguidance: output that is guaranteed to satisfy the constraint.",
        lifespan=lifespan,
    )
    app.state.engine, app.state.generator, app.state.admission = engine, generator, admission
    app.state.drain_seconds = drain_seconds
    app.add_middleware(
        _Guard,
        api_key=api_key,
        engine=engine,
        admission=admission,
        max_body_bytes=limits.max_body_bytes,
        max_json_depth=max_json_depth,
    )

    async def require_key(request: Request) -> None:
        """Route-level check too (the guard already refused keyless requests): defence in depth."""
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = _digest(token.strip().encode("latin-1", "replace"))
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, _digest(api_key.encode())):
            raise ApiError(401, "unauthorized", "missing or invalid API key (Authorization: Bearer ...)")

    _install_error_handlers(app, engine)

    @app.get("/health", response_model=HealthResponse)
    async def health() -> JSONResponse:
        """``loading`` until the engine is ready, then ``ok``; ``error`` if it failed, died or the
        server is draining. Also reports load: ``inflight`` (admitted requests) and
        ``engine_unfinished`` (requests the engine is still working on), and the ``dtype`` it runs in."""
        state = {"idle": "loading", "loading": "loading"}.get(engine.state, engine.state)
        detail = engine.error
        if state == "ok" and engine.is_dead:
            state, detail = "error", "the engine process has died; restart the service"
        elif state == "ok" and admission.draining:
            state, detail = "error", "server is shutting down"
        body = HealthResponse(status=state, model=engine.model_name, detail=detail)  # type: ignore[arg-type]
        load = {
            "inflight": admission.inflight,
            "engine_unfinished": engine.num_unfinished_requests() if engine.state == "ok" else 0,
            "draining": admission.draining,
            "dtype": getattr(engine, "dtype", None),
        }
        return JSONResponse(
            body.model_dump() | load,
            status_code=200 if state == "ok" else 503,
            headers=None if state == "ok" else {"Retry-After": "5"},
        )

    @app.post(
        "/generate_api",
        response_model=GenerateResponse | BatchGenerateResponse,
        responses={**_ERROR_RESPONSES, 200: {"description": "JSON, or text/event-stream when stream=true"}},
        dependencies=[Depends(require_key)],
    )
    async def generate_api(req: GenerateRequest) -> Any:
        """Generate under at most one constraint; ``stream=true`` answers with SSE frames."""
        precheck(req)
        if req.stream:
            return await _stream_response(generator, admission, req)
        with admission.slot():
            if isinstance(req.prompt, list):  # a batch: a timeout is per result (finish_reason)
                return await generator.run(req)
            started = time.monotonic()
            plan = (await generator.aplan(req))[0]
            return await answer(generator, req, plan, started)

    from modal_service.openai_compat import add_openai_routes

    add_openai_routes(app, generator, admission, require_key, _ERROR_RESPONSES, precheck=precheck)
    return app


def _install_error_handlers(app: FastAPI, engine: Engine) -> None:
    """Every error answer in the one body shape."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.detail, exc.headers)

    @app.exception_handler(EngineNotReady)
    async def _not_ready(_: Request, exc: EngineNotReady) -> JSONResponse:
        return error_response(503, "engine_unavailable", str(exc), headers={"Retry-After": "5"})

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_response(400, "malformed_json", "request body is not valid JSON", _clean(errors))
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error_response(
            422, "invalid_request", f"{where}: {first.get('msg', 'invalid')}", _clean(errors)
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, "http_error", str(exc.detail))

    @app.exception_handler(RecursionError)
    async def _too_deep(_: Request, exc: RecursionError) -> JSONResponse:
        # Deeply nested or long $ref-chained input that slipped past the body depth bound.
        log.warning("input too deeply nested to process: %s", exc)
        return error_response(422, "too_deep", "the request (e.g. its schema) nests too deeply to process")

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # Only reached for exceptions raised outside the guard (it answers the rest itself).
        return unexpected_error_response(exc, engine)


def unexpected_error_response(exc: Exception, engine: Engine) -> JSONResponse:
    """An exception no route handled: engine death -> 503, engine rejection -> 422, else 500."""
    if _is_engine_dead(exc):
        log.error("the engine has died: %s", exc)
        return _engine_unavailable(engine)
    if _is_engine_rejection(exc):
        return error_response(422, "invalid_request", f"the engine rejected the request: {exc}")
    log.exception("unhandled error")
    return error_response(500, "internal_error", f"{type(exc).__name__}: {exc}")


def _clean(errors: Any) -> Any:
    """Validation errors as plain JSON (pydantic puts exception objects in ``ctx``)."""
    return json.loads(json.dumps(errors, default=str))


async def _stream_response(generator: Generator, admission: _Admission, req: GenerateRequest) -> Any:
    """SSE: ``data: <StreamEvent JSON>`` frames; the last is ``done``, or ``error`` (``timeout`` when
    the deadline passed: the tokens sent so far are all there is)."""
    started = time.monotonic()
    plan = (await generator.aplan(req))[0]  # errors here are plain 4xx answers, before the stream starts
    timed = within_deadline(generator, req, started)
    slot = admission.slot().__enter__()

    async def frames() -> AsyncIterator[str]:
        events = generator.events(timed, plan)
        try:
            async for event in events:
                frame = event
                if event.event == "done" and event.response and event.response.finish_reason == "timeout":
                    error = timeout_error(request_timeout(generator, req), event.response.tokens_generated)
                    frame = timeout_event(error)
                yield f"data: {frame.model_dump_json(exclude_none=True)}\n\n"
        except Exception as exc:  # after the 200 header, errors travel as an error event
            dead, rejected = _is_engine_dead(exc), _is_engine_rejection(exc)
            if dead:
                log.error("the engine has died: %s", exc)
            elif not rejected:
                log.exception("stream failed")
            code = "engine_unavailable" if dead else "invalid_request" if rejected else "internal_error"
            event = StreamEvent(event="error", error=ErrorDetail(code=code, message=str(exc)))
            yield f"data: {event.model_dump_json(exclude_none=True)}\n\n"
        finally:
            await _aclose(events)  # aborts the engine request now, not when the generator is collected
            slot.release()

    return _ClosingStream(frames(), on_close=slot.release)


async def _aclose(iterator: AsyncIterator[Any]) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()
