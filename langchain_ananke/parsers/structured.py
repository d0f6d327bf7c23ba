"""Structured output: schema -> bound constraint -> parsed, validated result.

Data flow: :func:`structured_runnable` binds a constraint (or a forced tool) on the model and pipes
it into :class:`AnankeOutputParser` (``bound | parser``, as LangChain's partner packages do), which
(1) refuses output the service's independent check marked unsatisfied (truncation included) with
:class:`ConstraintNotSatisfiedError`, (2) parses JSON and validates Pydantic models, and (3) while
streaming yields partial dicts as the JSON grows. ``include_raw=True`` wraps it the way ``ChatOpenAI``
does: ``{"raw", "parsed", "parsing_error"}``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from operator import itemgetter
from typing import Any, Literal

from langchain_core.exceptions import OutputParserException
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.output_parsers.transform import BaseCumulativeTransformOutputParser
from langchain_core.outputs import ChatGeneration, Generation
from langchain_core.runnables import Runnable, RunnableLambda, RunnableMap, RunnablePassthrough
from langchain_core.utils.function_calling import convert_to_json_schema
from langchain_core.utils.json import parse_partial_json
from pydantic import BaseModel, ValidationError
from pydantic.v1 import BaseModel as BaseModelV1
from pydantic.v1 import ValidationError as ValidationErrorV1

from langchain_ananke.errors import check_satisfied
from langchain_ananke.parsers.constraints import (
    TEXT_CONSTRAINTS,
    Constraints,
    answer_schema,
    is_pydantic_class,
    schema_name,
    to_constraints,
)

Target = Literal["pydantic", "json", "text", "tool"]
Method = Literal["json_schema", "function_calling", "json_mode"]


class AnankeOutputParser(BaseCumulativeTransformOutputParser[Any]):
    """Parses constrained output into a Pydantic object, a dict, a string or tool arguments."""

    target: Target = "json"
    pydantic_model: type[BaseModel] | type[BaseModelV1] | None = None
    """A Pydantic (v2, or v1 from ``pydantic.v1``) class the output is validated into."""
    tool_name: str | None = None

    def parse_result(self, result: list[Generation], *, partial: bool = False) -> Any:
        generation = result[0]
        message = generation.message if isinstance(generation, ChatGeneration) else None
        text = generation.text
        if not partial:
            meta = message.response_metadata if message is not None else generation.generation_info
            check_satisfied(meta, text)
        if self.target == "text":
            return text
        if self.target == "tool":
            return self._tool_args(message, partial)
        return self._json(text, partial)

    def parse(self, text: str) -> Any:
        return self.parse_result([Generation(text=text)])

    def _json(self, text: str, partial: bool) -> Any:
        if partial:
            value = parse_partial_json(text) if text.strip() else None
            if self.pydantic_model is not None and value is not None:
                try:
                    return self._instance(value)
                except (ValidationError, ValidationErrorV1):
                    return None
            return value
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise OutputParserException(f"output is not JSON: {exc}", llm_output=text) from exc
        return self._validate(value, text)

    def _validate(self, value: Any, text: str) -> Any:
        if self.pydantic_model is None:
            return value
        try:
            return self._instance(value)
        except (ValidationError, ValidationErrorV1) as exc:
            raise OutputParserException(
                f"output does not validate as {self.pydantic_model.__name__}: {exc}", llm_output=text
            ) from exc

    def _instance(self, value: Any) -> Any:
        model = self.pydantic_model
        assert model is not None  # noqa: S101 - callers check
        if issubclass(model, BaseModelV1):
            return model.parse_obj(value)
        return model.model_validate(value)

    def _tool_args(self, message: BaseMessage | None, partial: bool) -> Any:
        calls = getattr(message, "tool_calls", None) or []
        call = next((c for c in calls if c["name"] == self.tool_name), None)
        if call is None:
            if partial:
                return None
            raise OutputParserException(f"the model did not call {self.tool_name}")
        return self._validate(call["args"], json.dumps(call["args"]))

    def _transform(self, input: Iterator[str | BaseMessage]) -> Iterator[Any]:
        # The base class only ever parses partially; the final, checked parse happens here.
        chunks: list[Any] = []
        last = None
        for parsed in super()._transform(_tee(input, chunks)):
            last = parsed
            yield parsed
        final = self._final(chunks)
        if final != last:
            yield final

    async def _atransform(self, input: AsyncIterator[str | BaseMessage]) -> AsyncIterator[Any]:
        chunks: list[Any] = []
        last = None
        async for parsed in super()._atransform(_atee(input, chunks)):
            last = parsed
            yield parsed
        final = self._final(chunks)
        if final != last:
            yield final

    def _final(self, chunks: list[Any]) -> Any:
        if not chunks:
            raise OutputParserException("the model produced no output")
        acc = chunks[0]
        for chunk in chunks[1:]:
            acc = acc + chunk
        if isinstance(acc, BaseMessage):
            return self.parse_result([ChatGeneration(message=acc)])
        return self.parse_result([Generation(text=str(acc))])

    @property
    def _type(self) -> str:
        return "ananke_structured"


def _tee(source: Iterator[Any], sink: list[Any]) -> Iterator[Any]:
    for item in source:
        sink.append(item)
        yield item


async def _atee(source: AsyncIterator[Any], sink: list[Any]) -> AsyncIterator[Any]:
    async for item in source:
        sink.append(item)
        yield item


def _parser_for(schema: Any, target: Target, tool_name: str | None = None) -> AnankeOutputParser:
    model = schema if is_pydantic_class(schema) else None
    if target == "json" and model is not None:
        target = "pydantic"
    return AnankeOutputParser(target=target, pydantic_model=model, tool_name=tool_name)


def structured_runnable(
    model: Any,
    schema: Any,
    *,
    method: Method = "json_schema",
    include_raw: bool = False,
    strict: bool | None = None,
    extra_bind: dict[str, Any] | None = None,
) -> Runnable[Any, Any]:
    """The ``with_structured_output`` implementation shared by ``AnankeLLM`` and ``ChatAnanke``.

    Args:
        model: the language model (must support ``bind``; ``function_calling`` needs ``bind_tools``).
        schema: Pydantic class, TypedDict, JSON Schema, OpenAI tool dict, or ``Regex``/``Grammar``/
            ``Choice`` (returns the matched string).
        method: ``json_schema`` (grammar-constrained), ``function_calling`` (a forced, constrained
            tool call) or ``json_mode`` (any JSON object).
        include_raw: return ``{"raw", "parsed", "parsing_error"}`` instead of raising.
        strict: like ``ChatOpenAI``'s strict mode, objects are closed (``additionalProperties:
            false`` where the schema does not say) unless ``strict=False``
            (:func:`~langchain_ananke.parsers.constraints.answer_schema`).
        extra_bind: more keywords bound on the model (e.g. ``require_satisfied`` for ``AnankeLLM``).

    Returns:
        ``bound | parser``; with ``include_raw``, ``RunnableMap(raw=bound)`` piped into the parse
        with a fallback that reports the parsing error.
    """
    extra = dict(extra_bind or {})

    bound: Runnable[Any, Any]
    if isinstance(schema, TEXT_CONSTRAINTS):
        bound = model.bind(constraints=to_constraints(schema), **extra)
        parser = AnankeOutputParser(target="text")
    elif method == "function_calling":
        if not hasattr(model, "bind_tools"):
            raise ValueError("method='function_calling' needs a chat model (ChatAnanke)")
        name = schema_name(schema)
        tool = {
            "type": "function",
            "function": {
                "name": name,
                "parameters": answer_schema(schema, strict),
                "description": _description(schema),
            },
        }
        bound = model.bind_tools(
            [tool],
            tool_choice=name,
            parallel_tool_calls=False,
            ls_structured_output_format=_ls_format(schema, method, strict),
            **extra,
        )
        parser = _parser_for(schema, "tool", name)
    elif method in ("json_schema", "json_mode"):
        constraint = (
            Constraints(json_schema=answer_schema(schema, strict))
            if method == "json_schema"
            else Constraints(json_object=True)
        )
        bound = model.bind(
            constraints=constraint, ls_structured_output_format=_ls_format(schema, method, strict), **extra
        )
        parser = _parser_for(schema, "json")
    else:
        raise ValueError(f"unknown method {method!r}; use json_schema, function_calling or json_mode")

    if not include_raw:
        return bound | parser
    parse = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
    on_error = RunnablePassthrough.assign(parsed=lambda _: None)
    with_fallback = parse.with_fallbacks([on_error], exception_key="parsing_error")
    return RunnableMap(raw=bound) | with_fallback


def _description(schema: Any) -> str:
    if isinstance(schema, type):
        return (schema.__doc__ or "").strip()
    if isinstance(schema, dict):
        fn = schema.get("function", schema)
        return str(fn.get("description", ""))
    return ""


def _ls_format(schema: Any, method: str, strict: bool | None) -> dict[str, Any]:
    """Tracing info, as ``ChatOpenAI`` binds it, with the schema already converted.

    LangChain runs ``convert_to_json_schema`` on it for the callbacks on *every* call; for a Pydantic
    class that rebuilds ``model_json_schema()`` each time (0.6 ms, most of this path's client
    overhead). Converting once here gives the same dict (the conversion is idempotent) and leaves
    LangChain a ~7 µs pass. A schema it cannot convert is passed as given (LangChain drops it).
    """
    try:
        converted = convert_to_json_schema(schema)
    except ValueError:
        converted = schema
    return {"kwargs": {"method": method, "strict": strict}, "schema": converted}


def raise_on_unsatisfied(message: AIMessage) -> AIMessage:
    """A runnable step that refuses unsatisfied output (for hand-built chains)."""
    check_satisfied(message.response_metadata, str(message.content))
    return message


RAISE_ON_UNSATISFIED: Runnable[AIMessage, AIMessage] = RunnableLambda(raise_on_unsatisfied)
