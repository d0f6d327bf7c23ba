"""langchain-ananke: guaranteed-valid structured output from open models, for LangChain."""

from langchain_ananke._http import AnankeClient, AsyncAnankeClient, RetryPolicy
from langchain_ananke.errors import (
    AnankeAPIError,
    AnankeConnectionError,
    AnankeError,
    AnankeRequestTimeoutError,
    AnankeStreamError,
    AnankeTimeoutError,
    ConstraintNotSatisfiedError,
)
from langchain_ananke.llms import AnankeLLM, ChatAnanke
from langchain_ananke.parsers import Choice, Grammar, JsonSchema, Regex, TokenMask

__all__ = [
    "AnankeAPIError",
    "AnankeClient",
    "AnankeConnectionError",
    "AnankeError",
    "AnankeLLM",
    "AnankeRequestTimeoutError",
    "AnankeStreamError",
    "AnankeTimeoutError",
    "AsyncAnankeClient",
    "ChatAnanke",
    "Choice",
    "ConstraintNotSatisfiedError",
    "Grammar",
    "JsonSchema",
    "Regex",
    "RetryPolicy",
    "TokenMask",
]
