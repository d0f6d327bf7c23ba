"""The ``BaseLLM`` contract for ``AnankeLLM``, by hand (LangChain has no standard suite for ``BaseLLM``).

Runs against the real local service (the ``base_url`` session fixture). Every comparison uses a
constraint plus greedy, seeded decoding, so the answers are deterministic and the assertions are
about the integration, not about what a 135M-parameter model knows.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any
from uuid import UUID

import httpx
import pytest
from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler
from langchain_core.outputs import LLMResult
from pydantic import BaseModel, Field

from langchain_ananke import AnankeLLM, Choice, ConstraintNotSatisfiedError, Regex
from langchain_ananke.errors import AnankeAPIError
from tests.conftest import chat_prompt

pytestmark = pytest.mark.integration

MODEL_NAME = "SmolLM2-135M-Instruct"
SEED = 1234

YES_NO = Choice(["yes", "no"])
YES_NO_PROMPT = chat_prompt("Is the sky blue on a clear day? Answer yes or no.")
PHONE = Regex(r"[0-9]{3}-[0-9]{4}")
PHONE_PROMPT = chat_prompt("Make up a phone number in the form 555-0199.")


class Person(BaseModel):
    """A person mentioned in the text."""

    name: str = Field(description="the person's first name")
    age: int = Field(description="the person's age in years")


PERSON_PROMPT = chat_prompt(
    'Bob is 31 years old. Give his name and age as JSON, like {"name": ..., "age": ...}.'
)


@pytest.fixture(scope="module")
def llm(base_url: str) -> Iterator[AnankeLLM]:
    model = AnankeLLM(base_url=base_url, temperature=0, seed=SEED, max_tokens=64, timeout=300)
    yield model
    model.client.close()


def _count_requests(client: httpx.Client) -> list[httpx.Request]:
    """Record every request the sync httpx client sends (an event hook, not a mock: it still sends)."""
    seen: list[httpx.Request] = []
    client.event_hooks["request"] = [*client.event_hooks["request"], seen.append]
    return seen


class _Tokens(BaseCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.starts = 0
        self.ends: list[LLMResult] = []

    def on_llm_start(self, serialized: dict[str, Any], prompts: list[str], **kwargs: Any) -> None:
        self.starts += 1

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)

    def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        self.ends.append(response)


class _AsyncTokens(AsyncCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []

    async def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)


# ----------------------------------------------------------------------------- identity & params
def test_llm_type_and_identifying_params(llm: AnankeLLM, base_url: str) -> None:
    assert llm._llm_type == "ananke"
    params = llm._identifying_params
    assert params["base_url"] == base_url
    assert params["temperature"] == 0
    assert params["seed"] == SEED
    assert params["max_tokens"] == 64


def test_ls_params(llm: AnankeLLM) -> None:
    ls = llm._get_ls_params(stop=["\n"])
    assert ls["ls_provider"] == "ananke"
    assert ls["ls_model_type"] == "llm"
    assert ls["ls_model_name"]
    assert ls["ls_temperature"] == 0
    assert ls["ls_max_tokens"] == 64
    assert ls["ls_stop"] == ["\n"]
    assert llm._get_ls_params(model="override")["ls_model_name"] == "override"


# --------------------------------------------------------- every entry point gives the same answer
@pytest.mark.parametrize(
    ("constraint", "prompt"), [(YES_NO, YES_NO_PROMPT), (PHONE, PHONE_PROMPT)], ids=["choice", "regex"]
)
async def test_entry_points_agree(llm: AnankeLLM, constraint: Any, prompt: str) -> None:
    kw: dict[str, Any] = {"constraints": constraint}
    invoked = llm.invoke(prompt, **kw)
    if isinstance(constraint, Choice):
        assert invoked in constraint.options
    else:
        assert re.fullmatch(constraint.pattern, invoked)
    assert await llm.ainvoke(prompt, **kw) == invoked
    assert "".join(llm.stream(prompt, **kw)) == invoked
    assert "".join([chunk async for chunk in llm.astream(prompt, **kw)]) == invoked
    assert llm.batch([prompt, prompt], **kw) == [invoked, invoked]
    assert await llm.abatch([prompt, prompt], **kw) == [invoked, invoked]


# ------------------------------------------------------------------------------------- callbacks
def test_stream_fires_new_token_callbacks(llm: AnankeLLM) -> None:
    handler = _Tokens()
    chunks = list(llm.stream(PHONE_PROMPT, constraints=PHONE, config={"callbacks": [handler]}))
    text = "".join(chunks)
    assert len([c for c in chunks if c]) >= 2, "a regex answer of 8 characters streams in pieces"
    assert handler.tokens == [c for c in chunks if c]
    assert "".join(handler.tokens) == text
    assert handler.starts == 1
    assert len(handler.ends) == 1
    assert handler.ends[0].generations[0][0].text == text


async def test_astream_fires_new_token_callbacks(llm: AnankeLLM) -> None:
    handler = _AsyncTokens()
    chunks = [c async for c in llm.astream(PHONE_PROMPT, constraints=PHONE, config={"callbacks": [handler]})]
    assert handler.tokens
    assert "".join(handler.tokens) == "".join(chunks)


def test_invoke_fires_start_and_end(llm: AnankeLLM) -> None:
    handler = _Tokens()
    answer = llm.invoke(YES_NO_PROMPT, constraints=YES_NO, config={"callbacks": [handler]})
    assert handler.starts == 1
    assert [r.generations[0][0].text for r in handler.ends] == [answer]


# ------------------------------------------------------------------------ batching is one request
def test_batch_sends_one_request(base_url: str) -> None:
    llm = AnankeLLM(base_url=base_url, temperature=0, seed=SEED, max_tokens=16)
    seen = _count_requests(llm.client._client)
    prompts = [YES_NO_PROMPT, chat_prompt("Is fire cold? Answer yes or no."), YES_NO_PROMPT]
    answers = llm.batch(prompts, constraints=YES_NO)
    assert len(seen) == 1, f"{len(prompts)} prompts went out as {len(seen)} HTTP requests"
    assert seen[0].url.path == "/generate_api"
    assert len(answers) == len(prompts)
    assert all(a in YES_NO.options for a in answers)
    assert answers[0] == answers[2]
    llm.client.close()


async def test_abatch_sends_one_request(base_url: str) -> None:
    llm = AnankeLLM(base_url=base_url, temperature=0, seed=SEED, max_tokens=16)
    seen: list[httpx.Request] = []

    async def record(request: httpx.Request) -> None:
        seen.append(request)

    llm.async_client._client.event_hooks["request"] = [record]
    answers = await llm.abatch([YES_NO_PROMPT, YES_NO_PROMPT], constraints=YES_NO)
    assert len(seen) == 1
    assert answers[0] == answers[1]
    assert answers[0] in YES_NO.options
    await llm.async_client.aclose()


# ------------------------------------------------------------------------- usage and metadata
def test_generate_carries_metadata_and_usage(llm: AnankeLLM) -> None:
    result = llm.generate([YES_NO_PROMPT, PHONE_PROMPT], constraints=YES_NO)
    assert len(result.generations) == 2
    for [generation] in result.generations:
        info = generation.generation_info
        assert info is not None
        assert info["finish_reason"] == "stop"
        assert info["constraint_satisfied"] is True
        assert info["constraint_error"] is None
        assert info["model_name"] == MODEL_NAME
        assert info["tokens_generated"] >= 1
        assert generation.text in YES_NO.options
    assert result.llm_output is not None
    usage = result.llm_output["token_usage"]
    assert usage["prompt_tokens"] > 0
    assert usage["completion_tokens"] >= 2


def test_unconstrained_generation_info(llm: AnankeLLM) -> None:
    result = llm.generate([chat_prompt("Say hello.")], max_tokens=8)
    info = result.generations[0][0].generation_info
    assert info is not None
    assert info["constraint_satisfied"] is None
    assert info["finish_reason"] in ("stop", "length")
    assert info["model_name"] == MODEL_NAME


def test_unconstrained_stream_matches_invoke(llm: AnankeLLM) -> None:
    prompt = chat_prompt("Say hello.")
    text = llm.invoke(prompt, max_tokens=8)
    assert "".join(llm.stream(prompt, max_tokens=8)) == text
    final = list(llm._stream(prompt, max_tokens=8))[-1]
    assert final.generation_info is not None
    assert final.generation_info["constraint_satisfied"] is None


def test_stream_final_chunk_carries_metadata(llm: AnankeLLM) -> None:
    chunks = list(llm._stream(PHONE_PROMPT, constraints=PHONE))
    final = chunks[-1]
    assert final.text == ""
    assert final.generation_info is not None
    assert final.generation_info["finish_reason"] == "stop"
    assert final.generation_info["constraint_satisfied"] is True
    assert final.generation_info["model_name"] == MODEL_NAME
    assert all(c.generation_info is None for c in chunks[:-1])


# ------------------------------------------------------------------------------ structured output
def test_with_structured_output_pydantic(llm: AnankeLLM) -> None:
    structured = llm.with_structured_output(Person)
    person = structured.invoke(PERSON_PROMPT, max_tokens=64)
    assert isinstance(person, Person)
    # The grammar guarantees the shape: a str name and an int age, nothing else.
    assert isinstance(person.name, str)
    assert isinstance(person.age, int)
    streamed = list(structured.stream(PERSON_PROMPT))
    assert streamed
    assert all(isinstance(p, Person) for p in streamed)
    assert streamed[-1] == person


async def test_with_structured_output_pydantic_async(llm: AnankeLLM) -> None:
    structured = llm.with_structured_output(Person)
    person = await structured.ainvoke(PERSON_PROMPT)
    assert isinstance(person, Person)
    assert person == structured.invoke(PERSON_PROMPT)


def test_with_structured_output_text_constraint(llm: AnankeLLM) -> None:
    assert llm.with_structured_output(YES_NO).invoke(YES_NO_PROMPT) in YES_NO.options


def test_with_structured_output_include_raw(llm: AnankeLLM) -> None:
    out = llm.with_structured_output(Person, include_raw=True).invoke(PERSON_PROMPT)
    assert isinstance(out["parsed"], Person)
    assert out["parsing_error"] is None
    assert isinstance(out["raw"], str)
    assert Person.model_validate_json(out["raw"]) == out["parsed"]


# ------------------------------------------------------- truncation raises, never a half object
def test_too_few_tokens_raises(llm: AnankeLLM) -> None:
    structured = llm.with_structured_output(Person)
    with pytest.raises(AnankeAPIError) as info:  # refused before any token is generated
        structured.invoke(PERSON_PROMPT, max_tokens=3)
    assert info.value.status_code == 422
    assert info.value.code == "max_tokens_too_small"


def test_too_few_tokens_raises_streaming(llm: AnankeLLM) -> None:
    structured = llm.with_structured_output(Person)
    got: list[Any] = []
    with pytest.raises(AnankeAPIError):
        got.extend(structured.stream(PERSON_PROMPT, max_tokens=3))
    assert not any(isinstance(p, Person) for p in got)


async def test_too_few_tokens_raises_async(llm: AnankeLLM) -> None:
    structured = llm.with_structured_output(Person)
    with pytest.raises(AnankeAPIError):
        await structured.ainvoke(PERSON_PROMPT, max_tokens=3)
    with pytest.raises(AnankeAPIError):
        await structured.abatch([PERSON_PROMPT, PERSON_PROMPT], max_tokens=3)


class Bio(BaseModel):
    name: str
    bio: str


BIO_PROMPT = chat_prompt("Write a long biography of Ada Lovelace as JSON with name and bio.")


def test_budget_cut_structured_output_is_closed_not_half(llm: AnankeLLM) -> None:
    # The model writes on past max_tokens (the bio is unbounded): the server finishes the object
    # within the budget, and the parser gets a whole, valid Bio, never half of one.
    schema = {"json_schema": Bio.model_json_schema(), "length_caps": False}
    result = llm.generate([BIO_PROMPT], constraints=schema, max_tokens=20)
    info = result.generations[0][0].generation_info
    assert info is not None
    assert info["constraint_satisfied"] is True
    assert info["tokens_generated"] <= 20
    assert info["metadata"]["closed_on_budget"]["added_tokens"] >= 1
    Bio.model_validate_json(result.generations[0][0].text)
    assert isinstance(llm.with_structured_output(Bio).invoke(BIO_PROMPT, max_tokens=20), Bio)


def test_require_satisfied_on_plain_invoke(llm: AnankeLLM) -> None:
    # Without require_satisfied the truncated text is returned, with the verdict in its metadata
    # (closing on budget off, so the budget-cut text comes back as it is).
    cut = {"json_schema": Person.model_json_schema(), "close_on_budget": False}
    result = llm.generate([PERSON_PROMPT], constraints=cut, max_tokens=8)
    info = result.generations[0][0].generation_info
    assert info is not None
    assert info["constraint_satisfied"] is False
    assert info["finish_reason"] == "length"
    with pytest.raises(ConstraintNotSatisfiedError):
        llm.invoke(PERSON_PROMPT, constraints=cut, max_tokens=8, require_satisfied=True)
