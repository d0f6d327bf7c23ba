"""One error hierarchy for the client; the HTTP layer translates every failure into it.

:func:`check_satisfied` is the one place that turns the service's verdict on an output
(``constraint_satisfied`` in the response metadata) into :class:`ConstraintNotSatisfiedError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from langchain_core.exceptions import OutputParserException


class AnankeError(Exception):
    """Base of every error this package raises."""


class AnankeConnectionError(AnankeError):
    """The service could not be reached (or the connection dropped before an answer)."""


class AnankeTimeoutError(AnankeError):
    """The request or the cold-start deadline ran out."""


class AnankeAPIError(AnankeError):
    """The service answered with an error body.

    ``request_id`` is the request's ``X-Request-ID`` (the service's answer, else the one the client
    sent): the id in the service's log lines about this request.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        code: str = "error",
        detail: Any = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(f"[{status_code} {code}] {message}")
        self.message = message
        self.status_code = status_code
        self.code = code
        self.detail = detail
        self.request_id = request_id

    @property
    def retryable(self) -> bool:
        """Overload, scale-up and gateway errors; never 4xx input errors, nor the service's own
        per-request timeout (504 ``timeout``: the same request would time out again)."""
        if self.code == "timeout":
            return False
        return self.status_code in (429, 502, 503, 504)


class AnankeRequestTimeoutError(AnankeAPIError, AnankeTimeoutError):
    """The service's deadline for this request (``timeout_s``) passed and it aborted the generation.

    A 504 with code ``timeout`` (or a stream's final ``error`` event with that code); ``detail``
    holds ``timeout_s`` and ``tokens_generated``. Not retried: raise ``timeout_s`` or lower
    ``max_tokens`` instead.
    """


class AnankeStreamError(AnankeError):
    """A stream ended without its final event (server died, connection cut)."""


class ConstraintNotSatisfiedError(OutputParserException, AnankeError):
    """The service's independent check says the output does not satisfy the constraint.

    Raised instead of returning a partial or invalid object; ``finish_reason == "length"`` means the
    output was truncated by ``max_tokens``. ``code`` is the service's ``constraint_error_code``
    (``budget_exhausted``, ``schema_mismatch``, ...; see ``protocol.ConstraintErrorCode``).
    """

    def __init__(
        self,
        message: str,
        *,
        finish_reason: str | None = None,
        llm_output: str = "",
        code: str | None = None,
    ) -> None:
        super().__init__(message, llm_output=llm_output)
        self.finish_reason = finish_reason
        self.code = code


def check_satisfied(metadata: Mapping[str, Any] | None, text: str) -> None:
    """Raise when the service's independent check says the output does not satisfy its constraint.

    Args:
        metadata: the response metadata (``response_metadata`` of a message, ``generation_info`` of
            a generation); ``constraint_satisfied`` is ``None`` or absent when nothing was checked.
        text: the output, kept on the error as ``llm_output``.

    Raises:
        ConstraintNotSatisfiedError: ``constraint_satisfied`` is ``False``.
    """
    if metadata and metadata.get("constraint_satisfied") is False:
        reason = metadata.get("constraint_error") or "constraint not satisfied"
        raise ConstraintNotSatisfiedError(
            f"the output does not satisfy the constraint: {reason}",
            finish_reason=metadata.get("finish_reason"),
            llm_output=text,
            code=metadata.get("constraint_error_code"),
        )
