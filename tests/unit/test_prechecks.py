"""The server's cheap bounds (prompt characters, constraint shape) and timeout answers, offline."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from langchain_ananke.protocol import GenerateRequest
from modal_service.engine.engine import Engine, EngineConfig
from modal_service.errors import ApiError
from modal_service.http.lifecycle import Prechecks, error_event
from modal_service.limits import Deadline, Limits


class _Tokenizer:
    """The two things the prompt bound reads: the vocabulary and the backend's normalizer."""

    def __init__(self, longest: int, normalizer: Any = None) -> None:
        self.vocab = {"a": 0, "b" * longest: 1}
        self.backend_tokenizer = SimpleNamespace(normalizer=normalizer)

    def get_vocab(self) -> dict[str, int]:
        return self.vocab

    def encode(self, *_: Any, **__: Any) -> list[int]:
        raise AssertionError("the bound must not tokenize")


class NFC:
    pass


class Lowercase:
    pass


def _prechecks(longest: int = 10, normalizer: Any = None, context: int = 100) -> Prechecks:
    engine = Engine(EngineConfig(model="/nowhere", max_model_len=context))
    engine.tokenizer = _Tokenizer(longest, normalizer)
    return Prechecks(engine, Limits(max_choices=3, max_branches=2))


@pytest.mark.parametrize(
    ("fields", "refused"),
    [
        ({"prompt": "x" * 900, "max_tokens": 10}, False),  # 90 tokens of room * 10 chars
        ({"prompt": "x" * 901, "max_tokens": 10}, True),
        ({"prompt": ["short", "x" * 901], "max_tokens": 10}, True),
        ({"messages": [{"role": "user", "content": "x" * 450}] * 2, "max_tokens": 10}, False),
        ({"messages": [{"role": "user", "content": "x" * 450}] * 2, "max_tokens": 11}, True),
    ],
)
def test_prompt_characters_bound_the_tokens(fields: dict[str, Any], refused: bool) -> None:
    check = _prechecks()
    req = GenerateRequest.model_validate(fields)
    if not refused:
        check(req)
        return
    with pytest.raises(ApiError) as info:
        check(req)
    assert (info.value.status, info.value.code) == (422, "context_length_exceeded")
    assert "context of 100 tokens" in info.value.message


def test_normalizers_loosen_or_disable_the_bound() -> None:
    req = GenerateRequest(prompt="x" * 2_000, max_tokens=10)
    _prechecks(normalizer=NFC())(req)  # NFC may compose 3 characters into 1: 2,700 allowed
    with pytest.raises(ApiError):
        _prechecks(normalizer=NFC())(GenerateRequest(prompt="x" * 2_701, max_tokens=10))
    _prechecks(normalizer=Lowercase())(GenerateRequest(prompt="x" * 100_000, max_tokens=10))  # no bound


def test_no_tokenizer_yet_means_no_prompt_bound() -> None:
    engine = Engine(EngineConfig(model="/nowhere", max_model_len=10))
    Prechecks(engine, Limits())(GenerateRequest(prompt="x" * 10_000, max_tokens=8))


def test_max_tokens_cap_comes_before_the_prompt_bound() -> None:
    # max_tokens over the cap (and over the context): the answer names the cap, not the context.
    with pytest.raises(ApiError) as info:
        _prechecks()(GenerateRequest(prompt="x", max_tokens=10**6))
    assert (info.value.status, info.value.code) == (422, "invalid_request")
    assert "cap" in info.value.message


@pytest.mark.parametrize(
    "fields",
    [
        {"prompt": "x", "constraints": {"choice": ["a", "b", "c", "d"]}},
        {"prompt": "x", "constraints": {"regex_patterns": ["a", "b", "c", "d"]}},
        {"prompt": "x", "constraints": {"json_schema": {"anyOf": [{}, {}, {}]}}},
        {
            "messages": [{"role": "user", "content": "x"}],
            "tools": [{"function": {"name": "f", "parameters": {"oneOf": [{}, {}, {}]}}}],
        },
    ],
)
def test_oversized_constraints_are_422_before_compiling(fields: dict[str, Any]) -> None:
    with pytest.raises(ApiError) as info:
        _prechecks()(GenerateRequest.model_validate(fields))
    assert (info.value.status, info.value.code) == (422, "invalid_constraint")
    assert "the limit is" in info.value.message


def test_timeout_answers_name_the_deadline_and_the_tokens() -> None:
    assert "before any output" in Deadline(0.5).error(0).message
    unknown = Deadline(0.5).error(None)
    assert "aborted in the engine (raise timeout_s" in unknown.message
    assert unknown.detail == {"timeout_s": 0.5, "tokens_generated": None}
    error = Deadline(0.5).error(7)
    assert (error.status, error.code) == (504, "timeout")
    assert (
        "timeout of 0.5 s passed and it was aborted in the engine after 7 generated tokens" in error.message
    )
    assert error.detail == {"timeout_s": 0.5, "tokens_generated": 7}
    event = error_event(error)
    assert event.event == "error"
    assert event.error is not None
    assert event.error.code == "timeout"
    assert event.error.detail == error.detail
