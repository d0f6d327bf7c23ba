"""Tool calls: the call format, the grammar an agent turn is generated under, and the parser.

Every call is ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` with a real tool name and
arguments valid for that tool's schema, in one of two layouts: compact JSON between the markers, or
Qwen2.5's, ``<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>`` (JSON spaced as
``json.dumps`` spaces it, on its own line), which is how that model's chat template writes calls and
so how the model writes them. :func:`tool_grammar` builds one Lark grammar for a turn:

- ``auto``: the reply is either calls, or the final answer. The answer is free text (which may not
  begin with ``<``, so a half-formed call is never text), or, when the request carries an answer
  schema, JSON valid for it;
- ``required`` or a named tool: only calls;
- ``none``: only the answer (no grammar at all without an answer schema).

Where the model's tokenizer has a call marker as one token (Qwen2.5's ``<tool_call>``, id 151657),
the grammar references that token (``<[151657]>``) instead of spelling the marker: llguidance treats
such tokens as special, and a literal would mask out the very token the model opens a call with.
:func:`parse_tool_calls` reads the calls back out for the independent check.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from langchain_ananke.protocol import ToolCall, ToolSpec
from modal_service.constraints.schema import DATA_KEYS, NAME_MAPS

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_CALL_RE = re.compile(re.escape(CALL_OPEN) + r"(.*?)" + re.escape(CALL_CLOSE), re.DOTALL)


@dataclass(frozen=True)
class Markers:
    """How the grammar writes the call markers: Lark literals, or references to single tokens."""

    open: str = json.dumps(CALL_OPEN)
    close: str = json.dumps(CALL_CLOSE)

    @classmethod
    def for_tokens(cls, open_id: int | None, close_id: int | None) -> Markers:
        """Reference a marker's token where it is one token of the vocabulary."""
        return cls(
            open=f"<[{open_id}]>" if open_id is not None else json.dumps(CALL_OPEN),
            close=f"<[{close_id}]>" if close_id is not None else json.dumps(CALL_CLOSE),
        )


def format_call(call: ToolCall) -> str:
    """A call as the model writes it (earlier turns of a conversation are rendered this way)."""
    body = json.dumps({"name": call.name, "arguments": call.arguments}, ensure_ascii=False)
    return f"{CALL_OPEN}{body}{CALL_CLOSE}"


#: A call's JSON, compact (between the markers) or spaced as ``json.dumps`` spaces it (on its own line).
_COMPACT: dict[str, Any] = {"whitespace_flexible": False}
_SPACED: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


#: Where a call schema holds the tool's parameters: the JSON pointer of its ``arguments`` property.
ARGUMENTS_POINTER = "#/properties/arguments"


def _rebase_refs(schema: Any) -> Any:
    """A copy of a tool's parameters with every local ``$ref`` re-pointed from the parameters' root to
    where they sit in the call schema (``#`` -> ``#/properties/arguments``, ``#/$defs/A`` ->
    ``#/properties/arguments/$defs/A``), so refs resolve as they do in the caller's schema.

    A subschema with its own ``$id`` is a resource of its own, against which llguidance resolves the
    refs inside it: those are left as they are, as is data (``const``, ``enum``, ...).
    """
    if not isinstance(schema, dict):
        return [_rebase_refs(x) for x in schema] if isinstance(schema, list) else schema
    resource = schema.get("$id")
    if isinstance(resource, str) and not resource.startswith("#"):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and value.startswith("#"):
            out[key] = ARGUMENTS_POINTER + value[1:]
        elif key in DATA_KEYS:
            out[key] = value
        elif key in NAME_MAPS and isinstance(value, dict):
            out[key] = {name: _rebase_refs(sub) for name, sub in value.items()}
        else:
            out[key] = _rebase_refs(value)
    return out


def _call_schema(tool: ToolSpec, spacing: dict[str, Any]) -> dict[str, Any]:
    # The parameters become the ``arguments`` property of the call schema, which moves their
    # document root: their local refs are rebased to keep pointing where they point for the caller
    # (a copy; the caller's dicts are never changed, and a schema without refs comes out the same).
    params = dict(_rebase_refs(tool.function.parameters or {"type": "object", "properties": {}}))
    # Arguments are exact, as in OpenAI's strict mode: a call with invented keys would not run. Not
    # beside a root ``$ref``: the keyword would apply to the referenced schema's properties too.
    if "$ref" not in params:
        params.setdefault("additionalProperties", False)
    return {
        "type": "object",
        "properties": {"name": {"const": tool.function.name}, "arguments": params},
        "required": ["name", "arguments"],
        "additionalProperties": False,
        "x-guidance": spacing,
    }


def tool_grammar(
    tools: list[ToolSpec],
    tool_choice: str,
    parallel: bool,
    answer_schema: dict[str, Any] | None = None,
    markers: Markers | None = None,
) -> str | None:
    """The Lark grammar for one agent turn; None when nothing is constrained (``none``, no schema).

    ``answer_schema`` is the engine's form of the answer schema (length caps and ``x-guidance``
    options already applied); with it, the answer branch is JSON for that schema instead of text.
    """
    markers = markers or Markers()
    answer = "answer" if answer_schema is not None else "TEXT"
    answer_rules = [f"answer: %json {json.dumps(answer_schema)}"] if answer_schema is not None else []
    if tool_choice == "none":
        return "\n".join([f"start: {answer}", *answer_rules]) if answer_schema is not None else None
    chosen = [t for t in tools if tool_choice in ("auto", "required") or t.function.name == tool_choice]
    rules = [f"call_{i}: %json {json.dumps(_call_schema(t, _COMPACT))}" for i, t in enumerate(chosen)]
    rules += [f"spaced_{i}: %json {json.dumps(_call_schema(t, _SPACED))}" for i, t in enumerate(chosen)]
    compact = " | ".join(f"call_{i}" for i in range(len(chosen)))
    spaced = " | ".join(f"spaced_{i}" for i in range(len(chosen)))
    calls = "call+" if parallel else "call"
    start = f"start: {answer} | {calls}" if tool_choice == "auto" else f"start: {calls}"
    text_rule = [r"TEXT: /[^<\s](.|\n)*/"] if tool_choice == "auto" and answer_schema is None else []
    # Two layouts, each exact (free whitespace would let a model pad a call until it runs out of
    # tokens): compact, or Qwen2.5's (as its chat template writes calls, and so the model). Once a
    # layout is taken, what follows the JSON is forced, so the closing search can finish a call.
    # A newline may follow a call in Qwen2.5's layout only (it puts one between parallel calls):
    # after a compact call, a newline invites a small model to start another call.
    layouts = (
        f"{markers.open} ({compact}) {markers.close}",
        f'{markers.open} "\\n" ({spaced}) "\\n" {markers.close} "\\n"?',
    )
    return "\n".join(
        [
            start,
            "call: " + " | ".join(layouts),
            *rules,
            *(answer_rules if tool_choice == "auto" else []),
            *text_rule,
        ]
    )


def is_call(text: str) -> bool:
    """Whether a reply under the tool grammar took the calls branch (calls start with the marker;
    leading whitespace is skipped, as neither branch's text can start with ``<``)."""
    return text.lstrip().startswith(CALL_OPEN)


def parse_tool_calls(text: str) -> list[ToolCall]:
    """The calls in ``text``, in order; raises ValueError on a malformed call."""
    calls = []
    for body in _CALL_RE.findall(text):
        value = json.loads(body)  # JSONDecodeError is a ValueError
        if (
            not isinstance(value, dict)
            or not isinstance(value.get("name"), str)
            or not isinstance(value.get("arguments"), dict)
        ):
            raise ValueError(f"malformed tool call: {body[:200]}")
        calls.append(
            ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", name=value["name"], arguments=value["arguments"])
        )
    return calls
