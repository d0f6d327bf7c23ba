"""The loop guard on the real local service: a value the model fills with a repetition is cut where
the repetition began and the structure finished; the answer is valid and says so in
``metadata.loop_guard``. Off (per request), the same request runs on to ``max_tokens``.

SmolLM2-135M at temperature 0 fills a digits-only identifier with ``1234567890`` over and over: the
grammar allows every digit, so only the guard stops it.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import pytest

from tests.conftest import chat_prompt, stream_generate

pytestmark = pytest.mark.integration

SCHEMA = {
    "type": "object",
    "properties": {"id": {"type": "string", "pattern": "^[0-9]+$"}},
    "required": ["id"],
}
MAX_TOKENS = 256


def _body(guard: bool, **extra: Any) -> dict[str, Any]:
    return {
        "prompt": chat_prompt("Give an identifier for a user account."),
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        # No length caps: the string may take the whole budget, so the loop can run.
        "constraints": {"json_schema": SCHEMA, "length_caps": False, "loop_guard": guard},
    } | extra


def _valid(data: dict[str, Any]) -> None:
    assert data["constraint_satisfied"] is True, data
    assert data["finish_reason"] == "stop", data
    jsonschema.validate(json.loads(data["generated_text"]), SCHEMA)


def test_a_runaway_value_is_cut_and_closed(http: httpx.Client) -> None:
    off = http.post("/generate_api", json=_body(False)).json()
    on = http.post("/generate_api", json=_body(True)).json()
    assert "loop_guard" not in off["metadata"]
    guard = on["metadata"].get("loop_guard")
    if guard is None:  # only the model decides whether it loops; the structure is checked below
        pytest.xfail(f"SmolLM2 did not loop on this prompt: {off['generated_text'][:80]!r}")
    _valid(on)
    _valid(off)  # closed on budget, or stopped: valid either way
    assert guard["fired"] is True
    assert on["metadata"]["request_finish_reason"] == "loop_guard"
    assert on["tokens_generated"] < guard["detected_at_token"] < MAX_TOKENS
    assert guard["loop_start_token"] + guard["period_tokens"] <= on["tokens_generated"]
    assert guard["dropped_tokens"] == guard["detected_at_token"] - (
        on["tokens_generated"] - guard["added_tokens"]
    )
    # Until the loop began, both answers are the same tokens (temperature 0): the guard cut, it did
    # not steer.
    assert off["generated_text"].startswith(on["generated_text"].rstrip('"}'))
    assert off["tokens_generated"] >= guard["detected_at_token"]


def test_the_guard_in_a_stream(http: httpx.Client) -> None:
    text, done = stream_generate(http, _body(True))
    assert done is not None
    _valid(done)
    assert text == done["generated_text"]  # what was streamed is the closed answer, nothing taken back
    guard = done["metadata"].get("loop_guard")
    if guard is None:
        pytest.xfail("SmolLM2 did not loop on this prompt")
    assert guard["fired"] is True
    assert done["tokens_generated"] < MAX_TOKENS
