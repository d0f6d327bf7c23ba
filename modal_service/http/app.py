"""The FastAPI app factory, shared by ``ananke serve`` and the Modal app.

Importable with no GPU and no Modal: the engine is built in the app's lifespan, in the background, so
``/health`` answers ``loading`` until it is ready. Every non-2xx answer is one
:class:`~langchain_ananke.protocol.ErrorBody` (:mod:`.errors`). Requests pass
:class:`~modal_service.http.metrics.Observe` first (request id, request metrics), then the
:class:`~modal_service.http.guard.Guard`, then a router (:mod:`.generate_api`, :mod:`.openai_api`,
:mod:`.metrics`), which runs the one :class:`~modal_service.http.lifecycle.Lifecycle`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from langchain_ananke.protocol import HealthResponse
from modal_service.engine.engine import Engine
from modal_service.engine.generator import Generator
from modal_service.engine.release import running_vllm
from modal_service.http.errors import install_error_handlers
from modal_service.http.generate_api import generate_router
from modal_service.http.guard import OPEN_PATHS, Admission, ApiKey, Guard, unauthorized
from modal_service.http.lifecycle import Lifecycle
from modal_service.http.metrics import Observe, ServiceMetrics, metrics_router
from modal_service.http.openai_api import openai_router
from modal_service.limits import Limits


def create_app(
    engine: Engine,
    *,
    api_key: str | None = None,
    limits: Limits | None = None,
    start_engine: bool = True,
    drain_seconds: float = 30.0,
    metrics_public: bool = False,
) -> FastAPI:
    """Build the service around ``engine`` (started in the background unless ``start_engine=False``).

    ``limits`` (default: the engine's) become the engine's too, so the compiler it builds at start
    enforces the same bounds. With ``api_key`` set, every path but ``/health`` needs
    ``Authorization: Bearer <key>`` (the OpenAPI document, ``/docs`` and ``/metrics`` included;
    ``metrics_public`` opens ``/metrics``, for scrapers inside a private network).
    """
    limits = engine.limits = limits or engine.limits
    admission = Admission(limits.max_inflight)
    metrics = ServiceMetrics(admission, engine)
    lifecycle = Lifecycle(Generator(engine, limits), admission, limits, metrics)
    key = ApiKey(api_key)
    vllm_release = running_vllm()  # fixed for the process: not looked up on every /health poll

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(engine.start()) if start_engine else None
        yield
        await admission.drain(drain_seconds)
        if task is not None:
            await task
        engine.shutdown()

    app = FastAPI(
        title="Ananke constrained generation",
        version="0.1.0",
        description="vLLM + llguidance: output that is guaranteed to satisfy the constraint.",
        lifespan=lifespan,
    )
    app.state.engine, app.state.lifecycle, app.state.admission = engine, lifecycle, admission
    app.state.drain_seconds, app.state.metrics = drain_seconds, metrics
    app.add_middleware(
        Guard,
        api_key=key,
        engine=engine,
        admission=admission,
        max_body_bytes=limits.max_body_bytes,
        max_json_depth=limits.max_json_depth,
        open_paths=OPEN_PATHS | {"/metrics"} if metrics_public else OPEN_PATHS,
    )
    app.add_middleware(Observe, metrics=metrics)  # added last: the outermost

    async def require_key(request: Request) -> None:
        """Route-level check too (the guard already refused keyless requests): defence in depth."""
        if not key.authorized(request.headers):
            raise unauthorized()

    install_error_handlers(app, engine)

    @app.get("/health", response_model=HealthResponse)
    async def health() -> JSONResponse:
        """``loading`` until the engine is ready, then ``ok``; ``sleeping`` while the engine sleeps (a
        Modal snapshot); ``error`` if it failed, died or the server is draining. Also reports load:
        ``inflight`` (admitted requests) and ``engine_unfinished`` (requests the engine is still working
        on), the ``dtype`` it runs in, and ``fast_forward`` (``on``, ``off (...)``, ``not applied: ...``)."""
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
            "vllm": vllm_release,
            "fast_forward": engine.fast_forward,
        }
        return JSONResponse(
            body.model_dump() | load,
            status_code=200 if state == "ok" else 503,
            headers=None if state == "ok" else {"Retry-After": "5"},
        )

    app.include_router(generate_router(lifecycle, require_key))
    app.include_router(openai_router(lifecycle, require_key))
    app.include_router(metrics_router(metrics, None if metrics_public else require_key))
    metrics.routes = frozenset(path for r in app.routes if isinstance(path := getattr(r, "path", None), str))
    return app
