"""A LangChain 1.x agent (``create_agent``) whose tool calls are guaranteed to parse and validate.

``create_agent`` loops model -> tools -> model. With ``ChatAnanke`` every tool call is generated under
a grammar built from the tools' JSON Schemas, so each call names a real tool and its arguments
validate: no JSON repair, no "invalid tool call" retries.

The model here (SmolLM2-135M on CPU) is tiny, so its *choice* of tool and numbers is often wrong;
what is guaranteed is the *shape* of every call, and this script checks exactly that. To make the
run finish in a fixed number of steps, a middleware sets each model call: ``tool_choice="any"``
(must call a tool) for two rounds, then no tools and a regex constraint so the final answer is one
short sentence. ``recursion_limit`` bounds the graph as a second safety net.

Runs against ``ANANKE_BASE_URL`` (default http://127.0.0.1:8000); with no service there, it starts
``ananke serve`` for the run. The last line is ``RESULT: {json}`` for machines.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from langchain.agents import create_agent
from langchain.agents.middleware import AgentMiddleware, ModelRequest, ModelResponse
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import tool
from pydantic import BaseModel, Field

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _local import service

from langchain_ananke import ChatAnanke

ANSWER = r"The answer is -?[0-9]{1,13}\."


class Operands(BaseModel):
    """Two integers. Bounds keep generated numbers short (an unbounded integer can run on)."""

    a: int = Field(ge=-1_000_000, le=1_000_000)
    b: int = Field(ge=-1_000_000, le=1_000_000)


@tool(args_schema=Operands)
def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


@tool(args_schema=Operands)
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


TOOLS = [multiply, add]
TOOL_ROUNDS = 2


class ToolRoundsThenAnswer(AgentMiddleware):
    """One forced tool call per round for ``TOOL_ROUNDS`` rounds, then a one-sentence answer."""

    def _step(self, request: ModelRequest) -> ModelRequest:
        settings = request.model_settings
        if sum(isinstance(m, ToolMessage) for m in request.messages) < TOOL_ROUNDS:
            return request.override(
                tool_choice="any", model_settings={**settings, "parallel_tool_calls": False}
            )
        # No tools: the model's settings become ``llm.bind(constraints=...)``, the final answer.
        return request.override(tools=[], model_settings={**settings, "constraints": {"regex": ANSWER}})

    def wrap_model_call(
        self, request: ModelRequest, handler: Callable[[ModelRequest], ModelResponse]
    ) -> ModelResponse:
        return handler(self._step(request))

    async def awrap_model_call(
        self, request: ModelRequest, handler: Callable[[ModelRequest], Awaitable[ModelResponse]]
    ) -> ModelResponse:
        return await handler(self._step(request))


def build_agent() -> Any:
    llm = ChatAnanke(temperature=0, max_tokens=64)
    return create_agent(llm, TOOLS, middleware=[ToolRoundsThenAnswer()])


def main() -> None:
    with service():
        agent = build_agent()
        state = agent.invoke(
            {"messages": [("user", "Multiply 6 by 7, then add 5 to the product.")]},
            {"recursion_limit": 2 * TOOL_ROUNDS + 2},
        )
        messages = state["messages"]
        results = {m.tool_call_id: m.content for m in messages if isinstance(m, ToolMessage)}
        calls = []
        for message in messages:
            if not isinstance(message, AIMessage):
                continue
            if message.invalid_tool_calls:  # never happens: calls are grammar-constrained
                raise SystemExit(f"unparseable tool call: {message.invalid_tool_calls}")
            for call in message.tool_calls:
                Operands.model_validate(call["args"])  # the arguments validate against the schema
                calls.append({"name": call["name"], "args": call["args"], "result": results[call["id"]]})
                print(f"tool call: {call['name']}({call['args']}) -> {results[call['id']]}")
        answer = str(messages[-1].content)
        print(f"final answer: {answer}")
        print("RESULT: " + json.dumps({"tool_calls": calls, "answer": answer}))


if __name__ == "__main__":
    main()
