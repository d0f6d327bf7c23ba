"""Fast-forward on the real local service: the same output with and without it, in fewer steps.

Every request goes out twice at temperature 0, once with ``fast_forward: false``: the outputs must be
byte-identical (text, token count, tool calls, verdict), over a tool-call set, a sample of the
JSONSchemaBench dev schemas and the other constraint kinds, streaming and not. The metadata must
add up: ``decode_steps + forced_tokens`` is the engine's token count, and with fast-forward off every
token took a step. A forced tool call (named ``tool_choice``) must take at most half a step per token.

In float32 the identity is strict (:func:`test_float32_is_byte_identical`, on a float32 server of its own).
One allowance, in bfloat16 only: the forward pass that verifies a run of forced
tokens rounds differently from one token at a time, so a near-tie between two tokens can go either
way (seen: ``Y`` and `` York`` at the same bfloat16 logprob). Where the outputs part, the token the
fast-forward run took must be within :data:`NEAR_TIE` nats of the other run's choice, in the other
run's own distribution; anything wider fails.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench._server import ServerProcess
from tests.conftest import ROOT, chat_prompt

pytestmark = pytest.mark.integration

DATA = ROOT / "tests" / "data" / "jsonschemabench-dev"

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
SEARCH = {
    "type": "function",
    "function": {
        "name": "search_flights",
        "description": "Find flights.",
        "parameters": {
            "type": "object",
            "properties": {
                "origin": {"type": "string", "maxLength": 20},
                "destination": {"type": "string", "maxLength": 20},
                "passengers": {"type": "integer", "minimum": 1, "maximum": 9},
            },
            "required": ["origin", "destination", "passengers"],
        },
    },
}
#: (prompt, tools, tool_choice)
TOOL_CASES = [
    ("What's the weather in Paris?", [WEATHER], "get_weather"),
    ("Is it cold in Oslo today, in fahrenheit?", [WEATHER], "get_weather"),
    ("Find me a flight from Rome to Madrid for two.", [SEARCH], "search_flights"),
    ("Flights Berlin to Lisbon, 3 people, and the weather in Lisbon.", [WEATHER, SEARCH], "required"),
    ("Weather in Tokyo please.", [WEATHER, SEARCH], "auto"),
]
SCHEMAS_PER_CATEGORY = 2
NEAR_TIE = 0.25
"""Nats: about two bfloat16 rounding steps of a logit of SmolLM2's size."""


def _health_says_on(http: httpx.Client) -> None:
    state = http.get("/health").json().get("fast_forward")
    assert state in {"on", "on (async scheduling)"}, (
        f"the service runs without fast-forward ({state}); start it with --fast-forward on"
    )


def _post_pair(http: httpx.Client, body: dict[str, Any]) -> tuple[httpx.Response, httpx.Response]:
    """``body`` at temperature 0 with logprobs, once as it is and once with ``fast_forward: false``."""
    base = {"temperature": 0, "seed": 0, "logprobs": 5} | body
    on = http.post("/generate_api", json=base)
    off = http.post("/generate_api", json=base | {"fast_forward": False})
    return on, off


def _pair(http: httpx.Client, body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    on, off = _post_pair(http, body)
    assert on.status_code == off.status_code == 200, (on.text, off.text)
    return on.json(), off.json()


def _tool_body(prompt: str, tools: list[dict[str, Any]], choice: str) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": prompt}],
        "tools": tools,
        "tool_choice": choice,
        "max_tokens": 160,
    }


def _kind_body(constraint: dict[str, Any]) -> dict[str, Any]:
    return {"prompt": chat_prompt("Give one example."), "constraints": constraint, "max_tokens": 48}


def _same(on: dict[str, Any], off: dict[str, Any]) -> None:
    for key in ("generated_text", "tokens_generated", "finish_reason", "constraint_satisfied", "tool_calls"):
        if key == "tool_calls":  # call ids are random
            strip = [{k: v for k, v in c.items() if k != "id"} for c in (on[key] or [])]
            assert strip == [{k: v for k, v in c.items() if k != "id"} for c in (off[key] or [])]
        else:
            assert on[key] == off[key], (key, on[key], off[key])


def _same_or_near_tie(on: dict[str, Any], off: dict[str, Any]) -> bool:
    """True when identical; False when they part at a near-tie (see the module docstring); fails otherwise."""
    if on["generated_text"] == off["generated_text"]:
        _same(on, off)
        return True
    for k, (a, b) in enumerate(zip(on["logprobs"], off["logprobs"], strict=False)):
        if a["token_id"] != b["token_id"]:
            if a["logprob"] is None or b["logprob"] is None:
                # a token closing on budget added: both runs hit max_tokens and were closed at different
                # places, so where the engine's outputs parted lies in the dropped tail
                return False
            alternatives = {t["token_id"]: t["logprob"] for t in b["top"]}
            assert a["token_id"] in alternatives, (k, a, b)
            assert b["logprob"] - alternatives[a["token_id"]] <= NEAR_TIE, (k, a, b)
            return False
    raise AssertionError(("texts differ but tokens do not", on["generated_text"], off["generated_text"]))


def _steps(resp: dict[str, Any]) -> tuple[int, int]:
    meta = resp["metadata"]
    steps, forced = meta["decode_steps"], meta["forced_tokens"]
    engine_tokens = resp["tokens_generated"]
    closing = meta.get("closed_on_budget")
    if closing:  # closing on budget dropped and added tokens after the engine stopped
        engine_tokens += closing["dropped_tokens"] - closing["added_tokens"]
    assert steps + forced == engine_tokens, meta
    assert steps >= 1
    return steps, forced


def test_tool_calls_identical_and_forced_calls_take_half_a_step_per_token(http: httpx.Client) -> None:
    _health_says_on(http)
    for prompt, tools, choice in TOOL_CASES:
        on, off = _pair(http, _tool_body(prompt, tools, choice))
        _same_or_near_tie(on, off)
        steps_off, forced_off = _steps(off)
        assert (steps_off, forced_off) == (off["tokens_generated"], 0)
        steps_on, forced_on = _steps(on)
        if choice not in ("auto", "required"):
            assert on["tool_calls"], on
            assert forced_on > 0
            assert steps_on <= 0.5 * on["tokens_generated"], (prompt, on["metadata"])


def _dev_sample() -> list[tuple[str, dict[str, Any]]]:
    by_cat: dict[str, list[Path]] = {}
    for path in sorted(DATA.glob("*/*.json")):
        by_cat.setdefault(path.parent.name, []).append(path)
    return [
        (f"{cat}/{p.name}", json.loads(p.read_text()))
        for cat, paths in sorted(by_cat.items())
        for p in paths[:SCHEMAS_PER_CATEGORY]
    ]


def _schema_body(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    title = str(schema.get("title") or schema.get("description") or name)[:200]
    return {
        "prompt": chat_prompt(f"Write one realistic JSON example for: {title}"),
        "constraints": {"json_schema": schema},
        "max_tokens": 64,
        "temperature": 0,
        "seed": 1,
        "logprobs": 5,
    }


Outcome = tuple[str, int, dict[str, Any], dict[str, Any]]
"""(schema, status, answer with fast-forward, answer without)"""


def test_dev_schemas_identical(base_url: str) -> None:
    """One request at a time: a batch's make-up changes the rounding too, with or without fast-forward."""
    cases = _dev_sample()

    async def run() -> list[Outcome]:
        sem = asyncio.Semaphore(1)
        async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:

            async def one(name: str, schema: dict[str, Any]) -> Outcome:
                body = _schema_body(name, schema)
                async with sem:
                    on = await client.post("/generate_api", json=body)
                    off = await client.post("/generate_api", json=body | {"fast_forward": False})
                assert on.status_code == off.status_code, (name, on.text, off.text)
                return name, on.status_code, on.json(), off.json()

            return await asyncio.gather(*(one(n, s) for n, s in cases))

    results = asyncio.run(run())
    answered, identical = 0, 0
    for name, status, on, off in results:
        if status != 200:  # refused (4xx) either way: the same refusal
            assert on == off, name
            continue
        answered += 1
        identical += _same_or_near_tie(on, off)
        assert _steps(off)[1] == 0
        _steps(on)
    assert answered >= len(cases) * 3 // 4
    assert identical >= answered - 2, (identical, answered)


OTHER_KINDS: list[dict[str, Any]] = [
    {"regex": r"ID-[0-9]{3}-(alpha|beta)-END"},
    {"choice": ["strongly agree", "agree", "disagree", "strongly disagree"]},
    {"grammar": 'start: "color=" COLOR ";size=" SIZE\nCOLOR: "red" | "green" | "blue"\nSIZE: /[0-9]{1,2}/'},
    {"json_object": True},
]


@pytest.mark.parametrize("constraint", OTHER_KINDS, ids=lambda c: next(iter(c)))
def test_other_kinds_identical(http: httpx.Client, constraint: dict[str, Any]) -> None:
    on, off = _pair(http, _kind_body(constraint))
    _same_or_near_tie(on, off)
    _steps(on)
    assert _steps(off)[1] == 0


def test_closing_on_budget_identical(http: httpx.Client) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "biography": {"type": "string"}},
        "required": ["name", "biography"],
    }
    body = {"prompt": chat_prompt("Describe a famous person as JSON."), "max_tokens": 16}
    on, off = _pair(http, body | {"constraints": {"json_schema": schema}})
    if _same_or_near_tie(on, off):
        assert on["metadata"].get("closed_on_budget") == off["metadata"].get("closed_on_budget")
    _steps(on)


def _stream(http: httpx.Client, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    text, done = "", None
    with http.stream("POST", "/generate_api", json=body | {"stream": True}) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if not line.startswith("data:"):
                continue
            event = json.loads(line[5:])
            if event["event"] == "token":
                text += event["text"]
            elif event["event"] == "done":
                done = event["response"]
    assert done is not None
    return text, done


def test_streaming_identical(http: httpx.Client) -> None:
    _health_says_on(http)
    body = {
        "messages": [{"role": "user", "content": "What's the weather in Paris?"}],
        "tools": [WEATHER],
        "tool_choice": "get_weather",
        "max_tokens": 120,
        "temperature": 0,
    }
    text_on, done_on = _stream(http, body)
    text_off, done_off = _stream(http, body | {"fast_forward": False})
    assert text_on == text_off == done_on["generated_text"] == done_off["generated_text"]
    _same(done_on, done_off)
    assert _steps(done_on)[1] > 0
    assert _steps(done_off) == (done_off["tokens_generated"], 0)
    plain, _ = _pair(http, body)
    assert plain["generated_text"] == text_on  # the stream is the non-streaming answer


def test_a_stop_string_inside_a_forced_run_keeps_the_counts(http: httpx.Client) -> None:
    """A stop string finishes a request in the API process, after the engine; vLLM sends its step count
    only with the engine's own finishing output, so without the scheduler sending it each drafted step
    such a request reported every token as a step and none forced."""
    sentence = "The quick brown fox jumps over the lazy dog and then runs far away into the dark forest"
    body = {
        "prompt": chat_prompt("Complete the sentence: The quick brown"),
        "constraints": {"choice": [sentence]},
        "max_tokens": 60,
        "stop": ["dark"],
    }
    on, off = _pair(http, body)
    _same(on, off)
    assert on["generated_text"] == sentence[: sentence.index("dark")]
    assert on["finish_reason"] == "stop"
    steps, forced = _steps(on)
    assert forced > on["tokens_generated"] // 2, on["metadata"]  # all but the first token or two
    assert _steps(off) == (off["tokens_generated"], 0)
    text, done = _stream(http, body | {"temperature": 0})
    assert text == on["generated_text"]
    assert _steps(done) == (steps, forced)


def test_a_grammar_that_forces_the_end_token_mid_run(http: httpx.Client) -> None:
    """A grammar may force the end-of-sequence token with more text after it. Drafted past that token,
    the rest reached vLLM's mask fill after the grammar had ended, which left llguidance's matcher in its
    error state: vLLM terminated the request (finish ``abort``) where decoding without fast-forward
    stops cleanly."""
    body = {
        "prompt": chat_prompt("Say hi."),
        "constraints": {"grammar": 'start: "hello there" <|im_end|> " and more text"'},
        "max_tokens": 30,
    }
    on, off = _pair(http, body)
    _same(on, off)
    assert on["generated_text"] == "hello there"
    assert on["metadata"]["request_finish_reason"] == off["metadata"]["request_finish_reason"] == "stop"
    assert on["constraint_satisfied"] is False  # the grammar's text after the end token never came
    _steps(on)


def test_openai_api_carries_the_switch_and_the_counts(http: httpx.Client) -> None:
    body = {
        "messages": [{"role": "user", "content": "Weather in Rome?"}],
        "tools": [WEATHER],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "max_tokens": 120,
        "temperature": 0,
    }
    on = http.post("/v1/chat/completions", json=body).json()
    off = http.post("/v1/chat/completions", json=body | {"fast_forward": False}).json()
    calls = [c["function"] for c in on["choices"][0]["message"]["tool_calls"]]
    assert calls == [c["function"] for c in off["choices"][0]["message"]["tool_calls"]]
    meta_on, meta_off = on["ananke"]["metadata"], off["ananke"]["metadata"]
    tokens = on["usage"]["completion_tokens"]
    assert meta_on["decode_steps"] + meta_on["forced_tokens"] == tokens
    assert meta_on["forced_tokens"] > 0
    assert (meta_off["decode_steps"], meta_off["forced_tokens"]) == (tokens, 0)
    wrong = http.post("/generate_api", json={"prompt": "x", "fast_forward": "sometimes"})
    assert wrong.status_code == 422


def test_a_seeded_sample_stays_reproducible(http: httpx.Client) -> None:
    """A request that samples with a seed runs without fast-forward by default (vLLM's draft verification
    does not keep a seeded sample reproducible), so the same request gives the same output; asked for
    explicitly, fast-forward still applies."""
    _health_says_on(http)
    body = {
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "tools": [WEATHER],
        "tool_choice": "get_weather",
        "max_tokens": 64,
        "temperature": 0.9,
        "seed": 7,
    }
    first, second = (http.post("/generate_api", json=body).json() for _ in range(2))
    assert first["generated_text"] == second["generated_text"]
    assert first["metadata"]["forced_tokens"] == 0
    forced = http.post("/generate_api", json=body | {"fast_forward": True}).json()
    assert forced["metadata"]["forced_tokens"] > 0
    assert forced["tool_calls"], forced  # still a valid call of the named tool


FLOAT32_SERVERS = {"on": "on", "async": "on (async scheduling)"}
"""``--fast-forward`` of the float32 servers -> their ``/health`` ``fast_forward``. ``on`` runs without
async scheduling on the CPU; ``async`` runs it anyway, as ``on`` does on the GPU, with the drafts one
step late (modal_service/engine/fast_forward_async.py)."""


@pytest.fixture(scope="module", params=sorted(FLOAT32_SERVERS))
def float32_http(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[httpx.Client]:
    """A server of this module's own, in float32, with fast-forward ``on`` (the default) or ``async``."""
    mode = request.param
    args = ["--dtype", "float32", "--fast-forward", mode]
    server = ServerProcess(args, tmp_path_factory.mktemp(f"float32-{mode}") / "serve.log")
    server.start()
    try:
        server.wait_for("ok")
        with httpx.Client(base_url=server.url, timeout=600) as client:
            yield client
    finally:
        server.stop()


def test_float32_is_byte_identical(float32_http: httpx.Client, request: pytest.FixtureRequest) -> None:
    """No allowance: in float32 the multi-token forward pass rounds about 1e-6 away from one token at a
    time, far below any gap between two tokens here, so every answer must be byte-identical with
    fast-forward on and off: the tool calls, the sampled dev schemas, the other constraint kinds."""
    health = float32_http.get("/health").json()
    mode = request.node.callspec.params["float32_http"]
    assert (health["dtype"], health["fast_forward"]) == ("float32", FLOAT32_SERVERS[mode]), health
    bodies = [_tool_body(*case) for case in TOOL_CASES]
    bodies += [_schema_body(name, schema) for name, schema in _dev_sample()]
    bodies += [_kind_body(constraint) for constraint in OTHER_KINDS]
    answered, forced = 0, 0
    for body in bodies:
        on, off = _post_pair(float32_http, body)
        assert on.status_code == off.status_code, (body, on.text, off.text)
        if on.status_code != 200:  # refused (4xx) either way: the same refusal
            assert on.json() == off.json()
            continue
        answered += 1
        on_, off_ = on.json(), off.json()
        _same(on_, off_)
        assert [t["token_id"] for t in on_["logprobs"]] == [t["token_id"] for t in off_["logprobs"]]
        forced += _steps(on_)[1]
    assert answered >= len(bodies) * 3 // 4
    assert forced > 0
