"""User inputs -> protocol constraints: the one place the client turns schemas into constraints.

Accepts typed helpers (:class:`Regex`, :class:`Grammar`, :class:`Choice`, :class:`JsonSchema`,
:class:`TokenMask`), the wire's constraint dicts, Pydantic classes (v2 and ``pydantic.v1``),
TypedDicts, JSON Schema dicts, OpenAI function/tool dicts and OpenAI ``response_format`` dicts.
:func:`to_json_schema` is the one schema converter; :func:`answer_schema` closes its objects for
structured output. Never imports llguidance or vLLM; the service validates and compiles. Never
mutates the caller's objects.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from langchain_core.utils.function_calling import convert_to_json_schema
from pydantic import BaseModel, ValidationError
from pydantic.v1 import BaseModel as BaseModelV1
from typing_extensions import is_typeddict

from langchain_ananke.protocol import Constraints
from langchain_ananke.protocol import TokenMask as _WireTokenMask


@dataclass(frozen=True)
class Regex:
    """The output must fully match ``pattern`` (Rust regex syntax; use ``[0-9]``, not ``\\d``)."""

    pattern: str


@dataclass(frozen=True)
class Grammar:
    """A Lark grammar (llguidance dialect, ``%json`` allowed) or a GBNF ``::=`` grammar."""

    grammar: str


@dataclass(frozen=True)
class Choice:
    """The output is exactly one of ``options``."""

    options: Sequence[str]


@dataclass(frozen=True)
class JsonSchema:
    """Output valid for ``schema``; ``whitespace="flexible"`` allows pretty-printed JSON."""

    schema: Mapping[str, Any]
    whitespace: Literal["compact", "flexible"] = "compact"


@dataclass(frozen=True)
class TokenMask:
    """Only ``allowed_tokens`` and/or never ``forbidden_tokens`` (token ids of the served model)."""

    allowed_tokens: Sequence[int] | None = None
    forbidden_tokens: Sequence[int] | None = None


__all__ = [
    "Choice",
    "ConstraintLike",
    "Constraints",
    "Grammar",
    "JsonSchema",
    "Regex",
    "TokenMask",
    "answer_schema",
    "close_objects",
    "is_pydantic_class",
    "response_format_constraints",
    "schema_name",
    "to_constraints",
    "to_json_schema",
]

ConstraintLike = Constraints | Mapping[str, Any] | Regex | Grammar | Choice | JsonSchema | TokenMask
TEXT_CONSTRAINTS = (Regex, Grammar, Choice)


def to_constraints(value: ConstraintLike) -> Constraints:
    """Any accepted constraint form -> the protocol model (raises ``ValueError`` with the reason)."""
    if isinstance(value, Constraints):
        return value
    if isinstance(value, Regex):
        return Constraints(regex=value.pattern)
    if isinstance(value, Grammar):
        return Constraints(grammar=value.grammar)
    if isinstance(value, Choice):
        return Constraints(choice=list(value.options))
    if isinstance(value, JsonSchema):
        return Constraints(json_schema=copy.deepcopy(dict(value.schema)), whitespace=value.whitespace)
    if isinstance(value, TokenMask):
        mask = _WireTokenMask(
            allowed_tokens=list(value.allowed_tokens) if value.allowed_tokens is not None else None,
            forbidden_tokens=list(value.forbidden_tokens) if value.forbidden_tokens is not None else None,
        )
        return Constraints(token_mask=mask)
    if isinstance(value, Mapping):
        try:
            return Constraints.model_validate(copy.deepcopy(dict(value)))
        except ValidationError as exc:
            raise ValueError(f"invalid constraints: {exc.errors()[0]['msg']}") from exc
    raise TypeError(f"not a constraint: {type(value).__name__}")


def is_pydantic_class(obj: Any) -> bool:
    """A Pydantic model class, v2 or ``pydantic.v1``."""
    return isinstance(obj, type) and issubclass(obj, BaseModel | BaseModelV1)


def schema_name(schema: Any) -> str:
    """A tool/function name for a schema."""
    if isinstance(schema, type):
        return schema.__name__
    if isinstance(schema, Mapping):
        fn = schema.get("function") if schema.get("type") == "function" else schema
        if isinstance(fn, Mapping) and isinstance(fn.get("name"), str):
            return str(fn["name"])
        if isinstance(schema.get("title"), str):
            return str(schema["title"])
    return "output"


def to_json_schema(schema: Any) -> dict[str, Any]:
    """A Pydantic class, TypedDict, JSON Schema dict or OpenAI function/tool dict -> a JSON Schema.

    Raises:
        TypeError: ``schema`` is none of these.
    """
    if isinstance(schema, type) and issubclass(schema, BaseModel):
        return schema.model_json_schema()
    if isinstance(schema, type) and (is_typeddict(schema) or issubclass(schema, BaseModelV1)):
        # As LangChain converts them: TypedDicts from typing and typing_extensions on every Python
        # version (typing.is_typeddict misses the latter before 3.12), and pydantic.v1 models.
        return convert_to_json_schema(schema)
    if isinstance(schema, Mapping):
        if schema.get("type") == "function" and isinstance(schema.get("function"), Mapping):
            schema = schema["function"]
        if "name" in schema and ("parameters" in schema or "description" in schema):
            params = schema.get("parameters") or {"type": "object", "properties": {}}
            return copy.deepcopy(dict(params))
        return copy.deepcopy(dict(schema))
    raise TypeError(
        f"unsupported schema {schema!r}: give a Pydantic class, a TypedDict, a JSON Schema dict "
        "or an OpenAI function/tool dict"
    )


def answer_schema(schema: Any, strict: bool | None = None) -> dict[str, Any]:
    """The JSON Schema structured output is generated under: :func:`to_json_schema`, with objects
    closed by :func:`close_objects` unless ``strict`` is ``False`` (as in OpenAI's strict mode).

    Output is schema-exact either way; closing only stops the model from inventing keys.
    """
    found = to_json_schema(schema)
    return found if strict is False else close_objects(found)


def response_format_constraints(response_format: Any, strict: bool | None = None) -> Constraints | None:
    """An OpenAI ``response_format`` -> the constraint of the final answer (``None`` for text).

    Args:
        response_format: ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``
            (what ``ChatOpenAI`` code and LangChain's ``ProviderStrategy`` bind),
            ``{"type": "json_object"}``, ``{"type": "text"}``, or a schema :func:`to_json_schema`
            takes (a Pydantic class, TypedDict or JSON Schema dict).
        strict: as in :func:`answer_schema`; ``json_schema.strict`` counts the same.

    Raises:
        ValueError: a malformed ``json_schema`` format, or two different ``strict`` values.
        TypeError: an unsupported schema.
    """
    if not (isinstance(response_format, Mapping) and "type" in response_format):
        return Constraints(json_schema=answer_schema(response_format, strict))
    kind = response_format["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraints(json_object=True)
    if kind != "json_schema":  # a bare JSON Schema, e.g. {"type": "object", ...}
        return Constraints(json_schema=answer_schema(response_format, strict))
    spec = response_format.get("json_schema")
    if not isinstance(spec, Mapping) or not isinstance(spec.get("schema"), Mapping):
        raise ValueError("response_format json_schema needs json_schema.schema, a JSON Schema object")
    own = spec.get("strict")
    if strict is not None and own is not None and own is not strict:
        raise ValueError(f"strict={strict} contradicts the response_format's own strict={own}")
    return Constraints(json_schema=answer_schema(spec["schema"], own if own is not None else strict))


def close_objects(schema: Mapping[str, Any]) -> dict[str, Any]:
    """A copy where objects with ``properties`` but no ``additionalProperties`` get ``false``.

    This is what OpenAI's strict mode does. It only narrows the schema (output stays valid for the
    original), and it stops a small model from inventing keys until ``max_tokens`` runs out. Branches
    of ``allOf`` are left open: closing each would reject the keys of the others.
    """
    out = copy.deepcopy(dict(schema))

    def walk(node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item)
            return
        if not isinstance(node, dict):
            return
        if (
            isinstance(node.get("properties"), dict)
            and "additionalProperties" not in node
            and not {"patternProperties", "allOf", "unevaluatedProperties"} & node.keys()
        ):
            node["additionalProperties"] = False
        for key, value in node.items():
            if key not in ("allOf", "enum", "const", "default", "examples"):
                walk(value)

    walk(out)
    return out
