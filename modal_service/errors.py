"""The service's one error type, and how engine failures are told apart.

Every layer raises :class:`ApiError` for what the caller should hear (a status, a stable ``code``, a
message that names the culprit); the HTTP layer renders it as the one
:class:`~langchain_ananke.protocol.ErrorBody`, or as a stream's ``error`` frame once a stream started.
"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """An error answered with one JSON error body."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        detail: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.detail, self.headers = detail, headers


def is_engine_dead(exc: BaseException) -> bool:
    """vLLM's ``EngineDeadError`` (matched by name: the HTTP layer imports without vLLM)."""
    return any(type(e).__name__ == "EngineDeadError" for e in (exc, exc.__cause__) if e is not None)


def is_engine_rejection(exc: BaseException) -> bool:
    """vLLM refused the request's parameters (``VLLMValidationError``): the client's fault, a 422."""
    return any(type(e).__name__ == "VLLMValidationError" for e in (exc, exc.__cause__) if e is not None)
