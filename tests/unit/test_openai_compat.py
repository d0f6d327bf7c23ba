"""OpenAI bodies -> protocol requests (``modal_service.http.openai_api``)."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from langchain_ananke.protocol import GenerateRequest
from modal_service.engine.engine import Engine, EngineConfig
from modal_service.errors import ApiError
from modal_service.http.app import create_app
from modal_service.http.openai_api import chat_to_request, completion_to_request
from modal_service.limits import Limits

USER = {"role": "user", "content": "hi"}
SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
OTHER_TOOL = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": [USER]} | fields


# ----------------------------------------------------------------------------- messages


def test_plain_chat() -> None:
    request = chat_to_request(chat())
    assert isinstance(request, GenerateRequest)
    assert request.prompt is None
    assert request.messages is not None
    assert [m.model_dump(exclude_none=True) for m in request.messages] == [USER]
    assert request.constraints is None
    assert request.tools is None


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ({"role": "developer", "content": "Be brief."}, {"role": "system", "content": "Be brief."}),
        ({"role": "system", "content": "Be brief."}, {"role": "system", "content": "Be brief."}),
        (
            {
                "role": "user",
                "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}],
            },
            {"role": "user", "content": "Hello, world"},
        ),
        ({"role": "assistant", "content": None}, {"role": "assistant", "content": ""}),
        (
            {"role": "tool", "content": "18C", "tool_call_id": "call_1"},
            {"role": "tool", "content": "18C", "tool_call_id": "call_1"},
        ),
    ],
    ids=["developer", "system", "text-parts", "null-content", "tool-result"],
)
def test_message_conversion(message: dict[str, Any], expected: dict[str, Any]) -> None:
    request = chat_to_request(chat(messages=[message, USER]))
    assert request.messages is not None
    assert request.messages[0].model_dump(exclude_none=True) == expected


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ('{"city": "Paris"}', {"city": "Paris"}),
        ("", {}),
        (None, {}),
        ('{"n": [1, {"x": null}]}', {"n": [1, {"x": None}]}),
    ],
)
def test_assistant_tool_calls_with_json_string_arguments(
    arguments: str | None, expected: dict[str, Any]
) -> None:
    assistant = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
        ],
    }
    tool = {"role": "tool", "content": "18C", "tool_call_id": "call_1"}
    request = chat_to_request(chat(messages=[USER, assistant, tool]))
    assert request.messages is not None
    calls = request.messages[1].tool_calls
    assert calls is not None
    assert [(c.id, c.name, c.arguments) for c in calls] == [("call_1", "get_weather", expected)]
    assert request.messages[2].tool_call_id == "call_1"


def test_malformed_tool_call_arguments_are_a_422() -> None:
    assistant = {
        "role": "assistant",
        "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "{city"}}
        ],
    }
    with pytest.raises(ApiError) as info:
        chat_to_request(chat(messages=[USER, assistant]))
    assert info.value.status == 422


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ({"model": "tiny"}, "messages must be a non-empty list"),
        (chat(messages=[]), "messages must be a non-empty list"),
        (chat(messages="hi"), "messages must be a non-empty list"),
        (
            chat(messages=[{"role": "user", "content": 42}]),
            "message content must be a string or a list of parts",
        ),
        (chat(messages=[{"role": "function", "content": "x"}]), "messages.0.role"),
        (chat(n=2), "only n=1 is supported"),
        (chat(temperature=3.0), "temperature"),
        (chat(max_tokens=0), "max_tokens"),
        (chat(response_format={"type": "xml"}), "unsupported response_format type: xml"),
        (
            chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
            "response_format.json_schema.schema must be an object",
        ),
        (
            chat(response_format={"type": "json_schema"}),
            "response_format.json_schema.schema must be an object",
        ),
        (
            chat(response_format={"type": "json_object", "schema": SCHEMA}),
            r"response_format\.schema is not supported here",
        ),
        (
            chat(
                response_format={"type": "json_schema", "json_schema": {"schema": SCHEMA, "strict_mode": 1}}
            ),
            r"response_format\.json_schema\.strict_mode is not supported here",
        ),
        (chat(stream_options={"include_usage": True}), "stream_options applies to streamed answers only"),
        (
            chat(stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True}),
            r"stream_options\.continuous_usage_stats is not supported here",
        ),
        (chat(tools=[TOOL], tool_choice={"type": "allowed_tools"}), "unsupported tool_choice"),
        (
            chat(tools=[TOOL], tool_choice="get_time"),
            "tool_choice must be auto, required, none or a tool name",
        ),
        (chat(tools=[TOOL], response_format={"type": "json_object"}), "either 'tools' or 'constraints'"),
    ],
)
def test_chat_errors_are_422(body: dict[str, Any], match: str) -> None:
    with pytest.raises(ApiError, match=match) as info:
        chat_to_request(body)
    assert (info.value.status, info.value.code) == (422, "invalid_request")


# ----------------------------------------------------------------------------- response_format


@pytest.mark.parametrize(
    ("response_format", "expected"),
    [
        (None, None),
        ({"type": "text"}, None),
        ({"type": "json_object"}, {"json_object": True}),
        (
            {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}},
            {"json_schema": SCHEMA},
        ),
    ],
)
def test_response_format(response_format: dict[str, Any] | None, expected: dict[str, Any] | None) -> None:
    for convert, body in ((chat_to_request, chat()), (completion_to_request, {"prompt": "x"})):
        request = convert(body | {"response_format": response_format})
        got = request.constraints.model_dump(exclude_defaults=True) if request.constraints else None
        assert got == expected


# ----------------------------------------------------------------------------- tools


@pytest.mark.parametrize(
    ("tool_choice", "expected"),
    [
        (None, "auto"),
        ("auto", "auto"),
        ("required", "required"),
        ("none", "none"),
        ({"type": "function", "function": {"name": "get_time"}}, "get_time"),
    ],
)
def test_tool_choice(tool_choice: Any, expected: str) -> None:
    body = chat(tools=[TOOL, OTHER_TOOL])
    if tool_choice is not None:
        body["tool_choice"] = tool_choice
    request = chat_to_request(body)
    assert request.tool_choice == expected
    assert request.tools is not None
    assert [t.function.name for t in request.tools] == ["get_weather", "get_time"]
    assert request.tools[0].function.parameters == TOOL["function"]["parameters"]


@pytest.mark.parametrize(("parallel", "expected"), [(None, True), (True, True), (False, False)])
def test_parallel_tool_calls(parallel: bool | None, expected: bool) -> None:
    body = chat(tools=[TOOL])
    if parallel is not None:
        body["parallel_tool_calls"] = parallel
    assert chat_to_request(body).parallel_tool_calls is expected


def test_tool_with_strict_flag_is_accepted() -> None:
    strict_tool = {"type": "function", "function": TOOL["function"] | {"strict": True}}
    request = chat_to_request(chat(tools=[strict_tool]))
    assert request.tools is not None
    assert request.tools[0].function.name == "get_weather"


@pytest.mark.parametrize("tools", [None, []], ids=["absent", "empty"])
@pytest.mark.parametrize("tool_choice", ["auto", "none"])
def test_tool_choice_that_needs_no_tool_is_fine_without_tools(tools: Any, tool_choice: str) -> None:
    body = chat(tool_choice=tool_choice) | ({} if tools is None else {"tools": tools})
    request = chat_to_request(body)
    assert not request.tools
    assert request.tool_choice == "auto"  # nothing to choose from: plain text either way


NAMED = {"type": "function", "function": {"name": "nope"}}


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"tool_choice": "required"}, "tool_choice 'required' needs tools"),
        ({"tool_choice": "required", "tools": []}, "tool_choice 'required' needs tools"),
        ({"tool_choice": NAMED}, "tool_choice names 'nope'.*no tools"),
        ({"tool_choice": NAMED, "tools": []}, "tool_choice names 'nope'.*no tools"),
        ({"tool_choice": NAMED, "tools": [TOOL]}, "tool_choice names 'nope'.*get_weather"),
        ({"tool_choice": "get_time"}, "tool_choice names 'get_time'"),
        ({"tool_choice": {"type": "function"}, "tools": [TOOL]}, 'tool_choice: a "function" choice'),
        ({"tool_choice": {"type": "function", "function": "get_weather"}, "tools": [TOOL]}, "tool_choice"),
        ({"tool_choice": {"type": "function", "function": {"name": 3}}, "tools": [TOOL]}, "tool_choice"),
        ({"tool_choice": {"type": "function"}}, 'tool_choice: a "function" choice'),
        ({"tool_choice": ["auto"], "tools": [TOOL]}, "unsupported tool_choice"),
    ],
)
def test_tool_choice_the_service_cannot_honour_is_refused_by_name(fields: dict[str, Any], match: str) -> None:
    """Never dropped: a choice that needs a tool the request does not give is a 422 naming tool_choice."""
    with pytest.raises(ApiError, match=match) as info:
        chat_to_request(chat(**fields))
    assert (info.value.status, info.value.code) == (422, "invalid_request")
    assert "tool_choice" in info.value.message
    assert info.value.detail == {"field": "tool_choice"}


# ----------------------------------------------------------------------------- sampling fields


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, {"max_tokens": 256, "temperature": 0.7, "top_p": 1.0, "seed": None, "stop": None}),
        ({"max_tokens": 10}, {"max_tokens": 10}),
        ({"max_completion_tokens": 20}, {"max_tokens": 20}),
        ({"max_tokens": 20, "max_completion_tokens": 20}, {"max_tokens": 20}),
        ({"max_tokens": 10, "max_completion_tokens": None}, {"max_tokens": 10}),
        ({"temperature": 0.0, "top_p": 0.5, "seed": 7}, {"temperature": 0.0, "top_p": 0.5, "seed": 7}),
        ({"temperature": None}, {"temperature": 0.7}),
        ({"stop": "\n"}, {"stop": ["\n"]}),
        ({"stop": ["a", "b"]}, {"stop": ["a", "b"]}),
        ({"n": 1, "user": "u-1", "logprobs": None}, {"max_tokens": 256}),
        ({"n": None}, {"max_tokens": 256}),
    ],
)
def test_sampling_fields(fields: dict[str, Any], expected: dict[str, Any]) -> None:
    for convert, body in ((chat_to_request, chat()), (completion_to_request, {"prompt": "x"})):
        request = convert(body | fields)
        assert {k: getattr(request, k) for k in expected} == expected


def test_an_empty_stop_string_is_a_422_naming_stop() -> None:
    for convert, body in ((chat_to_request, chat()), (completion_to_request, {"prompt": "x"})):
        with pytest.raises(ApiError, match=r"^stop: ") as info:
            convert(body | {"stop": ["\n", ""], "stream": True})
        assert (info.value.status, info.value.code) == (422, "invalid_request")


def test_stream_flag_is_not_forwarded() -> None:
    assert chat_to_request(chat(stream=True)).stream is False


# ----------------------------------------------------------------------------- completions


@pytest.mark.parametrize("prompt", ["Once upon", ["a", "b"]])
def test_completion_prompt(prompt: str | list[str]) -> None:
    request = completion_to_request({"model": "tiny", "prompt": prompt})
    assert request.prompt == prompt
    assert request.messages is None


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ({"model": "tiny"}, "exactly one of 'prompt' or 'messages'"),
        ({"prompt": []}, "prompt list is empty"),
        ({"prompt": "x", "n": 3}, "only n=1 is supported"),
        ({"prompt": "x", "response_format": {"type": "yaml"}}, "unsupported response_format type"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
    ],
)
def test_completion_errors_are_422(body: dict[str, Any], match: str) -> None:
    with pytest.raises(ApiError, match=match) as info:
        completion_to_request(body)
    assert (info.value.status, info.value.code) == (422, "invalid_request")


# ----------------------------------------------------------------------------- refused, never dropped


@pytest.mark.parametrize("kind", ["image_url", "input_audio", "file"])
def test_content_parts_the_model_cannot_read_are_refused_by_name(kind: str) -> None:
    parts = [{"type": "text", "text": "a"}, {"type": kind, kind: {"url": "x"}}]
    with pytest.raises(ApiError) as info:
        chat_to_request(chat(messages=[USER, {"role": "user", "content": parts}]))
    assert (info.value.status, info.value.code) == (422, "unsupported_content")
    assert "messages.1.content.1" in info.value.message
    assert kind in info.value.message


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("best_of", 2),
        ("store", True),
        ("metadata", {"team": "a"}),
        ("service_tier", "flex"),
        ("frequency_penalty", 0.5),
        ("presence_penalty", -1),
        ("logit_bias", {"42": 5}),
    ],
)
def test_fields_that_would_change_the_output_are_refused_by_name(field: str, value: Any) -> None:
    for convert, body in ((chat_to_request, chat()), (completion_to_request, {"prompt": "x"})):
        with pytest.raises(ApiError) as info:
            convert(body | {field: value})
        assert (info.value.status, info.value.code) == (422, "unsupported_parameter")
        assert field in info.value.message
        convert(body | {field: None})  # the no-op value is fine


# ----------------------------------------------------------------------------- the field the user set


@pytest.mark.parametrize("value", [0, -3, 1 << 21])
def test_max_completion_tokens_is_validated_under_its_own_name(value: int) -> None:
    """0 is refused, not read as "absent"; an error names max_completion_tokens, not max_tokens."""
    for convert, body in ((chat_to_request, chat()), (completion_to_request, {"prompt": "x"})):
        for extra in ({}, {"max_tokens": 8}) if value <= 0 else ({},):  # a big one with 8 disagrees
            with pytest.raises(ApiError) as info:
                convert(body | extra | {"max_completion_tokens": value})
            assert (info.value.status, info.value.code) == (422, "invalid_request")
            assert info.value.message.startswith("max_completion_tokens: "), info.value.message


@pytest.mark.parametrize("value", [0, -1])
def test_max_tokens_is_validated_under_its_own_name(value: int) -> None:
    for convert, body in ((chat_to_request, chat()), (completion_to_request, {"prompt": "x"})):
        with pytest.raises(ApiError) as info:
            convert(body | {"max_tokens": value, "max_completion_tokens": 8})
        assert info.value.message.startswith("max_tokens: "), info.value.message


def test_max_tokens_and_max_completion_tokens_that_disagree_are_refused() -> None:
    for convert, body in ((chat_to_request, chat()), (completion_to_request, {"prompt": "x"})):
        disagree = r"max_completion_tokens \(20\) and max_tokens \(10\) disagree"
        with pytest.raises(ApiError, match=disagree) as info:
            convert(body | {"max_tokens": 10, "max_completion_tokens": 20})
        assert info.value.status == 422
        assert info.value.detail == {"fields": ["max_completion_tokens", "max_tokens"]}


@pytest.mark.parametrize("top", [21, 25, -1])
def test_top_logprobs_is_validated_under_its_own_name(top: int) -> None:
    with pytest.raises(ApiError) as info:
        chat_to_request(chat(logprobs=True, top_logprobs=top))
    assert (info.value.status, info.value.code) == (422, "invalid_request")
    assert info.value.message.startswith("top_logprobs: "), info.value.message


@pytest.mark.parametrize("logprobs", [None, False])
def test_top_logprobs_without_logprobs_is_refused(logprobs: bool | None) -> None:
    body = chat(top_logprobs=3) | ({} if logprobs is None else {"logprobs": logprobs})
    with pytest.raises(ApiError, match="top_logprobs needs logprobs: true") as info:
        chat_to_request(body)
    assert info.value.detail == {"fields": ["top_logprobs", "logprobs"]}
    assert chat_to_request(chat(top_logprobs=0)).logprobs is None  # 0 alternatives asks for nothing


def test_logprobs_are_honoured_on_both_apis() -> None:
    assert chat_to_request(chat(logprobs=True, top_logprobs=3)).logprobs == 3
    assert chat_to_request(chat(logprobs=True)).logprobs == 0
    assert chat_to_request(chat(logprobs=False)).logprobs is None
    assert completion_to_request({"prompt": "x", "logprobs": 2}).logprobs == 2
    with pytest.raises(ApiError, match="top_logprobs needs logprobs"):
        chat_to_request(chat(top_logprobs=3))


# ----------------------------------------------------------------------------- over HTTP (no engine)


@pytest.fixture
def client() -> Any:
    """The real app and routes with a cap of 64 tokens; every request below is refused before planning."""
    engine = Engine(EngineConfig(model="/nowhere/tiny"))
    app = create_app(engine, api_key="k", limits=Limits(max_tokens=64), start_engine=False)
    engine.state = "ok"
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        (
            "/v1/chat/completions",
            chat(max_completion_tokens=100_000),
            "max_completion_tokens 100000 exceeds the cap 64",
        ),
        ("/v1/chat/completions", chat(max_tokens=100_000), "max_tokens 100000 exceeds the cap 64"),
        (
            "/v1/completions",
            {"prompt": "x", "max_completion_tokens": 65},
            "max_completion_tokens 65 exceeds the cap 64",
        ),
        (
            "/v1/chat/completions",
            chat(max_completion_tokens=0, max_tokens=8),
            "max_completion_tokens: Input should",
        ),
        ("/v1/chat/completions", chat(max_completion_tokens=0), "max_completion_tokens: Input should"),
        ("/v1/chat/completions", chat(logprobs=True, top_logprobs=25), "top_logprobs: Input should"),
        ("/v1/chat/completions", chat(tool_choice="required"), "tool_choice 'required' needs tools"),
        (
            "/v1/chat/completions",
            chat(tools=[], tool_choice="required"),
            "tool_choice 'required' needs tools",
        ),
        ("/v1/chat/completions", chat(tool_choice=NAMED), "tool_choice names 'nope'"),
        (
            "/v1/chat/completions",
            chat(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice={"type": "function"}),
            "tool_choice: ",
        ),
    ],
)
def test_refusals_over_http_name_the_field(
    client: TestClient, path: str, body: dict[str, Any], message: str
) -> None:
    r = client.post(path, json=body, headers={"Authorization": "Bearer k"})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_request"
    assert error["message"].startswith(message), error["message"]


@pytest.mark.parametrize("field", ["max_completion_tokens", "max_tokens"])
def test_the_cap_refusal_names_the_field_set(client: TestClient, field: str) -> None:
    r = client.post(
        "/v1/chat/completions", json=chat(**{field: 100_000}), headers={"Authorization": "Bearer k"}
    )
    assert r.status_code == 422, r.text
    assert r.json()["error"]["detail"] == {"field": field}
