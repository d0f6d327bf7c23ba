"""``ChatAnanke``: a LangChain ``BaseChatModel`` over the Ananke service, a drop-in for ``ChatOpenAI``.

Data flow: LangChain messages -> :func:`to_wire_message` -> the one request builder
(``AnankeParams._request``) -> the HTTP client -> :class:`GenerateResponse` (or stream events) ->
an ``AIMessage`` with content or tool calls and the service's verdict in ``response_metadata``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, Literal, Self, cast

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams, LanguageModelInput, ModelProfile
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.tool import tool_call, tool_call_chunk
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import model_validator

from langchain_ananke.errors import check_satisfied
from langchain_ananke.llms._common import (
    AnankeParams,
    ananke_ls_params,
    check_call_kwargs,
    response_metadata,
    usage_metadata,
)
from langchain_ananke.llms._profile import ServiceProfile, token_limits
from langchain_ananke.parsers.constraints import response_format_constraints
from langchain_ananke.protocol import GenerateResponse, StreamEvent

_ROLES = {
    "human": "user",
    "user": "user",
    "ai": "assistant",
    "assistant": "assistant",
    "system": "system",
    "developer": "system",
    "tool": "tool",
}


def _content(message: BaseMessage) -> str:
    if isinstance(message.content, str):
        return message.content
    return "".join(
        part if isinstance(part, str) else str(part.get("text", ""))
        for part in message.content
        if isinstance(part, str) or part.get("type") == "text"
    )


def to_wire_message(message: BaseMessage) -> dict[str, Any]:
    """A LangChain message -> a protocol chat message dict."""
    if isinstance(message, HumanMessage | AIMessage | SystemMessage | ToolMessage | ChatMessage):
        role = message.role if isinstance(message, ChatMessage) else message.type
    else:
        raise TypeError(f"unsupported message type: {type(message).__name__}")
    if role not in _ROLES:
        raise ValueError(f"unsupported chat role: {role}")
    wire: dict[str, Any] = {"role": _ROLES[role], "content": _content(message)}
    if isinstance(message, AIMessage) and message.tool_calls:
        wire["tool_calls"] = [
            {"id": c.get("id") or "", "name": c["name"], "arguments": c["args"]} for c in message.tool_calls
        ]
    if isinstance(message, ToolMessage):
        wire["tool_call_id"] = message.tool_call_id
    return wire


def _ai_fields(resp: GenerateResponse, model: str | None) -> dict[str, Any]:
    calls = [tool_call(name=c.name, args=c.arguments, id=c.id) for c in resp.tool_calls or []]
    return {
        "content": "" if calls else resp.generated_text,
        "tool_calls": calls,
        "usage_metadata": usage_metadata(resp),
        "response_metadata": response_metadata(resp, model),
    }


ToolChoice = dict[str, Any] | str | Literal["auto", "any", "required", "none"] | bool | None


def _tool_choice(choice: ToolChoice, names: list[str]) -> str:
    if choice is None or choice == "auto":
        return "auto"
    if choice is True or choice in ("any", "required"):
        return "required"
    if choice is False or choice == "none":
        return "none"
    if isinstance(choice, dict):
        choice = choice.get("function", {}).get("name") or choice.get("name")
    if isinstance(choice, str) and choice in names:
        return choice
    raise ValueError(f"tool_choice {choice!r} is not auto/any/required/none or one of {names}")


class ChatAnanke(AnankeParams, BaseChatModel):
    """Chat model with grammar-constrained structured output and tool calls.

    Setup:
        ``pip install langchain-ananke``; run ``ananke serve`` (or deploy to Modal) and set
        ``ANANKE_BASE_URL`` / ``ANANKE_API_KEY``.

    Instantiate:
        .. code-block:: python

            from langchain_ananke import ChatAnanke
            llm = ChatAnanke(temperature=0, max_tokens=256)

    Invoke:
        .. code-block:: python

            llm.invoke([("system", "Be brief."), ("human", "Name a colour.")])

    Stream:
        .. code-block:: python

            for chunk in llm.stream("Tell me a joke"):
                print(chunk.content, end="")

    Structured output:
        .. code-block:: python

            class Person(BaseModel):
                name: str
                age: int

            llm.with_structured_output(Person).invoke("Bob is 31.")  # Person(name='Bob', age=31)

    Tool calling:
        .. code-block:: python

            llm.bind_tools([multiply], tool_choice="any").invoke("What is 6 times 7?").tool_calls

    Agents:
        .. code-block:: python

            from langchain.agents import create_agent
            agent = create_agent(llm, [multiply], response_format=Person)  # ProviderStrategy

        ``profile`` declares native structured output, so LangChain picks ``ProviderStrategy``:
        each turn is either valid tool calls or a final answer valid for ``Person``, one grammar.

    Every constrained answer carries ``response_metadata["constraint_satisfied"]`` from the
    service's independent re-check; structured output raises
    :class:`~langchain_ananke.errors.ConstraintNotSatisfiedError` rather than return a partial object.
    """

    @property
    def _llm_type(self) -> str:
        return "ananke-chat"

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        return ananke_ls_params(super()._get_ls_params(stop=stop, **kwargs))

    def _chat_request(
        self, messages: list[BaseMessage], stop: list[str] | None, stream: bool, **kwargs: Any
    ) -> Any:
        return self._request(
            messages=[to_wire_message(m) for m in messages], stop=stop, stream=stream, **kwargs
        )

    def _resolve_model_profile(self) -> ModelProfile | None:
        """The static capabilities; the token limits come from the service on first lookup."""
        return cast("ModelProfile", ServiceProfile(lambda: token_limits(self.client.models())))

    @model_validator(mode="after")
    def _arm_profile(self) -> Self:
        # Runs after langchain-core's own profile validators, which read the whole mapping.
        if isinstance(self.profile, ServiceProfile):
            self.profile.arm()
        return self

    def _message_fields(self, resp: GenerateResponse, require: bool) -> dict[str, Any]:
        fields = _ai_fields(resp, self.model)
        if require:
            check_satisfied(fields["response_metadata"], resp.generated_text)
        return fields

    def _result(self, resp: Any, require: bool) -> ChatResult:
        assert isinstance(resp, GenerateResponse)  # noqa: S101 - a chat request has one answer
        message = AIMessage(**self._message_fields(resp, require))
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        request, require = self._chat_request(messages, stop, False, **kwargs)
        return self._result(self.client.generate(request), require)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        request, require = self._chat_request(messages, stop, False, **kwargs)
        return self._result(await self.async_client.generate(request), require)

    def _chunk(self, event: StreamEvent, require: bool, tools: bool) -> ChatGenerationChunk | None:
        """Token events become content chunks (held back while tool calls may be forming)."""
        if event.event == "token":
            return None if tools else ChatGenerationChunk(message=AIMessageChunk(content=event.text))
        if event.response is None:
            return None
        fields = self._message_fields(event.response, require)
        chunks = [
            tool_call_chunk(name=c["name"], args=json.dumps(c["args"]), id=c["id"], index=i)
            for i, c in enumerate(fields.pop("tool_calls"))
        ]
        if not tools or chunks:
            fields["content"] = ""
        return ChatGenerationChunk(
            message=AIMessageChunk(**fields, tool_call_chunks=chunks, chunk_position="last")
        )

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        request, require = self._chat_request(messages, stop, True, **kwargs)
        tools = bool(request.tools) and request.tool_choice != "none"
        for event in self.client.stream(request):
            chunk = self._chunk(event, require, tools)
            if chunk is not None:
                if run_manager:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        request, require = self._chat_request(messages, stop, True, **kwargs)
        tools = bool(request.tools) and request.tool_choice != "none"
        async for event in self.async_client.stream(request):
            chunk = self._chunk(event, require, tools)
            if chunk is not None:
                if run_manager:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: ToolChoice = None,
        parallel_tool_calls: bool | None = None,
        strict: bool | None = None,
        response_format: Any = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools; every call the model makes is generated under the service's tool grammar.

        With ``response_format`` as well, one grammar covers the turn: the model either calls tools
        or gives a final answer valid for that schema, as JSON text in ``content`` (what LangChain's
        ``ProviderStrategy`` parses). ``tool_choice`` ``required`` or a name allows only calls,
        ``none`` only the answer.

        Args:
            tools: LangChain tools, Pydantic classes, functions or OpenAI tool dicts; may be empty.
            tool_choice: ``auto`` (default), ``any``/``required``, ``none``, or a tool name.
            parallel_tool_calls: allow several calls in one answer (default True).
            strict: accepted so ``ChatOpenAI`` code runs unchanged: tool arguments always match
                their schema exactly. ``strict=False`` leaves the answer schema's objects open
                (:func:`~langchain_ananke.parsers.constraints.answer_schema`).
            response_format: the final answer's schema: OpenAI's ``{"type": "json_schema",
                "json_schema": {"name", "schema", "strict"}}``, or a Pydantic class, TypedDict or
                JSON Schema dict. Without tools, ``{"type": "json_object"}`` works too.
            **kwargs: more request fields (``max_tokens``, ``constraints``, ...) and LangChain's
                ``ls_structured_output_format``.

        Raises:
            TypeError: a keyword that no request field takes.
            ValueError: a ``tool_choice`` that no given tool satisfies, or a malformed
                ``response_format``.
        """
        check_call_kwargs(kwargs)
        specs = [convert_to_openai_tool(t) for t in tools]
        names = [s["function"]["name"] for s in specs]
        for spec in specs:
            spec["function"].setdefault("parameters", {"type": "object", "properties": {}})
            spec["function"].pop("strict", None)
        choice = _tool_choice(tool_choice, names)
        bound: dict[str, Any] = {}
        if specs:
            bound |= {"tools": specs, "tool_choice": choice}
        elif choice == "required":
            raise ValueError(f"tool_choice {tool_choice!r} needs at least one tool")
        if parallel_tool_calls is not None:
            bound["parallel_tool_calls"] = parallel_tool_calls
        # Converted once here rather than on every call (a Pydantic class rebuilds its schema).
        answer = response_format_constraints(response_format, strict) if response_format else None
        if answer is not None:
            if kwargs.get("constraints") is not None:
                raise ValueError("give either constraints or response_format, not both")
            bound["constraints"] = answer
        return super().bind(**bound, **kwargs)
