"""Validation rules of the wire protocol (``langchain_ananke.protocol``)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from langchain_ananke.protocol import (
    CONSTRAINT_KINDS,
    BatchGenerateResponse,
    Constraints,
    GenerateRequest,
    StreamEvent,
    TokenMask,
)

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}
ONE_OF_EACH: dict[str, Any] = {
    "json_schema": SCHEMA,
    "json_object": True,
    "regex": "[0-9]+",
    "regex_patterns": ["a+", "b+"],
    "grammar": 'start: "yes" | "no"',
    "choice": ["red", "green"],
    "token_mask": {"allowed_tokens": [1, 2, 3]},
}
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}}
CHAT = [{"role": "user", "content": "hi"}]


def test_every_kind_has_an_example() -> None:
    assert set(ONE_OF_EACH) == set(CONSTRAINT_KINDS)


@pytest.mark.parametrize("kind", CONSTRAINT_KINDS)
def test_one_constraint_is_accepted(kind: str) -> None:
    constraints = Constraints.model_validate({kind: ONE_OF_EACH[kind]})
    assert constraints.kinds() == [kind]
    assert constraints.kind == kind


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("json_schema", "regex"),
        ("regex", "grammar"),
        ("choice", "token_mask"),
        ("json_object", "json_schema"),
    ],
)
def test_two_constraints_are_rejected_naming_both(first: str, second: str) -> None:
    with pytest.raises(ValidationError, match="exactly one constraint per request, got 2") as info:
        Constraints.model_validate({first: ONE_OF_EACH[first], second: ONE_OF_EACH[second]})
    message = str(info.value)
    assert first in message.split("got 2:")[1]
    assert second in message.split("got 2:")[1]


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"whitespace": "flexible"},
        {"json_object": False},
        {"json_schema": None, "regex": None},
    ],
)
def test_empty_constraints_are_rejected(data: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="constraints is empty; give one of: json_schema"):
        Constraints.model_validate(data)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"regex": "a", "pattern": "b"}, "pattern"),
        ({"regex": "a", "schema": {}}, "schema"),
        ({"token_mask": {"allowed_tokens": [1], "banned": [2]}}, "banned"),
        ({"regex": "a", "whitespace": "pretty"}, "whitespace"),
    ],
)
def test_unknown_or_bad_constraint_fields_are_rejected(data: dict[str, Any], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        Constraints.model_validate(data)


@pytest.mark.parametrize("field", ["choice", "regex_patterns"])
def test_empty_lists_are_rejected(field: str) -> None:
    with pytest.raises(ValidationError, match="must be a non-empty list"):
        Constraints.model_validate({field: []})


@pytest.mark.parametrize(
    "data",
    [{}, {"allowed_tokens": []}, {"forbidden_tokens": []}, {"allowed_tokens": None, "forbidden_tokens": []}],
)
def test_empty_token_mask_is_rejected(data: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="token_mask needs allowed_tokens and/or forbidden_tokens"):
        TokenMask.model_validate(data)


@pytest.mark.parametrize(
    "data",
    [{"allowed_tokens": [5]}, {"forbidden_tokens": [7]}, {"allowed_tokens": [1, 2], "forbidden_tokens": [2]}],
)
def test_token_mask_with_ids_is_accepted(data: dict[str, Any]) -> None:
    assert TokenMask.model_validate(data).model_dump(exclude_none=True) == data


@pytest.mark.parametrize(
    "data",
    [
        {"prompt": "hi"},
        {"prompt": ["a", "b"]},
        {"messages": CHAT},
        {"messages": CHAT, "tools": [TOOL]},
        {"messages": CHAT, "tools": [TOOL], "tool_choice": "get_weather"},
        {"messages": CHAT, "tools": [TOOL], "tool_choice": "required"},
        {"messages": CHAT, "tools": [TOOL], "constraints": {"json_schema": SCHEMA}},
        {"messages": CHAT, "tools": [TOOL], "constraints": {"json_schema": SCHEMA}, "tool_choice": "none"},
        {"messages": CHAT, "tool_choice": "none"},
        {"prompt": "hi", "stream": True},
        {"prompt": "hi", "constraints": {"regex": "[a-z]+"}, "max_tokens": 1},
    ],
)
def test_valid_requests(data: dict[str, Any]) -> None:
    request = GenerateRequest.model_validate(data)
    assert request.model_dump(exclude_unset=True, mode="json") == data


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({}, "exactly one of 'prompt' or 'messages'"),
        ({"prompt": "hi", "messages": CHAT}, "exactly one of 'prompt' or 'messages'"),
        ({"prompt": []}, "prompt list is empty"),
        ({"messages": []}, "messages is empty"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": -5}, "max_tokens"),
        ({"prompt": "hi", "temperature": 2.5}, "temperature"),
        ({"prompt": "hi", "top_p": 0}, "top_p"),
        ({"prompt": "hi", "timeout_s": 0}, "timeout_s"),
        ({"prompt": "hi", "promt": "typo"}, "promt"),
        ({"prompt": "hi", "constraints": {}}, "constraints is empty"),
        ({"prompt": "hi", "tools": [TOOL]}, "tools need 'messages'"),
        (
            {"messages": CHAT, "tools": [TOOL], "constraints": {"regex": "a"}},
            "either 'tools' or 'constraints'",
        ),
        (
            {"messages": CHAT, "tools": [TOOL], "constraints": {"json_object": True}},
            "tools combine only with a json_schema constraint",
        ),
        ({"messages": CHAT, "tools": [TOOL, TOOL]}, "tool names must be unique"),
        (
            {"messages": CHAT, "tools": [{"function": {"name": "f", "parameters": {"type": "string"}}}]},
            "tool 'f': function.parameters must be a JSON Schema for an object",
        ),
        (
            {"messages": CHAT, "tools": [TOOL], "tool_choice": "get_time"},
            r"auto, required, none or a tool name \(get_weather\)",
        ),
        (
            {"messages": CHAT, "tool_choice": "get_weather"},
            "tool_choice 'get_weather' needs tools, and no tools were given",
        ),
        ({"messages": CHAT, "tool_choice": "required"}, "tool_choice 'required' needs tools"),
        ({"messages": CHAT, "tools": [], "tool_choice": "required"}, "tool_choice 'required' needs tools"),
        ({"prompt": ["a", "b"], "stream": True}, "streaming takes a single prompt"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "role"),
        ({"messages": CHAT, "tools": [{"function": {"name": "bad name!"}}]}, "name"),
        ({"prompt": "hi", "constraints": {"token_mask": {"allowed_tokens": []}}}, "token_mask needs"),
    ],
)
def test_invalid_requests(data: dict[str, Any], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        GenerateRequest.model_validate(data)


@pytest.mark.parametrize(
    ("stop", "expected"),
    [("###", ["###"]), (["a", "b"], ["a", "b"]), (None, None), ([], [])],
)
def test_stop_string_becomes_a_list(stop: Any, expected: list[str] | None) -> None:
    assert GenerateRequest(prompt="hi", stop=stop).stop == expected


@pytest.mark.parametrize("stop", ["", ["a", ""]])
def test_an_empty_stop_string_is_refused_up_front(stop: Any) -> None:
    # vLLM refuses it only when the request reaches the engine, which a stream does after its 200
    with pytest.raises(ValidationError, match="stop strings must not be empty") as info:
        GenerateRequest(prompt="hi", stop=stop)
    assert info.value.errors()[0]["loc"] == ("stop",)


def test_tool_parameters_default_to_an_empty_object() -> None:
    request = GenerateRequest.model_validate({"messages": CHAT, "tools": [{"function": {"name": "now"}}]})
    assert request.tools is not None
    assert request.tools[0].function.parameters == {"type": "object", "properties": {}}


def test_stream_event_carries_the_folded_response() -> None:
    done = StreamEvent.model_validate(
        {
            "event": "done",
            "response": {
                "generated_text": "42",
                "tokens_generated": 1,
                "generation_time_ms": 3.0,
                "constraint_satisfied": True,
                "finish_reason": "stop",
            },
        }
    )
    assert done.response is not None
    assert done.response.generated_text == "42"
    assert done.response.usage.total_tokens == 0


def test_batch_response_keeps_order() -> None:
    one = {
        "tokens_generated": 1,
        "generation_time_ms": 1.0,
        "constraint_satisfied": None,
        "finish_reason": "stop",
    }
    batch = BatchGenerateResponse.model_validate(
        {
            "results": [one | {"generated_text": "a"}, one | {"generated_text": "b"}],
            "generation_time_ms": 2.0,
            "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4},
        }
    )
    assert [r.generated_text for r in batch.results] == ["a", "b"]


def test_an_unsatisfied_answer_carries_its_reason_code_to_the_client_exception() -> None:
    from langchain_ananke.errors import ConstraintNotSatisfiedError, check_satisfied

    metadata = {
        "constraint_satisfied": False,
        "constraint_error": "generation stopped at max_tokens before the constraint completed",
        "constraint_error_code": "budget_exhausted",
        "finish_reason": "length",
    }
    with pytest.raises(ConstraintNotSatisfiedError) as info:
        check_satisfied(metadata, '{"a": ')
    assert info.value.code == "budget_exhausted"
    assert info.value.finish_reason == "length"


@pytest.mark.parametrize(
    ("extra", "needle"),
    [({"whitespace": "flexible"}, "whitespace applies"), ({"max_attempts": 5}, "max_attempts applies")],
)
@pytest.mark.parametrize("kind", [{"regex": "[0-9]+"}, {"choice": ["a"]}, {"grammar": 'start: "a"'}])
def test_json_only_options_are_refused_elsewhere(
    kind: dict[str, Any], extra: dict[str, Any], needle: str
) -> None:
    with pytest.raises(ValidationError, match=needle):
        Constraints.model_validate(kind | extra)
    # their defaults, as clients send them, are fine
    Constraints.model_validate(kind | {"whitespace": "compact", "max_attempts": 3})
    Constraints.model_validate({"json_schema": {"type": "object"}} | extra)


@pytest.mark.parametrize(
    "data",
    [
        {"allowed_tokens": [True]},
        {"forbidden_tokens": [False]},
        {"allowed_tokens": ["5"]},
        {"allowed_tokens": [5.0]},
    ],
)
def test_token_ids_must_be_json_integers(data: dict[str, Any]) -> None:
    # Found by the adversarial probe: {"allowed_tokens": [true]} was read as token id 1
    with pytest.raises(ValidationError, match="valid integer"):
        TokenMask.model_validate(data)
