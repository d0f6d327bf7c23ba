"""The independent re-check: only this decides ``constraint_satisfied``.

It does not trust the engine's mask. JSON is parsed and validated with ``jsonschema`` against the
caller's full schema (never the capped or approximated one the engine enforced); regexes, grammars and
choices are replayed through a fresh llguidance matcher over the produced tokens (the returned text's
own where a stop string cut the text short of them). A regex is checked in the dialect it is enforced
in (Rust's ``regex``): Python's ``re`` reads ``[[:digit:]]``, ``[a-z--aeiou]`` and ``\\w`` otherwise, and
would call right output wrong (or wrong output right). A token mask is checked by set membership. Tool
calls are parsed and each call's arguments validated against its tool's schema; an agent turn (tools
plus an answer schema) is checked on whichever branch it took, and the verdict says which.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

import jsonschema
import llguidance

from langchain_ananke.protocol import ConstraintErrorCode, ToolCall
from modal_service.constraints.compiled import CompiledConstraint
from modal_service.constraints.matchers import MatcherPool
from modal_service.constraints.schema import schema_nodes
from modal_service.constraints.tools import is_call, parse_tool_calls

Branch = Literal["tool_calls", "answer"]


@dataclass
class Verdict:
    """The outcome of the re-check; for a tool grammar, also the calls and the branch taken."""

    satisfied: bool
    error: str | None = None
    tool_calls: list[ToolCall] | None = None
    branch: Branch | None = None
    code: ConstraintErrorCode | None = None
    """Why it is not satisfied, as a stable code (``error`` says it for people)."""


STANDARD_FORMATS = frozenset(
    [
        "date-time",
        "date",
        "time",
        "duration",
        "email",
        "idn-email",
        "hostname",
        "idn-hostname",
        "ipv4",
        "ipv6",
        "uri",
        "uri-reference",
        "iri",
        "iri-reference",
        "uuid",
        "uri-template",
        "json-pointer",
        "relative-json-pointer",
        "regex",
    ]
)
"""JSON Schema 2020-12's formats. jsonschema checks some only with optional packages (its
``format-nongpl`` extra, a dependency of the server) and silently skips the others."""
UNCHECKED_FORMATS = STANDARD_FORMATS - set(jsonschema.Draft202012Validator.FORMAT_CHECKER.checkers)
"""Standard formats this installation cannot check (empty where the server's dependencies are in)."""


def _formats(schema: Any) -> set[str]:
    return {node["format"] for node in schema_nodes(schema) if isinstance(node.get("format"), str)}


def json_validator(schema: dict[str, Any]) -> jsonschema.protocols.Validator:
    """A validator for the draft the schema declares (Draft 2020-12 when it declares none), formats
    checked: the one the final check, the witness and the compile-time search all use."""
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


class Verifier:
    """Re-checks outputs for one tokenizer (whose end-of-sequence tokens are not output)."""

    def __init__(
        self,
        tokenizer: llguidance.LLTokenizer,
        eos_token_ids: frozenset[int],
        matchers: MatcherPool | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        self._eos = eos_token_ids
        self._matchers = matchers or MatcherPool(tokenizer)

    def verify(
        self, compiled: CompiledConstraint, text: str, token_ids: list[int], finish_reason: str
    ) -> Verdict:
        """Re-check the final output independently of the engine's mask.

        Output cut by ``max_tokens`` satisfies a grammar constraint only if it is complete (the whole
        schema validates, the matcher accepts): a cut that happened to land on a complete instance is
        not reported unsatisfied, and every other cut is. A token mask has no notion of complete, so
        a cut there is never satisfied.
        """
        if finish_reason in ("abort", "timeout"):
            return Verdict(False, f"generation was cut short ({finish_reason})", code="cut_short")
        verdict = self._complete(compiled, text, token_ids)
        if finish_reason == "length" and (not verdict.satisfied or compiled.allowed_token_ids is not None):
            return Verdict(
                False,
                "generation stopped at max_tokens before the constraint completed",
                code="budget_exhausted",
            )
        return verdict

    def _complete(self, compiled: CompiledConstraint, text: str, token_ids: list[int]) -> Verdict:
        body = [t for t in token_ids if t not in self._eos]
        if compiled.allowed_token_ids is not None:
            stray = sorted({t for t in body if t not in compiled.allowed_token_ids})
            if stray:
                return Verdict(
                    False, f"tokens outside the mask were generated: {stray[:20]}", code="mask_violation"
                )
            return Verdict(True)
        if compiled.tools is not None:
            return self._agent_turn(compiled, text, self._as_returned(text, body))
        if compiled.json_schema is not None:
            return verify_json(compiled.json_schema, text)  # the text decides: no replay
        end = token_ids[-1] if token_ids and token_ids[-1] in self._eos else None
        verdict = self._matcher(compiled, self._as_returned(text, body), end=end)
        if compiled.regexes and not verdict.satisfied:
            verdict.code = "regex_mismatch"
        return verdict

    def _as_returned(self, text: str, body: list[int]) -> list[int]:
        """The tokens to replay: the ones produced, or, where a stop string cut the text short of them
        (vLLM keeps the token that holds the stop string, and cuts the text), the returned text's own.
        What is checked is what the caller gets."""
        returned = text.encode()
        produced = self._tokenizer.decode_bytes(body)
        if produced != returned and produced.startswith(returned):
            return list(self._tokenizer.tokenize_bytes(returned))
        return body

    def _agent_turn(self, compiled: CompiledConstraint, text: str, body: list[int]) -> Verdict:
        """The grammar first, then the branch taken: calls against their tools, or the answer."""
        assert compiled.tools is not None  # noqa: S101 - the caller checked
        grammar = self._matcher(compiled, body)
        if not grammar.satisfied:
            return grammar
        if is_call(text):
            verdict = check_tool_calls(text, compiled.tools)
            verdict.branch = "tool_calls"
            return verdict
        verdict = (
            verify_json(compiled.json_schema, text) if compiled.json_schema is not None else Verdict(True)
        )
        verdict.branch = "answer"
        return verdict

    def _matcher(self, compiled: CompiledConstraint, tokens: list[int], *, end: int | None = None) -> Verdict:
        """Replay ``tokens`` (end-of-sequence tokens left out); ``end``: the end-of-sequence token the
        output ended with, which completes the match where the grammar names it (``<[2]>``,
        ``<|im_end|>``): the engine stopped on it, and no output text stands for it."""
        assert compiled.ll_grammar is not None  # noqa: S101 - token masks are checked above
        matcher = self._matchers.fresh(compiled.ll_grammar)
        if not matcher.consume_tokens(tokens):
            error = f"output does not match the {compiled.kind}: {matcher.get_error()}"
            return Verdict(False, error, code="grammar_mismatch")
        if not matcher.is_accepting() and not (
            end is not None and matcher.consume_tokens([end]) and matcher.is_accepting()
        ):
            return Verdict(False, f"output is an incomplete {compiled.kind} match", code="incomplete")
        return Verdict(True)


def verify_json(schema: dict[str, Any], text: str) -> Verdict:
    """``text`` parses as JSON and the full ``schema`` validates it; never satisfied where the schema
    uses a standard format this installation cannot check."""
    if UNCHECKED_FORMATS and (unchecked := sorted(_formats(schema) & UNCHECKED_FORMATS)):
        error = f"format {', '.join(unchecked)} cannot be checked here (jsonschema's format extra is missing)"
        return Verdict(False, error, code="unverifiable")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return Verdict(False, f"output is not valid JSON: {exc}", code="not_json")
    try:
        errors = sorted(json_validator(schema).iter_errors(value), key=lambda e: list(e.path))
    except Exception as exc:  # unresolvable $ref, bad regex in the schema, ...: never valid by default
        return Verdict(False, f"output could not be validated against the schema: {exc}", code="unverifiable")
    if errors:
        first = errors[0]
        error = f"output does not validate: {first.message} at {list(first.path)}"
        return Verdict(False, error, code="schema_mismatch")
    return Verdict(True)


def check_tool_calls(text: str, tools: dict[str, dict[str, Any]]) -> Verdict:
    """Tool calls parse, name a tool, and their arguments validate against its schema."""
    try:
        calls = parse_tool_calls(text)
    except ValueError as exc:
        return Verdict(False, f"tool call does not parse: {exc}", code="tool_call_malformed")
    for call in calls:
        if call.name not in tools:
            return Verdict(False, f"tool call names an unknown tool: {call.name}", code="tool_unknown")
        errors = list(json_validator(tools[call.name]).iter_errors(call.arguments))
        if errors:
            error = f"arguments of {call.name} do not validate: {errors[0].message}"
            return Verdict(False, error, code="tool_arguments_invalid")
    if not calls:
        return Verdict(False, "no complete tool call in the output", code="tool_call_malformed")
    return Verdict(True, tool_calls=calls)
