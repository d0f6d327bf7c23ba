"""The service against the real engine and model: every constraint binds, and nothing fails open."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import jsonschema
import pytest
from pydantic import BaseModel, Field

from tests.conftest import chat_prompt

pytestmark = pytest.mark.integration


def gen(http: httpx.Client, **body: Any) -> dict[str, Any]:
    body.setdefault("temperature", 0.0)
    body.setdefault("seed", 7)
    resp = http.post("/generate_api", json=body)
    assert resp.status_code == 200, resp.text
    data: dict[str, Any] = resp.json()
    return data


def error(http: httpx.Client, body: Any, status: int, raw: bool = False) -> dict[str, Any]:
    resp = (
        http.post("/generate_api", content=body, headers={"content-type": "application/json"})
        if raw
        else http.post("/generate_api", json=body)
    )
    assert resp.status_code == status, resp.text
    err: dict[str, Any] = resp.json()["error"]
    assert err["code"]
    assert err["message"]
    return err


def test_health_reports_model(http: httpx.Client) -> None:
    body = http.get("/health").json()
    assert body["status"] == "ok"
    assert body["model"] == "SmolLM2-135M-Instruct"


PHONE = "[0-9]{3}-[0-9]{4}"


def test_regex_constraint_really_binds(http: httpx.Client) -> None:
    """vLLM >= 0.12 ignores unknown guided fields: prove the constraint changes the output."""
    prompt = chat_prompt("Write a short poem about the sea.")
    free = gen(http, prompt=prompt, max_tokens=24)
    bound = gen(http, prompt=prompt, max_tokens=24, constraints={"regex": PHONE})
    assert re.fullmatch(PHONE, bound["generated_text"])
    assert bound["constraint_satisfied"] is True
    assert bound["finish_reason"] == "stop"
    assert not re.fullmatch(PHONE, free["generated_text"])
    assert free["constraint_satisfied"] is None


def test_original_fields_are_kept(http: httpx.Client) -> None:
    data = gen(http, prompt=chat_prompt("A number"), max_tokens=8, constraints={"regex": "[0-9]{2}"})
    for field in (
        "generated_text",
        "tokens_generated",
        "generation_time_ms",
        "metadata",
        "constraint_satisfied",
    ):
        assert field in data
    assert data["metadata"]["tokens_per_sec"] > 0
    assert data["metadata"]["constraint_type"] == "regex"
    assert data["metadata"]["compile_time_ms"] >= 0
    assert data["usage"]["completion_tokens"] == data["tokens_generated"]


FEATURE_SCHEMA: dict[str, Any] = {
    "$defs": {
        "leaf": {
            "type": "object",
            "properties": {"node": {"$ref": "#/$defs/node"}},
            "required": ["node"],
            "additionalProperties": False,
        },
        "node": {
            "type": "object",
            "properties": {
                "label": {"type": "string", "minLength": 1, "maxLength": 8},
                "children": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 0},
            },
            "required": ["label", "children"],
            "additionalProperties": False,
        },
    },
    "type": "object",
    "properties": {
        "id": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"},
        "kind": {"enum": ["cat", "dog"]},
        "version": {"const": 2},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "count": {"type": "integer", "exclusiveMinimum": 0, "maximum": 9},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "minItems": 1, "maxItems": 3},
        "when": {"type": "string", "format": "date"},
        "owner": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 10}]},
        "shape": {"oneOf": [{"type": "integer"}, {"type": "boolean"}]},
        "meta": {
            "allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}],
            "properties": {"a": {"maximum": 100}},
            "additionalProperties": False,
        },
        "tree": {"$ref": "#/$defs/leaf"},
    },
    "required": ["id", "kind", "version", "score", "count", "tags", "when", "owner", "shape", "meta", "tree"],
    "additionalProperties": False,
}


def test_json_schema_features_validate(http: httpx.Client) -> None:
    data = gen(
        http,
        prompt=chat_prompt("Describe a pet as JSON."),
        max_tokens=400,
        constraints={"json_schema": FEATURE_SCHEMA},
    )
    assert data["finish_reason"] == "stop", data
    value = json.loads(data["generated_text"])
    jsonschema.Draft202012Validator(
        FEATURE_SCHEMA, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    ).validate(value)
    assert data["constraint_satisfied"] is True
    assert "\n" not in data["generated_text"]  # compact by default: no runaway whitespace


def test_max_tokens_below_the_shortest_instance_is_422(http: httpx.Client) -> None:
    body = {
        "prompt": chat_prompt("Describe a pet as JSON."),
        "max_tokens": 4,
        "constraints": {"json_schema": FEATURE_SCHEMA},
    }
    err = error(http, body, 422)
    assert err["code"] == "max_tokens_too_small"
    assert err["detail"]["shortest_output_tokens"] > 4


#: One unbounded string: the model writes on until max_tokens.
BIO_SCHEMA = {"type": "object", "properties": {"bio": {"type": "string"}}, "required": ["bio"]}


def test_truncated_output_is_never_valid(http: httpx.Client) -> None:
    # Closing on budget off: the budget-cut output is reported as it is.
    data = gen(
        http,
        prompt=chat_prompt("Describe a pet as JSON."),
        max_tokens=12,
        constraints={"json_schema": BIO_SCHEMA, "length_caps": False, "close_on_budget": False},
    )
    assert data["finish_reason"] == "length"
    assert data["constraint_satisfied"] is False
    assert "max_tokens" in data["constraint_error"]


def test_flexible_whitespace_is_configurable(http: httpx.Client) -> None:
    schema = {
        "type": "object",
        "properties": {"a": {"type": "integer"}},
        "required": ["a"],
        "additionalProperties": False,
    }
    data = gen(
        http,
        prompt=chat_prompt("JSON please"),
        max_tokens=64,
        constraints={"json_schema": schema, "whitespace": "flexible"},
    )
    assert data["constraint_satisfied"] is (data["finish_reason"] == "stop")
    if data["finish_reason"] == "stop":
        jsonschema.validate(json.loads(data["generated_text"]), schema)


def test_recursive_pydantic_schema(http: httpx.Client) -> None:
    from pydantic import BaseModel

    class Tree(BaseModel):
        name: str
        children: list[Tree]

    schema = Tree.model_json_schema()
    assert "$defs" in schema or "$ref" in json.dumps(schema)
    finished = 0
    for seed in (1, 2, 3):
        data = gen(
            http,
            prompt=chat_prompt("A family tree as JSON: Ann has no children."),
            max_tokens=160,
            constraints={"json_schema": schema},
            seed=seed,
            temperature=0.8,
        )
        if data["finish_reason"] == "stop":
            finished += 1
            assert data["constraint_satisfied"] is True
            Tree.model_validate_json(data["generated_text"])
        else:
            assert data["constraint_satisfied"] is False
    assert finished >= 1


def test_regex_patterns_list_form(http: httpx.Client) -> None:
    patterns = ["Result<[A-Za-z]{1,10}>", "Option<[A-Za-z]{1,10}>"]
    data = gen(
        http,
        prompt=chat_prompt("A Rust return type"),
        max_tokens=16,
        constraints={"regex_patterns": patterns},
    )
    assert any(re.fullmatch(p, data["generated_text"]) for p in patterns)
    assert data["constraint_satisfied"] is True


LARK = r"""
start: "fn " NAME "(" params ")" " -> " TYPE
params: (param (", " param)*)?
param: NAME ": " TYPE
NAME: /[a-z_][a-z0-9_]{0,10}/
TYPE: "i32" | "bool" | "String"
"""


def test_lark_grammar(http: httpx.Client) -> None:
    data = gen(
        http, prompt=chat_prompt("A Rust function signature"), max_tokens=48, constraints={"grammar": LARK}
    )
    text = data["generated_text"]
    assert re.fullmatch(
        r"fn [a-z_][a-z0-9_]*\((([a-z_][a-z0-9_]*: (i32|bool|String))(, )?)*\) -> "
        r"(i32|bool|String)",
        text,
    ), text
    assert data["constraint_satisfied"] is True


def test_lark_with_json_embedding(http: httpx.Client) -> None:
    grammar = (
        'start: "RESULT: " obj\nobj: %json {"type": "object", "properties": {"ok": {"type": "boolean"}}, '
        '"required": ["ok"], "additionalProperties": false}'
    )
    data = gen(http, prompt=chat_prompt("Report"), max_tokens=32, constraints={"grammar": grammar})
    assert data["generated_text"].startswith("RESULT: ")
    assert isinstance(json.loads(data["generated_text"][len("RESULT: ") :])["ok"], bool)
    assert data["constraint_satisfied"] is True


def test_gbnf_grammar_is_converted(http: httpx.Client) -> None:
    gbnf = """
root ::= function
function ::= "fn " name "(" params ")" block
name ::= [a-z]+
params ::= "" | name ("," name)*
block ::= " { " [a-z0-9 +]* "}"
"""
    data = gen(http, prompt=chat_prompt("A tiny function"), max_tokens=40, constraints={"grammar": gbnf})
    assert data["finish_reason"] == "stop", data
    assert re.fullmatch(r"fn [a-z]+\(([a-z]+(,[a-z]+)*)?\) \{ [a-z0-9 +]*\}", data["generated_text"])
    assert data["constraint_satisfied"] is True


def test_choice(http: httpx.Client) -> None:
    data = gen(
        http,
        prompt=chat_prompt("Is water wet?"),
        max_tokens=8,
        constraints={"choice": ["definitely yes", "no"]},
    )
    assert data["generated_text"] in ("definitely yes", "no")
    assert data["constraint_satisfied"] is True


@pytest.mark.parametrize(
    "constraints",
    [{"choice": ["red apple"]}, {"grammar": 'start: "red apple"'}],
    ids=["choice", "grammar"],
)
def test_a_stop_string_cut_is_never_valid(http: httpx.Client, constraints: dict[str, Any]) -> None:
    # the engine stops on "apple" and returns "red ": that is not the constraint's text
    data = gen(
        http, prompt=chat_prompt("Name a fruit."), max_tokens=8, constraints=constraints, stop=["apple"]
    )
    assert data["generated_text"] == "red "
    assert data["constraint_satisfied"] is False
    whole = gen(http, prompt=chat_prompt("Name a fruit."), max_tokens=8, constraints=constraints)
    assert (whole["generated_text"], whole["constraint_satisfied"]) == ("red apple", True)


def test_a_tool_call_cut_by_a_stop_string_is_not_a_call(http: httpx.Client) -> None:
    data = gen(
        http, messages=ASK, tools=[WEATHER_TOOL], tool_choice="required", max_tokens=64, stop=["</tool_call>"]
    )
    assert data["constraint_satisfied"] is False
    assert not data["tool_calls"]


def test_token_mask_allowed(http: httpx.Client) -> None:
    from transformers import AutoTokenizer

    from modal_service.model_prep import default_model_dir

    tok = AutoTokenizer.from_pretrained(str(default_model_dir()))
    digits = sorted({tok.convert_tokens_to_ids(str(d)) for d in range(10)})
    data = gen(
        http,
        prompt=chat_prompt("Write a poem"),
        max_tokens=6,
        constraints={"token_mask": {"allowed_tokens": digits}},
    )
    assert re.fullmatch("[0-9]+", data["generated_text"]), data
    assert data["constraint_satisfied"] is False  # stopped by max_tokens: reported honestly
    data = gen(
        http,
        prompt=chat_prompt("Write a poem"),
        max_tokens=6,
        constraints={"token_mask": {"forbidden_tokens": digits}},
    )
    assert not re.search("[0-9]", data["generated_text"])


@pytest.mark.parametrize(
    ("constraints", "needle"),
    [
        ({"token_mask": {"allowed_tokens": [10**9]}}, "vocabulary"),
        ({"regex": "[0-9", "grammar": "start: x"}, "exactly one constraint"),
        ({"json_schema": {"type": "objectx"}}, "invalid JSON Schema"),
        ({"json_schema": {"type": "object", "not": {"required": ["a"]}}, "strict": True}, "llguidance"),
        ({"json_schema": {"$ref": "http://example.com/remote.json"}}, "llguidance"),
        ({"grammar": "start: undefined_rule"}, "llguidance"),
        ({"grammar": "root ::= ("}, "GBNF"),
        ({"regex": "(unclosed"}, "llguidance"),
        ({"choice": []}, "non-empty"),
        ({}, "empty"),
        ({"bogus": 1}, "Extra inputs"),
    ],
)
def test_bad_constraints_are_422(http: httpx.Client, constraints: dict[str, Any], needle: str) -> None:
    err = error(http, {"prompt": "x", "constraints": constraints}, 422)
    assert needle.lower() in err["message"].lower(), err


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ('{"prompt": "x", bad', 400, "not valid JSON"),
        ({"prompt": "x", "max_tokens": 0}, 422, "greater than 0"),
        ({"prompt": "x", "max_tokens": 10**6}, 422, "cap"),
        ({"prompt": "x" * 30000, "max_tokens": 8}, 422, "context"),
        ({"prompt": ["x"] * 65, "max_tokens": 1}, 422, "limit"),
        ({"messages": []}, 422, "empty"),
        ({"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, 422, "exactly one"),
    ],
)
def test_bad_requests_are_4xx(http: httpx.Client, body: Any, status: int, needle: str) -> None:
    err = error(http, body, status, raw=isinstance(body, str))
    assert needle.lower() in err["message"].lower(), err


def test_batch_prompts_in_order(http: httpx.Client) -> None:
    prompts = [chat_prompt(f"Say a number for item {i}") for i in range(4)]
    data = gen(http, prompt=prompts, max_tokens=8, constraints={"regex": "[0-9]{3}"})
    assert len(data["results"]) == 4
    for r in data["results"]:
        assert re.fullmatch("[0-9]{3}", r["generated_text"])
        assert r["constraint_satisfied"] is True
    assert data["usage"]["completion_tokens"] == sum(r["tokens_generated"] for r in data["results"])


def _sse(http: httpx.Client, body: dict[str, Any]) -> list[dict[str, Any]]:
    events = []
    with http.stream("POST", "/generate_api", json=body | {"stream": True}) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
    return events


def test_streaming_folds_to_the_final_answer(http: httpx.Client) -> None:
    schema = {
        "type": "object",
        "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["x"],
        "additionalProperties": False,
    }
    events = _sse(
        http,
        {
            "prompt": chat_prompt("JSON"),
            "max_tokens": 32,
            "temperature": 0,
            "constraints": {"json_schema": schema},
        },
    )
    tokens = [e for e in events if e["event"] == "token"]
    assert len(tokens) >= 2
    assert events[-1]["event"] == "done"
    final = events[-1]["response"]
    assert "".join(e["text"] for e in tokens) == final["generated_text"]
    assert final["constraint_satisfied"] is True
    assert final["finish_reason"] == "stop"


def test_chat_messages_use_the_template(http: httpx.Client) -> None:
    data = gen(
        http,
        messages=[
            {"role": "system", "content": "Answer with one word."},
            {"role": "user", "content": "Colour of the sky?"},
        ],
        max_tokens=6,
        constraints={"choice": ["blue", "green"]},
    )
    assert data["generated_text"] in ("blue", "green")
    assert data["usage"]["prompt_tokens"] > 10


CALC_TOOL = {
    "type": "function",
    "function": {
        "name": "multiply",
        "description": "Multiply two integers",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
        },
    },
}
ASK = [{"role": "user", "content": "What is 6 times 7?"}]


@pytest.mark.parametrize("choice", ["required", "multiply", "weather"])
def test_forced_tool_calls_validate(http: httpx.Client, choice: str) -> None:
    data = gen(
        http,
        messages=ASK,
        tools=[CALC_TOOL, WEATHER_TOOL],
        tool_choice=choice,
        max_tokens=64,
        parallel_tool_calls=False,
    )
    assert data["finish_reason"] == "tool_calls", data
    assert data["constraint_satisfied"] is True
    (call,) = data["tool_calls"]
    if choice != "required":
        assert call["name"] == choice
    tool = {"multiply": CALC_TOOL, "weather": WEATHER_TOOL}[call["name"]]
    params = tool["function"]["parameters"]  # type: ignore[index]
    jsonschema.validate(call["arguments"], params | {"additionalProperties": False})


class _Place(BaseModel):
    city: str = Field(max_length=20)
    country: str = Field(max_length=20)


class _Route(BaseModel):
    start: _Place
    end: _Place


def test_nested_pydantic_tool_parameters_get_a_valid_call(http: httpx.Client) -> None:
    """A nested model's schema refers to its parts through ``$defs`` (as LangChain's ``bind_tools``
    sends it): the refs resolve as in the caller's schema, not at the service's call wrapper (before,
    a 422 "Pointer '/$defs/_Place' does not exist")."""
    params = _Route.model_json_schema()
    assert "$defs" in params
    route = {"type": "function", "function": {"name": "route", "parameters": params}}
    data = gen(
        http,
        messages=[{"role": "user", "content": "Plan a route from Paris, France to Rome, Italy."}],
        tools=[route],
        tool_choice="route",
        max_tokens=96,
        parallel_tool_calls=False,
    )
    assert data["finish_reason"] == "tool_calls", data
    assert data["constraint_satisfied"] is True, data
    (call,) = data["tool_calls"]
    assert call["name"] == "route"
    jsonschema.validate(call["arguments"], params)


def test_tool_choice_none_is_plain_text(http: httpx.Client) -> None:
    data = gen(http, messages=ASK, tools=[CALC_TOOL], tool_choice="none", max_tokens=24)
    assert data["tool_calls"] is None
    assert "<tool_call>" not in data["generated_text"]


def test_tool_choice_auto_is_text_or_valid_calls(http: httpx.Client) -> None:
    for seed in (1, 2, 3):
        data = gen(
            http,
            messages=ASK,
            tools=[CALC_TOOL],
            tool_choice="auto",
            max_tokens=64,
            seed=seed,
            temperature=1.0,
        )
        if data["finish_reason"] == "length":
            assert data["constraint_satisfied"] is False
            continue
        assert data["constraint_satisfied"] is True
        if data["tool_calls"]:
            assert all(c["name"] == "multiply" for c in data["tool_calls"])
        else:
            assert not data["generated_text"].startswith("<")


def test_parallel_tool_calls(http: httpx.Client) -> None:
    data = gen(
        http,
        messages=[{"role": "user", "content": "Weather in Paris and in Rome?"}],
        tools=[WEATHER_TOOL],
        tool_choice="required",
        max_tokens=96,
        parallel_tool_calls=True,
    )
    if data["finish_reason"] == "tool_calls":
        assert data["constraint_satisfied"] is True
        assert len(data["tool_calls"]) >= 1
    else:
        assert data["constraint_satisfied"] is False


def test_tool_results_round_trip(http: httpx.Client) -> None:
    messages = [
        *ASK,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "c1", "name": "multiply", "arguments": {"a": 6, "b": 7}}],
        },
        {"role": "tool", "content": "42", "tool_call_id": "c1"},
    ]
    data = gen(http, messages=messages, tools=[CALC_TOOL], tool_choice="none", max_tokens=24)
    assert data["usage"]["prompt_tokens"] > 20
    assert data["tool_calls"] is None


def test_openai_chat_completions_json_schema(http: httpx.Client) -> None:
    schema = {
        "type": "object",
        "properties": {"colour": {"enum": ["red", "blue"]}},
        "required": ["colour"],
        "additionalProperties": False,
    }
    resp = http.post(
        "/v1/chat/completions",
        json={
            "model": "x",
            "messages": [{"role": "user", "content": "Pick a colour"}],
            "temperature": 0,
            "max_tokens": 32,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "c", "schema": schema, "strict": True},
            },
        },
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "chat.completion"
    jsonschema.validate(json.loads(body["choices"][0]["message"]["content"]), schema)
    assert body["ananke"]["constraint_satisfied"] is True


def test_openai_chat_tools_and_stream(http: httpx.Client) -> None:
    body = {
        "model": "x",
        "messages": ASK,
        "tools": [CALC_TOOL],
        "tool_choice": {"type": "function", "function": {"name": "multiply"}},
        "max_tokens": 64,
        "temperature": 0,
    }
    data = http.post("/v1/chat/completions", json=body).json()
    call = data["choices"][0]["message"]["tool_calls"][0]
    assert call["function"]["name"] == "multiply"
    assert set(json.loads(call["function"]["arguments"])) == {"a", "b"}
    chunks = []
    with http.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["choices"][0]["delta"]["tool_calls"][0]["function"]["name"] == "multiply"


def test_openai_completions(http: httpx.Client) -> None:
    data = http.post(
        "/v1/completions", json={"model": "x", "prompt": "Phone: ", "max_tokens": 12, "temperature": 0}
    ).json()
    assert data["object"] == "text_completion"
    assert data["usage"]["completion_tokens"] >= 1


def test_openapi_describes_every_endpoint(http: httpx.Client) -> None:
    spec = http.get("/openapi.json").json()
    for path in ("/health", "/generate_api", "/v1/chat/completions", "/v1/completions", "/v1/models"):
        assert path in spec["paths"]
    assert "422" in spec["paths"]["/generate_api"]["post"]["responses"]
    assert "GenerateRequest" in spec["components"]["schemas"]


UNIQUE = {
    "type": "array",
    "items": {"type": "integer", "minimum": 0, "maximum": 9},
    "minItems": 3,
    "maxItems": 3,
    "uniqueItems": True,
}


def test_unenforceable_keyword_is_approximated_then_verified(http: httpx.Client) -> None:
    data = gen(
        http,
        prompt=chat_prompt("Three different digits as a JSON array"),
        max_tokens=32,
        constraints={"json_schema": UNIQUE},
        temperature=1.0,
        seed=3,
    )
    meta = data["metadata"]
    assert meta["constraint_mode"] == "approximate"
    assert "uniqueItems" in meta["approximation"]
    assert 1 <= meta["attempts"] <= 3
    value = json.loads(data["generated_text"])
    valid = len(set(value)) == len(value) == 3
    assert data["constraint_satisfied"] is valid  # the full schema decides, not the grammar
    if not valid:
        assert "unique" in data["constraint_error"]


def test_strict_mode_rejects_what_it_cannot_enforce(http: httpx.Client) -> None:
    err = error(http, {"prompt": "x", "constraints": {"json_schema": UNIQUE, "strict": True}}, 422)
    assert "uniqueItems" in err["message"]


def test_schema_without_finite_instance_is_rejected(http: httpx.Client) -> None:
    schema = {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}
    err = error(http, {"prompt": "x", "constraints": {"json_schema": schema}}, 422)
    assert "finite instance" in err["message"]


def test_length_caps_bound_unbounded_fields(http: httpx.Client) -> None:
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}},
        "required": ["n"],
        "additionalProperties": False,
    }
    capped = gen(
        http, prompt=chat_prompt("A big number as JSON"), max_tokens=40, constraints={"json_schema": schema}
    )
    assert capped["metadata"]["length_caps_applied"] >= 1
    if capped["finish_reason"] == "stop":
        assert abs(json.loads(capped["generated_text"])["n"]) <= 10**15
        assert capped["constraint_satisfied"] is True
