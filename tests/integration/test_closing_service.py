"""Steer-to-close through the real service: a budget-cut structure is finished within max_tokens,
verified independently, and reported; with closing off the truncation is reported as it is; a
budget that cannot hold the structure at all is a 422 up front."""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import pytest

from tests.conftest import chat_prompt

pytestmark = pytest.mark.integration

BIO = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "bio": {"type": "string"}, "born": {"type": "integer"}},
    "required": ["name", "bio", "born"],
}
PROMPT = chat_prompt("Write a very long biography of Ada Lovelace as JSON.")
BUDGET = 24


def _body(**constraints: Any) -> dict[str, Any]:
    return {
        "prompt": PROMPT,
        "max_tokens": BUDGET,
        "temperature": 0.0,
        "seed": 1,
        # length_caps off: the bio string is unbounded, so the model runs into the budget.
        "constraints": {"json_schema": BIO, "length_caps": False, **constraints},
    }


def test_budget_cut_json_is_closed_within_max_tokens(http: httpx.Client) -> None:
    data = http.post("/generate_api", json=_body()).json()
    assert data["constraint_satisfied"] is True, data
    assert data["finish_reason"] == "stop"
    assert data["tokens_generated"] <= BUDGET
    jsonschema.validate(json.loads(data["generated_text"]), BIO)
    closed = data["metadata"]["closed_on_budget"]
    assert closed["added_tokens"] >= 1
    assert data["metadata"]["request_finish_reason"] == "length"


def test_closing_off_reports_the_truncation(http: httpx.Client) -> None:
    data = http.post("/generate_api", json=_body(close_on_budget=False)).json()
    assert data["finish_reason"] == "length"
    assert data["constraint_satisfied"] is False
    assert "closed_on_budget" not in data["metadata"]
    with pytest.raises(json.JSONDecodeError):
        json.loads(data["generated_text"])


def test_streamed_closing_sends_exactly_the_final_text(http: httpx.Client) -> None:
    events = []
    with http.stream("POST", "/generate_api", json={**_body(), "stream": True}) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    final = events[-1]["response"]
    streamed = "".join(e["text"] for e in events[:-1])
    assert streamed == final["generated_text"]
    assert sum(len(e["token_ids"]) for e in events[:-1]) == final["tokens_generated"] <= BUDGET
    assert final["constraint_satisfied"] is True
    assert "closed_on_budget" in final["metadata"]
    jsonschema.validate(json.loads(final["generated_text"]), BIO)


def test_closing_also_serves_grammars(http: httpx.Client) -> None:
    lark = 'start: "[" ITEM ("," ITEM)* "]"\nITEM: /[a-z]+/'
    body = {
        "prompt": chat_prompt("List every animal you know, lowercase, comma separated, in brackets."),
        "max_tokens": 12,
        "temperature": 0.0,
        "constraints": {"grammar": lark},
    }
    data = http.post("/generate_api", json=body).json()
    assert data["constraint_satisfied"] is True, data
    assert data["tokens_generated"] <= 12
    text = data["generated_text"]
    assert text.startswith("[")
    assert text.endswith("]")
    assert all(x.isalpha() for x in text[1:-1].split(","))


def test_max_tokens_too_small_for_the_structure_is_422(http: httpx.Client) -> None:
    wide = {
        "type": "object",
        "properties": {f"field_number_{i}": {"type": "string"} for i in range(12)},
        "required": [f"field_number_{i}" for i in range(12)],
    }
    resp = http.post(
        "/generate_api",
        json={"prompt": PROMPT, "max_tokens": 8, "constraints": {"json_schema": wide}},
    )
    assert resp.status_code == 422
    err = resp.json()["error"]
    assert err["code"] == "max_tokens_too_small"
    assert err["detail"]["shortest_output_tokens"] > 8
    # The same schema with room for it is served, and closes within its budget.
    need = err["detail"]["shortest_output_tokens"]
    ok = http.post(
        "/generate_api",
        json={
            "prompt": PROMPT,
            "max_tokens": need + 8,
            "temperature": 0.0,
            "constraints": {"json_schema": wide},
        },
    ).json()
    assert ok["constraint_satisfied"] is True, ok
    jsonschema.validate(json.loads(ok["generated_text"]), wide)
