"""The service on Qwen2.5's tokenizer and chat template: a tiny random-weight Qwen2 through the real engine.

SmolLM2 hides whatever depends on the production tokenizer: Qwen's ``<tool_call>`` is one added
token, its byte-level pieces split non-ASCII text its own way, its chat template lays out tools
itself. This module starts a second ``ananke serve`` on
:func:`~modal_service.model_prep.tiny_qwen_dir` (``ananke model pull --tiny-qwen``) and checks every
constraint kind, every ``tool_choice``, the agent turn, closing on budget, streaming and ``/v1``.
The weights are random, so what the model says is noise: only structure is asserted, each answer
re-checked here (jsonschema, ``re.fullmatch``, token ids), not taken from the service's verdict.
Sampling is at a temperature with fixed seeds, so a run repeats.

Set ``ANANKE_TEST_QWEN_BASE_URL`` to reuse a tiny-Qwen service that is already running.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import jsonschema
import pytest

from modal_service.model_prep import QWEN_TINY_DIRNAME, cache_dir, tiny_qwen_dir
from tests.conftest import ROOT, _free_port, _wait_healthy

pytestmark = pytest.mark.integration

TEMPERATURE = 0.9


@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """A client of a real local service running the tiny Qwen2, started for this module only."""
    existing = os.environ.get("ANANKE_TEST_QWEN_BASE_URL")
    if existing:
        _wait_healthy(existing, None, None)
        with httpx.Client(base_url=existing, timeout=300) as client:
            assert client.get("/health").json()["model"] == QWEN_TINY_DIRNAME
            yield client
        return
    port = _free_port()
    log = tmp_path_factory.mktemp("qwen_server") / "serve.log"
    argv = [sys.executable, "-m", "modal_service.cli", "serve", "--model", str(tiny_qwen_dir())]
    # 0.25 GiB holds a million tokens of this model's KV cache; the default 1 GiB only costs memory.
    argv += ["--port", str(port), "--max-model-len", "2048", "--kv-cache-gib", "0.25"]
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, log)
        with httpx.Client(base_url=url, timeout=300) as client:
            yield client
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _vocab() -> tuple[dict[str, int], dict[str, int]]:
    """The served tokenizer's vocabulary and its added tokens, read from its ``tokenizer.json``."""
    path = cache_dir() / "models" / QWEN_TINY_DIRNAME / "tokenizer.json"  # the fixture prepared it
    data = json.loads(path.read_text(encoding="utf-8"))
    return data["model"]["vocab"], {t["content"]: t["id"] for t in data["added_tokens"]}


def _chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _post(client: httpx.Client, body: dict[str, Any], path: str = "/generate_api") -> dict[str, Any]:
    resp = client.post(path, json={"temperature": TEMPERATURE} | body)
    assert resp.status_code == 200, resp.text
    data: dict[str, Any] = resp.json()
    return data


def _stream(client: httpx.Client, body: dict[str, Any]) -> tuple[list[int], dict[str, Any]]:
    """The token ids a ``/generate_api`` stream sent, and its folded response (checked to be the
    frames' text and tokens, in order)."""
    request = {"temperature": TEMPERATURE} | body | {"stream": True}
    with client.stream("POST", "/generate_api", json=request) as resp:
        assert resp.status_code == 200, resp.read()
        events = [json.loads(line[5:]) for line in resp.iter_lines() if line.startswith("data:")]
    *tokens, done = events
    assert all(e["event"] == "token" for e in tokens), events
    assert done["event"] == "done", done
    final: dict[str, Any] = done["response"]
    assert "".join(e["text"] for e in tokens) == final["generated_text"]
    ids = [t for e in tokens for t in e["token_ids"]]
    assert len(ids) == final["tokens_generated"]
    return ids, final


def _valid(data: dict[str, Any], max_tokens: int) -> str:
    """The text of an answer that the service calls satisfied and finished, within its budget."""
    assert data["constraint_satisfied"] is True, data
    assert data["finish_reason"] in ("stop", "tool_calls"), data
    assert data["tokens_generated"] <= max_tokens, data
    if data["metadata"].get("request_finish_reason") == "length":
        assert "closed_on_budget" in data["metadata"], data  # cut by the budget, then closed
    text: str = data["generated_text"]
    return text


def _fits(schema: dict[str, Any]) -> Callable[[str], bool]:
    def check(text: str) -> bool:
        jsonschema.validate(json.loads(text), schema)
        return True

    return check


def _fullmatch(pattern: str) -> Callable[[str], bool]:
    return lambda text: re.fullmatch(pattern, text) is not None


# ----------------------------------------------------------------------------- every constraint kind

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 16}, "zip": {"pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "role", "address"],
    "additionalProperties": False,
}
LIST_GRAMMAR = 'start: "[" ITEM ("," ITEM)* "]"\nITEM: /[a-z]+/'
LIST = r"\[[a-z]+(,[a-z]+)*\]"
JSON_IN_LARK = (
    'start: "RESULT: " obj\nobj: %json {"type": "object", "properties": {"ok": {"type": "boolean"}}, '
    '"required": ["ok"], "additionalProperties": false, "x-guidance": {"whitespace_flexible": false}}'
)
GBNF = 'root ::= "fn " name "(" params ")"\nname ::= [a-z]+\nparams ::= "" | name ("," name)*'
CHOICES = ["red", "green blue", "café au lait", "<tool_call>"]

KINDS: dict[str, tuple[dict[str, Any], Callable[[str], bool]]] = {
    "json_schema": ({"json_schema": PERSON}, _fits(PERSON)),
    "json_object": ({"json_object": True}, _fits({"type": "object"})),
    "regex": ({"regex": "caf[éè] [a-z]{2,8}-[0-9]{1,3}"}, _fullmatch("caf[éè] [a-z]{2,8}-[0-9]{1,3}")),
    "regex_patterns": (
        {"regex_patterns": ["yes", "no [0-9]+", "maybe [A-Z][a-z]*"]},
        _fullmatch("yes|no [0-9]+|maybe [A-Z][a-z]*"),
    ),
    "grammar_lark": ({"grammar": LIST_GRAMMAR}, _fullmatch(LIST)),
    "grammar_lark_json": ({"grammar": JSON_IN_LARK}, _fullmatch('RESULT: {"ok":(true|false)}')),
    "grammar_gbnf": ({"grammar": GBNF}, _fullmatch(r"fn [a-z]+\(([a-z]+(,[a-z]+)*)?\)")),
    "choice": ({"choice": CHOICES}, CHOICES.__contains__),
}


@pytest.mark.parametrize("kind", KINDS)
def test_every_constraint_kind_gives_valid_output(qwen: httpx.Client, kind: str) -> None:
    constraints, check = KINDS[kind]
    for seed in (1, 2):
        body = {"messages": _chat("Answer."), "constraints": constraints, "max_tokens": 40, "seed": seed}
        text = _valid(_post(qwen, body), 40)
        assert check(text), text


def test_token_masks_hold_token_by_token(qwen: httpx.Client) -> None:
    vocab, added = _vocab()
    digits = [vocab[str(d)] for d in range(10)]
    eos = {added["<|im_end|>"], added["<|endoftext|>"]}
    stopped = 0
    for seed in (1, 2):
        body = {"messages": _chat("Count."), "max_tokens": 24, "seed": seed}
        ids, final = _stream(qwen, body | {"constraints": {"token_mask": {"allowed_tokens": digits}}})
        assert set(ids) <= set(digits) | eos, ids
        assert re.fullmatch("[0-9]*", final["generated_text"]), final
        # A mask has no end of its own: the output is complete when the model stopped (EOS is allowed).
        assert final["constraint_satisfied"] is (final["finish_reason"] == "stop"), final
        stopped += final["finish_reason"] == "stop"

        # Forbid exactly what the model writes unmasked with this seed: it must write otherwise.
        free, _ = _stream(qwen, body)
        forbidden = sorted(set(free) - eos)
        ids, final = _stream(qwen, body | {"constraints": {"token_mask": {"forbidden_tokens": forbidden}}})
        assert ids, final
        assert not set(ids) & set(forbidden), ids
        assert final["constraint_satisfied"] is (final["finish_reason"] == "stop"), final
    assert stopped, "every allowed-token run hit max_tokens"


# ----------------------------------------------------------------------------- tools and the agent turn

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 16}, "unit": {"enum": ["C", "F"]}},
            "required": ["city"],
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers.",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}
NOTE = {
    "type": "function",
    "function": {
        "name": "note",
        "parameters": {
            "type": "object",
            "properties": {"title": {"type": "string"}, "body": {"type": "string"}},
            "required": ["title", "body"],
        },
    },
}
TOOLS = [WEATHER, ADD]
#: Arguments are exact: no keys beyond the schema's.
PARAMS = {
    t["function"]["name"]: t["function"]["parameters"] | {"additionalProperties": False}  # type: ignore[index, operator]
    for t in (WEATHER, ADD, NOTE)
}
ANSWER = {
    "type": "object",
    "properties": {"result": {"type": "integer"}, "summary": {"type": "string", "maxLength": 20}},
    "required": ["result", "summary"],
    "additionalProperties": False,
}


def _check_calls(calls: list[tuple[str, dict[str, Any]]], only: str | None = None) -> None:
    assert calls
    for name, args in calls:
        assert name in PARAMS if only is None else name == only, name
        jsonschema.validate(args, PARAMS[name])


def _check_turn(
    data: dict[str, Any], tool_choice: str, schema: dict[str, Any] | None, max_tokens: int
) -> str:
    """The branch an answer took, checked independently of the service; fails if it is neither."""
    text = _valid(data, max_tokens)
    calls = [(c["name"], c["arguments"]) for c in data["tool_calls"] or []]
    branch = "tool_calls" if calls else "answer"
    assert data["metadata"]["branch"] == branch, data
    if calls:
        assert tool_choice != "none", data
        _check_calls(calls, None if tool_choice in ("auto", "required") else tool_choice)
        assert data["finish_reason"] == "tool_calls", data
        assert text.startswith("<tool_call>"), text
    else:
        assert tool_choice in ("auto", "none"), data
        if schema is not None:
            jsonschema.validate(json.loads(text), schema)
        else:  # free text, which never starts like a call
            assert text, data
            assert not text.startswith("<"), text
            assert not text[0].isspace(), text
    return branch


@pytest.mark.parametrize("tool_choice", ["auto", "required", "get_weather"])
@pytest.mark.parametrize("schema", [None, ANSWER], ids=["tools", "agent_turn"])
def test_tool_turns_are_valid_calls_or_the_answer(
    qwen: httpx.Client, tool_choice: str, schema: dict[str, Any] | None
) -> None:
    for seed in (1, 2, 3):
        body: dict[str, Any] = {
            "messages": _chat("What is the weather in Paris, and what is 2 plus 3?"),
            "tools": TOOLS,
            "tool_choice": tool_choice,
            "max_tokens": 64,
            "seed": seed,
        }
        if schema is not None:
            body["constraints"] = {"json_schema": schema}
        _check_turn(_post(qwen, body), tool_choice, schema, 64)


def test_tool_choice_none_is_the_answer_only(qwen: httpx.Client) -> None:
    body = {"messages": _chat("Hello."), "tools": TOOLS, "tool_choice": "none", "max_tokens": 24, "seed": 1}
    free = _post(qwen, body)
    assert free["tool_calls"] is None
    assert free["constraint_satisfied"] is None  # nothing is constrained
    answer = _post(qwen, body | {"constraints": {"json_schema": ANSWER}, "max_tokens": 40})
    assert _check_turn(answer, "none", ANSWER, 40) == "answer"


def test_required_calls_open_with_qwens_own_token(qwen: httpx.Client) -> None:
    """A call opens with ``<tool_call>``, the one added token, not with pieces (``<``, ``tool``, ...)
    that decode to the same text; and it streams as it is answered whole."""
    _, added = _vocab()
    chat = _chat("Weather in Rome?")
    body = {"messages": chat, "tools": TOOLS, "tool_choice": "required", "max_tokens": 64}
    for seed in (1, 2):
        ids, final = _stream(qwen, body | {"seed": seed})
        assert ids[0] == added["<tool_call>"], ids
        assert added["</tool_call>"] in ids, ids
        assert _check_turn(final, "required", None, 64) == "tool_calls"
        assert _post(qwen, body | {"seed": seed})["generated_text"] == final["generated_text"]


# ----------------------------------------------------------------------------- closing on budget

BIO = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "bio": {"type": "string"}, "born": {"type": "integer"}},
    "required": ["name", "bio", "born"],
}


def test_budget_cut_structures_are_closed_or_refused_up_front(qwen: httpx.Client) -> None:
    """At a small ``max_tokens`` every answer is still valid (closed where the budget cut it), streamed
    or not; a budget below the shortest output, counted in Qwen's tokens, is a 422 up front."""
    chat = _chat("Write at length.")
    # Unbounded strings (length caps off), so that the model runs into the budget.
    cases: list[tuple[dict[str, Any], Callable[[dict[str, Any]], bool]]] = [
        (
            {"constraints": {"json_schema": BIO, "length_caps": False}, "max_tokens": 16},
            lambda data: _fits(BIO)(data["generated_text"]),
        ),
        (
            {"constraints": {"grammar": LIST_GRAMMAR}, "max_tokens": 12},
            lambda data: _fullmatch(LIST)(data["generated_text"]),
        ),
        (
            {"tools": [NOTE], "tool_choice": "required", "max_tokens": 28},
            lambda data: (
                _check_calls([(c["name"], c["arguments"]) for c in data["tool_calls"]], "note") is None
            ),
        ),
    ]
    closed = 0
    for extra, check in cases:
        for seed in (1, 2):
            body = {"messages": chat, "seed": seed} | extra
            for data in (_post(qwen, body), _stream(qwen, body)[1]):
                _valid(data, extra["max_tokens"])
                assert check(data), data
                closed += "closed_on_budget" in data["metadata"]
    assert closed, "no answer reached its budget: nothing here tested closing"

    for constraint in ({"constraints": {"json_schema": BIO}}, {"tools": [NOTE], "tool_choice": "required"}):
        refused = qwen.post("/generate_api", json={"messages": chat, "max_tokens": 4} | constraint)
        assert refused.status_code == 422, refused.text
        error = refused.json()["error"]
        assert error["code"] == "max_tokens_too_small", error
        shortest = error["detail"]["shortest_output_tokens"]
        assert shortest > 4, error
        # Exactly that budget is enough, whatever the model writes.
        _valid(_post(qwen, {"messages": chat, "max_tokens": shortest, "seed": 1} | constraint), shortest)


# ----------------------------------------------------------------------------- /v1


def _v1(qwen: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    request = {"model": "Qwen2.5-tiny-random", "max_tokens": 64} | body
    data = _post(qwen, request, "/v1/chat/completions")
    assert data["object"] == "chat.completion", data
    assert data["ananke"]["constraint_satisfied"] is True, data
    return data


def _v1_turn(choice: dict[str, Any], only: str | None = None) -> str:
    message = choice["message"]
    if message.get("tool_calls"):
        calls = [
            (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]
        ]
        _check_calls(calls, only)
        assert choice["finish_reason"] == "tool_calls", choice
        return "tool_calls"
    jsonschema.validate(json.loads(message["content"]), ANSWER)
    assert choice["finish_reason"] == "stop", choice
    return "answer"


def test_v1_chat_completions_with_tools_and_response_format(qwen: httpx.Client) -> None:
    answer = {"type": "json_schema", "json_schema": {"name": "Answer", "schema": ANSWER, "strict": True}}
    chat = _chat("What is 2 plus 3? Report the result.")
    for seed in (1, 2, 3):  # the agent turn: tools and an answer schema
        data = _v1(qwen, {"messages": chat, "tools": TOOLS, "response_format": answer, "seed": seed})
        _v1_turn(data["choices"][0])
    named = {"type": "function", "function": {"name": "add"}}
    data = _v1(qwen, {"messages": chat, "tools": TOOLS, "tool_choice": named, "seed": 1})
    assert _v1_turn(data["choices"][0], "add") == "tool_calls"
    data = _v1(qwen, {"messages": chat, "response_format": answer, "seed": 1})
    assert _v1_turn(data["choices"][0]) == "answer"
    data = _v1(qwen, {"messages": chat, "response_format": {"type": "json_object"}, "seed": 1})
    assert isinstance(json.loads(data["choices"][0]["message"]["content"]), dict)


def test_v1_streamed_tool_calls_fold_to_valid_calls(qwen: httpx.Client) -> None:
    body = {
        "model": "Qwen2.5-tiny-random",
        "messages": _chat("Weather in Oslo?"),
        "tools": TOOLS,
        "tool_choice": "required",
        "max_tokens": 64,
        "temperature": TEMPERATURE,
        "seed": 2,
        "stream": True,
    }
    with qwen.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        lines = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    calls: dict[int, dict[str, str]] = {}
    for chunk in chunks:
        for delta in chunk["choices"][0]["delta"].get("tool_calls") or []:
            call = calls.setdefault(delta["index"], {"name": "", "arguments": ""})
            call["name"] += delta["function"].get("name") or ""
            call["arguments"] += delta["function"].get("arguments") or ""
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls", chunks[-1]
    _check_calls([(c["name"], json.loads(c["arguments"])) for c in calls.values()])
