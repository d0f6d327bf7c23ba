"""What the service cannot honour is refused up front with a 4xx that names it, and blames the right
thing; nothing is silently dropped (real local service)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration

#: A real schema (JSONSchemaBench Github_hard) whose ids carry a UUID ``pattern``: 36 characters that
#: no length cap derived from a small ``max_tokens`` can hold.
UUID_SCHEMA = json.loads((ROOT / "tests/data/jsonschemabench-dev/Github_hard/o21223.json").read_text())


@pytest.mark.parametrize("max_tokens", [16, 32])
def test_a_budget_problem_is_max_tokens_too_small_not_an_invalid_schema(
    http: httpx.Client, max_tokens: int
) -> None:
    body = {"prompt": "x", "max_tokens": max_tokens, "constraints": {"json_schema": UUID_SCHEMA}}
    r = http.post("/generate_api", json=body)
    assert r.status_code == 422
    error = r.json()["error"]
    assert error["code"] == "max_tokens_too_small", error
    assert error["detail"]["shortest_output_tokens"] > max_tokens


def test_the_same_schema_with_room_is_answered_and_valid(http: httpx.Client) -> None:
    body = {"prompt": "x", "max_tokens": 256, "temperature": 0, "constraints": {"json_schema": UUID_SCHEMA}}
    data = http.post("/generate_api", json=body).json()
    assert data["constraint_satisfied"] is True, data


@pytest.mark.parametrize(
    ("body", "code", "named"),
    [
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "unsupported_content",
            "messages.0.content.0",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}], "presence_penalty": 1},
            "unsupported_parameter",
            "presence_penalty",
        ),
        ({"messages": [{"role": "user", "content": "hi"}], "store": True}, "unsupported_parameter", "store"),
        (
            {"messages": [{"role": "user", "content": "hi"}], "metadata": {"team": "a"}},
            "unsupported_parameter",
            "metadata",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}], "service_tier": "flex"},
            "unsupported_parameter",
            "service_tier",
        ),
        # A field no endpoint knows (a typo, a newer OpenAI field) is named, not dropped.
        (
            {"messages": [{"role": "user", "content": "hi"}], "reasoning_effort": "high"},
            "unsupported_parameter",
            "reasoning_effort",
        ),
        ({"messages": [{"role": "user", "content": "hi"}], "echo": True}, "unsupported_parameter", "echo"),
    ],
)
def test_v1_chat_refuses_what_it_cannot_honour(
    http: httpx.Client, body: dict[str, Any], code: str, named: str
) -> None:
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 422
    assert r.json()["error"]["code"] == code
    assert named in r.json()["error"]["message"]


def test_v1_completions_refuses_best_of(http: httpx.Client) -> None:
    r = http.post("/v1/completions", json={"prompt": "x", "best_of": 3})
    assert (r.status_code, r.json()["error"]["code"]) == (422, "unsupported_parameter")
    assert "best_of" in r.json()["error"]["message"]


@pytest.mark.parametrize("timeout_s", [5e-324, 0.0, 1e9])
def test_absurd_numbers_are_a_422_naming_the_field(http: httpx.Client, timeout_s: float) -> None:
    r = http.post("/generate_api", json={"prompt": "x", "timeout_s": timeout_s})
    assert r.status_code == 422
    assert "timeout_s" in r.json()["error"]["message"]


def test_v1_fields_that_change_nothing_are_accepted(http: httpx.Client) -> None:
    body = {
        "model": "any-name",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2,
        "user": "end-user-7",
        "store": False,
        "metadata": {},
        "service_tier": "auto",
    }
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == http.get("/v1/models").json()["data"][0]["id"]  # the model that answered


def test_v1_completions_echo_puts_the_prompt_first(http: httpx.Client) -> None:
    body = {
        "prompt": "Phone: ",
        "max_tokens": 6,
        "temperature": 0,
        "response_format": {"type": "json_object"},
    }
    plain = http.post("/v1/completions", json=body).json()
    echoed = http.post("/v1/completions", json=body | {"echo": True}).json()
    assert echoed["choices"][0]["text"] == "Phone: " + plain["choices"][0]["text"]
    text = ""
    with http.stream("POST", "/v1/completions", json=body | {"echo": True, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                text += json.loads(line[6:])["choices"][0]["text"]
    assert text == echoed["choices"][0]["text"]
    r = http.post("/v1/completions", json=body | {"echo": True, "logprobs": 1})
    assert (r.status_code, r.json()["error"]["code"]) == (422, "unsupported_parameter")
    assert "echo" in r.json()["error"]["message"]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("path", "body", "code"),
    [
        (
            "/v1/completions",
            {"prompt": "hello " * 3000, "max_completion_tokens": 2000},
            "context_length_exceeded",
        ),
        (
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "hi"}],
                "max_completion_tokens": 2,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "a", "schema": UUID_SCHEMA},
                },
            },
            "max_tokens_too_small",
        ),
    ],
)
def test_a_budget_refusal_names_the_field_the_request_set(
    http: httpx.Client, path: str, body: dict[str, Any], code: str, *, stream: bool
) -> None:
    # Found by the adversarial probe: these said "max_tokens 2000" to a request that set
    # max_completion_tokens (OpenAI's current name), which it had not written
    r = http.post(path, json=body | {"stream": stream})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == code
    assert "max_completion_tokens" in error["message"]
    assert "max_tokens " not in error["message"]
    assert error["detail"]["field"] == "max_completion_tokens"
