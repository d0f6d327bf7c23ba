"""Chat rendering: protocol ``messages`` (+ ``tools``) -> the plain dicts a chat template takes.

Tool specs go into the system turn with the call format; earlier tool calls are written in that
format (:func:`~modal_service.constraints.tools.format_call`). The engine wrapper applies the model's
own chat template to the result.
"""

from __future__ import annotations

import json
from typing import Any

from langchain_ananke.protocol import ChatMessage, ToolSpec
from modal_service.constraints.tools import CALL_CLOSE, CALL_OPEN, format_call


def _tools_prompt(tools: list[ToolSpec], tool_choice: str, answer_schema: dict[str, Any] | None) -> str:
    specs = "\n".join(json.dumps(t.function.model_dump(exclude_none=True), ensure_ascii=False) for t in tools)
    if tool_choice == "required":
        rule = "You must call one of these tools."
    elif tool_choice not in ("auto", "none"):
        rule = f"You must call the tool {tool_choice}."
    elif answer_schema is not None:
        rule = (
            "Call a tool when it helps; otherwise give the final answer as JSON matching this schema: "
            + json.dumps(answer_schema, ensure_ascii=False)
        )
    else:
        rule = "Call a tool when it helps; otherwise answer in plain text."
    return (
        "You have access to these tools:\n"
        f"{specs}\n{rule} To call a tool, write "
        f'{CALL_OPEN}{{"name": <tool name>, "arguments": <arguments object>}}{CALL_CLOSE}'
    )


def to_template_messages(
    messages: list[ChatMessage],
    tools: list[ToolSpec] | None,
    tool_choice: str,
    answer_schema: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Protocol messages -> the plain role/content dicts every chat template understands.

    ``answer_schema``: the schema a final answer must match when the turn may also call tools.
    """
    out: list[dict[str, Any]] = []
    for msg in messages:
        content = msg.content
        if msg.role == "assistant" and msg.tool_calls:
            content = content + "".join(format_call(c) for c in msg.tool_calls)
        out.append({"role": msg.role, "content": content})
    if tools and tool_choice != "none":
        instructions = _tools_prompt(tools, tool_choice, answer_schema)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{instructions}"}
        else:
            out.insert(0, {"role": "system", "content": instructions})
    return out
