"""The Ananke wire protocol: one place for every request, response, stream event and error.

Data flows client -> service as a :class:`GenerateRequest`, and back as a
:class:`GenerateResponse` (one prompt), a :class:`BatchGenerateResponse` (a list of prompts), or a
stream of :class:`StreamEvent` frames over Server-Sent Events whose last frame carries the folded
response. Every non-2xx answer carries an :class:`ErrorBody`. ``GET /health`` answers a
:class:`HealthResponse` and ``GET /v1/models`` a :class:`ModelList`.

This module imports only pydantic, so the client, the service and third-party tools can share it.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

#: The structural constraint kinds; a request carries at most one of them.
CONSTRAINT_KINDS: tuple[str, ...] = (
    "json_schema",
    "json_object",
    "regex",
    "regex_patterns",
    "grammar",
    "choice",
    "token_mask",
)

FinishReason = Literal["stop", "length", "abort", "tool_calls", "timeout"]


class _Strict(BaseModel):
    """Base for request models: unknown fields are an error, never silently dropped."""

    model_config = ConfigDict(extra="forbid")


class TokenMask(_Strict):
    """Token-level constraint: ids the model may (or may not) emit."""

    # StrictInt: JSON true is not token id 1, nor "5" token 5 (lax ints would read both silently)
    allowed_tokens: list[StrictInt] | None = None
    """Only these token ids may be generated (end-of-sequence is always allowed)."""
    forbidden_tokens: list[StrictInt] | None = None
    """These token ids are never generated."""

    @model_validator(mode="after")
    def _not_empty(self) -> TokenMask:
        if not self.allowed_tokens and not self.forbidden_tokens:
            raise ValueError("token_mask needs allowed_tokens and/or forbidden_tokens")
        return self


class Constraints(_Strict):
    """Exactly one structural constraint."""

    json_schema: dict[str, Any] | None = None
    """A JSON Schema (Draft 2020-12 as far as llguidance supports it)."""
    json_object: bool | None = None
    """Any JSON object (``json_mode``)."""
    regex: str | None = None
    """The output must fully match this pattern (llguidance/Rust regex syntax)."""
    regex_patterns: list[str] | None = None
    """The output must fully match one of these patterns."""
    grammar: str | None = None
    """A Lark grammar in llguidance's dialect (``%json`` allowed), or a GBNF/EBNF ``::=`` grammar."""
    choice: list[str] | None = None
    """The output is exactly one of these strings."""
    token_mask: TokenMask | None = None
    """Allowed and/or forbidden token ids."""
    whitespace: Literal["compact", "flexible"] = "compact"
    """JSON whitespace: ``compact`` (default, no runaway whitespace) or ``flexible``."""
    strict: bool = False
    """Reject JSON Schema keywords the grammar cannot enforce exactly (422), instead of compiling
    without them and verifying the full schema afterwards (the default)."""
    max_attempts: int = Field(default=3, ge=1, le=8)
    """JSON output that fails the full-schema check is resampled with new seeds up to this many
    attempts in all (non-streaming requests)."""
    length_caps: bool = True
    """Bound strings, arrays and integers the schema leaves unbounded, from the request's
    ``max_tokens``, so one field cannot eat the whole budget. Only narrows the schema."""
    close_on_budget: bool = True
    """When ``max_tokens`` would cut the output short, roll back up to 32 of the last tokens and
    finish the structure with a short completion the grammar allows (minimal values such as ``""``
    or ``0``), within the same budget. The result is verified like any output, and the response
    metadata's ``closed_on_budget`` says what was added. Off: the truncation is reported as is."""
    loop_guard: bool = True
    """Stop a runaway repetition inside the output (a value filled with ``a_1_2_3_4_...``, one record
    repeated) as it is written, and finish the structure from where it began, like closing on budget.
    The response metadata's ``loop_guard`` says what was found and dropped. Off: the model writes on
    until it stops or ``max_tokens`` runs out. The server's ``--loop-guard-span`` (0: off) sets how
    long a repetition must be."""

    @field_validator("regex_patterns", "choice")
    @classmethod
    def _non_empty_list(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("must be a non-empty list")
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> Constraints:
        given = self.kinds()
        if (self.strict or not self.length_caps) and not {"json_schema", "json_object"} & set(given):
            raise ValueError("strict and length_caps apply to json_schema / json_object constraints only")
        if len(given) > 1:
            raise ValueError(f"exactly one constraint per request, got {len(given)}: {', '.join(given)}")
        if not given:
            raise ValueError(f"constraints is empty; give one of: {', '.join(CONSTRAINT_KINDS)}")
        if not {"json_schema", "json_object"} & set(given):
            # both act on JSON only: elsewhere they would be silently ignored
            if self.whitespace == "flexible":
                raise ValueError("whitespace applies to json_schema / json_object constraints only")
            if self.max_attempts != type(self).model_fields["max_attempts"].default:
                raise ValueError(
                    "max_attempts applies to json_schema / json_object constraints only "
                    "(the other kinds are not resampled)"
                )
        return self

    def kinds(self) -> list[str]:
        """The constraint kinds set on this object."""
        return [
            kind
            for kind in CONSTRAINT_KINDS
            if getattr(self, kind) is not None and getattr(self, kind) is not False
        ]

    @property
    def kind(self) -> str:
        """The one constraint kind set."""
        return self.kinds()[0]


class FunctionSpec(_Strict):
    """A callable tool, described by a JSON Schema for its arguments."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None
    """Accepted for OpenAI compatibility; tool arguments are always generated schema-exact."""


class ToolSpec(_Strict):
    """An OpenAI-style tool entry."""

    type: Literal["function"] = "function"
    function: FunctionSpec


class ToolCall(BaseModel):
    """A tool call the model made; ``arguments`` validated against the tool's schema."""

    id: str
    name: str
    arguments: dict[str, Any]


class ChatMessage(_Strict):
    """One chat turn."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    tool_calls: list[ToolCall] | None = None
    """Tool calls an earlier assistant turn made."""
    tool_call_id: str | None = None
    """For ``tool`` messages: the call this is the result of."""
    name: str | None = None


class GenerateRequest(_Strict):
    """``POST /generate_api``: one prompt, a list of prompts, or a chat."""

    prompt: str | list[str] | None = None
    """Raw prompt text (no chat template), or a list of them batched together."""
    messages: list[ChatMessage] | None = None
    """A chat; the model's chat template is applied server-side."""
    constraints: Constraints | None = None
    """The output's constraint. With ``tools`` only ``json_schema`` is allowed: the schema of the
    final answer, the branch the model takes when it calls no tool."""
    tools: list[ToolSpec] | None = None
    tool_choice: str = "auto"
    """``auto``, ``required``, ``none`` or the name of one tool."""
    parallel_tool_calls: bool = True
    max_tokens: int = Field(default=256, gt=0, le=1 << 20)
    """Output token cap (the server's own cap, ``--max-tokens-cap``, is usually lower)."""
    temperature: float = Field(default=0.7, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-(1 << 63), le=(1 << 63) - 1)
    stop: list[str] | None = None
    stream: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    """Return each output token's log-probability and this many top alternatives (0: none)."""
    timeout_s: float | None = Field(default=None, ge=0.01, le=86_400)
    """Server-side deadline (0.01 s to a day); the request is aborted in the engine when it passes."""
    fast_forward: bool | None = None
    """``False``: every token costs a decoding step, even where the grammar forces it. ``True``: the
    server's setting (``--fast-forward``). ``None`` (default): the server's setting, except for a request
    that samples (temperature above 0) with a ``seed``, which runs without: drafts verified by vLLM do not
    keep a seeded sample reproducible. Metadata's ``decode_steps`` and ``forced_tokens`` say what it cost."""

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: list[str] | None) -> list[str] | None:
        # The engine refuses an empty stop string only once the request reaches it: after a stream's 200.
        if value is not None and "" in value:
            raise ValueError(f"stop strings must not be empty (item {value.index('')} is)")
        return value

    @model_validator(mode="after")
    def _check(self) -> GenerateRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt list is empty")
        if self.messages is not None and not self.messages:
            raise ValueError("messages is empty")
        if self.tools:
            if self.messages is None:
                raise ValueError("tools need 'messages' (a chat request)")
            if self.constraints is not None and self.constraints.kind != "json_schema":
                # One grammar covers "tool calls or a final answer valid for this schema"; other
                # kinds have no such union.
                raise ValueError(
                    "tools combine only with a json_schema constraint (the final answer's schema), "
                    f"not {self.constraints.kind}: give either 'tools' or 'constraints'"
                )
            names = [tool.function.name for tool in self.tools]
            if len(set(names)) != len(names):
                raise ValueError("tool names must be unique")
            for tool in self.tools:
                kind = tool.function.parameters.get("type", "object")
                if kind != "object":
                    # Arguments are a JSON object (OpenAI requires parameters to describe one):
                    # any other schema would fail every call's check.
                    raise ValueError(
                        f"tool {tool.function.name!r}: function.parameters must be a JSON Schema for an "
                        f'object ("type": "object"), not "type": {json.dumps(kind)}'
                    )
            if self.tool_choice not in ("auto", "required", "none", *names):
                raise ValueError(
                    f"tool_choice must be auto, required, none or a tool name ({', '.join(names)})"
                )
        elif self.tool_choice not in ("auto", "none"):
            raise ValueError(f"tool_choice {self.tool_choice!r} needs tools, and no tools were given")
        if self.stream and isinstance(self.prompt, list):
            raise ValueError("streaming takes a single prompt")
        return self


class Usage(BaseModel):
    """Token counts."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


#: Why an output does not satisfy its constraint (``constraint_error_code``): cut short (abort,
#: deadline), the budget ran out before the structure completed, the independent check failed (and
#: how), or the check could not be run (``unverifiable``: e.g. an unresolvable ``$ref``).
ConstraintErrorCode = Literal[
    "cut_short",
    "budget_exhausted",
    "mask_violation",
    "grammar_mismatch",
    "incomplete",
    "not_json",
    "schema_mismatch",
    "unverifiable",
    "regex_mismatch",
    "tool_call_malformed",
    "tool_unknown",
    "tool_arguments_invalid",
]


class TopLogprob(BaseModel):
    """One alternative at a position of the output."""

    token: str
    token_id: int
    logprob: float


class TokenLogprob(BaseModel):
    """One output token with its log-probability and the most likely alternatives, from the
    distribution it was sampled from: the constraint's mask applied, so masked tokens never appear."""

    token: str
    token_id: int
    logprob: float | None
    """``None`` for a token the server added to close the output on budget (not sampled)."""
    top: list[TopLogprob] = Field(default_factory=list)


class GenerateResponse(BaseModel):
    """The result for one prompt or chat."""

    generated_text: str
    tokens_generated: int
    generation_time_ms: float
    metadata: dict[str, Any] = Field(default_factory=dict)
    """``request_id``, ``tokens_per_sec``, ``model``, ``constraint_type``, ``compile_time_ms``,
    ``cache_hit``, ...; for a chat turn with ``tools`` and an answer schema, ``branch``: ``tool_calls``
    or ``answer``."""
    constraint_satisfied: bool | None = None
    """Independent re-check of the output; ``None`` when the request had no constraint."""
    constraint_error: str | None = None
    """Why the constraint is not satisfied (e.g. truncated by ``max_tokens``)."""
    constraint_error_code: ConstraintErrorCode | None = None
    """The same reason as a stable code."""
    finish_reason: FinishReason
    usage: Usage = Field(default_factory=Usage)
    tool_calls: list[ToolCall] | None = None
    logprobs: list[TokenLogprob] | None = None
    """Per output token, when the request asked for ``logprobs``."""


class BatchGenerateResponse(BaseModel):
    """The result for a list of prompts, in input order."""

    results: list[GenerateResponse]
    generation_time_ms: float
    usage: Usage


class StreamEvent(BaseModel):
    """One SSE frame: ``token`` deltas, then one ``done`` with the folded response, or ``error``."""

    event: Literal["token", "done", "error"]
    text: str = ""
    token_ids: list[int] = Field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    """``token`` events of a request that asked for ``logprobs``: one entry per token in ``token_ids``."""
    response: GenerateResponse | None = None
    error: ErrorDetail | None = None


class ErrorDetail(BaseModel):
    """What went wrong."""

    code: str
    """Machine-readable: ``invalid_request``, ``invalid_constraint``, ``unauthorized``, ..."""
    message: str
    detail: Any = None


class ErrorBody(BaseModel):
    """The one error body shape of every non-2xx answer."""

    error: ErrorDetail


class ModelCard(BaseModel):
    """One served model in ``GET /v1/models``."""

    id: str
    object: str = "model"
    owned_by: str = "ananke"
    max_model_len: int | None = None
    """Context length in tokens: the prompt and the output together."""
    max_output_tokens: int | None = None
    """The largest ``max_tokens`` the service accepts."""


class ModelList(BaseModel):
    """``GET /v1/models``: the one served model, in OpenAI's list shape."""

    object: str = "list"
    data: list[ModelCard]


class HealthResponse(BaseModel):
    """``GET /health``."""

    status: Literal["loading", "ok", "sleeping", "error"]
    """``sleeping``: the engine is in vLLM's sleep mode (a Modal container between its snapshot and its
    wake); answered 503 with ``Retry-After`` like ``loading``."""
    model: str | None = None
    detail: str | None = None


StreamEvent.model_rebuild()
