"""Chat rendering: protocol ``messages`` (+ ``tools``) -> prompt text, through the model's chat template.

Two ways, chosen by the template (:func:`renders_tools`):

- a template that lays out tools itself (it reads ``tools``, as Qwen2.5-Instruct's does) gets the
  tool specs as ``tools=``, earlier calls as assistant ``tool_calls`` and results as ``tool``
  messages, all in its own format. The server adds one system line only for what the template cannot
  say: the final answer's schema;
- any other template (SmolLM2's) gets plain role/content turns: the tool specs and the call format go
  into the system turn, and earlier calls are written in that format
  (:func:`~modal_service.constraints.tools.format_call`).

:func:`render_chat` applies the template; the engine wrapper calls it with its tokenizer.
"""

from __future__ import annotations

import functools
import json
import re
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


def _answer_line(answer_schema: dict[str, Any]) -> str:
    return "When you call no tool, give the final answer as JSON matching this schema: " + json.dumps(
        answer_schema, ensure_ascii=False
    )


def _with_system(out: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """``text`` appended to the first system turn, or as a new first system turn."""
    if out and out[0]["role"] == "system":
        return [{**out[0], "content": f"{out[0]['content']}\n\n{text}"}, *out[1:]]
    return [{"role": "system", "content": text}, *out]


def _native_message(msg: ChatMessage) -> dict[str, Any]:
    """One turn in the shape Hugging Face chat templates with tool support read."""
    out: dict[str, Any] = {"role": msg.role, "content": msg.content}
    if msg.role == "assistant" and msg.tool_calls:
        out["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in msg.tool_calls
        ]
    if msg.role == "tool":
        out |= {k: v for k, v in (("tool_call_id", msg.tool_call_id), ("name", msg.name)) if v is not None}
    return out


def to_template_messages(
    messages: list[ChatMessage],
    tools: list[ToolSpec] | None,
    tool_choice: str,
    answer_schema: dict[str, Any] | None = None,
    *,
    native_tools: bool = False,
) -> list[dict[str, Any]]:
    """Protocol messages -> the dicts a chat template takes.

    Args:
        messages: the chat.
        tools: the tools of this turn.
        tool_choice: ``auto``, ``required``, ``none`` or a tool's name.
        answer_schema: the schema a final answer must match when the turn may also call tools.
        native_tools: the template lays out tools itself (:func:`renders_tools`): calls and results
            stay structured, and the tool specs go to the template as :func:`template_tools`;
            otherwise every turn is plain role/content and the tools are described in the system turn.
    """
    if native_tools:
        out = [_native_message(m) for m in messages]
        if tools and tool_choice == "auto" and answer_schema is not None:
            out = _with_system(out, _answer_line(answer_schema))
        return out
    out = []
    for msg in messages:
        content = msg.content
        if msg.role == "assistant" and msg.tool_calls:
            content = content + "".join(format_call(c) for c in msg.tool_calls)
        out.append({"role": msg.role, "content": content})
    if tools and tool_choice != "none":
        out = _with_system(out, _tools_prompt(tools, tool_choice, answer_schema))
    return out


def template_tools(tools: list[ToolSpec] | None, tool_choice: str) -> list[dict[str, Any]] | None:
    """The OpenAI-style tool specs a template's ``tools`` takes; None when the turn offers none."""
    if not tools or tool_choice == "none":
        return None
    return [t.model_dump(exclude_none=True) for t in tools]


def renders_tools(chat_template: str | dict[str, str] | None) -> bool:
    """Whether a chat template lays out tools itself: it reads a ``tools`` variable. Cached per template.

    A template mapping (Hugging Face's named templates) is judged by the one used with tools.
    """
    if isinstance(chat_template, dict):
        chat_template = chat_template.get("tool_use") or chat_template.get("default")
    return bool(chat_template) and _reads_tools(str(chat_template))


@functools.lru_cache(maxsize=8)
def _reads_tools(source: str) -> bool:
    import jinja2
    import jinja2.meta

    try:
        parsed = jinja2.Environment().parse(source)  # noqa: S701 - parsed only, never rendered
        return "tools" in jinja2.meta.find_undeclared_variables(parsed)
    except jinja2.TemplateSyntaxError:  # a tag of transformers' own (``{% generation %}``)
        return re.search(r"\btools\b", source) is not None


def render_chat(
    tokenizer: Any,
    messages: list[ChatMessage],
    tools: list[ToolSpec] | None,
    tool_choice: str,
    answer_schema: dict[str, Any] | None = None,
) -> str:
    """The prompt text for a chat: the tokenizer's chat template, given tools its own way when it can.

    ``tokenizer`` is a Hugging Face tokenizer (anything with ``apply_chat_template``).
    """
    if renders_tools(getattr(tokenizer, "chat_template", None)):
        turns = to_template_messages(messages, tools, tool_choice, answer_schema, native_tools=True)
        rendered = tokenizer.apply_chat_template(
            turns, tools=template_tools(tools, tool_choice), tokenize=False, add_generation_prompt=True
        )
    else:
        turns = to_template_messages(messages, tools, tool_choice, answer_schema)
        rendered = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    return str(rendered)
