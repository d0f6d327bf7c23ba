"""``ChatAnanke.bind_tools`` and message conversion -> the protocol request, offline.

Each case binds tools the way ``ChatOpenAI`` code does, then builds the request the bound call would
send (the one request builder, no service needed).
"""

from __future__ import annotations

from typing import Any

import pytest
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.runnables import RunnableBinding
from langchain_core.tools import tool
from pydantic import BaseModel

from langchain_ananke import ChatAnanke
from langchain_ananke.llms.chat import to_wire_message
from langchain_ananke.protocol import GenerateRequest


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
