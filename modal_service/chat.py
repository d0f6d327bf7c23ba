"""Chat rendering and the tool-call grammar.

Data flow: protocol ``messages`` (+ ``tools``) -> :func:`to_template_messages` (tool specs go into the
system turn; earlier tool calls are written in the call format) -> the model's own chat template
(applied by the engine wrapper). :func:`tool_grammar` builds a Lark grammar so that every call the
model emits is ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` with a real tool name and
arguments valid for that tool's schema; :func:`parse_tool_calls` reads them back out.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from langchain_ananke.protocol import ChatMessage, ToolCall, ToolSpec

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_CALL_RE = re.compile(re.escape(CALL_OPEN) + r"(.*?)" + re.escape(CALL_CLOSE), re.DOTALL)


def _format_call(call: ToolCall) -> str:
    body = json.dumps({"name": call.name, "arguments": call.arguments}, ensure_ascii=False)
    return f"{CALL_OPEN}{body}{CALL_CLOSE}"


def _tools_prompt(tools: list[ToolSpec], tool_choice: str) -> str:
    specs = "\n".join(json.dumps(t.function.model_dump(exclude_none=True), ensure_ascii=False) for t in tools)
    if tool_choice == "required":
        rule = "You must call one of these tools."
    elif tool_choice not in ("auto", "none"):
        rule = f"You must call the tool {tool_choice}."
    else:
        rule = "Call a tool when it helps; otherwise answer in plain text."
    return (
        "You have access to these tools:\n"
        f"{specs}\n{rule} To call a tool, write "
        f'{CALL_OPEN}{{"name": <tool name>, "arguments": <arguments object>}}{CALL_CLOSE}'
    )


def to_template_messages(
    messages: list[ChatMessage], tools: list[ToolSpec] | None, tool_choice: str
) -> list[dict[str, Any]]:
    """Protocol messages -> the plain role/content dicts every chat template understands."""
    out: list[dict[str, Any]] = []
    for msg in messages:
        content = msg.content
        if msg.role == "assistant" and msg.tool_calls:
            content = content + "".join(_format_call(c) for c in msg.tool_calls)
        out.append({"role": msg.role, "content": content})
    if tools and tool_choice != "none":
        instructions = _tools_prompt(tools, tool_choice)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{instructions}"}
        else:
            out.insert(0, {"role": "system", "content": instructions})
    return out


def _call_schema(tool: ToolSpec) -> dict[str, Any]:
    params = dict(tool.function.parameters or {"type": "object", "properties": {}})
    # Arguments are exact, as in OpenAI's strict mode: a call with invented keys would not run.
    params.setdefault("additionalProperties", False)
    return {
        "type": "object",
        "properties": {"name": {"const": tool.function.name}, "arguments": params},
        "required": ["name", "arguments"],
        "additionalProperties": False,
        "x-guidance": {"whitespace_flexible": False},
    }


def tool_grammar(tools: list[ToolSpec], tool_choice: str, parallel: bool) -> str | None:
    """The Lark grammar for this tool choice; None when calls are off (``none``)."""
    if tool_choice == "none":
        return None
    chosen = [t for t in tools if tool_choice in ("auto", "required") or t.function.name == tool_choice]
    rules = [f"call_{i}: %json {json.dumps(_call_schema(t))}" for i, t in enumerate(chosen)]
    alternatives = " | ".join(f"call_{i}" for i in range(len(chosen)))
    calls = "call+" if parallel else "call"
    # Plain text may not begin with "<", so a reply is either text or well-formed calls, never a
    # half-formed call.
    start = f"start: TEXT | {calls}" if tool_choice == "auto" else f"start: {calls}"
    return "\n".join(
        [
            start,
            f'call: "{CALL_OPEN}" ({alternatives}) "{CALL_CLOSE}"',
            *rules,
            r"TEXT: /[^<\s](.|\n)*/",
        ]
    )


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
