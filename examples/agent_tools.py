"""A LangGraph ReAct agent whose tool calls are guaranteed to parse and validate.

``create_react_agent`` loops model -> tools -> model. With ``ChatAnanke.bind_tools`` every tool call
is generated under a grammar built from the tools' JSON Schemas, so each call names a real tool and
its arguments validate: no JSON repair, no "invalid tool call" retries.

The model here (SmolLM2-135M on CPU) is tiny, so its *choice* of tool and numbers is often wrong;
what is guaranteed is the *shape* of every call, and this script checks exactly that. To make the
run finish in a fixed number of steps, the model is picked per step (a LangGraph "dynamic model"):
``tool_choice="any"`` (must call a tool) for two rounds, then no tools and a regex constraint so the
final answer is one short sentence. ``recursion_limit`` bounds the graph as a second safety net.

Runs against ``ANANKE_BASE_URL`` (default http://127.0.0.1:8000); with no service there, it starts
``ananke serve`` for the run. The last line is ``RESULT: {json}`` for machines.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import tool
from langgraph.prebuilt import create_react_agent
from pydantic import BaseModel, Field

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _local import service

from langchain_ananke import ChatAnanke

# LangGraph 1.x points at langchain.agents.create_agent; the prebuilt agent still works the same.
warnings.filterwarnings("ignore", message=".*create_react_agent.*")

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


def build_agent() -> Any:
    llm = ChatAnanke(temperature=0, max_tokens=64)

    def pick_model(state: dict[str, Any], runtime: Any) -> Any:
        rounds = sum(isinstance(m, ToolMessage) for m in state["messages"])
        if rounds < TOOL_ROUNDS:
            return llm.bind_tools(TOOLS, tool_choice="any", parallel_tool_calls=False)
        return llm.bind(constraints={"regex": ANSWER})  # no tools: the final answer

    return create_react_agent(pick_model, TOOLS)


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
