"""LangChain 1.x agents (``create_agent``) against the real local service (SmolLM2-135M on CPU).

Covers the three ways to ask an agent for a structured answer: ``ToolStrategy`` (the answer is a
forced call of a tool named after the schema), ``ProviderStrategy`` (each turn sends the tools and the
answer schema, and the service compiles one grammar: tool calls *or* an answer valid for the schema)
and the default (``response_format=Report``), for which LangChain must pick ``ProviderStrategy``
because ``ChatAnanke``'s model profile declares native structured output. Each runs sync and async,
and streamed. The same agent code runs with ``ChatOpenAI`` against the service's ``/v1`` routes.

A middleware picks each turn's branch so a 135M model finishes in a fixed number of steps: the first
turn must call the calculator, the one after its answer must give the final answer. What is asserted
is structure, never the small model's arithmetic: which strategy the model was bound with (recorded
from LangChain's own invocation params), the branch the service says it took, calls valid for their
schema, and a validated ``Report``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Literal

import httpx
import pytest
from langchain.agents import create_agent
from langchain.agents.middleware import ModelRequest
from langchain.agents.structured_output import ProviderStrategy, ToolStrategy
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage, ToolMessage
from langchain_core.runnables import RunnableConfig
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from langchain_ananke import ChatAnanke
from langchain_ananke.protocol import Constraints
from tests.integration.agent_parts import OPS, Calculation, PerTurn, calculator, tool_rounds
from tests.integration.test_examples import result, run_example

pytestmark = pytest.mark.integration

#: Greedy and short: a tool call here is ~35 tokens, the answer ~30.
PARAMS: dict[str, Any] = {"temperature": 0, "max_tokens": 96}


class Report(BaseModel):
    """The agent's final answer."""

    result: int = Field(ge=-1_000_000, le=1_000_000, description="The number the calculator returned")
    summary: str = Field(max_length=60, description="One short sentence")


Strategy = Literal["tool", "provider", "auto"]
STRATEGIES: tuple[Strategy, ...] = ("tool", "provider", "auto")
QUESTION = {"messages": [HumanMessage("What is 6 times 7? Use the calculator, then report the result.")]}
#: Model, tools, model (and for ToolStrategy its structured-response tool): room for one more round.
RECURSION_LIMIT = 8


def response_format(strategy: Strategy) -> Any:
    return {"tool": ToolStrategy(Report), "provider": ProviderStrategy(Report), "auto": Report}[strategy]


class CallThenAnswer(PerTurn):
    """Turn one must call the calculator; once it has answered, the turn must be the final answer.

    Under ``ProviderStrategy`` LangChain passes the model settings (not ``request.tool_choice``) to
    ``bind_tools`` with the answer schema, so the branch is chosen there: ``required`` allows only
    calls, ``none`` only the answer; both turns carry the tools and the schema. ``ToolStrategy``
    always forces a call of some tool, so its first turn goes without the answer tool and its second
    has only that one.

    Args:
        strategy: the strategy the agent is expected to use (the default must behave as
            ``provider``; if LangChain picked ``ToolStrategy`` instead, its forced ``tool_choice``
            would clash with the one set here and the call fails).
        free_rounds: turns left to the model (``tool_choice="auto"``) before the answer is forced.
    """

    def __init__(self, strategy: Strategy, free_rounds: int = 0) -> None:
        super().__init__()
        self.strategy = strategy
        self.free_rounds = free_rounds

    def step(self, request: ModelRequest) -> ModelRequest:
        rounds = tool_rounds(request.messages)
        settings = request.model_settings
        if self.strategy == "tool":
            if rounds == 0:
                return request.override(
                    response_format=None,
                    tool_choice="any",
                    model_settings={**settings, "parallel_tool_calls": False},
                )
            return request.override(tools=[])
        if rounds < self.free_rounds:
            choice = "auto"
        elif self.free_rounds == 0 and rounds == 0:
            choice = "required"
        else:
            choice = "none"
        return request.override(
            model_settings={**settings, "tool_choice": choice, "parallel_tool_calls": False}
        )


class BoundWith(BaseCallbackHandler):
    """Records what each chat-model call was bound with: LangChain's own invocation params."""

    run_inline = True

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def on_chat_model_start(
        self, serialized: dict[str, Any], messages: list[list[BaseMessage]], **kwargs: Any
    ) -> None:
        self.calls.append(kwargs.get("invocation_params") or {})


def tool_names(params: dict[str, Any]) -> list[str]:
    return [spec["function"]["name"] for spec in params.get("tools") or []]


def answer_schema_sent(params: dict[str, Any]) -> bool:
    """Whether the call carried an answer schema: ``ChatAnanke``'s constraint or OpenAI's format."""
    constraints = params.get("constraints")
    if isinstance(constraints, Constraints):
        return constraints.json_schema is not None
    return params.get("response_format") is not None


def build_agent(llm: BaseChatModel, strategy: Strategy, free_rounds: int = 0) -> Any:
    """The app: the same code for every chat model."""
    return create_agent(
        llm,
        [calculator],
        response_format=response_format(strategy),
        middleware=[CallThenAnswer(strategy, free_rounds)],
    )


def config(recorder: BoundWith) -> RunnableConfig:
    return {"recursion_limit": RECURSION_LIMIT, "callbacks": [recorder]}


@pytest.fixture(scope="module")
def served_model(base_url: str) -> str:
    name = httpx.get(f"{base_url}/health", timeout=30).json()["model"]
    assert isinstance(name, str)
    return name


@pytest.fixture
def llm(base_url: str, served_model: str) -> ChatAnanke:
    return ChatAnanke(base_url=base_url, model=served_model, **PARAMS)


def chat_openai(base_url: str, model: str) -> ChatOpenAI:
    # The OpenAI client needs some key; the service ignores it unless it was started with one.
    api_key = os.environ.get("ANANKE_API_KEY") or "unused"
    return ChatOpenAI(base_url=f"{base_url}/v1", api_key=api_key, model=model, **PARAMS)


# --- checks -----------------------------------------------------------------------------------------


def check_calculator_call(message: BaseMessage, tool_message: BaseMessage) -> None:
    """One calculator call with arguments valid for its schema, answered by the tool."""
    assert isinstance(message, AIMessage)
    assert message.invalid_tool_calls == []
    assert [c["name"] for c in message.tool_calls] == ["calculator"], message.tool_calls
    call = message.tool_calls[0]
    args = Calculation.model_validate(call["args"])
    assert isinstance(tool_message, ToolMessage)
    assert tool_message.tool_call_id == call["id"]
    assert tool_message.content == str(OPS[args.op](args.a, args.b))


def check_run(state: dict[str, Any], strategy: Strategy, recorder: BoundWith, *, ours: bool = True) -> None:
    """The agent used ``strategy`` (``auto`` must mean ProviderStrategy) and ended with a Report."""
    messages = state["messages"]
    report = state["structured_response"]
    assert isinstance(report, Report), report
    kinds = [type(m).__name__ for m in messages]
    check_calculator_call(messages[1], messages[2])
    if strategy == "tool":
        assert kinds == ["HumanMessage", "AIMessage", "ToolMessage", "AIMessage", "ToolMessage"], kinds
        answer_call = messages[3]
        assert isinstance(answer_call, AIMessage)
        assert [c["name"] for c in answer_call.tool_calls] == ["Report"]
        assert Report.model_validate(answer_call.tool_calls[0]["args"]) == report
        # Bound the ToolStrategy way: the answer is a forced call of the Report tool, no schema.
        assert tool_names(recorder.calls[-1]) == ["Report"]
        assert not any(answer_schema_sent(call) for call in recorder.calls)
        return
    assert kinds == ["HumanMessage", "AIMessage", "ToolMessage", "AIMessage"], kinds
    final = messages[-1]
    assert isinstance(final, AIMessage)
    assert final.tool_calls == []
    assert isinstance(final.content, str)
    assert Report.model_validate_json(final.content) == report  # the answer is plain JSON text
    # Bound the ProviderStrategy way: every turn sent the calculator and the answer schema together.
    assert len(recorder.calls) == 2
    for call in recorder.calls:
        assert tool_names(call) == ["calculator"]
        assert answer_schema_sent(call)
    if ours:
        # The service compiled the one agent-turn grammar and says which branch each turn took.
        assert messages[1].response_metadata["metadata"]["branch"] == "tool_calls"
        assert final.response_metadata["metadata"]["branch"] == "answer"
        assert final.response_metadata["constraint_satisfied"] is True
        sent = recorder.calls[-1]["constraints"]
        assert sent.json_schema["title"] == "Report"


# --- tests ------------------------------------------------------------------------------------------


def test_profile_declares_structured_output_and_reads_the_limits(llm: ChatAnanke, base_url: str) -> None:
    card = httpx.get(f"{base_url}/v1/models", timeout=30).json()["data"][0]
    assert llm.profile is not None
    assert llm.profile.get("structured_output") is True
    assert llm.profile.get("tool_calling") is True
    assert llm.profile.get("tool_choice") is True
    assert llm.profile["max_input_tokens"] == card["max_model_len"]
    assert llm.profile["max_output_tokens"] == card["max_output_tokens"] == 4096  # --max-tokens-cap


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_agent_invoke(llm: ChatAnanke, strategy: Strategy) -> None:
    recorder = BoundWith()
    state = build_agent(llm, strategy).invoke(QUESTION, config(recorder))
    check_run(state, strategy, recorder)


@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_agent_ainvoke(llm: ChatAnanke, strategy: Strategy) -> None:
    recorder = BoundWith()
    state = await build_agent(llm, strategy).ainvoke(QUESTION, config(recorder))
    check_run(state, strategy, recorder)


def test_agent_stream_default_strategy(llm: ChatAnanke) -> None:
    """``agent.stream`` token by token; the answer turn (``tool_choice="none"``) streams its JSON."""
    recorder = BoundWith()
    state: dict[str, Any] = {}
    chunks: dict[str, list[AIMessageChunk]] = {}
    for mode, data in build_agent(llm, "auto").stream(
        QUESTION, config(recorder), stream_mode=["messages", "values"]
    ):
        if mode == "values":
            state = data
        elif isinstance(data[0], AIMessageChunk):
            chunks.setdefault(data[1]["langgraph_checkpoint_ns"], []).append(data[0])
    check_run(state, "auto", recorder)
    assert len(chunks) == 2, list(chunks)
    call_chunks, answer_chunks = (sum(c[1:], c[0]) for c in chunks.values())
    assert [c["args"] for c in call_chunks.tool_calls] == [state["messages"][1].tool_calls[0]["args"]]
    assert answer_chunks.content == state["messages"][-1].content
    assert len(chunks[list(chunks)[1]]) > 2  # the answer arrived in pieces, not at the end


async def test_agent_astream_provider_strategy(llm: ChatAnanke) -> None:
    recorder = BoundWith()
    updates: list[str] = []
    state: dict[str, Any] = {}
    async for mode, data in build_agent(llm, "provider").astream(
        QUESTION, config(recorder), stream_mode=["updates", "values"]
    ):
        if mode == "values":
            state = data
        else:
            updates.extend(data)
    check_run(state, "provider", recorder)
    assert updates == ["model", "tools", "model"], updates


def test_agent_turns_left_to_the_model_are_calls_or_the_answer(llm: ChatAnanke) -> None:
    """With ``tool_choice="auto"`` the model picks the branch; whichever it picks, a turn is either
    valid calls or the answer, never free text. Two free turns, then the answer is forced."""
    recorder = BoundWith()
    state = build_agent(llm, "provider", free_rounds=2).invoke(QUESTION, config(recorder))
    messages = state["messages"]
    report = state["structured_response"]
    assert isinstance(report, Report)
    *calls, last = [i for i, m in enumerate(messages) if isinstance(m, AIMessage)]
    assert len(calls) <= 2  # the model may answer at once, or call the tool in either free turn
    for i in calls:
        check_calculator_call(messages[i], messages[i + 1])
        assert messages[i].response_metadata["metadata"]["branch"] == "tool_calls"
    final = messages[last]
    assert last == len(messages) - 1
    assert final.response_metadata["metadata"]["branch"] == "answer"
    assert Report.model_validate_json(str(final.content)) == report
    for call in recorder.calls:
        assert tool_names(call) == ["calculator"]
        assert answer_schema_sent(call)


@pytest.mark.parametrize("strategy", ["tool", "provider"])
def test_the_same_agent_runs_with_chat_openai(base_url: str, served_model: str, strategy: Strategy) -> None:
    """The app code is unchanged with ``ChatOpenAI(base_url=<service>/v1)`` (tools + response_format on
    ``/v1/chat/completions`` for ``ProviderStrategy``)."""
    recorder = BoundWith()
    state = build_agent(chat_openai(base_url, served_model), strategy).invoke(QUESTION, config(recorder))
    check_run(state, strategy, recorder, ours=False)


def test_agent_structured_example(base_url: str) -> None:
    data = result(run_example("agent_structured.py", base_url))
    [call] = data["tool_calls"]
    assert call["name"] == "calculator"
    args = Calculation.model_validate(call["args"])
    assert call["result"] == str(OPS[args.op](args.a, args.b))
    report = Report.model_validate(data["structured_response"])
    assert Report.model_validate(json.loads(data["final_content"])) == report
    assert data["branch"] == "answer"
