"""Steer-to-close (:mod:`modal_service.closing`) with the real model's tokenizer and llguidance.

No engine: truncated outputs are written by hand, tokenized, and closed. Every closed output is
checked independently (``jsonschema`` / ``re.fullmatch`` / the matcher) and against the budget.
"""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import pytest

from langchain_ananke.protocol import Constraints
from modal_service.model_prep import default_model_dir

llguidance = pytest.importorskip("llguidance")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf() -> Any:
    path = default_model_dir()
    if not (path / "tokenizer.json").exists():
        pytest.skip(f"model not pulled to {path} (make setup)")
    return transformers.AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="module")
def compiler(hf: Any) -> Any:
    import llguidance.hf

    from modal_service.constraints import ConstraintCompiler

    tok = llguidance.hf.from_tokenizer(hf)
    return ConstraintCompiler(tok, vocab_size=len(hf), eos_token_ids=frozenset({hf.eos_token_id}))


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "email": {"type": "string", "format": "email"},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1},
    },
    "required": ["name", "age", "email", "tags"],
    "additionalProperties": False,
}


def _close(compiler: Any, hf: Any, constraints: Constraints, partial: str, *, budget: int) -> Any:
    compiled, _ = compiler.compile(constraints, budget)
    ids = hf.encode(partial, add_special_tokens=False)
    closing = compiler.close(compiled, ids, budget=budget, window=len(ids))
    if closing is None:
        return None, None
    out = ids[: closing.keep] + closing.suffix
    assert len(out) <= budget
    return hf.decode(out), closing


@pytest.mark.parametrize(
    "partial",
    [
        '{"name":"A very long name that the model kept writing and writ',
        '{"name":"Ann","age":3',
        '{"name":"Ann","age":34,"email":"ann@exa',
        '{"name":"Ann","age":34,"email":"ann@example.com","tags":["a","b',
        "{",
    ],
)
def test_closes_a_truncated_json_object_into_a_valid_instance(compiler: Any, hf: Any, partial: str) -> None:
    budget = len(hf.encode(partial, add_special_tokens=False)) + 24
    text, closing = _close(
        compiler, hf, Constraints(json_schema=PERSON, length_caps=False), partial, budget=budget
    )
    assert closing is not None, partial
    jsonschema.Draft202012Validator(PERSON, format_checker=jsonschema.FormatChecker()).validate(
        json.loads(text)
    )
    kept = hf.decode(hf.encode(partial, add_special_tokens=False)[: closing.keep])
    assert text.startswith(kept)


def test_rolls_back_when_the_remaining_budget_is_too_small(compiler: Any, hf: Any) -> None:
    partial = '{"name":"Ann","age":34,"email":"ann@example.com","tags":["alpha","beta","gamma'
    n = len(hf.encode(partial, add_special_tokens=False))
    text, closing = _close(compiler, hf, Constraints(json_schema=PERSON), partial, budget=n)
    assert closing is not None
    assert closing.keep < n  # nothing was left to close with: some of the model's tokens went
    assert len(hf.encode(text, add_special_tokens=False)) <= n + 1  # re-tokenizing may merge/split
    assert json.loads(text)["tags"]


def test_gives_up_honestly_when_nothing_fits(compiler: Any, hf: Any) -> None:
    # The required fields alone need more than 6 tokens, and there is nothing to roll back.
    text, closing = _close(compiler, hf, Constraints(json_schema=PERSON, length_caps=False), "{", budget=6)
    assert closing is None
    assert text is None


def test_closes_regex_and_grammar(compiler: Any, hf: Any) -> None:
    text, _ = _close(compiler, hf, Constraints(regex=r"[0-9]{3}-[0-9]{4}"), "55", budget=12)
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", text)
    lark = 'start: "fn " NAME "(" NAME ")" "{" body "}"\nbody: (NAME ";")*\nNAME: /[a-z]+/'
    text, _ = _close(compiler, hf, Constraints(grammar=lark), "fn main(argv){x;yy", budget=24)
    assert re.fullmatch(r"fn [a-z]+\([a-z]+\)\{([a-z]+;)*\}", text), text


def test_smallest_output_is_found_at_compile_time(compiler: Any) -> None:
    person, _ = compiler.compile(Constraints(json_schema=PERSON), 256)
    assert person.min_tokens is not None
    assert 10 <= person.min_tokens <= 40
    choice, _ = compiler.compile(Constraints(choice=["yes", "no"]), 16)
    assert choice.min_tokens == 1
    nested = {
        "type": "object",
        "properties": {"a": {"$ref": "#/$defs/wide"}, "b": {"$ref": "#/$defs/wide"}},
        "required": ["a", "b"],
        "$defs": {
            "wide": {
                "type": "object",
                "properties": {f"field_{i}": {"type": "string"} for i in range(20)},
                "required": [f"field_{i}" for i in range(20)],
            }
        },
    }
    wide, _ = compiler.compile(Constraints(json_schema=nested), 256)
    assert wide.min_tokens is not None
    assert wide.min_tokens > person.min_tokens


ADA = '{"name": "Ada", "age": 36, "email": "a@b.co", "tags": ["x"'


@pytest.mark.parametrize(
    ("constraints", "text", "satisfied"),
    [
        (Constraints(json_schema=PERSON), ADA + "]}", True),
        (Constraints(json_schema=PERSON), ADA, False),
        (Constraints(regex_patterns=["[0-9]{3}"]), "123", True),
        (Constraints(regex_patterns=["[0-9]{3}"]), "12", False),
        (Constraints(choice=["yes", "no"]), "yes", True),
    ],
)
def test_output_cut_by_max_tokens_is_judged_on_completeness(
    compiler: Any, hf: Any, constraints: Constraints, text: str, satisfied: bool
) -> None:
    # finish "length" alone does not make output unsatisfied: a cut that landed on a complete
    # instance satisfies the constraint; an incomplete one never does.
    compiled, _ = compiler.compile(constraints, 64)
    ids = hf.encode(text, add_special_tokens=False)
    verdict = compiler.verify(compiled, text, ids, "length")
    assert verdict.satisfied is satisfied
    if not satisfied:
        assert "max_tokens" in (verdict.error or "")
    assert compiler.verify(compiled, text, ids, "abort").satisfied is False
