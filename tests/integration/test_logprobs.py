"""Log-probabilities on both APIs, from the distribution each token was sampled from: with the
constraint's mask applied, so a ``choice`` classifier's alternatives are only allowed choices."""

from __future__ import annotations

import math

import httpx
import openai
import pytest

from tests.conftest import chat_prompt

pytestmark = pytest.mark.integration

CHOICES = ["positive", "negative", "neutral"]


def test_under_a_choice_the_alternatives_are_only_the_allowed_choices(http: httpx.Client) -> None:
    body = {
        "prompt": chat_prompt("Is 'I love it' positive, negative or neutral?"),
        "constraints": {"choice": CHOICES},
        "logprobs": 10,
        "temperature": 0,
        "max_tokens": 8,
    }
    data = http.post("/generate_api", json=body).json()
    assert data["generated_text"] in CHOICES
    logprobs = data["logprobs"]
    assert len(logprobs) == data["tokens_generated"]
    first = logprobs[0]
    assert first["top"], first
    for alt in first["top"]:
        assert any(c.startswith(alt["token"]) for c in CHOICES), alt  # masked tokens never appear
        assert math.isfinite(alt["logprob"])
    assert sum(math.exp(a["logprob"]) for a in first["top"]) == pytest.approx(1.0, abs=0.02)
    assert first["logprob"] == max(a["logprob"] for a in first["top"])  # greedy took the likeliest


def test_unconstrained_alternatives_include_other_tokens(http: httpx.Client) -> None:
    body = {"prompt": chat_prompt("Say hi."), "logprobs": 5, "temperature": 0, "max_tokens": 4}
    data = http.post("/generate_api", json=body).json()
    assert len(data["logprobs"]) == data["tokens_generated"]
    assert all(len(t["top"]) == 5 for t in data["logprobs"] if t["logprob"] is not None)


def test_v1_chat_and_completions_logprobs(base_url: str, http: httpx.Client) -> None:
    model = http.get("/health").json()["model"]
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused")
    chat = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Answer yes or no: is water wet?"}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "A", "schema": {"enum": ["yes", "no"]}},
        },
        logprobs=True,
        top_logprobs=3,
        temperature=0,
        max_tokens=8,
    )
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None
    assert "".join(t.token for t in content) == chat.choices[0].message.content
    assert [a.token for a in content[0].top_logprobs] == ['"']  # a JSON string must open with a quote
    text = client.completions.create(
        model=model, prompt="Count: 1, 2,", logprobs=2, temperature=0, max_tokens=3
    )
    lp = text.choices[0].logprobs
    assert lp is not None
    assert lp.tokens is not None
    assert "".join(lp.tokens) == text.choices[0].text


def test_v1_streams_carry_the_same_logprobs(base_url: str, http: httpx.Client) -> None:
    """Streamed (the OpenAI SDK, as it is), each chunk carries its tokens' logprobs; all of them
    together are the non-streaming answer's, closing's added tokens included."""
    model = http.get("/health").json()["model"]
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused")
    ask = {
        "model": model,
        "messages": [{"role": "user", "content": "Name a colour as JSON."}],
        "response_format": {"type": "json_object"},
        "logprobs": True,
        "top_logprobs": 2,
        "temperature": 0,
        "max_tokens": 12,  # short: the object is closed on budget, so the last tokens have no logprob
    }
    whole = client.chat.completions.create(**ask)
    streamed, text = [], ""
    for chunk in client.chat.completions.create(**ask, stream=True):
        if chunk.choices and chunk.choices[0].logprobs and chunk.choices[0].logprobs.content:
            streamed += chunk.choices[0].logprobs.content
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    content = whole.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None
    assert text == whole.choices[0].message.content == "".join(t.token for t in streamed)
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]
    completion, pieces, offsets = "", [], []
    for chunk in client.completions.create(
        model=model, prompt="Count: 1, 2,", logprobs=2, temperature=0, max_tokens=4, stream=True
    ):
        lp = chunk.choices[0].logprobs if chunk.choices else None
        completion += chunk.choices[0].text if chunk.choices else ""
        if lp is not None and lp.tokens:
            pieces += lp.tokens
            offsets += lp.text_offset or []
    assert "".join(pieces) == completion
    assert offsets == [len("".join(pieces[:i])) for i in range(len(pieces))]
