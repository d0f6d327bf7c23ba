"""Parts the agent tests share: the calculator tool and a middleware base that sets each model turn.

``test_drop_in_agent.py`` and ``test_agents.py`` build LangChain 1.x agents (``create_agent``) around
the same tool. A 135M model rarely decides on its own when to call a tool or stop, so each test's
middleware decides every turn from the conversation so far (:meth:`PerTurn.step`).
"""

from __future__ import annotations

import operator
from collections.abc import Awaitable, Callable
from typing import Literal

from langchain.agents.middleware import AgentMiddleware, ModelRequest, ModelResponse
from langchain_core.messages import BaseMessage, ToolMessage
from langchain_core.tools import tool
from pydantic import BaseModel, ConfigDict, Field

OPS: dict[str, Callable[[int, int], int]] = {"+": operator.add, "-": operator.sub, "*": operator.mul}


class Calculation(BaseModel):
    """Two integers and an operator. Bounds keep generated numbers short."""

    model_config = ConfigDict(extra="forbid")

    a: int = Field(ge=-1000, le=1000, description="Left operand")
    op: Literal["+", "-", "*"] = Field(description="Operator")
    b: int = Field(ge=-1000, le=1000, description="Right operand")


@tool(args_schema=Calculation)
def calculator(a: int, op: str, b: int) -> int:
    """Compute `a op b` for two integers."""
    return OPS[op](a, b)


def tool_rounds(messages: list[BaseMessage]) -> int:
    """How many tool results the conversation holds (one per round: calls are not parallel)."""
    return sum(isinstance(m, ToolMessage) for m in messages)


class PerTurn(AgentMiddleware):
    """Rewrites each model request with :meth:`step`, on the sync and the async path alike."""

    def step(self, request: ModelRequest) -> ModelRequest:
        """The request this turn sends."""
        raise NotImplementedError

    def wrap_model_call(
        self, request: ModelRequest, handler: Callable[[ModelRequest], ModelResponse]
    ) -> ModelResponse:
        return handler(self.step(request))

    async def awrap_model_call(
        self, request: ModelRequest, handler: Callable[[ModelRequest], Awaitable[ModelResponse]]
    ) -> ModelResponse:
        return await handler(self.step(request))
