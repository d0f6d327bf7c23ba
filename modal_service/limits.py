"""Every bound the service enforces, in one object, and the request deadline.

:class:`Limits` is read by the CLI (each field is an ``ananke serve`` option, with this default), by the
Modal app, by the HTTP layer (body size, JSON depth, admission, deadline), by the prechecks (constraint
shape) and by the constraint compiler (llguidance's parser limits, the compile cache). Each breach is a
clear 4xx. :class:`Deadline` is one request's time bound: started when the request arrives, it covers
planning and generation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from typing import Any

from modal_service.errors import ApiError


def _limit(default: Any, help_text: str, flag: str | None = None) -> Any:
    """A field with its CLI help (and flag, where it is not ``--<field-name>``)."""
    return field(default=default, metadata={"help": help_text, "flag": flag})


@dataclass(frozen=True)
class Limits:
    """Per-request bounds; the CLI exposes each field as ``--<field-name>`` unless it names a flag."""

    # -- requests
    max_tokens: int = _limit(2048, "largest max_tokens a request may ask for", "--max-tokens-cap")
    max_batch_prompts: int = _limit(64, "most prompts in one /generate_api batch")
    max_inflight: int = _limit(256, "admitted requests at once (planning included); above it: 429")
    max_body_bytes: int = _limit(2 * 1024 * 1024, "largest request body (413)")
    max_json_depth: int = _limit(100, "deeper request bodies get 422")
    default_timeout_s: float = _limit(
        600.0,
        "server-side deadline (s) for requests without timeout_s; past it: 504 timeout",
        "--request-timeout",
    )
    # -- constraint shape, checked before compiling. The defaults keep a compile under about half a
    # second on 2 shared CPU cores (docs/RELIABILITY.md), where a 20,000-entry choice took 1.8-1.9 s
    # and an anyOf of 500 objects 1.6-1.8 s.
    max_choices: int = _limit(
        5_000, "most choice entries / regex_patterns in one constraint (5,000 compile in 0.2-0.3 s)"
    )
    max_branches: int = _limit(100, "most branches of one anyOf/oneOf (100 compile in 0.3-0.4 s)")
    max_enum: int = _limit(20_000, "most values of one enum (0.23-0.24 s)")
    max_schema_nodes: int = _limit(
        512,
        "most subschemas in one JSON Schema, or in all tool schemas of a request (255 required "
        "properties compile in 0.8 s; llguidance refuses about 1,000)",
    )
    # -- the compiler
    max_constraint_bytes: int = _limit(256 * 1024, "largest constraint (JSON)")
    initial_lexer_fuel: int = _limit(1_000_000, "llguidance lexer fuel, first mask")
    step_lexer_fuel: int = _limit(200_000, "llguidance lexer fuel per step")
    max_grammar_size: int = _limit(500_000, "llguidance grammar size bound")
    max_lexer_states: int = _limit(250_000, "llguidance lexer state bound")
    max_schema_depth: int = _limit(
        64, "schema nesting plus $ref hops (vLLM refuses deeper; ~1,000 crashes llguidance)"
    )
    max_grammar_rules: int = _limit(
        500, "rules in one grammar (3,000 overflowed llguidance's stack in the engine)"
    )
    cache_size: int = _limit(512, "compiled constraints kept (LRU)")
    loop_guard_span: int = _limit(
        48,
        "tokens of near-periodic repetition that end a constrained output early, finished by the "
        "closing search (metadata.loop_guard); 0 turns the loop guard off",
    )

    @classmethod
    def cli_options(cls) -> list[tuple[str, str, type, Any, str]]:
        """``(field, flag, type, default, help)`` for every field: the CLI's options."""
        out: list[tuple[str, str, type, Any, str]] = []
        for f in fields(cls):
            flag = str(f.metadata.get("flag") or "") or "--" + f.name.replace("_", "-")
            kind = float if f.type in ("float", float) else int
            out.append((f.name, flag, kind, f.default, str(f.metadata.get("help", ""))))
        return out


@dataclass
class Deadline:
    """One request's deadline: ``seconds`` from ``started`` (a :func:`time.monotonic` reading)."""

    seconds: float
    started: float = field(default_factory=time.monotonic)

    def left(self) -> float:
        """Seconds left; 0 or less once it passed."""
        return self.seconds - (time.monotonic() - self.started)

    def check(self) -> None:
        """Raise the 504 when nothing is left (planning, say, took it all)."""
        if self.left() <= 0:
            raise self.error(0)

    def error(self, tokens: int | None) -> ApiError:
        """504 ``timeout``: the deadline passed and the engine request was aborted.

        ``tokens``: how many were generated (streamed) before; None when unknown (a non-streaming
        request asks the engine for its final output only, so an aborted one reports none).
        """
        timeout = self.seconds
        done = "before any output" if tokens == 0 else f"after {tokens} generated tokens" if tokens else ""
        return ApiError(
            504,
            "timeout",
            f"the request's timeout of {timeout:g} s passed and it was aborted in the engine {done}".rstrip()
            + " (raise timeout_s, or ask for fewer max_tokens)",
            {"timeout_s": timeout, "tokens_generated": tokens},
        )
