"""Structured-output adapter: user schemas -> constraints, and constrained output -> objects."""

from langchain_ananke.parsers.constraints import (
    Choice,
    Grammar,
    JsonSchema,
    Regex,
    TokenMask,
    to_constraints,
    to_json_schema,
)
from langchain_ananke.parsers.structured import AnankeOutputParser, structured_runnable

__all__ = [
    "AnankeOutputParser",
    "Choice",
    "Grammar",
    "JsonSchema",
    "Regex",
    "TokenMask",
    "structured_runnable",
    "to_constraints",
    "to_json_schema",
]
