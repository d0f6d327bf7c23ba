"""``GET /metrics``: the engine's Prometheus metrics and the service's own, in the text format.

Two sources, rendered one after the other:

- **The engine's.** vLLM's own ``PrometheusStatLogger`` (``vllm:`` names: requests running and
  waiting, prompt and generation tokens, TTFT and time-per-output-token histograms, KV-cache usage,
  preemptions). :class:`~modal_service.engine.engine.Engine` hands it to ``AsyncLLM`` as its one stat
  logger; it runs in this process (the engine core sends its stats to the output handler here) and
  records into ``prometheus_client``'s default registry, which is rendered as it is.
- **The service's** (``ananke_`` names), in a registry of the app's own (so several apps in one
  process count apart): :class:`Observe` counts every request by route template, status and error
  code and sets its request id (:mod:`.request_id`); the lifecycle reports plans (constraint kind and
  mode, compile time, cache hits) and outputs (verdict, closing on budget, resampling, agent-turn
  branch) through :meth:`ServiceMetrics.planned` and :meth:`ServiceMetrics.answered`; admission and
  engine state are read when scraped (:class:`_StateCollector`).

Every label has a small fixed set of values: route templates (``other`` for any path the app does not
serve), status codes, the service's error codes, constraint kinds. Never a schema, a prompt, a hash or
anything else a client chose.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable
from typing import Any

import prometheus_client
from fastapi import APIRouter, Depends, Response
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.datastructures import Headers

from langchain_ananke.protocol import CONSTRAINT_KINDS, BatchGenerateResponse, GenerateResponse
from modal_service.engine.engine import Engine
from modal_service.engine.generator import Plan
from modal_service.http import request_id
from modal_service.http.errors import ERROR_RESPONSES
from modal_service.http.guard import Admission, ASGIApp, Message, Receive, Scope, Send

#: Label value for paths the app does not serve (so a scan of random URLs adds one series, not many).
OTHER_ROUTE = "other"
#: The status label when the client left before any answer (nginx's convention).
CLIENT_CLOSED = "499"
_CODE = re.compile(r"[a-z_]{1,40}")
_ERROR_BODY_LIMIT = 64 * 1024
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_COMPILE_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_FINISH_REASONS = ("stop", "length", "tool_calls", "timeout", "abort")
_KINDS = frozenset({*CONSTRAINT_KINDS, "tools"})


class ServiceMetrics:
    """The service's metrics for one app, and the ``/metrics`` body (these plus the engine's)."""

    def __init__(self, admission: Admission, engine: Engine) -> None:
        self.registry = CollectorRegistry()
        self.routes: frozenset[str] = frozenset()
        """The app's route templates (set by the app factory once its routes are in)."""
        r = self.registry
        self.requests = Counter(
            "ananke_requests",
            "HTTP requests answered, by route template, status (499: the client left before any "
            "answer) and error code (ok when none; a stream that failed after its 200 has its "
            "error event's code)",
            ["route", "status", "code"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "ananke_request_duration_seconds",
            "Time from a request's arrival to the end of its answer (a stream's last frame)",
            ["route"],
            buckets=_SECONDS,
            registry=r,
        )
        self.constraints = Counter(
            "ananke_constraints",
            "Requests planned, by constraint kind (none: unconstrained) and mode (exact, or "
            "approximate: the token mask drops keywords and the final check decides)",
            ["kind", "mode"],
            registry=r,
        )
        self.compile_cache = Counter(
            "ananke_compile_cache",
            "Constraint compiles by result: hit (from the cache) or miss (compiled now)",
            ["result"],
            registry=r,
        )
        self.compile_seconds = Histogram(
            "ananke_compile_seconds",
            "Compile time of constraints that missed the cache, by kind",
            ["kind"],
            buckets=_COMPILE_SECONDS,
            registry=r,
        )
        self.outputs = Counter(
            "ananke_outputs",
            "Outputs generated (one per prompt), by the re-check's verdict (satisfied, unsatisfied, or "
            "unchecked: no constraint) and finish reason",
            ["verdict", "finish_reason"],
            registry=r,
        )
        self.closed_on_budget = Counter(
            "ananke_closed_on_budget",
            "Outputs cut by max_tokens that the closing search finished (rebuilt: from the start)",
            ["rebuilt"],
            registry=r,
        )
        self.loop_guard = Counter(
            "ananke_loop_guard",
            "Runaway repetitions the loop guard found (fired: cut and closed; false: no closing found)",
            ["fired"],
            registry=r,
        )
        self.decode_steps = Counter(
            "ananke_decode_steps",
            "Engine decoding steps of finished requests (metadata.decode_steps)",
            registry=r,
        )
        self.forced_tokens = Counter(
            "ananke_forced_tokens",
            "Tokens that entered by fast-forward, without a decoding step (metadata.forced_tokens)",
            registry=r,
        )
        self.resampled_attempts = Counter(
            "ananke_resampled_attempts",
            "Extra attempts run because JSON failed the full-schema check (constraints.max_attempts)",
            registry=r,
        )
        self.agent_turns = Counter(
            "ananke_agent_turns",
            "Agent turns (tools + answer grammar) by the branch the output took",
            ["branch"],
            registry=r,
        )
        self.deadline_exceeded = Counter(
            "ananke_deadline_exceeded",
            "Requests whose deadline (timeout_s) passed: a 504, or a stream's timeout error event",
            ["stream"],
            registry=r,
        )
        self.disconnects = Counter(
            "ananke_client_disconnects",
            "Clients that left before their answer was complete; engine_aborted: engine work was "
            "under way and was aborted",
            ["engine_aborted"],
            registry=r,
        )
        r.register(_StateCollector(admission, engine))
        # Series that exist from the start, so rate() and alerts see them before the first event.
        for verdict in ("satisfied", "unsatisfied"):
            self.outputs.labels(verdict, "stop")
        for flag in ("true", "false"):
            self.closed_on_budget.labels(flag)
            self.loop_guard.labels(flag)
            self.deadline_exceeded.labels(flag)
            self.disconnects.labels(flag)
        for result in ("hit", "miss"):
            self.compile_cache.labels(result)

    # ------------------------------------------------------------------ reported by the lifecycle
    def planned(self, plans: list[Plan]) -> None:
        """One request planned: its constraint (compiled once for all its prompts)."""
        constraint = plans[0].constraint if plans else None
        if constraint is None:
            self.constraints.labels("none", "none").inc()
            return
        mode = "approximate" if constraint.approximate else "exact"
        kind = constraint.kind if constraint.kind in _KINDS else "other"
        self.constraints.labels(kind, mode).inc()
        if plans[0].cache_hit:
            self.compile_cache.labels("hit").inc()
        else:
            self.compile_cache.labels("miss").inc()
            self.compile_seconds.labels(kind).observe(constraint.compile_ms / 1000)

    def answered(self, response: GenerateResponse | BatchGenerateResponse) -> None:
        """Outputs folded: verdicts, closing, resampling, agent-turn branches."""
        results = response.results if isinstance(response, BatchGenerateResponse) else [response]
        for resp in results:
            meta = resp.metadata
            satisfied = resp.constraint_satisfied
            verdict = "unchecked" if satisfied is None else "satisfied" if satisfied else "unsatisfied"
            finish = resp.finish_reason if resp.finish_reason in _FINISH_REASONS else "abort"
            self.outputs.labels(verdict, finish).inc()
            closing = meta.get("closed_on_budget")
            if isinstance(closing, dict):
                self.closed_on_budget.labels(_flag(bool(closing.get("rebuilt")))).inc()
            for counter, key in ((self.decode_steps, "decode_steps"), (self.forced_tokens, "forced_tokens")):
                value = meta.get(key)
                if isinstance(value, int) and value > 0:
                    counter.inc(value)
            guard = meta.get("loop_guard")
            if isinstance(guard, dict):
                self.loop_guard.labels(_flag(bool(guard.get("fired")))).inc()
            attempts = meta.get("attempts")
            if isinstance(attempts, int) and attempts > 1:
                self.resampled_attempts.inc(attempts - 1)
            branch = meta.get("branch")
            if branch in ("tool_calls", "answer"):
                self.agent_turns.labels(branch).inc()

    # ------------------------------------------------------------------- recorded by Observe
    def route_of(self, scope: Scope) -> str:
        """The route template that served ``scope`` (the router records it), else the path if the app
        serves it (a refusal before routing), else ``other``."""
        route = scope.get("route")
        path = getattr(route, "path", None) if route is not None else None
        if isinstance(path, str):
            return path
        return scope["path"] if scope["path"] in self.routes else OTHER_ROUTE

    def finished(
        self,
        scope: Scope,
        status: int | None,
        error_code: str | None,
        seconds: float,
        context: request_id.RequestContext,
    ) -> None:
        """One request ended: ``status`` None when no answer started (the client left, or the server
        is stopping), ``error_code`` from an error answer's body."""
        route = self.route_of(scope)
        if status is None:
            disconnected = context.disconnected
            label, code = (CLIENT_CLOSED, "client_disconnected") if disconnected else ("500", "cancelled")
        else:
            label = str(status)
            code = error_code or context.stream_error or "ok"
            if context.disconnected:
                code = "client_disconnected"
        self.requests.labels(route, label, code if _CODE.fullmatch(code) else "other").inc()
        self.request_seconds.labels(route).observe(seconds)
        if code == "timeout":
            self.deadline_exceeded.labels(_flag(status == 200)).inc()
        if context.disconnected:
            self.disconnects.labels(_flag(context.engine_busy)).inc()

    def render(self) -> bytes:
        """The ``/metrics`` body: the service's metrics, then the default registry's (vLLM's
        ``vllm:`` metrics, and ``prometheus_client``'s process and Python metrics)."""
        return prometheus_client.generate_latest(self.registry) + prometheus_client.generate_latest()


def _flag(value: bool) -> str:
    return "true" if value else "false"


class _StateCollector(Collector):
    """Admission and engine state, read when scraped."""

    def __init__(self, admission: Admission, engine: Engine) -> None:
        self.admission = admission
        self.engine = engine

    def collect(self) -> Iterable[Metric]:
        a = self.admission
        yield GaugeMetricFamily("ananke_inflight_requests", "Admitted requests (planning too)", a.inflight)
        yield GaugeMetricFamily("ananke_inflight_limit", "Admission bound; above it: 429", a.limit)
        yield GaugeMetricFamily("ananke_draining", "1 while shutting down (new requests get 503)", a.draining)
        refused = CounterMetricFamily(
            "ananke_admission_rejections",
            "Requests refused at admission: overloaded (429) or shutting_down (503)",
            labels=["reason"],
        )
        for reason, count in a.refused.items():
            refused.add_metric([reason], count)
        yield refused
        ready = self.engine.state == "ok" and not self.engine.is_dead
        yield GaugeMetricFamily("ananke_engine_ready", "1 when the engine is loaded and alive", ready)


# ------------------------------------------------------------------------------ the middleware
class Observe:
    """The outermost middleware: a request id for every request (the ``X-Request-ID`` header on every
    answer, refusals included) and one :meth:`ServiceMetrics.finished` record when it ends."""

    def __init__(self, app: ASGIApp, *, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        context = request_id.RequestContext(request_id.request_id_for(Headers(scope=scope)))
        header = (request_id.HEADER.lower().encode(), context.id.encode())
        status: int | None = None
        error_body: list[bytes] = []
        size = 0

        async def observed_send(message: Message) -> None:
            nonlocal status, size
            if message["type"] == "http.response.start":
                status = int(message["status"])
                kept = [h for h in message.get("headers", ()) if h[0].lower() != header[0]]
                message = {**message, "headers": [*kept, header]}
            elif message["type"] == "http.response.body" and status is not None and status >= 400:
                chunk: bytes = message.get("body", b"")
                if size + len(chunk) <= _ERROR_BODY_LIMIT:  # error bodies are small; a huge one is not ours
                    error_body.append(chunk)
                    size += len(chunk)
            await send(message)

        token = request_id.enter(context)
        started = time.perf_counter()
        try:
            await self.app(scope, receive, observed_send)
        finally:
            request_id.leave(token)
            code = _error_code(b"".join(error_body)) if error_body else None
            self.metrics.finished(scope, status, code, time.perf_counter() - started, context)


def _error_code(body: bytes) -> str:
    """``error.code`` of the one error body shape (``other`` for anything else)."""
    try:
        code = json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return "other"
    return code if isinstance(code, str) else "other"


# ----------------------------------------------------------------------------------- the route
class PrometheusResponse(Response):
    media_type = prometheus_client.CONTENT_TYPE_LATEST


def metrics_router(metrics: ServiceMetrics, require_key: Callable[..., Any] | None) -> APIRouter:
    """``GET /metrics``; ``require_key`` None when ``--metrics-public`` opened it."""
    router = APIRouter(dependencies=[Depends(require_key)] if require_key is not None else [])

    @router.get(
        "/metrics",
        response_class=PrometheusResponse,
        responses={
            200: {"description": "Prometheus text format", "content": {"text/plain": {}}},
            401: ERROR_RESPONSES[401],
        },
    )
    async def prometheus_metrics() -> Response:
        """The engine's (``vllm:``) and the service's (``ananke_``) metrics, Prometheus text format."""
        return PrometheusResponse(metrics.render())

    return router
