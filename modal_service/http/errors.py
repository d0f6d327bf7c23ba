"""Every failure in one body shape: :class:`~langchain_ananke.protocol.ErrorBody`.

Before a response starts, an error is a JSON answer (:func:`error_response`); after a stream's 200,
it is the stream's last frame, built from the same :class:`~langchain_ananke.protocol.ErrorDetail`
(:func:`error_detail`). Validation errors map to 400/422 in one place (:func:`validation_error`),
whether FastAPI found them in a body or a route found them converting an OpenAI body.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from langchain_ananke.protocol import ErrorBody, ErrorDetail
from modal_service.engine.engine import Engine, EngineNotReady
from modal_service.errors import ApiError, is_engine_dead, is_engine_rejection

log = logging.getLogger(__name__)

#: The error answers every engine route documents in the OpenAPI document.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
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


def engine_unavailable(engine: Engine) -> JSONResponse:
    """503; Retry-After only while loading (a failed or dead engine needs a restart, not a retry)."""
    if engine.state == "ok":  # it started, then died
        return error_response(503, "engine_unavailable", "the engine process has died; restart the service")
    message = engine.error or f"engine is {engine.state}"
    if engine.state == "error":
        return error_response(503, "engine_unavailable", f"the engine failed to start: {message}")
    return error_response(503, "engine_unavailable", message, headers={"Retry-After": "5"})


def unexpected_error_response(exc: Exception, engine: Engine) -> JSONResponse:
    """An exception no route handled: engine death -> 503, engine rejection -> 422, else 500."""
    if is_engine_dead(exc):
        log.error("the engine has died: %s", exc)
        return engine_unavailable(engine)
    if is_engine_rejection(exc):
        return error_response(422, "invalid_request", f"the engine rejected the request: {exc}")
    log.exception("unhandled error")
    return error_response(500, "internal_error", f"{type(exc).__name__}: {exc}")


def error_detail(exc: BaseException) -> ErrorDetail:
    """What a stream's ``error`` frame says about ``exc`` (after the 200, errors travel in-band)."""
    if isinstance(exc, ApiError):
        return ErrorDetail(code=exc.code, message=exc.message, detail=exc.detail)
    dead, rejected = is_engine_dead(exc), is_engine_rejection(exc)
    if dead:
        log.error("the engine has died: %s", exc)
    elif not rejected:
        log.error("stream failed", exc_info=exc)
    code = "engine_unavailable" if dead else "invalid_request" if rejected else "internal_error"
    return ErrorDetail(code=code, message=str(exc))


def validation_error(errors: list[Any]) -> ApiError:
    """400 for a body that is not JSON; otherwise 422 naming the first field at fault."""
    clean = json.loads(json.dumps(errors, default=str))  # pydantic puts exception objects in ``ctx``
    if any(e.get("type") == "json_invalid" for e in errors):
        return ApiError(400, "malformed_json", "request body is not valid JSON", clean)
    first = errors[0] if errors else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    return ApiError(422, "invalid_request", f"{where}: {first.get('msg', 'invalid')}", clean)


def install_error_handlers(app: FastAPI, engine: Engine) -> None:
    """Every error answer in the one body shape."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.detail, exc.headers)

    @app.exception_handler(EngineNotReady)
    async def _not_ready(_: Request, exc: EngineNotReady) -> JSONResponse:
        return error_response(503, "engine_unavailable", str(exc), headers={"Retry-After": "5"})

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        error = validation_error(list(exc.errors()))
        return error_response(error.status, error.code, error.message, error.detail)

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
