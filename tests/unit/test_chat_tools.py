"""``ChatAnanke.bind_tools`` and message conversion -> the protocol request, offline.

Each case binds tools the way ``ChatOpenAI`` code does, then builds the request the bound call would
send (the one request builder, no service needed).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.runnables import RunnableBinding
from langchain_core.tools import tool
from pydantic import BaseModel

from langchain_ananke import ChatAnanke
from langchain_ananke._http import _Base
from langchain_ananke.llms.chat import to_wire_message
from langchain_ananke.parsers.constraints import close_objects
from langchain_ananke.protocol import Constraints, GenerateRequest


class Operands(BaseModel):
    """Two integers."""

    a: int
    b: int


@tool(args_schema=Operands)
def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


LLM = ChatAnanke(base_url="http://ananke.invalid", temperature=0, max_tokens=32)


def bound_request(**bind: Any) -> GenerateRequest:
    """The request ``LLM.bind_tools([multiply], **bind).invoke("6 times 7?")`` would send."""
    binding = LLM.bind_tools([multiply], **bind)
    assert isinstance(binding, RunnableBinding)
    request, _ = LLM._chat_request([HumanMessage("6 times 7?")], None, False, **binding.kwargs)
    return request


@pytest.mark.parametrize("strict", [True, False, None])
def test_bind_tools_accepts_openais_strict(strict: bool | None) -> None:
    # ChatOpenAI.bind_tools(tools, strict=True) is common; it used to fail at invoke time with
    # "unexpected keyword arguments: strict". Calls are always schema-exact, so the request is the same.
    request = bound_request(tool_choice="any", strict=strict)
    assert request.tools is not None
    assert [t.function.name for t in request.tools] == ["multiply"]
    assert request.tools[0].function.strict is None
    assert request.tools[0].function.parameters["required"] == ["a", "b"]
    assert request.tool_choice == "required"
    assert request == bound_request(tool_choice="any")


@pytest.mark.parametrize(
    ("bind", "tool_choice", "parallel"),
    [
        ({}, "auto", True),
        ({"tool_choice": "auto"}, "auto", True),
        ({"tool_choice": "any"}, "required", True),
        ({"tool_choice": "required"}, "required", True),
        ({"tool_choice": True}, "required", True),
        ({"tool_choice": "none"}, "none", True),
        ({"tool_choice": "multiply"}, "multiply", True),
        ({"tool_choice": {"type": "function", "function": {"name": "multiply"}}}, "multiply", True),
        ({"tool_choice": "any", "parallel_tool_calls": False}, "required", False),
    ],
)
def test_bind_tools_choice(bind: dict[str, Any], tool_choice: str, parallel: bool) -> None:
    request = bound_request(**bind)
    assert request.tool_choice == tool_choice
    assert request.parallel_tool_calls is parallel


@pytest.mark.parametrize("tool_choice", ["divide", {"type": "function", "function": {"name": "divide"}}])
def test_bind_tools_rejects_unknown_tool_choice(tool_choice: Any) -> None:
    with pytest.raises(ValueError, match="divide"):
        LLM.bind_tools([multiply], tool_choice=tool_choice)


CALL = {"name": "multiply", "args": {"a": 6, "b": 7}, "id": "call_1", "type": "tool_call"}


@pytest.mark.parametrize(
    ("message", "wire"),
    [
        (HumanMessage("6 times 7?"), {"role": "user", "content": "6 times 7?"}),
        (
            AIMessage("", tool_calls=[CALL]),
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"id": "call_1", "name": "multiply", "arguments": {"a": 6, "b": 7}}],
            },
        ),
        (
            ToolMessage("42", tool_call_id="call_1"),
            {"role": "tool", "content": "42", "tool_call_id": "call_1"},
        ),
        (
            ToolMessage([{"type": "text", "text": "4"}, "2"], tool_call_id="call_1"),
            {"role": "tool", "content": "42", "tool_call_id": "call_1"},
        ),
    ],
)
def test_agent_messages_to_wire(message: BaseMessage, wire: dict[str, Any]) -> None:
    assert to_wire_message(message) == wire


# ----------------------------------------------------------------------------- agent keywords


class Answer(BaseModel):
    """The agent's final answer."""

    product: int
    note: str


ANSWER_SCHEMA = Answer.model_json_schema()
CLOSED_ANSWER = close_objects(ANSWER_SCHEMA)
OPENAI_FORMAT = {"type": "json_schema", "json_schema": {"name": "Answer", "schema": ANSWER_SCHEMA}}


def bound_chat_request(tools: list[Any], **bind: Any) -> GenerateRequest:
    """The request ``LLM.bind_tools(tools, **bind).invoke("6 times 7?")`` would send."""
    binding = LLM.bind_tools(tools, **bind)
    assert isinstance(binding, RunnableBinding)
    request, _ = LLM._chat_request([HumanMessage("6 times 7?")], None, False, **binding.kwargs)
    return request


@pytest.mark.parametrize(
    ("response_format", "strict", "expected"),
    [
        (OPENAI_FORMAT, None, CLOSED_ANSWER),
        (
            {**OPENAI_FORMAT, "json_schema": {**OPENAI_FORMAT["json_schema"], "strict": True}},
            None,
            CLOSED_ANSWER,
        ),
        (
            {**OPENAI_FORMAT, "json_schema": {**OPENAI_FORMAT["json_schema"], "strict": False}},
            None,
            ANSWER_SCHEMA,
        ),
        (OPENAI_FORMAT, False, ANSWER_SCHEMA),
        (Answer, None, CLOSED_ANSWER),
        (Answer, False, ANSWER_SCHEMA),
        (ANSWER_SCHEMA, None, CLOSED_ANSWER),
    ],
    ids=[
        "openai",
        "openai-strict",
        "openai-not-strict",
        "strict-false",
        "pydantic",
        "pydantic-open",
        "schema",
    ],
)
def test_bind_tools_response_format_is_the_answer_schema(
    response_format: Any, strict: bool | None, expected: dict[str, Any]
) -> None:
    request = bound_chat_request([multiply], response_format=response_format, strict=strict)
    assert request.tools is not None
    assert [t.function.name for t in request.tools] == ["multiply"]
    assert request.tool_choice == "auto"
    assert request.constraints == Constraints(json_schema=expected)


def test_tools_and_response_format_go_out_in_one_request_body() -> None:
    request = bound_chat_request(
        [multiply], response_format=OPENAI_FORMAT, tool_choice="none", parallel_tool_calls=False
    )
    body = _Base._body(request, False)
    assert body["constraints"] == {
        "json_schema": CLOSED_ANSWER,
        "whitespace": "compact",
        "strict": False,
        "max_attempts": 3,
        "length_caps": True,
        "close_on_budget": True,
        "loop_guard": True,
    }
    assert [t["function"]["name"] for t in body["tools"]] == ["multiply"]
    assert body["tools"][0]["function"]["parameters"]["required"] == ["a", "b"]
    assert (body["tool_choice"], body["parallel_tool_calls"]) == ("none", False)
    assert body["messages"] == [{"role": "user", "content": "6 times 7?"}]
    assert json.loads(json.dumps(body)) == body  # what the client serialises, unchanged


def test_provider_strategys_own_model_kwargs_bind() -> None:
    from langchain.agents.structured_output import ProviderStrategy

    kwargs = ProviderStrategy(Answer).to_model_kwargs()
    assert kwargs["response_format"]["type"] == "json_schema"
    request = bound_chat_request([multiply], **kwargs)
    assert request.constraints == Constraints(json_schema=CLOSED_ANSWER)
    assert request.tools is not None


def test_response_format_at_invoke_time_is_the_same_constraint() -> None:
    request, _ = LLM._chat_request([HumanMessage("x")], None, False, response_format=OPENAI_FORMAT)
    assert request.constraints == Constraints(json_schema=CLOSED_ANSWER)
    assert request.tools is None
    text, _ = LLM._chat_request([HumanMessage("x")], None, False, response_format={"type": "text"})
    assert text.constraints is None


@pytest.mark.parametrize(
    "bind",
    [
        {},
        {"tool_choice": "auto"},
        {"tool_choice": "none"},
        {"response_format": OPENAI_FORMAT},
        {"response_format": OPENAI_FORMAT, "strict": True, "parallel_tool_calls": False},
    ],
)
def test_bind_tools_takes_an_empty_tool_list(bind: dict[str, Any]) -> None:
    request = bound_chat_request([], **bind)
    assert request.tools is None
    assert request.tool_choice == "auto"
    expected = Constraints(json_schema=CLOSED_ANSWER) if "response_format" in bind else None
    assert request.constraints == expected


@pytest.mark.parametrize("tool_choice", ["any", "required", True])
def test_an_empty_tool_list_cannot_require_a_call(tool_choice: Any) -> None:
    with pytest.raises(ValueError, match="needs at least one tool"):
        LLM.bind_tools([], tool_choice=tool_choice)


def test_bind_tools_accepts_the_tracing_keyword() -> None:
    fmt = {"kwargs": {"method": "json_schema", "strict": None}, "schema": ANSWER_SCHEMA}
    request = bound_chat_request([multiply], tool_choice="any", ls_structured_output_format=fmt)
    assert request == bound_chat_request([multiply], tool_choice="any")


@pytest.mark.parametrize(
    ("bind", "error", "match"),
    [
        ({"reponse_format": OPENAI_FORMAT}, TypeError, "unexpected keyword arguments: reponse_format"),
        ({"n": 2, "logprobs": True}, TypeError, "unexpected keyword arguments: logprobs, n"),
        (
            {"response_format": OPENAI_FORMAT, "constraints": {"regex": "a"}},
            ValueError,
            "either constraints or response_format",
        ),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, ValueError, "schema"),
        (
            {
                "response_format": {
                    **OPENAI_FORMAT,
                    "json_schema": {"schema": ANSWER_SCHEMA, "strict": True},
                },
                "strict": False,
            },
            ValueError,
            "contradicts",
        ),
        ({"response_format": 42}, TypeError, "unsupported schema"),
    ],
    ids=["typo", "openai-only", "both", "no-schema", "two-stricts", "not-a-schema"],
)
def test_bind_tools_refuses_what_no_request_field_takes(
    bind: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        LLM.bind_tools([multiply], **bind)


def test_tools_with_a_non_json_answer_constraint_are_refused() -> None:
    binding = LLM.bind_tools([multiply], constraints={"regex": "[0-9]+"})
    assert isinstance(binding, RunnableBinding)
    with pytest.raises(ValueError, match="either 'tools' or 'constraints'"):
        LLM._chat_request([HumanMessage("x")], None, False, **binding.kwargs)
