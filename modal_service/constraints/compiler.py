"""Constraint compiler: protocol constraints and tool turns -> vLLM structured-output params.

Data flow per request:

1. :meth:`ConstraintCompiler.compile` is the one entry point for every kind: a
   :class:`~langchain_ananke.protocol.Constraints`, a tool turn (:class:`ToolTurn`), or both (an agent
   turn: tool calls or an answer valid for the schema, one grammar). It builds the llguidance grammar
   the same way vLLM's ``guidance`` backend will, and validates it up front against the model's
   tokenizer with bounded parser limits, so a bad constraint is a 422 before any token is generated.
   It also finds the shortest output (:mod:`~modal_service.constraints.witness` and the search of
   :mod:`~modal_service.constraints.closing`), for ``max_tokens_too_small`` and closing on budget.
   Results are cached by content hash (compiling costs 1-1000 ms; the cache hit costs a dict lookup).
2. vLLM generates under ``CompiledConstraint.structured_outputs`` (or ``allowed_token_ids``).
3. :meth:`ConstraintCompiler.verify` hands the output to :mod:`~modal_service.constraints.verify`,
   which alone decides ``constraint_satisfied``.

The module is one piece (over 450 lines) because compile, cache and shortest-output search share the
tokenizer, the parser limits and the matcher they build; verification, closing, the witness and the
schema walkers live in their own modules.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import jsonschema
import llguidance
from llguidance.gbnf_to_lark import any_to_lark, is_lark_syntax
from vllm.sampling_params import StructuredOutputsParams

from langchain_ananke.protocol import Constraints
from modal_service.constraints.closing import Closer, Closing
from modal_service.constraints.compiled import CompiledConstraint, ConstraintError, ToolTurn
from modal_service.constraints.matchers import MatcherPool
from modal_service.constraints.schema import (
    apply_length_caps,
    count_grammar_rules,
    exceeds_depth,
    finite_instance_error,
    inexact_number_bounds,
)
from modal_service.constraints.tools import Markers, is_call, tool_grammar
from modal_service.constraints.verify import Verdict, Verifier, json_validator
from modal_service.constraints.witness import minimal_instance
from modal_service.limits import Limits

__all__ = ["CompiledConstraint", "ConstraintCompiler", "ConstraintError", "ToolTurn"]


def _digest(kind: str, payload: Any) -> str:
    text = json.dumps([kind, payload], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


_UPPER_BOUND = re.compile(r'\\?"(exclusiveMaximum|maximum)\\?"\s*:\s*(-[0-9][0-9.eE+-]*)')
LOWEST_HELD_INTEGER = -(2**63)


def _refuse_crashing_bounds(ll_grammar: str) -> None:
    """A 422 for an upper bound at or below -2**63 in any JSON schema of the grammar (a schema, a
    tool's parameters, a Lark ``%json``): llguidance 1.7.6 clamps integer bounds to 64 bits, and an
    integer range whose bounds both clamp to the lowest one crashed the process (a segmentation fault
    in ``validate_grammar``, measured with ``{"type": "integer", "minimum": -1e20, "maximum": -1e20}``,
    and with ``maximum`` alone once the length caps add a ``minimum``). No integer there is one the
    mask can hold anyway."""
    for match in _UPPER_BOUND.finditer(ll_grammar):
        try:
            value = float(match[2])
        except ValueError:
            continue
        if value <= LOWEST_HELD_INTEGER:
            raise ConstraintError(
                f"{match[1]} {match[2]} is at or below -2**63, the lowest integer the token mask can hold",
                {"keyword": match[1], "value": match[2]},
            )


def hidden_token_ids(hf_tokenizer: Any) -> frozenset[int]:
    """The ids of ``hf_tokenizer``'s special tokens, which decoding with ``skip_special_tokens`` (vLLM's
    default) leaves out of the text: the named ones, and every added token marked special."""
    added = getattr(hf_tokenizer, "added_tokens_decoder", {}) or {}
    ids = {i for i, tok in added.items() if getattr(tok, "special", False)}
    return frozenset(ids | set(getattr(hf_tokenizer, "all_special_ids", ()) or ()))


class ConstraintCompiler:
    """Compiles and verifies constraints for one tokenizer. Thread-safe; compile results are cached."""

    def __init__(
        self,
        tokenizer: llguidance.LLTokenizer,
        *,
        vocab_size: int,
        eos_token_ids: frozenset[int],
        limits: Limits | None = None,
        markers: Markers | None = None,
        hidden_token_ids: frozenset[int] | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        # Tokens the detokenizer leaves out of the text (see hidden_token_ids); None: every token
        # llguidance calls special (which includes added tokens the text keeps, e.g. Qwen's <tool_call>).
        self._hidden = hidden_token_ids
        self._vocab_size = vocab_size
        self._eos = eos_token_ids
        self.limits = limits or Limits()
        self._markers = markers or Markers()
        matchers = MatcherPool(tokenizer, self.limits.cache_size)
        self._closer = Closer(tokenizer, matchers=matchers)
        self._verifier = Verifier(tokenizer, eos_token_ids, matchers)
        self._cache: OrderedDict[str, CompiledConstraint | ConstraintError] = OrderedDict()
        self._lock = threading.Lock()
        self._building: dict[str, threading.Event] = {}

    # ----------------------------------------------------------------------------- compile
    def compile(
        self, constraints: Constraints | None, max_tokens: int = 256, *, tools: ToolTurn | None = None
    ) -> tuple[CompiledConstraint | None, bool]:
        """Validate and compile; returns the result (None: nothing is constrained) and whether it
        came from the cache.

        ``max_tokens`` sets the length caps for JSON (see :func:`length_caps_for`). With ``tools``,
        the grammar is the agent turn's (:func:`~modal_service.constraints.tools.tool_grammar`); a
        ``json_schema`` (or ``json_object``) in ``constraints`` is then its answer branch.

        Raises:
            ConstraintError: the constraint is malformed, too large, or not supported by llguidance.
        """
        payload = constraints.model_dump(mode="json", exclude_none=True) if constraints is not None else {}
        if tools is not None:
            payload["tools"] = [t.model_dump(mode="json", exclude_none=True) for t in tools.tools]
            payload["tool_choice"], payload["parallel"] = tools.choice, tools.parallel
        elif constraints is None:
            return None, False
        size = len(json.dumps(payload))
        if size > self.limits.max_constraint_bytes:
            raise ConstraintError(
                f"constraint is {size} bytes; the limit is {self.limits.max_constraint_bytes}",
                {"size": size, "limit": self.limits.max_constraint_bytes},
            )
        # Caps bound JSON only: keying other kinds (and tool calls without an answer schema) on them
        # would compile the same grammar again for every max_tokens.
        caps = None
        if constraints is not None and constraints.length_caps and constraints.kind in _JSON_KINDS:
            caps = length_caps_for(max_tokens)
        if tools is not None:
            turn = tools
            answer = _answer_schema(constraints)
            if answer is None and turn.choice == "none":
                return None, False
            return self._cached(
                _digest("tools", [payload, caps]),
                lambda: _uncapped_if_caps_fail(
                    lambda caps: self._build_turn(turn, answer, constraints, caps), caps
                ),
            )
        assert constraints is not None  # noqa: S101 - checked above
        c = constraints
        return self._cached(
            _digest(c.kind, [payload, caps]),
            lambda: _uncapped_if_caps_fail(lambda caps: self._build(c, caps), caps),
        )

    def verify(
        self, compiled: CompiledConstraint, text: str, token_ids: list[int], finish_reason: str
    ) -> Verdict:
        """The independent re-check (:class:`~modal_service.constraints.verify.Verifier`)."""
        return self._verifier.verify(compiled, text, token_ids, finish_reason)

    def _cached(self, key: str, build: Any) -> tuple[CompiledConstraint, bool]:
        """The cached result for ``key``, else ``build()``'s, cached (errors too).

        Single flight: while one thread builds a key, others asking for it wait for that result
        instead of building it again. A burst of requests with one new schema (each compile runs
        the shortest-output search, up to ~1 s of GIL-holding work) compiles it once.
        """
        while True:
            with self._lock:
                hit = self._cache.get(key)
                if hit is not None:
                    self._cache.move_to_end(key)
                    break
                building = self._building.get(key)
                if building is None:
                    building = self._building[key] = threading.Event()
                    owner = True
                else:
                    owner = False
            if not owner:
                building.wait()
                continue  # now cached (or the builder failed unexpectedly: build here instead)
            try:
                try:
                    built: CompiledConstraint | ConstraintError = build()
                except ConstraintError as exc:
                    built = exc
                with self._lock:
                    self._cache[key] = built
                    while len(self._cache) > self.limits.cache_size:
                        self._cache.popitem(last=False)
            finally:
                with self._lock:
                    del self._building[key]
                building.set()
            return _unwrap(built), False
        return _unwrap(hit), True

    def _build(self, c: Constraints, caps: tuple[int, int] | None) -> CompiledConstraint:
        kind = c.kind
        if c.json_schema is not None or c.json_object:
            schema: dict[str, Any] = c.json_schema if c.json_schema is not None else {"type": "object"}
            return self._build_json(kind, schema, c, caps)
        if c.regex is not None or c.regex_patterns is not None:
            patterns = (c.regex,) if c.regex is not None else tuple(c.regex_patterns or ())
            if len(patterns) > 1:
                self._check_patterns(patterns)
            joined = patterns[0] if len(patterns) == 1 else "|".join(f"(?:{p})" for p in patterns)
            ll = llguidance.LLMatcher.grammar_from_regex(joined)
            return self._finish(kind, StructuredOutputsParams(regex=joined), ll, regexes=patterns)
        if c.grammar is not None:
            rules = count_grammar_rules(c.grammar)
            if rules > self.limits.max_grammar_rules:
                raise ConstraintError(
                    f"grammar has {rules} rules; the limit is {self.limits.max_grammar_rules}",
                    {"rules": rules, "limit": self.limits.max_grammar_rules},
                )
            lark = grammar_to_lark(c.grammar)
            return self._finish(kind, StructuredOutputsParams(grammar=lark), lark_to_ll(lark))
        if c.choice is not None:
            self._check_choices(c.choice)
            lark = "start: " + " | ".join(json.dumps(x) for x in c.choice)
            return self._finish(kind, StructuredOutputsParams(choice=list(c.choice)), lark_to_ll(lark))
        assert c.token_mask is not None  # noqa: S101 - Constraints guarantees exactly one kind
        return self._token_mask(c)

    def _check_choices(self, choices: list[str]) -> None:
        """A choice must not spell a token the output text leaves out (``<|im_end|>``,
        ``<|endoftext|>``): the tokenizer reads that text as the token, so the mask offers (or
        forces) it, and the request ends in the engine with nothing produced (measured on SmolLM2:
        finish ``abort``). An added token whose text the output keeps (Qwen2.5's ``<tool_call>``)
        works as a choice and is accepted. Each entry is a non-empty string."""
        for i, choice in enumerate(choices):
            field = f"constraints.choice.{i}"
            if not isinstance(choice, str) or not choice:
                raise ConstraintError(f"{field}: choice entries must be non-empty strings", {"field": field})
            ids = self._tokenizer.tokenize_str(choice)
            special = [
                t
                for t in ids
                if (t in self._hidden if self._hidden is not None else self._tokenizer.is_special_token(t))
            ]
            if special:
                raise ConstraintError(
                    f"{field} contains the text of the model's special token {special[0]}, which the token "
                    "mask cannot produce as text",
                    {"field": field, "special_token_ids": special},
                )

    def _check_patterns(self, patterns: tuple[str, ...]) -> None:
        """Each of ``regex_patterns`` must be a regex on its own: joined as ``(?:p1)|(?:p2)``, two
        broken ones can make a valid one (``a)|(?:b`` and ``c``), and an error about the joined
        regex would not say which pattern is wrong."""
        for i, pattern in enumerate(patterns):
            is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
                llguidance.LLMatcher.grammar_from_regex(pattern), self._tokenizer, limits=self._ll_limits()
            )
            if is_error:
                field = f"constraints.regex_patterns.{i}"
                raise ConstraintError(
                    f"{field} is not a regex llguidance accepts: {messages[0]}",
                    {"field": field, "llguidance": messages[0]},
                )

    def _build_turn(
        self,
        turn: ToolTurn,
        answer: dict[str, Any] | None,
        c: Constraints | None,
        caps: tuple[int, int] | None,
    ) -> CompiledConstraint:
        """One grammar for an agent turn: calls (each tool's arguments exact), or the answer."""
        tools = turn.schemas()
        if answer is None:
            lark = tool_grammar(list(turn.tools), turn.choice, turn.parallel, markers=self._markers)
            assert lark is not None  # noqa: S101 - compile() returned early for ("none", no answer)
            return self._finish("tools", StructuredOutputsParams(grammar=lark), lark_to_ll(lark), tools=tools)

        def attempt(engine_schema: dict[str, Any], **extra: Any) -> CompiledConstraint:
            lark = tool_grammar(list(turn.tools), turn.choice, turn.parallel, engine_schema, self._markers)
            assert lark is not None  # noqa: S101 - an answer schema always gives a grammar
            params = StructuredOutputsParams(grammar=lark)
            return self._finish("tools", params, lark_to_ll(lark), tools=tools, json_schema=answer, **extra)

        return self._json_modes(answer, c, caps, attempt)

    def _build_json(
        self, kind: str, schema: dict[str, Any], c: Constraints, caps: tuple[int, int] | None
    ) -> CompiledConstraint:
        """A JSON Schema constraint (see :meth:`_json_modes`)."""

        def attempt(engine_schema: dict[str, Any], **extra: Any) -> CompiledConstraint:
            try:
                ll = llguidance.LLMatcher.grammar_from_json_schema(engine_schema)
            except ValueError as exc:
                raise ConstraintError(f"invalid JSON Schema: {exc}") from exc
            params = StructuredOutputsParams(json=engine_schema)
            return self._finish(kind, params, ll, json_schema=schema, **extra)

        return self._json_modes(schema, c, caps, attempt)

    def _json_modes(
        self,
        schema: dict[str, Any],
        c: Constraints | None,
        caps: tuple[int, int] | None,
        attempt: Callable[..., CompiledConstraint],
    ) -> CompiledConstraint:
        """Exact when llguidance can enforce every keyword; otherwise (unless ``strict``) compiled
        leniently, with ``oneOf`` as ``anyOf``, and left to the full-schema check to decide.

        ``attempt(engine_schema, **extra)`` compiles the engine's form of the schema: the caps
        applied, and the per-request options in ``x-guidance`` (which override vLLM's engine-wide
        JSON options, so the request's choice holds whatever the engine was started with).
        """
        _check_schema(schema)
        if exceeds_depth(schema, self.limits.max_schema_depth):
            raise ConstraintError(
                f"schema nests (or chains $refs) deeper than {self.limits.max_schema_depth} levels",
                {"limit": self.limits.max_schema_depth},
            )
        problem = finite_instance_error(schema)
        if problem:
            raise ConstraintError(problem)
        engine_base, n_caps = (
            apply_length_caps(schema, max_length=caps[0], max_items=caps[1]) if caps else (schema, 0)
        )
        options: dict[str, Any] = {"whitespace_flexible": c is not None and c.whitespace == "flexible"}

        def engine_schema() -> dict[str, Any]:  # a copy: never mutate the caller's
            return {**engine_base, "x-guidance": {**dict(engine_base.get("x-guidance") or {}), **options}}

        inexact = inexact_number_bounds(schema)
        try:
            if inexact:  # llguidance would compile it, but not hold it: approximate, then checked
                raise ConstraintError(inexact)
            return attempt(engine_schema(), caps_applied=n_caps)
        except ConstraintError as exact:
            if c is not None and c.strict:
                raise
            options |= {"lenient": True, "coerce_one_of": True}
            return attempt(
                engine_schema(), caps_applied=n_caps, approximate=True, approximation=exact.message
            )

    def _token_mask(self, c: Constraints) -> CompiledConstraint:
        assert c.token_mask is not None  # noqa: S101
        mask = c.token_mask
        ids = [*(mask.allowed_tokens or []), *(mask.forbidden_tokens or [])]
        bad = sorted({i for i in ids if not 0 <= i < self._vocab_size})
        if bad:
            raise ConstraintError(
                f"token ids out of the vocabulary (0..{self._vocab_size - 1}): {bad[:20]}",
                {"invalid_ids": bad[:100], "vocab_size": self._vocab_size},
            )
        allowed = set(mask.allowed_tokens) if mask.allowed_tokens else set(range(self._vocab_size))
        allowed -= set(mask.forbidden_tokens or [])
        allowed -= self._eos
        if not allowed:
            raise ConstraintError("token_mask leaves no token to generate")
        return CompiledConstraint(
            kind="token_mask",
            structured_outputs=None,
            ll_grammar=None,
            allowed_token_ids=frozenset(allowed),
        )

    def _finish(
        self,
        kind: str,
        params: StructuredOutputsParams,
        ll_grammar: str,
        **extra: Any,
    ) -> CompiledConstraint:
        started = time.perf_counter()
        _refuse_crashing_bounds(ll_grammar)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
            ll_grammar, self._tokenizer, limits=self._ll_limits()
        )
        if is_error:
            raise ConstraintError(
                f"llguidance rejected the {kind} constraint: {messages[0]}",
                {"llguidance": messages[0]},
            )
        # Constructing the matcher builds the lexer; it catches what validation leaves to runtime.
        matcher = llguidance.LLMatcher(self._tokenizer, ll_grammar, limits=self._ll_limits())
        if matcher.is_error():
            raise ConstraintError(
                f"llguidance rejected the {kind} constraint: {matcher.get_error()}",
                {"llguidance": matcher.get_error()},
            )
        # Only where the grammar's size bounds its forced text (schemas, tool specs, choices): a
        # regex or Lark repetition like ((ab){1000}){1000} forces megabytes, and a single mask
        # there takes 0.2 s. Those are still closed on budget at request time.
        shortest = (
            self._shortest(
                matcher,
                extra.get("json_schema"),
                extra.get("approximation") if extra.get("approximate") else None,
                calls=extra.get("tools") is not None,
            )
            if kind in SHORTEST_OUTPUT_KINDS
            else None
        )
        elapsed = (time.perf_counter() - started) * 1000
        return CompiledConstraint(
            kind=kind,
            structured_outputs=params,
            ll_grammar=ll_grammar,
            compile_ms=round(elapsed, 3),
            min_tokens=None if shortest is None else len(shortest),
            shortest_output=shortest,
            **extra,
        )

    def _shortest(
        self,
        matcher: llguidance.LLMatcher,
        schema: dict[str, Any] | None,
        approximation: str | None,
        *,
        calls: bool = False,
    ) -> tuple[int, ...] | None:
        """The shortest output found (its tokens) that the grammar accepts and, for a JSON Schema,
        the full schema validates; None when none was found.

        Two ways, the shorter wins: an instance built from the schema's keywords
        (:mod:`modal_service.constraints.witness`), and the token-level search from the start state. With a
        witness in hand the search only looks for something shorter, with a node budget scaled to
        it. An *approximated* schema is accepted only with such an instance: it proves that the full
        check can pass, and without one the schema is answered 422 (it may be unsatisfiable). In an
        agent turn (``calls``), a complete call is accepted as it is: the grammar holds each call's
        arguments to its tool's schema exactly.
        """
        validator = json_validator(schema) if schema is not None else None
        witness = self._witness(schema, matcher) if schema is not None else None
        accept = None
        if validator is not None:

            def accept(tokens: list[int]) -> bool:
                text = self._tokenizer.decode_str(tokens)
                if calls and is_call(text):
                    return True
                try:
                    return bool(validator.is_valid(json.loads(text)))
                except ValueError:
                    return False

        if witness is None:
            found = self._closer.smallest_tokens(matcher, limit=MIN_TOKENS_SEARCH_LIMIT, accept=accept)
        elif len(witness) > 1:
            nodes = min(len(witness), 256) + WITNESS_SEARCH_NODES
            found = self._closer.smallest_tokens(
                matcher, limit=len(witness) - 1, accept=accept, max_nodes=nodes
            )
        else:
            found = None
        shortest = min((tuple(t) for t in (witness, found) if t is not None), key=len, default=None)
        if approximation is not None and shortest is None:
            raise ConstraintError(
                "the schema uses keywords the token mask cannot enforce, so the server approximates it "
                "and checks every output against the full schema; it accepts such a schema only when "
                "it can construct one instance that passes that check, and it found none (the schema "
                f"may be unsatisfiable). What the mask cannot enforce: {approximation}",
                {"approximate": True, "approximation": approximation},
            )
        return shortest

    def _witness(self, schema: dict[str, Any], matcher: llguidance.LLMatcher) -> list[int] | None:
        """Tokens of :func:`minimal_instance`'s instance (which the full schema validates), if the
        grammar accepts them too. ``matcher`` is fresh, and is left at the start again."""
        ok, instance = minimal_instance(schema, string_for_pattern=self._string_for_pattern)
        if not ok:
            return None
        text = json.dumps(instance, separators=(",", ":"), ensure_ascii=False)
        tokens = self._tokenizer.tokenize_str(text)
        if matcher.is_error() or matcher.validate_tokens(tokens) != len(tokens):
            return None
        matcher.consume_tokens(tokens)
        complete = matcher.is_accepting()
        matcher.rollback(len(tokens))  # back to the start, for the search
        return tokens if complete else None

    def _string_for_pattern(self, pattern: str, low: int, high: int | None) -> str | None:
        """A short string that llguidance's regex engine matches in full (so ``pattern`` finds it)."""
        body = pattern[1:] if pattern.startswith("^") else pattern
        if body.endswith("$") and not body.endswith("\\$"):
            body = body[:-1]
        try:
            matcher = llguidance.LLMatcher(
                self._tokenizer, llguidance.LLMatcher.grammar_from_regex(body), limits=self._ll_limits()
            )
        except (ValueError, RuntimeError):
            return None
        if matcher.is_error():
            return None
        limit = max(low, 1) + 32 if high is None else high + 1
        found = self._closer.smallest_tokens(matcher, limit=limit, max_nodes=PATTERN_SEARCH_NODES)
        if found is None:
            return None
        text = self._tokenizer.decode_str(found)
        if len(text) < low or (high is not None and len(text) > high):
            return None
        return text

    def _ll_limits(self) -> llguidance.LLParserLimits:
        lim = self.limits
        return llguidance.LLParserLimits(
            initial_lexer_fuel=lim.initial_lexer_fuel,
            step_lexer_fuel=lim.step_lexer_fuel,
            max_grammar_size=lim.max_grammar_size,
            max_lexer_states=lim.max_lexer_states,
        )

    # ----------------------------------------------------------------------------- closing
    def close(
        self, compiled: CompiledConstraint, token_ids: list[int], *, budget: int, window: int
    ) -> Closing | None:
        """Finish an output that ``max_tokens`` cut short (see :mod:`modal_service.constraints.closing`)."""
        if compiled.ll_grammar is None:
            return None
        body = [t for t in token_ids if t not in self._eos]
        general = compiled.kind in ("grammar", "regex", "regex_patterns")
        closing = self._closer.close(compiled.ll_grammar, body, budget=budget, window=window, general=general)
        shortest = compiled.shortest_output
        if closing is None and shortest is not None and window >= len(body) and len(shortest) <= budget:
            # The search found no way to finish what the model wrote, but the whole output may be
            # rebuilt: the compile-time shortest output is known to fit and to be valid.
            return Closing(keep=0, suffix=list(shortest), dropped=len(body), nodes=0, rebuilt=True)
        return closing


#: How far the compile-time search for the shortest output looks (tokens). Large on purpose: a
#: search that goes straight to a long instance is fast (a 1,945-token one took 0.06 s); a failing
#: one stops at its deadline whatever the limit.
MIN_TOKENS_SEARCH_LIMIT = 8192
#: Search nodes on top of the witness's length, when the search looks for a shorter output than the
#: witness (a search that goes straight needs at most one node per token).
WITNESS_SEARCH_NODES = 64
#: Search nodes for a string that matches a ``pattern`` (building a witness).
PATTERN_SEARCH_NODES = 256
#: Constraint kinds whose shortest output is searched at compile time (for max_tokens_too_small).
SHORTEST_OUTPUT_KINDS = frozenset({"json_schema", "json_object", "tools", "choice"})


def _uncapped_if_caps_fail(
    build: Callable[[tuple[int, int] | None], CompiledConstraint], caps: tuple[int, int] | None
) -> CompiledConstraint:
    """``build(caps)``; if the caps derived from ``max_tokens`` make the constraint fail (a ``pattern``
    longer than the string cap empties its regex), ``build(None)``. The caps are the service's own
    bound, so they must never make a valid schema look invalid: without them the constraint either
    compiles (and a budget too small for its shortest output is ``max_tokens_too_small``), or its own
    error is the one to report."""
    try:
        return build(caps)
    except ConstraintError:
        if caps is None:
            raise
        return build(None)


def _unwrap(hit: CompiledConstraint | ConstraintError) -> CompiledConstraint:
    if isinstance(hit, ConstraintError):
        raise hit
    return hit


_JSON_KINDS = ("json_schema", "json_object")


def _answer_schema(c: Constraints | None) -> dict[str, Any] | None:
    """The answer schema of an agent turn; other kinds do not combine with tools."""
    if c is None:
        return None
    if c.json_schema is not None:
        return c.json_schema
    if c.json_object:
        return {"type": "object"}
    raise ConstraintError(
        f"a {c.kind} constraint does not combine with tools: only json_schema or json_object can be "
        "the answer of a turn that may also call tools",
        {"kind": c.kind},
    )


def length_caps_for(max_tokens: int) -> tuple[int, int]:
    """(maxLength, maxItems) for unbounded strings/arrays, from the request's token budget."""
    return max(16, min(256, max_tokens)), max(2, min(32, max_tokens // 8))


def _unreadable_number(node: Any) -> str | None:
    """Why a number in the schema cannot reach the grammar compiler intact, or None: JSON's ``1e400``
    parses to infinity (which no JSON text can carry onward), and llguidance reads integers of at most
    64 bits (a larger one failed as "Value is not JSON serializable")."""
    if isinstance(node, float) and not math.isfinite(node):
        return f"a number in the schema is not finite ({node}: beyond a double's range)"
    if isinstance(node, int) and not isinstance(node, bool) and abs(node) >= 2**64:
        return (
            f"the integer {node} in the schema does not fit in 64 bits, the most the grammar compiler reads"
        )
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    return next((why for why in map(_unreadable_number, children) if why), None)


def _check_schema(schema: dict[str, Any]) -> None:
    if problem := _unreadable_number(schema):
        raise ConstraintError(problem)
    try:
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ConstraintError(f"invalid JSON Schema: {exc.message}", {"path": list(exc.path)}) from exc
    except (TypeError, ValueError, LookupError) as exc:
        raise ConstraintError(f"invalid JSON Schema: {exc}") from exc


def grammar_to_lark(grammar: str) -> str:
    """Accept Lark as is; convert a GBNF/EBNF ``::=`` grammar, or say what is unsupported."""
    if not grammar.strip():
        raise ConstraintError("grammar is empty")
    if is_lark_syntax(grammar):
        return grammar
    try:
        return any_to_lark(grammar)
    except Exception as exc:  # the converter raises bare Exceptions with a position
        raise ConstraintError(
            f"could not convert the GBNF/EBNF grammar to Lark: {exc}",
            {"hint": "use llguidance Lark syntax (rule: ...) or GBNF (rule ::= ...)"},
        ) from exc


def lark_to_ll(lark: str) -> str:
    """The llguidance grammar for a Lark text."""
    return llguidance.LLMatcher.grammar_from_lark(lark)
