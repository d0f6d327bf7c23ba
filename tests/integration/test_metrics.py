"""``/metrics`` and request ids on the real local service and model.

The session's service is shared with other tests, so every check is a delta between two scrapes
around a known mix, run one request at a time. The 429 burst needs a low admission bound:
``tests/reliability/test_observability.py`` runs it on that folder's service (``--max-inflight 4``),
and ``tests/unit/test_metrics.py`` in process.
"""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from langchain_ananke._http import AnankeClient
from langchain_ananke.errors import AnankeAPIError
from langchain_ananke.protocol import GenerateRequest
from tests.conftest import chat_prompt
from tests.prometheus_text import Scrape

pytestmark = pytest.mark.integration

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}
BIO = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "bio": {"type": "string"}, "born": {"type": "integer"}},
    "required": ["name", "bio", "born"],
}
VALID = {
    "prompt": chat_prompt("Describe a person as JSON."),
    "max_tokens": 64,
    "temperature": 0.0,
    "constraints": {"json_schema": PERSON},
}
#: length_caps off: the bio string is unbounded, so the model runs into the budget and closing finishes.
CLOSED = {
    "prompt": chat_prompt("Write a very long biography of Ada Lovelace as JSON."),
    "max_tokens": 24,
    "temperature": 0.0,
    "seed": 1,
    "constraints": {"json_schema": BIO, "length_caps": False},
}
#: A regex llguidance refuses: a 422 from planning, after admission.
INVALID = {"prompt": "x", "max_tokens": 4, "constraints": {"regex": "(unclosed"}}

#: The engine's metrics the issue names, as vLLM's Prometheus logger calls them.
ENGINE_METRICS = {
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:time_to_first_token_seconds_bucket",
    "vllm:request_time_per_output_token_seconds_bucket",
    "vllm:inter_token_latency_seconds_bucket",
    "vllm:kv_cache_usage_perc",
    "vllm:num_preemptions_total",
}


def scrape(http: httpx.Client) -> Scrape:
    r = http.get("/metrics")
    assert r.status_code == 200
    return Scrape(r.text)


def test_counters_move_by_exactly_the_mix(http: httpx.Client) -> None:
    before = scrape(http)
    valid = http.post("/generate_api", json=VALID)
    invalid = http.post("/generate_api", json=INVALID)
    closed = http.post("/generate_api", json=CLOSED)
    after = scrape(http)

    assert valid.status_code == 200, valid.text
    assert valid.json()["constraint_satisfied"] is True
    assert "closed_on_budget" not in valid.json()["metadata"]
    assert invalid.status_code == 422
    assert invalid.json()["error"]["code"] == "invalid_constraint"
    body: dict[str, Any] = closed.json()
    assert body["constraint_satisfied"] is True, body
    assert "closed_on_budget" in body["metadata"]

    def moved(name: str, **labels: str) -> float:
        return after.delta(before, name, **labels)

    route = {"route": "/generate_api"}
    assert moved("ananke_requests_total", **route, status="200", code="ok") == 2
    assert moved("ananke_requests_total", **route, status="422", code="invalid_constraint") == 1
    assert moved("ananke_requests_total", **route) == 3
    assert moved("ananke_request_duration_seconds_count", **route) == 3
    assert moved("ananke_constraints_total", kind="json_schema", mode="exact") == 2
    assert moved("ananke_constraints_total") == 2  # the 422 never got past compiling
    assert moved("ananke_compile_cache_total") == 2
    assert moved("ananke_outputs_total", verdict="satisfied", finish_reason="stop") == 2
    assert moved("ananke_outputs_total") == 2
    assert moved("ananke_closed_on_budget_total") == 1
    assert moved("ananke_admission_rejections_total") == 0
    assert moved("ananke_deadline_exceeded_total") == 0
    assert moved("ananke_client_disconnects_total") == 0
    assert after.value("ananke_inflight_requests") == 0
    assert after.value("ananke_engine_ready") == 1

    # The engine's own counters, from vLLM's stat logger: two engine requests, and every token.
    assert after.names() >= ENGINE_METRICS, ENGINE_METRICS - after.names()
    engine_tokens = valid.json()["tokens_generated"] + CLOSED["max_tokens"]  # closing cut at the budget
    assert moved("vllm:generation_tokens_total") == engine_tokens
    prompt_tokens = valid.json()["usage"]["prompt_tokens"] + body["usage"]["prompt_tokens"]
    assert moved("vllm:prompt_tokens_total") == prompt_tokens
    assert moved("vllm:request_success_total") == 2
    assert moved("vllm:time_to_first_token_seconds_count") == 2
    assert after.value("vllm:num_requests_running") == 0


def test_the_scrape_itself_is_counted_under_its_route(http: httpx.Client) -> None:
    before = scrape(http)
    after = scrape(http)
    assert after.delta(before, "ananke_requests_total", route="/metrics", status="200", code="ok") == 1


def test_a_client_request_id_comes_back_everywhere(base_url: str, http: httpx.Client) -> None:
    rid = f"it-{uuid.uuid4().hex[:12]}"
    r = http.post("/generate_api", json=VALID, headers={"X-Request-ID": rid})
    assert r.headers["x-request-id"] == rid
    assert r.json()["metadata"]["request_id"] == rid

    chat = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}
    r = http.post("/v1/chat/completions", json=chat, headers={"X-Request-ID": rid + "-v1"})
    assert r.headers["x-request-id"] == rid + "-v1"
    assert r.json()["ananke"]["metadata"]["request_id"] == rid + "-v1"

    client = AnankeClient(base_url)
    try:
        resp = client.generate(GenerateRequest.model_validate(VALID), request_id=rid + "-ok")
        assert resp.metadata["request_id"] == rid + "-ok"
        with pytest.raises(AnankeAPIError) as info:
            client.generate(GenerateRequest.model_validate(INVALID), request_id=rid + "-err")
        assert info.value.code == "invalid_constraint"
        assert info.value.request_id == rid + "-err"
        events = list(client.stream(GenerateRequest.model_validate(VALID), request_id=rid + "-s"))
        assert events[-1].response is not None
        assert events[-1].response.metadata["request_id"] == rid + "-s"
    finally:
        client.close()


def test_an_unsafe_request_id_is_replaced(http: httpx.Client) -> None:
    r = http.get("/health", headers={"X-Request-ID": "two words"})
    assert r.headers["x-request-id"] != "two words"
    assert len(r.headers["x-request-id"]) == 32
