"""Steer-to-close (:mod:`modal_service.constraints.closing`) with the real model's tokenizer and llguidance.

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
from tests.conftest import ROOT

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

    from modal_service.constraints.compiler import ConstraintCompiler, hidden_token_ids

    tok = llguidance.hf.from_tokenizer(hf)
    return ConstraintCompiler(
        tok,
        vocab_size=len(hf),
        eos_token_ids=frozenset({hf.eos_token_id}),
        hidden_token_ids=hidden_token_ids(hf),
    )


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


DATA = ROOT / "tests" / "data" / "jsonschemabench-dev"


def test_an_approximated_schema_needs_a_valid_instance(compiler: Any) -> None:
    from modal_service.constraints.compiler import ConstraintError

    # oneOf over required-sets, with every key required: no instance can match exactly one branch.
    unsatisfiable = json.loads((DATA / "Glaiveai2K" / "calculate_area_f8e04f89.json").read_text())
    with pytest.raises(ConstraintError, match="found none") as info:
        compiler.compile(Constraints(json_schema=unsatisfiable), 256)
    assert info.value.detail["approximate"] is True
    # A large approximated schema (llguidance lacks "dependencies") whose optional properties lead
    # the token search astray: the witness built from its required properties gives the length.
    granule = json.loads((DATA / "Github_ultra" / "o62899.json").read_text())
    compiled, _ = compiler.compile(Constraints(json_schema=granule), 48)
    assert compiled.approximate
    assert compiled.min_tokens is not None
    assert 48 < compiled.min_tokens < 200  # so max_tokens 48 is a 422 up front, not a truncation


def test_approximated_schema_with_dependencies_gets_an_exactly_valid_length(compiler: Any) -> None:
    schema = {
        "$schema": "http://json-schema.org/draft-07/schema#",  # "dependencies" is a draft-07 keyword
        "type": "object",
        "properties": {"card": {"type": "string"}, "billing": {"type": "string"}, "name": {"type": "string"}},
        "required": ["card"],
        "dependencies": {"card": ["billing"]},
        "additionalProperties": False,
    }
    compiled, _ = compiler.compile(Constraints(json_schema=schema), 64)
    assert compiled.approximate
    # {"card":"","billing":""}: the grammar alone would allow {"card":""}, which fails the schema.
    assert compiled.min_tokens is not None
    assert compiled.ll_grammar is not None
    matcher = llguidance.LLMatcher(compiler._tokenizer, compiled.ll_grammar)
    grammar_only = compiler._closer.smallest_tokens(matcher, limit=64)
    assert grammar_only is not None
    assert compiled.min_tokens > len(grammar_only)


def test_search_goes_past_outputs_the_check_refuses(compiler: Any, hf: Any) -> None:
    from modal_service.constraints.closing import Closer

    closer = Closer(compiler._tokenizer)
    grammar = llguidance.LLMatcher.grammar_from_regex("(a|bbbb)")
    first = closer.smallest_tokens(llguidance.LLMatcher(compiler._tokenizer, grammar), limit=16)
    assert first is not None
    assert hf.decode(first) == "a"
    refused = closer.smallest_tokens(
        llguidance.LLMatcher(compiler._tokenizer, grammar),
        limit=16,
        accept=lambda tokens: hf.decode(tokens) != "a",
    )
    assert refused is not None
    assert hf.decode(refused) == "bbbb"


def test_pattern_strings_come_from_llguidance(compiler: Any) -> None:
    text = compiler._string_for_pattern("^([0-9]{16})$", 0, None)
    assert text is not None
    assert re.fullmatch("[0-9]{16}", text)
    assert compiler._string_for_pattern("^[a-z]{20}$", 0, 5) is None  # longer than maxLength


def test_closing_falls_back_to_the_shortest_output_when_it_may_rebuild(compiler: Any, hf: Any) -> None:
    compiled, _ = compiler.compile(Constraints(json_schema=PERSON), 256)
    assert compiled.shortest_output is not None
    assert len(compiled.shortest_output) == compiled.min_tokens
    body = hf.encode('{"name": "Ada Lovelace, who wrote the first', add_special_tokens=False)
    searching = compiler._closer.max_nodes
    compiler._closer.max_nodes = 0  # the search finds nothing
    try:
        closing = compiler.close(compiled, body, budget=64, window=len(body))
        cannot_rebuild = compiler.close(compiled, body, budget=64, window=len(body) - 1)
        too_small = compiler.close(compiled, body, budget=compiled.min_tokens - 1, window=len(body))
    finally:
        compiler._closer.max_nodes = searching
    assert closing is not None
    assert closing.rebuilt
    assert (closing.keep, closing.dropped) == (0, len(body))
    assert closing.suffix == list(compiled.shortest_output)
    jsonschema.validate(json.loads(hf.decode(closing.suffix)), PERSON)
    assert cannot_rebuild is None  # part of the output was already sent (streaming)
    assert too_small is None


SQL = 'start: "SELECT " col (", " col)* " FROM " tbl ";"\ncol: /[a-z]+/\ntbl: /[a-z]+/'


@pytest.mark.parametrize(
    ("constraints", "partial", "pattern"),
    [
        (
            Constraints(grammar=SQL),
            "SELECT a, b, c, d, e, f, g, h, i, j, k, l",
            r"SELECT [a-z]+(, [a-z]+)* FROM [a-z]+;",
        ),
        (
            Constraints(grammar='root ::= "SELECT " col (", " col)* " FROM " col ";"\ncol ::= [a-z]+'),
            "SELECT a, b, c, d, e, f, g, h",
            r"SELECT [a-z]+(, [a-z]+)* FROM [a-z]+;",
        ),
        (Constraints(regex="[0-9]+(-[0-9]+)*;"), "1000000000", r"[0-9]+(-[0-9]+)*;"),
        (
            Constraints(regex_patterns=["[a-z]+@[a-z]+[.]com", "[0-9]{3}"]),
            "ab@cdefghijklmnopqrstuvwxyz",
            r"[a-z]+@[a-z]+[.]com|[0-9]{3}",
        ),
    ],
    ids=["lark-repetition", "gbnf", "regex-repetition", "regex-patterns"],
)
def test_general_grammars_close_where_a_repetition_would_run_on(
    compiler: Any, hf: Any, constraints: Constraints, partial: str, pattern: str
) -> None:
    """The budget is exactly what the model used: the structure is finished by dropping some of its
    last tokens, never by continuing the repetition (another column, another digit)."""
    budget = len(hf.encode(partial, add_special_tokens=False))
    text, closing = _close(compiler, hf, constraints, partial, budget=budget)
    assert text is not None, closing
    assert re.fullmatch(pattern, text), text
    assert closing.dropped > 0
    compiled, _ = compiler.compile(constraints, budget)
    ids = hf.encode(text, add_special_tokens=False)
    assert compiler.verify(compiled, text, ids, "stop").satisfied


@pytest.mark.parametrize(
    ("constraints", "case"),
    [
        (Constraints(json_schema=PERSON), ('{"name": "A"', "abort", "cut_short")),
        (Constraints(json_schema=PERSON), ('{"name": "A"', "length", "budget_exhausted")),
        (Constraints(json_schema=PERSON), ("not json", "stop", "not_json")),
        (Constraints(json_schema=PERSON), ('{"name": "A"}', "stop", "schema_mismatch")),
        (Constraints(regex="[0-9]{3}"), ("12a", "stop", "regex_mismatch")),
        (Constraints(grammar='start: "ab" "cd"'), ("ab", "stop", "incomplete")),
        (Constraints(grammar='start: "ab" "cd"'), ("ax", "stop", "grammar_mismatch")),
        (Constraints(token_mask={"allowed_tokens": [42]}), ("x", "stop", "mask_violation")),
    ],
)
def test_every_unsatisfied_verdict_has_a_reason_code(
    compiler: Any, hf: Any, constraints: Constraints, case: tuple[str, str, str]
) -> None:
    text, finish, code = case
    compiled, _ = compiler.compile(constraints, 64)
    ids = hf.encode(text, add_special_tokens=False)
    verdict = compiler.verify(compiled, text, ids, finish)
    assert (verdict.satisfied, verdict.code) == (False, code)
    assert verdict.error


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ('<tool_call>{"name": "add", "arguments": {"a": 1,}}</tool_call>', "tool_call_malformed"),
        ('<tool_call>{"name": "sub", "arguments": {"a": 1}}</tool_call>', "tool_unknown"),
        ('<tool_call>{"name": "add", "arguments": {"a": "x"}}</tool_call>', "tool_arguments_invalid"),
    ],
)
def test_tool_call_verdicts_have_reason_codes(text: str, code: str) -> None:
    from modal_service.constraints.verify import check_tool_calls

    tools = {"add": {"type": "object", "properties": {"a": {"type": "integer"}}}}
    verdict = check_tool_calls(text, tools)
    assert (verdict.satisfied, verdict.code) == (False, code)


@pytest.mark.parametrize(
    ("constraints", "produced", "returned"),
    [
        (Constraints(choice=["yes please", "no thanks"]), "yes please", "yes "),
        (Constraints(grammar='start: "yes please" | "no thanks"'), "yes please", "yes "),
        (Constraints(choice=["red apple"]), "red apple", "red "),
    ],
)
def test_a_stop_string_cut_is_checked_on_the_text_returned(
    compiler: Any, hf: Any, constraints: Constraints, produced: str, returned: str
) -> None:
    # vLLM cuts the text at a stop string but keeps the token that holds it: the check replays what
    # the caller gets, so "yes " is not a satisfied "yes please"
    compiled, _ = compiler.compile(constraints, 64)
    ids = hf.encode(produced, add_special_tokens=False)
    assert compiler.verify(compiled, produced, ids, "stop").satisfied
    verdict = compiler.verify(compiled, returned, ids, "stop")
    assert (verdict.satisfied, verdict.code) == (False, "incomplete")


def test_a_tool_call_cut_by_a_stop_string_is_not_satisfied(compiler: Any, hf: Any) -> None:
    from langchain_ananke.protocol import ToolSpec
    from modal_service.constraints.compiled import ToolTurn

    weather = ToolSpec.model_validate(
        {
            "function": {
                "name": "weather",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            }
        }
    )
    compiled, _ = compiler.compile(None, 64, tools=ToolTurn((weather,), "required", True))
    call = '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    ids = hf.encode(call, add_special_tokens=False)
    whole = compiler.verify(compiled, call, ids, "stop")
    assert whole.satisfied
    assert whole.tool_calls is not None
    cut = call[: call.index("</tool_call>")]  # stop: ["</tool_call>"]
    verdict = compiler.verify(compiled, cut, ids, "stop")
    assert verdict.satisfied is False
    assert verdict.tool_calls is None


def test_a_call_marker_without_a_complete_call_is_not_satisfied() -> None:
    from modal_service.constraints.verify import check_tool_calls

    verdict = check_tool_calls('<tool_call>\n{"name": "weather"', {"weather": {"type": "object"}})
    assert (verdict.satisfied, verdict.code) == (False, "tool_call_malformed")


def test_every_standard_format_is_checked() -> None:
    # jsonschema skips a format whose checker needs a package that is missing: the server depends on
    # its format extra, so here none is missing
    from modal_service.constraints.verify import UNCHECKED_FORMATS

    assert not UNCHECKED_FORMATS, UNCHECKED_FORMATS


@pytest.mark.parametrize(
    ("fmt", "bad", "good"),
    [
        ("date-time", "2023-02-29T00:00:00Z", "2024-02-29T00:00:00Z"),
        ("time", "25:00:00Z", "23:59:59Z"),
        ("duration", "P1Y2", "P1Y2M"),
        ("hostname", "-bad-.example", "example.com"),
        ("uri", "not a uri", "https://example.com/a"),
        ("iri", "  ", "https://example.com/\u00e9"),
    ],
)
def test_formats_are_checked(fmt: str, bad: str, good: str) -> None:
    from modal_service.constraints.verify import verify_json

    schema = {"type": "object", "properties": {"v": {"type": "string", "format": fmt}}}
    assert verify_json(schema, json.dumps({"v": good})).satisfied
    verdict = verify_json(schema, json.dumps({"v": bad}))
    assert (verdict.satisfied, verdict.code) == (False, "schema_mismatch")


def test_a_format_that_cannot_be_checked_is_never_satisfied(monkeypatch: pytest.MonkeyPatch) -> None:
    from modal_service.constraints import verify

    monkeypatch.setattr(verify, "UNCHECKED_FORMATS", frozenset({"uri-template"}))
    schema = {"type": "array", "items": [{"type": "string", "format": "uri-template"}]}
    verdict = verify.verify_json(schema, '["/a{b}"]')
    assert (verdict.satisfied, verdict.code) == (False, "unverifiable")
    assert "uri-template" in (verdict.error or "")
    assert verify.verify_json({"type": "string", "format": "uri"}, '"https://a.b"').satisfied


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "integer", "minimum": 1e300},
        {"type": "integer", "minimum": 9007199254740993, "maximum": 9007199254740993},
        {
            "type": "object",
            "properties": {"n": {"type": "integer", "maximum": -1e300}},
            "required": ["n"],
        },
    ],
)
def test_bounds_the_mask_cannot_hold_are_not_exact(compiler: Any, schema: dict[str, Any]) -> None:
    # llguidance clamps a bound to 64 bits and rounds it through a double: such a schema is never
    # compiled as exact; with no instance that passes the full check it is refused up front
    from modal_service.constraints.compiled import ConstraintError

    with pytest.raises(ConstraintError):
        compiler.compile(Constraints(json_schema=schema), 40)


def test_large_bounds_with_an_instance_are_approximated_and_checked(compiler: Any) -> None:
    from modal_service.constraints.schema import inexact_number_bounds

    schema = {"type": "integer", "minimum": 5, "maximum": 2**60}
    compiled, _ = compiler.compile(Constraints(json_schema=schema), 40)
    assert compiled.approximate
    assert "2**53" in (compiled.approximation or "")
    assert inexact_number_bounds({"type": "integer", "minimum": 3, "maximum": 9}) is None
    assert inexact_number_bounds({"const": {"minimum": 1e300}}) is None  # data, not a bound
    assert inexact_number_bounds({"items": [{"maximum": 2**54}]})


@pytest.mark.parametrize(
    "constraints",
    [
        Constraints(json_schema={"type": "integer", "minimum": -1e20, "maximum": -1e20}),
        Constraints(
            json_schema={"type": "object", "properties": {"n": {"type": "integer", "maximum": -1e300}}}
        ),
        Constraints(json_schema={"type": "integer", "exclusiveMinimum": -1e20, "exclusiveMaximum": -1e19}),
        Constraints(grammar='start: %json {"type": "integer", "minimum": -1e20, "maximum": -1e20}'),
    ],
)
def test_bounds_that_crashed_llguidance_are_refused(compiler: Any, constraints: Constraints) -> None:
    # each of these was a segmentation fault of the whole process in llguidance's validate_grammar
    from modal_service.constraints.compiled import ConstraintError

    with pytest.raises(ConstraintError, match=r"-2\*\*63"):
        compiler.compile(constraints, 40)


def test_a_tool_whose_parameters_crashed_llguidance_is_refused(compiler: Any) -> None:
    from langchain_ananke.protocol import ToolSpec
    from modal_service.constraints.compiled import ConstraintError, ToolTurn

    params = {"type": "object", "properties": {"n": {"type": "integer", "maximum": -1e20}}, "required": ["n"]}
    tool = ToolSpec.model_validate({"function": {"name": "f", "parameters": params}})
    with pytest.raises(ConstraintError, match=r"-2\*\*63"):
        compiler.compile(None, 40, tools=ToolTurn((tool,), "required", True))
    # an ordinary negative bound is fine
    ok = {"type": "object", "properties": {"n": {"type": "integer", "maximum": -5}}, "required": ["n"]}
    compiler.compile(Constraints(json_schema=ok), 40)


@pytest.mark.parametrize(
    ("schema", "needle"),
    [
        ({"const": float("inf")}, "not finite"),  # what JSON's 1e400 parses to
        ({"properties": {"a": {"enum": [1, float("-inf")]}}}, "not finite"),
        ({"type": "integer", "minimum": 2**64 + 1}, "does not fit in 64 bits"),
        ({"enum": [-(2**70)]}, "does not fit in 64 bits"),
    ],
)
def test_numbers_the_grammar_compiler_cannot_read_are_named(
    compiler: Any, schema: dict[str, Any], needle: str
) -> None:
    # before: 1e400 passed here and the engine refused the request without naming anything; a 65-bit
    # integer was "invalid JSON Schema: Value is not JSON serializable"
    from modal_service.constraints.compiled import ConstraintError

    with pytest.raises(ConstraintError, match=needle):
        compiler.compile(Constraints(json_schema=schema), 40)


@pytest.mark.parametrize(
    ("regex", "text", "satisfied"),
    [
        ("[[:digit:]]{3}", "123", True),  # a POSIX class; Python's re reads "[[:digit:]" then "]"
        ("[[:alpha:]]+ [[:alpha:]]+", "nil xt", True),
        ("[a-c--b]", "b", False),  # a class difference; Python's re reads a range from "-" to "b"
        (r"\w", "\u00b2", False),  # "²" is not a word character in Rust's regex; it is in Python's re
        (r"\s", "\x1c", False),
    ],
)
def test_a_regex_is_checked_in_the_dialect_it_is_enforced_in(
    compiler: Any, hf: Any, regex: str, text: str, *, satisfied: bool
) -> None:
    # The engine's mask reads the regex as Rust's regex crate does; a check in another dialect
    # called output the mask produced unsatisfied (found by generating under "[[:digit:]]{3}")
    compiled, _ = compiler.compile(Constraints(regex=regex), 16)
    ids = hf.encode(text, add_special_tokens=False)
    verdict = compiler.verify(compiled, text, ids, "stop")
    assert verdict.satisfied is satisfied, verdict.error
    if not satisfied:
        assert verdict.code == "regex_mismatch"


@pytest.mark.parametrize(
    ("patterns", "bad"),
    [
        (["a)|(?:b", "c"], 0),  # joined, "(?:a)|(?:b)|(?:c)" is a valid regex
        (["(?:x", ")|(?:zz"], 0),
        (["[0-9]+", "(?=a)a"], 1),
    ],
)
def test_each_regex_pattern_must_be_a_regex_on_its_own(compiler: Any, patterns: list[str], bad: int) -> None:
    from modal_service.constraints.compiler import ConstraintError

    with pytest.raises(ConstraintError) as caught:
        compiler.compile(Constraints(regex_patterns=patterns), 16)
    assert caught.value.detail is not None
    assert caught.value.detail["field"] == f"constraints.regex_patterns.{bad}"


@pytest.mark.parametrize(
    ("grammar", "text", "satisfied"),
    [
        ('start: "yes" EOS', "yes", True),  # the grammar names the token the engine stopped on
        ('start: "yes"', "yes", True),
        ('start: "yes" "no" EOS', "yes", False),
        ('start: "yes" "no"', "yes", False),
    ],
)
def test_a_grammar_may_end_with_the_end_of_sequence_token(
    compiler: Any, hf: Any, grammar: str, text: str, *, satisfied: bool
) -> None:
    # Found on the running service: under 'start: "a" <[2]>' the output "a" + <|im_end|> was reported
    # incomplete, the end-of-sequence token being left out of the replay
    eos = hf.eos_token_id
    compiled, _ = compiler.compile(Constraints(grammar=grammar.replace("EOS", f"<[{eos}]>")), 16)
    ids = [*hf.encode(text, add_special_tokens=False), eos]
    verdict = compiler.verify(compiled, text, ids, "stop")
    assert verdict.satisfied is satisfied, verdict.error


@pytest.mark.parametrize(
    ("choices", "bad"), [(["<|im_end|>"], 0), (["<|endoftext|>"], 0), (["no", "a<|im_start|>b"], 1)]
)
def test_a_choice_spelling_a_special_token_is_refused(compiler: Any, choices: list[str], bad: int) -> None:
    # Found on the running service: under {"choice": ["<|im_end|>"]} the mask offered only the special
    # token <|im_end|>, the grammar then refused it, and the engine ended the request with nothing
    from modal_service.constraints.compiler import ConstraintError

    with pytest.raises(ConstraintError) as caught:
        compiler.compile(Constraints(choice=choices), 16)
    assert caught.value.detail is not None
    assert caught.value.detail["field"] == f"constraints.choice.{bad}"


def test_a_choice_with_ordinary_angle_brackets_is_accepted(compiler: Any) -> None:
    compiled, _ = compiler.compile(Constraints(choice=["<b>", "<|x|>", "im_end"]), 16)
    assert compiled is not None


def test_an_empty_choice_entry_is_named(compiler: Any) -> None:
    from modal_service.constraints.compiler import ConstraintError

    with pytest.raises(ConstraintError, match=r"constraints\.choice\.1: choice entries") as caught:
        compiler.compile(Constraints(choice=["a", ""]), 16)
    assert caught.value.detail == {"field": "constraints.choice.1"}
