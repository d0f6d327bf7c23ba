"""OpenAI-compatible routes: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``.

Data flow: a typed OpenAI body (:class:`ChatCompletionBody`, :class:`CompletionBody`) ->
:func:`chat_to_request` / :func:`completion_to_request` (a protocol :class:`GenerateRequest`;
``response_format`` and ``tools`` become the same constraints ``/generate_api`` uses; both together are
one agent-turn grammar) -> the shared :class:`~modal_service.http.lifecycle.Lifecycle` -> OpenAI-shaped
JSON or SSE chunks. So ``ChatOpenAI(base_url=.../v1)`` and the OpenAI SDK work unchanged. Each answer
also carries an ``ananke`` field with ``constraint_satisfied`` from the independent re-check. A request
whose deadline passes is a 504 ``timeout`` (non-streaming) or ends its stream with an ``error`` chunk
in the one error body shape (the OpenAI SDK raises on it), as on ``/generate_api``.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, ValidationError

from langchain_ananke.protocol import (
    ErrorBody,
    GenerateRequest,
    GenerateResponse,
    ModelCard,
    ModelList,
    TokenLogprob,
)
from modal_service.errors import ApiError
from modal_service.http.errors import ERROR_RESPONSES, validation_error
from modal_service.http.lifecycle import Lifecycle, frame, sse

log = logging.getLogger(__name__)

#: Fields taken as they are; ``timeout_s`` (the server-side deadline) and ``fast_forward`` are ours
#: (``extra_body`` in the SDK).
_PASSTHROUGH = ("temperature", "top_p", "seed", "stop", "timeout_s", "fast_forward")


def _text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        for j, part in enumerate(content):
            kind = part.get("type", "text") if isinstance(part, dict) else type(part).__name__
            if kind != "text":
                raise ApiError(
                    422,
                    "unsupported_content",
                    f"{where}.content.{j} is a {kind!r} part: the served model reads text only",
                    {"field": f"{where}.content.{j}", "type": kind},
                )
        return "".join(p.get("text", "") for p in content)
    raise ApiError(422, "invalid_request", "message content must be a string or a list of parts")


def _message(raw: dict[str, Any], where: str) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": raw.get("role"), "content": _text(raw.get("content"), where)}
    if msg["role"] == "developer":
        msg["role"] = "system"
    if raw.get("tool_calls"):
        try:
            msg["tool_calls"] = [
                {
                    "id": c.get("id", ""),
                    "name": c["function"]["name"],
                    "arguments": json.loads(c["function"].get("arguments") or "{}"),
                }
                for c in raw["tool_calls"]
            ]
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ApiError(422, "invalid_request", f"malformed assistant tool_calls: {exc}") from exc
    if raw.get("tool_call_id"):
        msg["tool_call_id"] = raw["tool_call_id"]
    return msg


_FORMAT_KEYS = {"text": {"type"}, "json_object": {"type"}, "json_schema": {"type", "json_schema"}}
_JSON_SCHEMA_KEYS = {"name", "description", "schema", "strict"}


def _unknown_keys(given: dict[str, Any], known: set[str], where: str) -> None:
    """A 422 naming the first key of ``given`` not in ``known``: a field is never dropped silently (a
    ``schema`` inside ``json_object`` would otherwise leave the output unconstrained by it)."""
    extra = sorted(set(given) - known)
    if extra:
        raise ApiError(
            422,
            "invalid_request",
            f"{where}.{extra[0]} is not supported here (known: {', '.join(sorted(known))})",
            {"field": f"{where}.{extra[0]}"},
        )


def _response_format(fmt: dict[str, Any] | None) -> dict[str, Any] | None:
    if isinstance(fmt, dict) and fmt.get("type") in _FORMAT_KEYS:
        _unknown_keys(fmt, _FORMAT_KEYS[fmt["type"]], "response_format")
        if isinstance(fmt.get("json_schema"), dict):
            _unknown_keys(fmt["json_schema"], _JSON_SCHEMA_KEYS, "response_format.json_schema")
    if not fmt or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_object":
        return {"json_object": True}
    if fmt.get("type") == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise ApiError(422, "invalid_request", "response_format.json_schema.schema must be an object")
        return {"json_schema": schema}
    raise ApiError(422, "invalid_request", f"unsupported response_format type: {fmt.get('type')}")


def _tool_choice(choice: Any, names: list[str]) -> str:
    """OpenAI's ``tool_choice`` -> the protocol's (``auto``, ``required``, ``none`` or a tool's name).

    ``names``: the request's tools. A choice that needs a tool (``required``, a named one) without
    tools, or one naming a tool that is not among them, is a 422 naming ``tool_choice``: never dropped.
    """
    if choice is None:
        return "auto"
    if isinstance(choice, str):
        name = choice
    elif isinstance(choice, dict) and choice.get("type") == "function":
        function = choice.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ApiError(
                422,
                "invalid_request",
                f'tool_choice: a "function" choice names its tool as {{"function": {{"name": ...}}}}, '
                f"got {choice!r}",
                {"field": "tool_choice"},
            )
        name = str(function["name"])
        if name not in names:  # the object form always names a tool, even one called "auto"
            raise _unknown_tool(name, names)
        return name
    else:
        raise ApiError(
            422, "invalid_request", f"unsupported tool_choice: {choice!r}", {"field": "tool_choice"}
        )
    if name in ("auto", "none"):
        return name
    if name != "required" and name not in names:
        raise _unknown_tool(name, names)
    if not names:
        raise ApiError(
            422,
            "invalid_request",
            f"tool_choice {name!r} needs tools, and the request has none",
            {"field": "tool_choice"},
        )
    return name


def _unknown_tool(name: str, names: list[str]) -> ApiError:
    tools = f"the tools are {', '.join(names)}" if names else "the request has no tools"
    return ApiError(
        422,
        "invalid_request",
        f"tool_choice names {name!r}, which is not one of the request's tools ({tools}); "
        "tool_choice must be auto, required, none or a tool name",
        {"field": "tool_choice"},
    )


#: vLLM's own constraint fields. Ignoring them would return unconstrained text as if it were
#: constrained, so they are refused with a pointer to the supported ones.
_FOREIGN_CONSTRAINTS = (
    "structured_outputs",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "guided_decoding_backend",
    "guided_whitespace_pattern",
)


#: OpenAI fields that would change the output, which the service does not implement, with the values
#: that leave the output unchanged. Any other value is refused, naming the field: never dropped.
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "best_of": (None, 1),
    "suffix": (None, ""),
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "functions": (None, []),
    "function_call": (None,),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    # Nothing is stored here, so there is nothing to keep metadata with; one service tier.
    "store": (None, False),
    "metadata": (None, {}),
    "service_tier": (None, "auto", "default"),
}

#: Every field the two endpoints read (the models' fields, the refused ones above and vLLM's). Any
#: other field is refused by name: a field this service does not know is never dropped silently.
_KNOWN_ELSEWHERE = frozenset({*_FOREIGN_CONSTRAINTS, *_UNSUPPORTED})


def _refuse_unknown(body: BaseModel) -> None:
    """A field neither endpoint knows is a 422 that names it (OpenAI's own fields that this service
    does not implement are refused by :func:`_common`, with the values that change nothing allowed)."""
    unknown = sorted(k for k in body.model_extra or {} if k not in _KNOWN_ELSEWHERE)
    if unknown:
        raise ApiError(
            422,
            "unsupported_parameter",
            f"{', '.join(unknown)}: unknown to this service (never dropped silently); see docs/api.md for "
            "the fields each endpoint reads",
            {"fields": unknown},
        )


def _common(body: dict[str, Any]) -> dict[str, Any]:
    if body.get("stream_options") is not None and not body.get("stream"):
        raise ApiError(
            422,
            "invalid_request",
            "stream_options applies to streamed answers only (stream: true)",
            {"field": "stream_options"},
        )
    # Only include_usage is honoured: vLLM's continuous_usage_stats (usage in every chunk), say,
    # would otherwise be dropped silently.
    _unknown_keys(body.get("stream_options") or {}, {"include_usage"}, "stream_options")
    unsupported = [k for k, noop in _UNSUPPORTED.items() if k in body and body[k] not in noop]
    if unsupported:
        raise ApiError(
            422,
            "unsupported_parameter",
            f"{', '.join(unsupported)}: not supported by this service (only the values that leave the "
            "output unchanged are accepted)",
            {"fields": unsupported},
        )
    foreign = [k for k in _FOREIGN_CONSTRAINTS if k in body]
    if foreign:
        raise ApiError(
            422,
            "unsupported_parameter",
            f"{', '.join(foreign)} is not supported here; use response_format (json_schema / "
            "json_object) or tools, or POST /generate_api with constraints for regex/grammar/choice",
        )
    if body.get("n") not in (None, 1):  # null, as absent, is OpenAI's default of 1
        raise ApiError(422, "invalid_request", "only n=1 is supported", {"field": "n"})
    out = {k: body[k] for k in _PASSTHROUGH if body.get(k) is not None}
    field = max_tokens_field(body)
    if field is not None:
        out["max_tokens"] = body[field]
    return out


def max_tokens_field(body: dict[str, Any]) -> str | None:
    """Which field sets the output cap: ``max_completion_tokens`` (OpenAI's current name),
    ``max_tokens`` (its deprecated alias) or neither (None: the default).

    Every value given is validated, under its own name (``0`` is refused, never read as "not given"):
    a bad value is the field returned, so its error names it. Both, valid but different, is a 422 that
    names both: neither is dropped silently. Both with the same value is fine."""
    given = [f for f in ("max_completion_tokens", "max_tokens") if body.get(f) is not None]
    bad = [f for f in given if not (isinstance(body[f], int) and body[f] > 0)]
    if bad:
        return bad[0]
    if len(given) == 2 and body["max_completion_tokens"] != body["max_tokens"]:
        raise ApiError(
            422,
            "invalid_request",
            f"max_completion_tokens ({body['max_completion_tokens']}) and max_tokens ({body['max_tokens']}) "
            "disagree; give one of them (max_tokens is OpenAI's deprecated alias of max_completion_tokens)",
            {"fields": ["max_completion_tokens", "max_tokens"]},
        )
    return given[0] if given else None


def _build(fields: dict[str, Any], renamed: dict[str, str] | None = None) -> GenerateRequest:
    """The protocol request; ``renamed`` maps a protocol field to the OpenAI field the request set, so
    an error blames the field the user wrote (``max_completion_tokens``, not ``max_tokens``)."""
    try:
        return GenerateRequest.model_validate(fields)
    except ValidationError as exc:
        errors = list(exc.errors())
        for error in errors:
            loc = error["loc"]
            if loc and str(loc[0]) in (renamed or {}):
                error["loc"] = ((renamed or {})[str(loc[0])], *loc[1:])
        raise validation_error(errors) from exc


def _renamed(body: dict[str, Any]) -> dict[str, str]:
    """The protocol's ``max_tokens`` under the name the request gave it."""
    field = max_tokens_field(body)
    return {"max_tokens": field} if field else {}


def chat_to_request(body: dict[str, Any]) -> GenerateRequest:
    """An OpenAI chat body -> the protocol request."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(422, "invalid_request", "messages must be a non-empty list")
    fields = _common(body) | {"messages": [_message(m, f"messages.{i}") for i, m in enumerate(messages)]}
    top = body.get("top_logprobs")
    renamed = _renamed(body)
    if body.get("logprobs"):
        fields["logprobs"] = 0 if top is None else top
        if top is not None:
            renamed["logprobs"] = "top_logprobs"
    elif top:  # 0 (no alternatives) asks for nothing without logprobs; any other value needs them
        raise ApiError(
            422,
            "invalid_request",
            "top_logprobs needs logprobs: true",
            {"fields": ["top_logprobs", "logprobs"]},
        )
    constraint = _response_format(body.get("response_format"))
    if constraint:
        fields["constraints"] = constraint
    tools = body.get("tools") or []
    names = [
        t["function"].get("name")
        for t in tools
        if isinstance(t, dict) and isinstance(t.get("function"), dict)
    ]
    choice = _tool_choice(body.get("tool_choice"), names)
    if tools:
        fields["tools"] = tools
        fields["tool_choice"] = choice
        fields["parallel_tool_calls"] = body.get("parallel_tool_calls", True)
    return _build(fields, renamed)


def completion_to_request(body: dict[str, Any]) -> GenerateRequest:
    """An OpenAI completions body -> the protocol request (``response_format`` honoured too)."""
    fields = _common(body) | {"prompt": body.get("prompt")}
    if body.get("logprobs") is not None:
        fields["logprobs"] = body["logprobs"]
    constraint = _response_format(body.get("response_format"))
    if constraint:
        fields["constraints"] = constraint
    return _build(fields, _renamed(body))


def _chat_logprobs(items: list[TokenLogprob] | None) -> dict[str, Any] | None:
    """OpenAI's chat ``logprobs``; a token the server added to close the output has ``logprob: null``."""
    if items is None:
        return None

    def entry(token: str, logprob: float | None) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {
        "content": [
            entry(t.token, t.logprob) | {"top_logprobs": [entry(a.token, a.logprob) for a in t.top]}
            for t in items
        ]
    }


def _completion_logprobs(items: list[TokenLogprob] | None, offset: int = 0) -> dict[str, Any] | None:
    """OpenAI's legacy completions ``logprobs``; ``offset``: where ``items`` start in the text."""
    if items is None:
        return None
    offsets, at = [], offset
    for t in items:
        offsets.append(at)
        at += len(t.token)
    return {
        "tokens": [t.token for t in items],
        "token_logprobs": [t.logprob for t in items],
        "top_logprobs": [{a.token: a.logprob for a in t.top} for t in items],
        "text_offset": offsets,
    }


def _ananke(resp: GenerateResponse) -> dict[str, Any]:
    return {
        "constraint_satisfied": resp.constraint_satisfied,
        "constraint_error": resp.constraint_error,
        "constraint_error_code": resp.constraint_error_code,
        "metadata": resp.metadata,
    }


def _chat_message(resp: GenerateResponse) -> dict[str, Any]:
    calls = resp.tool_calls or []
    return {
        "role": "assistant",
        "content": None if calls else resp.generated_text,
        "tool_calls": [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": json.dumps(c.arguments)},
            }
            for c in calls
        ]
        or None,
    }


def _usage(resp: GenerateResponse) -> dict[str, int]:
    return resp.usage.model_dump()


class _OpenAIBody(BaseModel):
    """Fields both OpenAI endpoints share. Other fields are passed on to the conversion, which
    refuses vLLM's own constraint fields by name."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    """Any id names the one served model; the answer's ``model`` says which model answered."""
    user: str | None = None
    """The end user's id: written to the service log with the request id (for abuse monitoring)."""
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    """``{"type": "json_schema", "json_schema": {"schema": ...}}``, ``{"type": "json_object"}``."""
    timeout_s: float | None = None
    """The server-side deadline (ours; ``extra_body`` in the SDK)."""
    fast_forward: bool | None = None
    """``false``: no fast-forward for this request (ours; ``extra_body`` in the SDK)."""


class ChatCompletionBody(_OpenAIBody):
    """``POST /v1/chat/completions``."""

    messages: list[dict[str, Any]]
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


class CompletionBody(_OpenAIBody):
    """``POST /v1/completions``."""

    prompt: str | list[str] | None = None
    logprobs: int | None = None
    echo: bool | None = None
    """``true``: the prompt, then the completion, in ``text`` (not with ``logprobs``)."""


def openai_router(lifecycle: Lifecycle, require_key: Callable[..., Any]) -> APIRouter:
    """The OpenAI-compatible routes."""
    router = APIRouter(dependencies=[Depends(require_key)])
    engine = lifecycle.generator.engine

    @router.get("/v1/models", response_model=ModelList)
    async def models() -> ModelList:
        """The one served model, with its context length and the largest ``max_tokens`` allowed."""
        card = ModelCard(
            id=engine.model_name,
            max_model_len=engine.config.max_model_len,
            max_output_tokens=lifecycle.limits.max_tokens,
        )
        return ModelList(data=[card])

    @router.post("/v1/chat/completions", responses=ERROR_RESPONSES)
    async def chat_completions(body: ChatCompletionBody) -> Any:
        """OpenAI chat completions; honours ``response_format``, ``tools`` and ``tool_choice``."""
        _refuse_unknown(body)
        fields = body.model_dump(exclude_unset=True)
        return await _serve(lifecycle, chat_to_request(fields), fields, chat=True)

    @router.post("/v1/completions", responses=ERROR_RESPONSES)
    async def completions(body: CompletionBody) -> Any:
        """OpenAI text completions."""
        _refuse_unknown(body)
        fields = body.model_dump(exclude_unset=True)
        req = completion_to_request(fields)
        if isinstance(req.prompt, list):
            raise ApiError(422, "invalid_request", "use /generate_api for prompt lists")
        if body.echo and req.logprobs is not None:
            raise ApiError(
                422,
                "unsupported_parameter",
                "echo with logprobs: the prompt's logprobs are not computed; ask for one of them",
                {"fields": ["echo", "logprobs"]},
            )
        return await _serve(lifecycle, req, fields, chat=False)

    return router


#: Refusals about the output budget; their messages name the protocol's ``max_tokens``.
_BUDGET_ERRORS = frozenset({"context_length_exceeded", "max_tokens_too_small"})


def _blame_budget_field(exc: ApiError, body: dict[str, Any]) -> None:
    """A refusal about the output budget (the codes above, or one whose ``detail.field`` is
    ``max_tokens``, such as the server's cap) names the field the request set
    (``max_completion_tokens``), not the protocol's ``max_tokens`` it became; ``detail.field`` says which."""
    field = max_tokens_field(body)
    blames_cap = isinstance(exc.detail, dict) and exc.detail.get("field") == "max_tokens"
    if field is None or not (exc.code in _BUDGET_ERRORS or blames_cap):
        return
    if field != "max_tokens":
        exc.message = exc.message.replace("max_tokens", field, 1)
    exc.detail = (exc.detail if isinstance(exc.detail, dict) else {}) | {"field": field}


async def _serve(lifecycle: Lifecycle, req: GenerateRequest, body: dict[str, Any], *, chat: bool) -> Any:
    ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    head = {"id": ident, "created": int(time.time()), "model": lifecycle.generator.engine.model_name}
    if body.get("user"):
        log.info("for end user %r", str(body["user"])[:128])
    echo = str(req.prompt) if body.get("echo") else ""
    try:
        if body.get("stream"):
            return await _stream(lifecycle, req, body, head, echo, chat=chat)
        resp = await lifecycle.answer(req)
    except ApiError as exc:  # raised before any answer began: a stream's too
        _blame_budget_field(exc, body)
        raise
    obj = "chat.completion" if chat else "text_completion"
    assert isinstance(resp, GenerateResponse)  # noqa: S101 - prompt lists were refused above
    if chat:
        choice = {
            "index": 0,
            "message": _chat_message(resp),
            "finish_reason": resp.finish_reason,
            "logprobs": _chat_logprobs(resp.logprobs),
        }
    else:
        choice = {
            "index": 0,
            "text": echo + resp.generated_text,
            "finish_reason": resp.finish_reason,
            "logprobs": _completion_logprobs(resp.logprobs),
        }
    return head | {"object": obj, "choices": [choice], "usage": _usage(resp), "ananke": _ananke(resp)}


async def _stream(
    lifecycle: Lifecycle,
    req: GenerateRequest,
    body: dict[str, Any],
    head: dict[str, Any],
    echo: str,
    *,
    chat: bool,
) -> Any:
    """The SSE answer: OpenAI's chunks (with ``logprobs`` when asked), then ``data: [DONE]``."""
    admitted = await lifecycle.admit(req)
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    obj = "chat.completion.chunk" if chat else "text_completion"
    buffer_calls = bool(req.tools) and req.tool_choice != "none"

    offset = len(echo)  # completions: where the next chunk's logprobs start in the text

    def chunk(
        delta: dict[str, Any] | str, finish: str | None, lps: list[TokenLogprob] | None = None, **extra: Any
    ) -> str:
        nonlocal offset
        if chat:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            if lps is not None:
                choice["logprobs"] = _chat_logprobs(lps)
        else:
            choice = {"index": 0, "text": delta, "finish_reason": finish}
            if lps is not None:
                choice["logprobs"] = _completion_logprobs(lps, offset)
                offset += sum(len(t.token) for t in lps)
        return frame(json.dumps(head | {"object": obj, "choices": [choice]} | extra))

    async def frames() -> AsyncIterator[str]:
        if chat:
            yield chunk({"role": "assistant", "content": ""}, None)
        elif echo:
            yield chunk(echo, None)
        async for event in lifecycle.events(admitted):
            if event.event == "error" and event.error is not None:
                yield frame(ErrorBody(error=event.error).model_dump_json())
                break
            if event.event == "token" and not buffer_calls:
                yield chunk({"content": event.text} if chat else event.text, None, event.logprobs)
            elif event.event == "done" and event.response is not None:
                resp = event.response
                delta: dict[str, Any] | str = {} if chat else ""
                lps = None
                if buffer_calls and chat:
                    msg = _chat_message(resp)
                    delta = {"content": msg["content"]} if msg["content"] else {}
                    if msg["tool_calls"]:
                        delta = {"tool_calls": [c | {"index": i} for i, c in enumerate(msg["tool_calls"])]}
                    lps = resp.logprobs  # nothing was streamed before: all of them, with the calls
                yield chunk(delta, resp.finish_reason, lps, ananke=_ananke(resp))
                if include_usage:
                    yield frame(json.dumps(head | {"object": obj, "choices": [], "usage": _usage(resp)}))
        yield "data: [DONE]\n\n"

    return sse(frames())
