"""The FastAPI app factory, shared by ``ananke serve`` and the Modal app.

Importable with no GPU and no Modal: the engine is built in the app's lifespan, in the background, so
``/health`` answers ``loading`` until it is ready. Every non-2xx answer is one
:class:`~langchain_ananke.protocol.ErrorBody`. Requests flow: auth -> admission (in-flight bound,
429 above it) -> :class:`~modal_service.generation.Generator` -> JSON or Server-Sent Events.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
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

log = logging.getLogger(__name__)

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


class _Admission:
    """A bounded in-flight counter: above the bound, 429 at once instead of an unbounded queue."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.inflight = 0
        self.draining = False

    @contextlib.contextmanager
    def slot(self) -> Any:
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
        try:
            yield
        finally:
            self.inflight -= 1


def create_app(
    engine: Engine,
    *,
    api_key: str | None = None,
    limits: Limits | None = None,
    start_engine: bool = True,
    drain_seconds: float = 30.0,
) -> FastAPI:
    """Build the service around ``engine`` (started in the background unless ``start_engine=False``)."""
    limits = limits or Limits()
    generator = Generator(engine, limits)
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

    async def require_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), api_key.encode()):
            raise ApiError(401, "unauthorized", "missing or invalid API key (Authorization: Bearer ...)")

    @app.middleware("http")
    async def body_limit(request: Request, call_next: Callable[[Request], Awaitable[Any]]) -> Any:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limits.max_body_bytes:
            return error_response(
                413, "body_too_large", f"body is {length} bytes; the limit is {limits.max_body_bytes}"
            )
        return await call_next(request)

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

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, "internal_error", f"{type(exc).__name__}: {exc}")

    @app.get("/health", response_model=HealthResponse)
    async def health() -> JSONResponse:
        """``loading`` until the engine is ready, then ``ok`` and the model; ``error`` if it failed."""
        state = {"idle": "loading", "loading": "loading"}.get(engine.state, engine.state)
        body = HealthResponse(status=state, model=engine.model_name, detail=engine.error)  # type: ignore[arg-type]
        return JSONResponse(
            body.model_dump(),
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
        if req.stream:
            return await _stream_response(generator, admission, req)
        with admission.slot():
            return await generator.run(req)

    from modal_service.openai_compat import add_openai_routes

    add_openai_routes(app, generator, admission, require_key, _ERROR_RESPONSES)
    return app


def _clean(errors: Any) -> Any:
    """Validation errors as plain JSON (pydantic puts exception objects in ``ctx``)."""
    return json.loads(json.dumps(errors, default=str))


async def _stream_response(generator: Generator, admission: _Admission, req: GenerateRequest) -> Any:
    """SSE: ``data: <StreamEvent JSON>`` frames; the last is ``done`` (or ``error``)."""
    plan = (await generator.aplan(req))[0]  # errors here are plain 4xx answers, before the stream starts
    slot = admission.slot()
    slot.__enter__()

    async def frames() -> AsyncIterator[str]:
        try:
            async for event in generator.events(req, plan):
                yield f"data: {event.model_dump_json(exclude_none=True)}\n\n"
        except Exception as exc:  # after the 200 header, errors travel as an error event
            log.exception("stream failed")
            event = StreamEvent(event="error", error=ErrorDetail(code="internal_error", message=str(exc)))
            yield f"data: {event.model_dump_json(exclude_none=True)}\n\n"
        finally:
            slot.__exit__(None, None, None)

    return StreamingResponse(
        frames(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
