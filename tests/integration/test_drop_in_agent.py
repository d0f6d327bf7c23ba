"""Drop-in swap: one tool-calling agent and one extraction chain, run with ``ChatOpenAI`` and ``ChatAnanke``.

Issue 4's acceptance: replacing ``ChatOpenAI(...)`` with ``ChatAnanke(...)`` needs no other code
change. The app code below (``build_agent``, ``extraction_chain``) takes a chat model and is the same
for both; the only difference is the constructor. ``ChatOpenAI`` talks to the service's
OpenAI-compatible ``/v1`` routes, ``ChatAnanke`` to ``/generate_api``; both run against the session's
real local service (SmolLM2-135M on CPU). The agent is LangChain 1.x's ``create_agent``.

What is asserted is structure, never the small model's arithmetic or knowledge: the tool is called
with arguments valid for its schema, its result goes back to the model as a ``ToolMessage`` (the
server counts its tokens), the agent ends with a plain answer, and the chain returns a validated
object. The agent runs twice per model: ``invoke``, and ``astream`` token by token.
``tests/integration/test_examples.py::test_drop_in_swap`` runs an extraction swap too, through
``examples/drop_in_swap.py`` with an explicit ``method``; here it is the bare default.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from langchain.agents import create_agent
from langchain.agents.middleware import ModelRequest
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage, ToolMessage
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from langchain_ananke import ChatAnanke
from tests.integration.agent_parts import OPS, Calculation, PerTurn, calculator, tool_rounds

pytestmark = pytest.mark.integration

#: Greedy and short: the small model is slow on CPU, and a tool call here is ~35 tokens.
PARAMS: dict[str, Any] = {"temperature": 0, "max_tokens": 48}


class Person(BaseModel):
    """A person mentioned in the text."""

    name: str = Field(max_length=20, description="The person's name")
    age: int = Field(ge=0, le=150, description="Age in years")


# --- the app: written once, handed either chat model ---------------------------------------------


class CalculatorOnce(PerTurn):
    """The first model call must call a tool (``tool_choice="any"``): a 135M model rarely chooses a
    tool on its own, and forcing it keeps the run at two model calls. Once the tool has answered, the
    model gets no tools, so its reply ends the loop."""

    def step(self, request: ModelRequest) -> ModelRequest:
        if tool_rounds(request.messages):
            return request.override(tools=[])
        return request.override(
            tool_choice="any", model_settings={**request.model_settings, "parallel_tool_calls": False}
        )


def build_agent(llm: BaseChatModel) -> Any:
    """A LangChain agent that must use the calculator once, then answers in words."""
    return create_agent(llm, [calculator], middleware=[CalculatorOnce()])


def extraction_chain(llm: BaseChatModel) -> Runnable[dict[str, str], Any]:
    """The typical extraction chain: ``prompt | model.with_structured_output(Model)``, defaults only."""
    prompt = ChatPromptTemplate.from_messages(
        [("system", "Extract the person from the text."), ("human", "{text}")]
    )
    return prompt | llm.with_structured_output(Person)


# --- the two constructors ---------------------------------------------------------------------------


def chat_openai(base_url: str, model: str) -> BaseChatModel:
    # The OpenAI client needs some key; the service ignores it unless it was started with one.
    # stream_usage: ChatOpenAI asks other base URLs for streamed usage only when told to.
    api_key = os.environ.get("ANANKE_API_KEY") or "unused"
    return ChatOpenAI(base_url=f"{base_url}/v1", api_key=api_key, model=model, stream_usage=True, **PARAMS)


def chat_ananke(base_url: str, model: str) -> BaseChatModel:
    return ChatAnanke(base_url=base_url, model=model, **PARAMS)


@pytest.fixture(scope="module")
def served_model(base_url: str) -> str:
    name = httpx.get(f"{base_url}/health", timeout=30).json()["model"]
    assert isinstance(name, str)
    assert name
    return name


@pytest.fixture(params=[chat_openai, chat_ananke], ids=["ChatOpenAI", "ChatAnanke"])
def llm(request: pytest.FixtureRequest, base_url: str, served_model: str) -> BaseChatModel:
    make: Callable[[str, str], BaseChatModel] = request.param
    return make(base_url, served_model)


# --- tests ------------------------------------------------------------------------------------------

QUESTION = {"messages": [HumanMessage("What is 6 times 7? Use the calculator.")]}
#: Two model calls and one tool call are 4 steps; this leaves room for one more round, no more.
CONFIG: RunnableConfig = {"recursion_limit": 6}


def check_run(messages: list[BaseMessage], served_model: str) -> list[BaseMessage]:
    """Assert one tool round and a plain final answer; returns the final call's prompt, tool content
    blanked (to measure that the tool turn reached the model)."""
    kinds = [type(m).__name__ for m in messages]
    assert kinds == ["HumanMessage", "AIMessage", "ToolMessage", "AIMessage"], kinds
    _, call_message, tool_message, final = messages
    assert isinstance(call_message, AIMessage)
    assert isinstance(tool_message, ToolMessage)
    assert isinstance(final, AIMessage)

    # Both constructors reached the service (not some other OpenAI endpoint).
    for message in (call_message, final):
        assert message.response_metadata["model_name"] == served_model

    # The tool was called once, with arguments valid for its schema.
    assert call_message.invalid_tool_calls == []
    assert len(call_message.tool_calls) == 1, call_message.tool_calls
    call = call_message.tool_calls[0]
    assert call["name"] == "calculator"
    args = Calculation.model_validate(call["args"])
    assert call_message.response_metadata["finish_reason"] == "tool_calls"

    # The tool ran and its result answered that call.
    assert tool_message.tool_call_id == call["id"]
    assert tool_message.status == "success"
    assert tool_message.content == str(OPS[args.op](args.a, args.b))

    # The agent finished: a plain answer, no further calls.
    assert final.tool_calls == []
    assert final.invalid_tool_calls == []
    assert isinstance(final.content, str)
    assert final.content.strip()
    assert final.response_metadata["finish_reason"] in {"stop", "length"}
    return [*messages[:2], tool_message.model_copy(update={"content": ""})]


def check_tool_turn_reached_the_model(final: BaseMessage, probe: BaseMessage) -> None:
    """The final prompt is longer than the same conversation with the tool's content blanked, so the
    service rendered the tool turn and its content into the prompt."""
    assert isinstance(final, AIMessage)
    assert isinstance(probe, AIMessage)
    assert final.usage_metadata is not None
    assert probe.usage_metadata is not None
    assert final.usage_metadata["input_tokens"] > probe.usage_metadata["input_tokens"]


def test_agent_swap(llm: BaseChatModel, served_model: str) -> None:
    messages = build_agent(llm).invoke(QUESTION, CONFIG)["messages"]
    blanked = check_run(messages, served_model)
    check_tool_turn_reached_the_model(messages[-1], llm.bind(max_tokens=1).invoke(blanked))


async def test_agent_swap_streamed(llm: BaseChatModel, served_model: str) -> None:
    """The same agent, async and streamed token by token (LangGraph's ``messages`` mode)."""
    state: dict[str, Any] = {}
    chunks: dict[str, list[AIMessageChunk]] = {}
    async for mode, data in build_agent(llm).astream(QUESTION, CONFIG, stream_mode=["messages", "values"]):
        if mode == "values":
            state = data
        elif isinstance(data[0], AIMessageChunk):
            chunks.setdefault(data[1]["langgraph_checkpoint_ns"], []).append(data[0])
    messages = state["messages"]
    blanked = check_run(messages, served_model)
    check_tool_turn_reached_the_model(messages[-1], await llm.bind(max_tokens=1).ainvoke(blanked))

    # Each model call streamed, and its chunks add up to the message in the final state.
    assert len(chunks) == 2, list(chunks)
    call_chunks, answer_chunks = (sum(c[1:], c[0]) for c in chunks.values())
    assert [c["args"] for c in call_chunks.tool_calls] == [messages[1].tool_calls[0]["args"]]
    assert answer_chunks.content == messages[-1].content


def test_extraction_swap(llm: BaseChatModel) -> None:
    # Output that failed the schema would raise here (ChatOpenAI's parser, or ChatAnanke's
    # unsatisfied-constraint error); a validated instance is what both must return.
    person = extraction_chain(llm).invoke({"text": "Alice is 31 years old."})
    assert isinstance(person, Person), person
