"""What the compiler hands to the engine and to the re-check: the compiled constraint, the tool turn it
was compiled for, and the error a constraint the engine cannot honour raises. Plain data, so the
compiler and the verifier both import it without importing each other."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.sampling_params import StructuredOutputsParams

from langchain_ananke.protocol import ToolSpec


class ConstraintError(ValueError):
    """A constraint the engine cannot honour; answered with 422."""

    def __init__(self, message: str, detail: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail


@dataclass(frozen=True)
class CompiledConstraint:
    """A validated constraint, ready for the engine and for the re-check."""

    kind: str
    structured_outputs: StructuredOutputsParams | None
    ll_grammar: str | None
    """The llguidance grammar the engine enforces (None for token masks)."""
    json_schema: dict[str, Any] | None = None
    regexes: tuple[str, ...] = ()
    allowed_token_ids: frozenset[int] | None = None
    compile_ms: float = 0.0
    approximate: bool = False
    """Compiled without keywords llguidance cannot enforce; only the full-schema check decides."""
    approximation: str | None = None
    """What the exact compile rejected (llguidance's message)."""
    caps_applied: int = 0
    min_tokens: int | None = None
    """Tokens in the shortest output found at compile time (None: none found in the budget)."""
    shortest_output: tuple[int, ...] | None = None
    """That output's tokens: the grammar accepts it, and for a JSON Schema the full schema validates
    it. Closing falls back to it when it may rebuild an output from its start."""
    tools: dict[str, dict[str, Any]] | None = None
    """For a tool turn: each callable tool's name and argument schema (for the re-check)."""


@dataclass(frozen=True)
class ToolTurn:
    """The tools a chat turn may call, and how (``tool_choice``, parallel calls)."""

    tools: tuple[ToolSpec, ...]
    choice: str = "auto"
    parallel: bool = True

    def schemas(self) -> dict[str, dict[str, Any]]:
        return {t.function.name: t.function.parameters or {"type": "object"} for t in self.tools}
