"""A LangChain 1.x agent that calls a tool, then answers with a validated Pydantic object.

``create_agent(llm, tools, response_format=ProviderStrategy(Report))``: each model turn sends the
tools *and* the answer's JSON Schema, and the service generates the turn under one grammar: either
well-formed tool calls (real names, arguments valid for the tool) or a final answer valid for
``Report``, returned as JSON text that LangChain parses into ``state["structured_response"]``. With
``response_format=Report`` alone, LangChain picks ``ProviderStrategy`` too: ``ChatAnanke``'s model
profile declares native structured output.

The model here (SmolLM2-135M on CPU) is tiny and rarely decides on its own when to stop calling
tools, so a middleware picks the branch for each turn: the first must call a tool
(``tool_choice="required"``), the one after the tool's answer must give the final answer
(``tool_choice="none"``). Under ``ProviderStrategy`` LangChain passes the model settings, not
``request.tool_choice``, to ``bind_tools``, so the middleware sets ``tool_choice`` there.

Runs against ``ANANKE_BASE_URL`` (default http://127.0.0.1:8000); with no service there, it starts
``ananke serve`` for the run. The last line is ``RESULT: {json}`` for machines.
"""

from __future__ import annotations

import json
import operator
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

from langchain.agents import create_agent
from langchain.agents.middleware import AgentMiddleware, ModelRequest, ModelResponse
from langchain.agents.structured_output import ProviderStrategy
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import tool
from pydantic import BaseModel, Field

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _local import service

from langchain_ananke import ChatAnanke

OPS: dict[str, Callable[[int, int], int]] = {"+": operator.add, "-": operator.sub, "*": operator.mul}


class Calculation(BaseModel):
    """Two integers and an operator. Bounds keep generated numbers short."""

    a: int = Field(ge=-1000, le=1000, description="Left operand")
    op: Literal["+", "-", "*"] = Field(description="Operator")
    b: int = Field(ge=-1000, le=1000, description="Right operand")


@tool(args_schema=Calculation)
def calculator(a: int, op: str, b: int) -> int:
    """Compute `a op b` for two integers."""
    return OPS[op](a, b)


class Report(BaseModel):
    """The agent's final answer."""

    result: int = Field(ge=-1_000_000, le=1_000_000, description="The number the calculator returned")
    summary: str = Field(max_length=60, description="One short sentence")


class CallThenAnswer(AgentMiddleware):
    """The first turn must call a tool; once a tool has answered, the turn must be the answer."""

    def _step(self, request: ModelRequest) -> ModelRequest:
        answered = any(isinstance(m, ToolMessage) for m in request.messages)
        settings = (
            {"tool_choice": "none"} if answered else {"tool_choice": "required", "parallel_tool_calls": False}
        )
        return request.override(model_settings={**request.model_settings, **settings})

    def wrap_model_call(
        self, request: ModelRequest, handler: Callable[[ModelRequest], ModelResponse]
    ) -> ModelResponse:
        return handler(self._step(request))

    async def awrap_model_call(
        self, request: ModelRequest, handler: Callable[[ModelRequest], Awaitable[ModelResponse]]
    ) -> ModelResponse:
        return await handler(self._step(request))


QUESTION = "What is 6 times 7? Use the calculator, then report the result."
#: Two model calls and one tool call; room for one more round, no more.
RECURSION_LIMIT = 6


def build_agent() -> Any:
    llm = ChatAnanke(temperature=0, max_tokens=96)
    return create_agent(
        llm, [calculator], response_format=ProviderStrategy(Report), middleware=[CallThenAnswer()]
    )


def main() -> None:
    with service():
        state = build_agent().invoke({"messages": [("user", QUESTION)]}, {"recursion_limit": RECURSION_LIMIT})
        messages = state["messages"]
        results = {m.tool_call_id: m.content for m in messages if isinstance(m, ToolMessage)}
        calls = []
        for message in messages:
            if isinstance(message, AIMessage):
                for call in message.tool_calls:
                    Calculation.model_validate(call["args"])  # the arguments validate
                    calls.append({"name": call["name"], "args": call["args"], "result": results[call["id"]]})
                    print(f"tool call: {call['name']}({call['args']}) -> {results[call['id']]}")
        report = state["structured_response"]
        if not isinstance(report, Report):
            raise SystemExit(f"expected a Report, got {report!r}")
        print(f"structured response: {report!r}")
        final = messages[-1]
        print(
            "RESULT: "
            + json.dumps(
                {
                    "tool_calls": calls,
                    "structured_response": report.model_dump(),
                    "final_content": final.content,
                    "branch": final.response_metadata.get("metadata", {}).get("branch"),
                }
            )
        )


if __name__ == "__main__":
    main()
