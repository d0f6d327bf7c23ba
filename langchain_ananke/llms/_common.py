"""Shared configuration, the one request builder and the response-metadata mapping.

``AnankeLLM`` and ``ChatAnanke`` both mix in :class:`AnankeParams`. Every code path (sync, async,
stream, non-stream, batch) builds its request with :meth:`AnankeParams._request` and reads results
with :func:`response_metadata` / :func:`usage_metadata`; a caller that asked for a guarantee
(``require_satisfied``) has the metadata checked by :func:`~langchain_ananke.errors.check_satisfied`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, ClassVar

from langchain_core.language_models import LangSmithParams, LanguageModelInput
from langchain_core.messages.ai import UsageMetadata
from langchain_core.runnables import Runnable
from langchain_core.utils import from_env, secret_from_env
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, model_validator

from langchain_ananke._http import DEFAULT_BASE_URL, AnankeClient, AsyncAnankeClient, RetryPolicy
from langchain_ananke.parsers.constraints import (
    ConstraintLike,
    response_format_constraints,
    to_constraints,
)
from langchain_ananke.parsers.structured import Method, structured_runnable
from langchain_ananke.protocol import GenerateRequest, GenerateResponse

#: Per-call keywords the request builder understands (besides the sampling fields).
CALL_KWARGS = frozenset(
    {
        "constraints",
        "response_format",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "require_satisfied",
        "ls_structured_output_format",
        "timeout_s",
    }
)
SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "seed", "stop")


def check_call_kwargs(kwargs: Mapping[str, Any]) -> None:
    """Raise ``TypeError`` naming the keywords no request field takes."""
    unknown = set(kwargs) - CALL_KWARGS - set(SAMPLING_FIELDS)
    if unknown:
        raise TypeError(f"unexpected keyword arguments: {', '.join(sorted(unknown))}")


class AnankeParams(BaseModel):
    """Connection and sampling settings shared by ``AnankeLLM`` and ``ChatAnanke``."""

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True)

    base_url: str = Field(default_factory=from_env("ANANKE_BASE_URL", default=DEFAULT_BASE_URL))
    """Service URL (``ANANKE_BASE_URL``); a local ``ananke serve`` or a Modal deployment."""
    api_key: SecretStr | None = Field(default_factory=secret_from_env("ANANKE_API_KEY", default=None))
    """Bearer key (``ANANKE_API_KEY``), if the service requires one."""
    model: str | None = Field(default=None, alias="model_name")
    """Model name, for tracing; the service serves one model."""
    temperature: float | None = None
    """Sampling temperature; ``None`` uses the service default (0.7)."""
    max_tokens: int | None = 512
    """Output token cap; constrained output cut short by it is reported unsatisfied, never valid."""
    top_p: float | None = None
    stop: list[str] | None = None
    seed: int | None = None
    timeout: float | None = 120.0
    """Per-request HTTP timeout in seconds."""
    max_retries: int = 2
    """Retries for connection errors and 429/502/503/504 (cold starts), with backoff and jitter."""
    cold_start_timeout: float = 300.0
    """Give up retrying after this many seconds."""
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    """More request fields sent as is (e.g. ``timeout_s``)."""
    default_headers: dict[str, str] | None = None
    modal_key: SecretStr | None = Field(default_factory=secret_from_env("ANANKE_MODAL_KEY", default=None))
    """Modal proxy-auth token id (``ANANKE_MODAL_KEY``), sent as ``Modal-Key``."""
    modal_secret: SecretStr | None = Field(
        default_factory=secret_from_env("ANANKE_MODAL_SECRET", default=None)
    )
    """Modal proxy-auth token secret (``ANANKE_MODAL_SECRET``), sent as ``Modal-Secret``."""

    #: Keywords ``with_structured_output`` binds besides the constraint.
    _structured_bind: ClassVar[dict[str, Any]] = {}

    _client: AnankeClient | None = PrivateAttr(default=None)
    _async_client: AsyncAnankeClient | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _known_parameters(cls, values: Any) -> Any:
        """Accept ChatOpenAI's ``max_completion_tokens``; warn about (and drop) unknown parameters
        instead of ignoring them silently, so a typo or an OpenAI-only option is visible."""
        if not isinstance(values, dict):
            return values
        values = dict(values)
        if "max_completion_tokens" in values:
            alias = values.pop("max_completion_tokens")
            values.setdefault("max_tokens", alias)
        fields = cls.model_fields
        known = set(fields) | {f.alias for f in fields.values() if f.alias}
        unknown = sorted(set(values) - known)
        if unknown:
            warnings.warn(
                f"{cls.__name__} ignores unknown parameters: {', '.join(unknown)} "
                "(extra request fields go in model_kwargs)",
                UserWarning,
                stacklevel=2,
            )
            for key in unknown:
                del values[key]
        return values

    def _client_args(self) -> dict[str, Any]:
        return {
            "base_url": self.base_url,
            "api_key": self.api_key.get_secret_value() if self.api_key else None,
            "timeout": self.timeout,
            "retry": RetryPolicy(max_retries=self.max_retries, deadline=self.cold_start_timeout),
            "headers": self.default_headers,
            "modal_key": self.modal_key.get_secret_value() if self.modal_key else None,
            "modal_secret": self.modal_secret.get_secret_value() if self.modal_secret else None,
        }

    @property
    def client(self) -> AnankeClient:
        if self._client is None:
            self._client = AnankeClient(**self._client_args())
        return self._client

    @property
    def async_client(self) -> AsyncAnankeClient:
        if self._async_client is None:
            self._async_client = AsyncAnankeClient(**self._client_args())
        return self._async_client

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"base_url": self.base_url, "model": self.model, **self._default_params}

    @property
    def _default_params(self) -> dict[str, Any]:
        params = {k: getattr(self, k) for k in SAMPLING_FIELDS if getattr(self, k) is not None}
        return params | self.model_kwargs

    def _request(
        self,
        *,
        prompt: str | list[str] | None = None,
        messages: list[dict[str, Any]] | None = None,
        stop: list[str] | None = None,
        stream: bool = False,
        **kwargs: Any,
    ) -> tuple[GenerateRequest, bool]:
        """The one request builder. Returns the request and whether unsatisfied output must raise.

        ``response_format`` (OpenAI's shape, or a schema) becomes ``constraints`` here; with
        ``tools`` it is the schema of the final answer.
        """
        check_call_kwargs(kwargs)
        kwargs = dict(kwargs)
        kwargs.pop("ls_structured_output_format", None)
        require = bool(kwargs.pop("require_satisfied", False))
        fields: dict[str, Any] = self._default_params
        fields |= {k: kwargs.pop(k) for k in SAMPLING_FIELDS if kwargs.get(k) is not None}
        if stop is not None:
            fields["stop"] = stop
        constraints: ConstraintLike | None = kwargs.pop("constraints", None)
        response_format = kwargs.pop("response_format", None)
        if constraints is not None and response_format is not None:
            raise ValueError("give either constraints or response_format, not both")
        if constraints is not None:
            fields["constraints"] = to_constraints(constraints)
        elif response_format is not None:
            fields["constraints"] = response_format_constraints(response_format)
        fields |= {k: v for k, v in kwargs.items() if v is not None}
        fields |= {"prompt": prompt, "messages": messages, "stream": stream}
        return GenerateRequest.model_validate(fields), require

    def with_structured_output(
        self,
        schema: Any,
        *,
        method: Method = "json_schema",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, Any]:
        """Constrained output parsed into ``schema``, like ``ChatOpenAI.with_structured_output``.

        Args:
            schema: Pydantic class (a validated instance), TypedDict / JSON Schema / OpenAI tool
                dict (a dict), or ``Regex``/``Grammar``/``Choice`` (the matched string).
            method: ``json_schema`` (default), ``function_calling`` (chat models) or ``json_mode``.
            include_raw: return ``{"raw", "parsed", "parsing_error"}`` instead of raising.
            strict: output always matches the schema exactly; ``strict=False`` leaves objects
                open to keys the schema does not list, as OpenAI's non-strict mode does.

        Returns:
            The bound model piped into the parser. Unsatisfied output raises
            :class:`~langchain_ananke.errors.ConstraintNotSatisfiedError`.
        """
        if kwargs:
            raise TypeError(f"unexpected keyword arguments: {', '.join(kwargs)}")
        return structured_runnable(
            self,
            schema,
            method=method,
            include_raw=include_raw,
            strict=strict,
            extra_bind=self._structured_bind,
        )


def ananke_ls_params(params: LangSmithParams) -> LangSmithParams:
    """The base class's LangSmith params, marked as ours. The base already resolved a per-call
    ``model`` override, then ``self.model``."""
    params["ls_provider"] = "ananke"
    params["ls_model_name"] = params.get("ls_model_name") or "ananke"
    return params


def response_metadata(resp: GenerateResponse, model: str | None = None) -> dict[str, Any]:
    """What ``response_metadata`` / ``generation_info`` carry."""
    return {
        "finish_reason": resp.finish_reason,
        "constraint_satisfied": resp.constraint_satisfied,
        "constraint_error": resp.constraint_error,
        "constraint_error_code": resp.constraint_error_code,
        "model_name": resp.metadata.get("model") or model,
        "generation_time_ms": resp.generation_time_ms,
        "tokens_generated": resp.tokens_generated,
        "metadata": resp.metadata,
    }


def usage_metadata(resp: GenerateResponse) -> UsageMetadata:
    return UsageMetadata(
        input_tokens=resp.usage.prompt_tokens,
        output_tokens=resp.usage.completion_tokens,
        total_tokens=resp.usage.total_tokens,
    )
