"""One grammar for an agent turn, on the real local service: tool calls *or* an answer valid for the
schema, never free text and never half of either.

The same request (tools plus an answer schema, ``tool_choice="auto"``) goes out over many seeds and
prompts at a sampling temperature, so the model takes both branches. Each answer is checked here,
independently of the service's own verdict: calls name a real tool and their arguments validate
against its schema, or the text is JSON that validates against the answer schema. A control run of
the same prompts with no constraint shows that the check is not trivially met by the model alone,
so the grammar is what makes every answer pass.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.integration.agent_parts import Calculation

pytestmark = pytest.mark.integration

ANSWER = {
    "type": "object",
    "properties": {
        "result": {"type": "integer"},
        "summary": {"type": "string", "maxLength": 60},
    },
    "required": ["result", "summary"],
    "additionalProperties": False,
}
CALC_PARAMS = Calculation.model_json_schema()
TOOLS = [
    {
        "type": "function",
        "function": {"name": "calculator", "description": "Do arithmetic.", "parameters": CALC_PARAMS},
    },
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "Look up a fact.",
            "parameters": {
                "type": "object",
                "properties": {"topic": {"type": "string", "maxLength": 40}},
                "required": ["topic"],
            },
        },
    },
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
#: Some prompts invite a call, some an immediate answer; the model's choice is its own.
PROMPTS = [
    "What is 12 times 9? Use the calculator.",
    "Compute 345 plus 678 with a tool.",
    "Reply with the final answer now: the result is 7, summary 'seven'.",
    "Give your final report: result 42, summary 'the answer'.",
    "Look up the capital of France.",
    "Say hello and report result 1.",
]
SEEDS = [1, 2, 3, 4]  # 6 prompts x 4 seeds = 24 requests


def _messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def check_turn(calls: list[tuple[str, dict[str, Any]]] | None, text: str | None) -> str:
    """The branch an answer took, after checking it independently; raises if it is neither."""
    if calls:
        for name, args in calls:
            assert name in SCHEMAS, name
            jsonschema.validate(args, SCHEMAS[name])
        return "tool_calls"
    assert text is not None
    jsonschema.validate(json.loads(text), ANSWER)
    return "answer"


def _is_valid_turn(text: str) -> bool:
    try:
        check_turn(None, text)
    except (AssertionError, ValueError, jsonschema.ValidationError):
        return "<tool_call>" in text and text.strip().startswith("<tool_call>")
    return True


@pytest.fixture(scope="module")
def model(base_url: str) -> str:
    name = httpx.get(f"{base_url}/health", timeout=30).json()["model"]
    assert isinstance(name, str)
    return name


def test_tools_plus_schema_is_calls_or_the_answer_over_seeds(http: httpx.Client) -> None:
    branches: dict[str, int] = {"tool_calls": 0, "answer": 0}
    for prompt in PROMPTS:
        for seed in SEEDS:
            body = {
                "messages": _messages(prompt),
                "tools": TOOLS,
                "tool_choice": "auto",
                "constraints": {"json_schema": ANSWER},
                "temperature": 0.8,
                "seed": seed,
                "max_tokens": 128,
            }
            data = http.post("/generate_api", json=body).json()
            assert data["constraint_satisfied"] is True, (prompt, seed, data)
            calls = [(c["name"], c["arguments"]) for c in data["tool_calls"] or []]
            branch = check_turn(calls, data["generated_text"])
            assert data["metadata"]["branch"] == branch
            assert data["finish_reason"] == ("tool_calls" if branch == "tool_calls" else "stop")
            branches[branch] += 1
    assert branches["tool_calls"] > 0, branches
    assert branches["answer"] > 0, branches


def test_without_the_grammar_the_same_prompts_are_often_neither(http: httpx.Client) -> None:
    """The control: the model alone does not meet the check above, so the test above can fail."""
    invalid = 0
    for prompt in PROMPTS:
        body = {"messages": _messages(prompt), "temperature": 0.8, "seed": 1, "max_tokens": 64}
        text = http.post("/generate_api", json=body).json()["generated_text"]
        invalid += not _is_valid_turn(text)
    assert invalid > 0


@pytest.mark.parametrize("tool_choice", ["required", "none"])
def test_required_is_only_calls_and_none_only_the_answer(http: httpx.Client, tool_choice: str) -> None:
    for prompt in PROMPTS[:3]:
        body = {
            "messages": _messages(prompt),
            "tools": TOOLS,
            "tool_choice": tool_choice,
            "constraints": {"json_schema": ANSWER},
            "temperature": 0.8,
            "seed": 5,
            "max_tokens": 128,
        }
        data = http.post("/generate_api", json=body).json()
        assert data["constraint_satisfied"] is True, data
        calls = [(c["name"], c["arguments"]) for c in data["tool_calls"] or []]
        expected = "tool_calls" if tool_choice == "required" else "answer"
        assert check_turn(calls, data["generated_text"]) == expected
        assert data["metadata"]["branch"] == expected


def test_agent_turn_closes_on_budget_or_is_refused_up_front(http: httpx.Client) -> None:
    body = {
        "messages": _messages("Give the final report."),
        "tools": TOOLS,
        "tool_choice": "none",
        "constraints": {"json_schema": ANSWER},
        "temperature": 0.8,
        "seed": 3,
    }
    tiny = http.post("/generate_api", json=body | {"max_tokens": 4})
    assert tiny.status_code == 422
    assert tiny.json()["error"]["code"] == "max_tokens_too_small"
    data = http.post("/generate_api", json=body | {"max_tokens": 24}).json()
    assert data["constraint_satisfied"] is True, data
    assert check_turn(None, data["generated_text"]) == "answer"


def test_v1_tools_plus_response_format(base_url: str, model: str) -> None:
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused")
    branches = set()
    for prompt in PROMPTS:
        completion = client.chat.completions.create(
            model=model,
            messages=_messages(prompt),  # type: ignore[arg-type]
            tools=TOOLS,  # type: ignore[arg-type]
            response_format={"type": "json_schema", "json_schema": {"name": "Answer", "schema": ANSWER}},
            temperature=0.8,
            seed=2,
            max_tokens=128,
        )
        message = completion.choices[0].message
        calls = [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]
        branches.add(check_turn(calls, message.content))
    assert branches == {"tool_calls", "answer"}


class Answer(BaseModel):
    result: int
    summary: str = Field(max_length=60)


def test_openai_sdk_parse_with_tools_and_a_pydantic_response_format(base_url: str, model: str) -> None:
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused")
    branches = set()
    for prompt in PROMPTS:
        completion = client.chat.completions.parse(
            model=model,
            messages=_messages(prompt),  # type: ignore[arg-type]
            tools=[openai.pydantic_function_tool(Calculation, name="calculator")],
            response_format=Answer,
            temperature=0.8,
            seed=3,
            max_tokens=128,
        )
        message = completion.choices[0].message
        if message.tool_calls:
            for call in message.tool_calls:
                assert isinstance(call.function.parsed_arguments, Calculation)  # type: ignore[union-attr]
            branches.add("tool_calls")
        else:
            assert isinstance(message.parsed, Answer)
            branches.add("answer")
    assert branches, "no answer at all"
