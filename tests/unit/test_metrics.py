"""``/metrics`` in process (no engine, no model): exact counter deltas, auth, bounded labels.

The planning and generation steps are stubbed where a test needs an outcome the small model cannot be
made to produce on demand (a resampled answer, an agent-turn branch, an approximate schema); the
HTTP layer, the guard, the lifecycle and the metrics are the real ones. The live service's counters are
checked in ``tests/integration/test_metrics.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from langchain_ananke.protocol import GenerateResponse, StreamEvent
from modal_service.constraints.compiler import CompiledConstraint
from modal_service.engine.engine import Engine, EngineConfig
from modal_service.engine.generator import Plan
from modal_service.http.app import create_app
from modal_service.http.metrics import OTHER_ROUTE
from modal_service.limits import Limits
from tests.prometheus_text import Scrape

KEY = "metrics-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _client(*, ready: bool = True, metrics_public: bool = False, **limits: int) -> TestClient:
    engine = Engine(EngineConfig(model="/nowhere/tiny"))
    app = create_app(
        engine, api_key=KEY, limits=Limits(**limits), start_engine=False, metrics_public=metrics_public
    )
    if ready:
        engine.state = "ok"
    return TestClient(app, raise_server_exceptions=False)


def scrape(client: TestClient) -> Scrape:
    r = client.get("/metrics", headers=AUTH)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return Scrape(r.text)


def _constraint(kind: str = "json_schema", *, approximate: bool = False) -> CompiledConstraint:
    return CompiledConstraint(
        kind=kind, structured_outputs=None, ll_grammar=None, compile_ms=40.0, approximate=approximate
    )


def _response(satisfied: bool | None = True, finish: str = "stop", **metadata: Any) -> GenerateResponse:
    return GenerateResponse(
        generated_text="{}",
        tokens_generated=2,
        generation_time_ms=1.0,
        metadata=metadata,
        constraint_satisfied=satisfied,
        finish_reason=finish,  # type: ignore[arg-type]
    )


@pytest.fixture
def stubbed() -> Iterator[tuple[TestClient, list[Any]]]:
    """An app whose planning returns the next queued plan and whose generation the next response."""
    queue: list[Any] = []
    with _client() as client:
        generator = client.app.state.lifecycle.generator  # type: ignore[attr-defined]

        async def aplan(_req: object) -> list[Plan]:
            plan: Plan = queue.pop(0)
            return [plan]

        async def complete_verified(*_args: object) -> GenerateResponse:
            response: GenerateResponse = queue.pop(0)
            return response

        async def events(*_args: object) -> AsyncIterator[StreamEvent]:
            yield StreamEvent(event="token", text="{", token_ids=[1])
            yield StreamEvent(event="done", response=queue.pop(0))

        generator.aplan, generator.complete_verified, generator.events = aplan, complete_verified, events
        yield client, queue


def test_outcomes_move_by_exactly_what_was_answered(stubbed: tuple[TestClient, list[Any]]) -> None:
    client, queue = stubbed
    before = scrape(client)
    queue += [
        Plan([1], _constraint(), cache_hit=False),
        _response(closed_on_budget={"rebuilt": False, "added_tokens": 2}, request_finish_reason="length"),
        Plan([1], _constraint(approximate=True), cache_hit=True),
        _response(
            attempts=3, loop_guard={"fired": True, "dropped_tokens": 40}, decode_steps=5, forced_tokens=7
        ),
        Plan([1], _constraint("json_schema"), cache_hit=True),
        _response(branch="tool_calls", finish="tool_calls"),
        Plan([1], None, cache_hit=False),
        _response(satisfied=None, finish="length"),
        Plan([1], _constraint("regex"), cache_hit=False),
        _response(satisfied=False, finish="length"),
    ]
    for _ in range(4):
        r = client.post("/generate_api", json={"prompt": "x"}, headers=AUTH)
        assert r.status_code == 200, r.text
    r = client.post("/generate_api", json={"prompt": "x", "stream": True}, headers=AUTH)
    assert r.status_code == 200
    assert '"event":"done"' in r.text
    after = scrape(client)

    def moved(name: str, **labels: str) -> float:
        return after.delta(before, name, **labels)

    assert moved("ananke_requests_total", route="/generate_api", status="200", code="ok") == 5
    assert moved("ananke_constraints_total", kind="json_schema", mode="exact") == 2
    assert moved("ananke_constraints_total", kind="json_schema", mode="approximate") == 1
    assert moved("ananke_constraints_total", kind="regex", mode="exact") == 1
    assert moved("ananke_constraints_total", kind="none", mode="none") == 1
    assert moved("ananke_compile_cache_total", result="miss") == 2
    assert moved("ananke_compile_cache_total", result="hit") == 2
    assert moved("ananke_compile_seconds_count", kind="json_schema") == 1  # misses only
    assert moved("ananke_compile_seconds_sum", kind="json_schema") == pytest.approx(0.04)
    assert moved("ananke_outputs_total", verdict="satisfied") == 3
    assert moved("ananke_outputs_total", verdict="unsatisfied", finish_reason="length") == 1
    assert moved("ananke_outputs_total", verdict="unchecked", finish_reason="length") == 1
    assert moved("ananke_closed_on_budget_total", rebuilt="false") == 1
    assert moved("ananke_closed_on_budget_total", rebuilt="true") == 0
    assert moved("ananke_resampled_attempts_total") == 2
    assert moved("ananke_decode_steps_total") == 5
    assert moved("ananke_forced_tokens_total") == 7
    assert moved("ananke_loop_guard_total", fired="true") == 1
    assert moved("ananke_loop_guard_total", fired="false") == 0
    assert moved("ananke_agent_turns_total", branch="tool_calls") == 1
    assert moved("ananke_request_duration_seconds_count", route="/generate_api") == 5
    assert after.value("ananke_inflight_requests") == 0


def test_passed_deadlines_are_counted_streamed_or_not(stubbed: tuple[TestClient, list[Any]]) -> None:
    client, queue = stubbed
    before = scrape(client)
    queue += [Plan([1], None, cache_hit=False), _response(satisfied=None, finish="timeout")]
    r = client.post("/generate_api", json={"prompt": "x"}, headers=AUTH)
    assert (r.status_code, r.json()["error"]["code"]) == (504, "timeout")
    queue += [Plan([1], None, cache_hit=False), _response(satisfied=None, finish="timeout")]
    r = client.post("/v1/completions", json={"prompt": "x", "stream": True}, headers=AUTH)
    assert r.status_code == 200
    assert '"code": "timeout"' in r.text or '"code":"timeout"' in r.text
    after = scrape(client)
    assert after.delta(before, "ananke_deadline_exceeded_total", stream="false") == 1
    assert after.delta(before, "ananke_deadline_exceeded_total", stream="true") == 1
    assert (
        after.delta(before, "ananke_requests_total", route="/generate_api", status="504", code="timeout") == 1
    )
    assert (
        after.delta(before, "ananke_requests_total", route="/v1/completions", status="200", code="timeout")
        == 1
    )
    assert after.delta(before, "ananke_outputs_total", verdict="unchecked", finish_reason="timeout") == 2


def test_the_request_id_is_in_the_metadata(stubbed: tuple[TestClient, list[Any]]) -> None:
    client, queue = stubbed
    rid = {"X-Request-ID": "trace-7f:01"}
    queue += [Plan([1], None, cache_hit=False), _response(satisfied=None)]
    r = client.post("/generate_api", json={"prompt": "x"}, headers=AUTH | rid)
    assert r.json()["metadata"]["request_id"] == "trace-7f:01" == r.headers["x-request-id"]
    queue += [Plan([1], None, cache_hit=False), _response(satisfied=None)]
    r = client.post("/v1/completions", json={"prompt": "x"}, headers=AUTH | rid)
    assert r.json()["ananke"]["metadata"]["request_id"] == "trace-7f:01"
    queue += [Plan([1], None, cache_hit=False), _response(satisfied=None)]
    r = client.post("/generate_api", json={"prompt": "x", "stream": True}, headers=AUTH)
    done = r.text.strip().splitlines()[-1]
    assert f'"request_id":"{r.headers["x-request-id"]}"' in done


def test_a_429_burst_moves_the_admission_counters_exactly() -> None:
    burst = 7
    with _client(max_inflight=1) as client:
        admission = client.app.state.admission  # type: ignore[attr-defined]
        before = scrape(client)
        admission.inflight = 1  # another request holds the only slot
        assert scrape(client).value("ananke_inflight_requests") == 1
        codes = [
            client.post("/generate_api", json={"prompt": "x"}, headers=AUTH).status_code for _ in range(burst)
        ]
        admission.inflight = 0
        assert codes == [429] * burst
        admission.draining = True
        assert client.post("/v1/completions", json={"prompt": "x"}, headers=AUTH).status_code == 503
        after = scrape(client)
        admission.draining = False  # (the app's shutdown waits for in-flight requests)
    assert after.delta(before, "ananke_admission_rejections_total", reason="overloaded") == burst
    assert after.delta(before, "ananke_admission_rejections_total", reason="shutting_down") == 1
    assert (
        after.delta(before, "ananke_requests_total", route="/generate_api", status="429", code="overloaded")
        == burst
    )
    assert (
        after.delta(
            before, "ananke_requests_total", route="/v1/completions", status="503", code="shutting_down"
        )
        == 1
    )
    assert after.value("ananke_draining") == 1
    assert after.value("ananke_inflight_limit") == 1


def test_errors_are_counted_by_route_status_and_code() -> None:
    with _client(ready=False) as client:
        before = scrape(client)
        assert client.post("/generate_api", json={"prompt": "x"}).status_code == 401
        assert client.post("/generate_api", json={"prompt": "x"}, headers=AUTH).status_code == 503
        assert client.get("/v1/models").status_code == 401
        after = scrape(client)
    moved = after.delta
    assert (
        moved(before, "ananke_requests_total", route="/generate_api", status="401", code="unauthorized") == 1
    )
    assert (
        moved(before, "ananke_requests_total", route="/generate_api", status="503", code="engine_unavailable")
        == 1
    )
    assert moved(before, "ananke_requests_total", route="/v1/models", status="401", code="unauthorized") == 1
    assert after.value("ananke_engine_ready") == 0


def test_route_labels_are_templates_and_unknown_paths_collapse() -> None:
    with _client() as client:
        for path in ("/admin", "/generate_api/../etc", "/v1/chat/completions/x", "/%00", "/" + "a" * 300):
            client.get(path, headers=AUTH)
        routes = {
            labels["route"] for name, labels, _ in scrape(client).samples if name == "ananke_requests_total"
        }
    assert routes == {OTHER_ROUTE}  # the scrapes themselves are counted when they end, after this one


@pytest.mark.parametrize(("public", "keyless"), [(False, 401), (True, 200)])
def test_metrics_needs_the_key_unless_public(public: bool, keyless: int) -> None:
    with _client(metrics_public=public) as client:
        assert client.get("/metrics").status_code == keyless
        assert client.get("/metrics", headers=AUTH).status_code == 200
        assert client.get("/v1/models").status_code == 401  # the switch opens /metrics only
        assert client.get("/openapi.json").status_code == 401


def test_metrics_include_the_default_registry() -> None:
    """vLLM's stat logger records into prometheus_client's default registry; /metrics renders it (here
    its process metrics stand in: no engine runs in this test)."""
    from prometheus_client import REGISTRY, Counter

    probe = Counter("vllm:ananke_test_probe", "A stand-in for the engine's metrics", registry=REGISTRY)
    try:
        probe.inc(3)
        with _client() as client:
            assert scrape(client).value("vllm:ananke_test_probe_total") == 3
    finally:
        REGISTRY.unregister(probe)
