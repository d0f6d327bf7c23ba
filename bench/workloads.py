"""What the benchmarks send: the record-list workload and SmolLM2's prompt format.

The CPU bench (``bench.run``: overhead, peer comparison, closing, scaling; ``bench.dtype_probe``), the
stress burst and the GPU bench build their requests from these. Standard library only: the GPU
bench's device snapshot carries this file.
"""

from __future__ import annotations

from typing import Any


def chat_prompt(text: str) -> str:
    """SmolLM2's ChatML turn for raw prompts (the same string tests/integration uses)."""
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


RECORD: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "name": {"type": "string", "maxLength": 16},
        "ok": {"type": "boolean"},
    },
    "required": ["id", "name", "ok"],
    "additionalProperties": False,
}
"""One small record: strings, integers, booleans and punctuation, the mask work of an ordinary list."""

RECORD_LIST: dict[str, Any] = {"type": "array", "items": RECORD}
"""A list of :data:`RECORD` with no length bounds: it can close after any record."""

RECORD_LIST_PROMPT = chat_prompt("List 500 records as a JSON array of objects with id, name and ok fields.")
"""Asks for far more records than any ``max_tokens`` here allows, so the model keeps writing."""


def wide_record_list(n_props: int) -> dict[str, Any]:
    """A list of objects with ``n_props`` required integer/boolean/string properties (schema size)."""
    kinds = [{"type": "integer"}, {"type": "boolean"}, {"type": "string", "maxLength": 8}]
    props = {f"p{i}": kinds[i % 3] for i in range(n_props)}
    return {
        "type": "array",
        "items": {
            "type": "object",
            "properties": props,
            "required": list(props),
            "additionalProperties": False,
        },
    }


def wide_record_list_prompt(n_props: int) -> str:
    """The prompt that goes with :func:`wide_record_list`."""
    return chat_prompt(f"List 500 records as a JSON array; each has fields p0..p{n_props - 1}.")
