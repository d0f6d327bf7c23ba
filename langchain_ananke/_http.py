"""All HTTP code: sync + async httpx clients, retries, error translation, SSE decoding.

Data flow: a protocol :class:`GenerateRequest` -> JSON POST -> (retry on connection errors and
429/502/503/504 with exponential backoff + jitter, up to ``max_retries`` and a cold-start deadline;
never the service's own 504 ``timeout``, raised as :class:`AnankeRequestTimeoutError`)
-> :class:`GenerateResponse` / :class:`BatchGenerateResponse`, or for ``stream=True`` a sequence of
:class:`StreamEvent` decoded from ``data:`` lines. A request is retried only when no response body
has been consumed yet, so nothing is generated twice for the caller.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import AsyncIterator, Generator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
from pydantic import ValidationError

from langchain_ananke.errors import (
    AnankeAPIError,
    AnankeConnectionError,
    AnankeError,
    AnankeRequestTimeoutError,
    AnankeStreamError,
    AnankeTimeoutError,
)
from langchain_ananke.protocol import (
    BatchGenerateResponse,
    GenerateRequest,
    GenerateResponse,
    HealthResponse,
    StreamEvent,
)

DEFAULT_BASE_URL = "http://127.0.0.1:8000"


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, bounded by attempts and a wall-clock deadline."""

    max_retries: int = 2
    initial_delay: float = 0.5
    max_delay: float = 10.0
    deadline: float = 300.0
    """Seconds to keep retrying a cold start (a scaled-to-zero GPU container takes minutes)."""

    def delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_delay)
        return random.uniform(0, min(self.max_delay, self.initial_delay * 2**attempt))  # noqa: S311

    def should_retry(self, attempt: int, started: float, wait: float) -> bool:
        return attempt < self.max_retries and time.monotonic() - started + wait < self.deadline


def _api_error(response: httpx.Response) -> AnankeAPIError:
    """Translate an error answer (the service's body shape, or anything a proxy sent)."""
    code, message, detail = "http_error", response.reason_phrase or "error", None
    try:
        body = response.json()
        err = body.get("error", body) if isinstance(body, dict) else {}
        code = str(err.get("code", code))
        message = str(err.get("message", message))
        detail = err.get("detail")
    except (ValueError, AttributeError):
        text = response.text[:500] if not response.is_stream_consumed or response.is_closed else ""
        message = text or message
    return api_error(
        message,
        status_code=response.status_code,
        code=code,
        detail=detail,
        request_id=response.headers.get("x-request-id"),
    )


def api_error(
    message: str, *, status_code: int, code: str, detail: Any = None, request_id: str | None = None
) -> AnankeAPIError:
    """The typed error for one error answer: :class:`AnankeRequestTimeoutError` for the service's
    own timeout, :class:`AnankeAPIError` otherwise."""
    cls = AnankeRequestTimeoutError if code == "timeout" else AnankeAPIError
    return cls(message, status_code=status_code, code=code, detail=detail, request_id=request_id)


#: HTTP status of a stream's ``error`` event, by code (the status the request would have had).
_STREAM_ERROR_STATUS = {
    "timeout": 504,
    "engine_unavailable": 503,
    "invalid_request": 422,
    "invalid_constraint": 422,
}


def _redirect_error(response: httpx.Response) -> AnankeAPIError:
    location = response.headers.get("location", "?")
    return AnankeAPIError(
        f"the service answered with a redirect to {location}; redirects are not followed "
        "(so the API key never leaves the configured base_url): fix base_url",
        status_code=response.status_code,
        code="redirect",
    )


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    default_port = {"http": 80, "https": 443}.get(url.scheme)
    return url.scheme, url.host, url.port or default_port


#: Headers that carry credentials: sent only to the configured origin.
CREDENTIAL_HEADERS = ("Authorization", "Modal-Key", "Modal-Secret")


class _OriginBound(httpx.Auth):
    """Strips the credential headers from any request not for the configured base URL's origin.

    The clients never follow redirects either (a 3xx is an error); this keeps the key from any
    other host even if a request were ever built with an absolute URL.
    """

    def __init__(self, base_url: str) -> None:
        self._origin = _origin(httpx.URL(base_url))

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if _origin(request.url) != self._origin:
            for name in CREDENTIAL_HEADERS:
                request.headers.pop(name, None)
        yield request


def _retry_after(response: httpx.Response | None) -> float | None:
    if response is None:
        return None
    value = response.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def parse_response(data: Any) -> GenerateResponse | BatchGenerateResponse:
    """The one response parser: JSON -> protocol model."""
    try:
        if isinstance(data, dict) and "results" in data:
            return BatchGenerateResponse.model_validate(data)
        return GenerateResponse.model_validate(data)
    except ValidationError as exc:
        raise AnankeError(f"unexpected response from the service: {exc}") from exc


def decode_sse_line(line: str) -> StreamEvent | None:
    """One ``data:`` line -> a stream event (None for keep-alives and comments)."""
    if not line.startswith("data:"):
        return None
    payload = line[5:].strip()
    if not payload or payload == "[DONE]":
        return None
    try:
        return StreamEvent.model_validate_json(payload)
    except ValidationError as exc:
        raise AnankeStreamError(f"malformed stream event: {payload[:200]}") from exc


def _check_event(event: StreamEvent) -> StreamEvent:
    if event.event == "error":
        err = event.error
        code = err.code if err else "error"
        raise api_error(
            err.message if err else "stream error",
            status_code=_STREAM_ERROR_STATUS.get(code, 500),
            code=code,
            detail=err.detail if err else None,
        )
    return event


_RETRYABLE_EXC = (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


class _Base:
    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        *,
        api_key: str | None = None,
        timeout: float | None = 120.0,
        retry: RetryPolicy | None = None,
        headers: dict[str, str] | None = None,
        modal_key: str | None = None,
        modal_secret: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retry = retry or RetryPolicy()
        self._headers = {"Accept": "application/json", **(headers or {})}
        if modal_key and modal_secret:  # Modal proxy auth (requires_proxy_auth=True deployments)
            self._headers |= {"Modal-Key": modal_key, "Modal-Secret": modal_secret}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._auth = _OriginBound(self.base_url)
        self._timeout = httpx.Timeout(timeout, connect=min(timeout or 10.0, 10.0))
        self._json_headers = {**self._headers, "Content-Type": "application/json"}
        self._urls: dict[str, httpx.URL] = {}

    def _request(self, method: str, path: str, body: dict[str, Any] | None) -> httpx.Request:
        """The request for ``path`` under ``base_url``, with the configured headers.

        Built directly rather than with ``build_request``, which parses and merges the URL and the
        client's headers on every call; the fixed parts are built once here. On the 2-core dev box
        that is ~0.2 ms of the ~0.5 ms the client adds to a call (bench/client_overhead.py). The
        client still sends it (auth flow, timeouts, no redirects, transports and proxies)."""
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = httpx.URL(self.base_url + path)
        if body is None:
            return httpx.Request(method, url, headers=self._headers)
        content = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
        return httpx.Request(method, url, content=content, headers=self._json_headers)

    def _client_kwargs(self) -> dict[str, Any]:
        # follow_redirects=False is httpx's default; it is spelled out because the key depends on it.
        return {
            "base_url": self.base_url,
            "headers": self._headers,
            "timeout": self._timeout,
            "auth": self._auth,
            "follow_redirects": False,
        }

    @staticmethod
    def _body(request: GenerateRequest) -> dict[str, Any]:
        return request.model_dump(mode="json", exclude_none=True)

    def _outcome(self, exc: Exception | None, response: httpx.Response | None) -> Exception | None:
        """None when the answer is usable; otherwise the error to raise or retry on."""
        if exc is not None:
            if isinstance(exc, httpx.TimeoutException):
                return AnankeTimeoutError(f"request to {self.base_url} timed out: {exc}")
            return AnankeConnectionError(f"cannot reach the Ananke service at {self.base_url}: {exc}")
        assert response is not None  # noqa: S101
        if response.is_success:
            return None
        return _redirect_error(response) if response.is_redirect else _api_error(response)

    def _give_up(self, error: Exception, attempt: int, started: float, wait: float) -> Exception:
        """The error to raise: after retries, one message that names the cause and the effort."""
        if attempt == 0 or not self._retryable(error):
            return error
        elapsed = time.monotonic() - started
        cause = (
            f"after {attempt + 1} attempts over {elapsed:.0f} s the service at {self.base_url} "
            f"still answers: {error}"
        )
        if attempt < self.retry.max_retries and elapsed + wait >= self.retry.deadline:
            return AnankeTimeoutError(f"cold-start deadline of {self.retry.deadline:.0f} s passed; {cause}")
        if isinstance(error, AnankeAPIError):
            return api_error(
                cause,
                status_code=error.status_code,
                code=error.code,
                detail=error.detail,
                request_id=error.request_id,
            )
        return AnankeConnectionError(cause)

    @staticmethod
    def _retryable(error: Exception) -> bool:
        return isinstance(error, AnankeConnectionError) or (
            isinstance(error, AnankeAPIError) and error.retryable
        )


class AnankeClient(_Base):
    """Synchronous client for the Ananke service."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._client = httpx.Client(**self._client_kwargs())

    def close(self) -> None:
        self._client.close()

    def _send(self, method: str, path: str, body: dict[str, Any] | None, stream: bool) -> httpx.Response:
        started, attempt = time.monotonic(), 0
        while True:
            response: httpx.Response | None = None
            exc: Exception | None = None
            try:
                response = self._client.send(self._request(method, path, body), stream=stream)
                if stream and not response.is_success:
                    response.read()
            except (*_RETRYABLE_EXC, httpx.TimeoutException) as err:
                exc = err
            error = self._outcome(exc, response)
            if error is None:
                assert response is not None  # noqa: S101
                return response
            wait = self.retry.delay(attempt, _retry_after(response))
            if not (self._retryable(error) and self.retry.should_retry(attempt, started, wait)):
                raise self._give_up(error, attempt, started, wait) from exc
            time.sleep(wait)
            attempt += 1

    def health(self) -> HealthResponse:
        """``GET /health`` once, no retries (503 while loading is an answer here)."""
        try:
            response = self._client.get("/health")
        except (*_RETRYABLE_EXC, httpx.TimeoutException) as exc:
            raise self._outcome(exc, None) from exc  # type: ignore[misc]
        return HealthResponse.model_validate(response.json())

    def generate(self, request: GenerateRequest) -> GenerateResponse | BatchGenerateResponse:
        """``POST /generate_api`` (non-streaming)."""
        response = self._send("POST", "/generate_api", self._body(request), stream=False)
        return parse_response(response.json())

    def stream(self, request: GenerateRequest) -> Iterator[StreamEvent]:
        """``POST /generate_api`` with ``stream=true``: token events, then ``done``."""
        body = self._body(request) | {"stream": True}
        response = self._send("POST", "/generate_api", body, stream=True)
        done = False
        try:
            for line in response.iter_lines():
                event = decode_sse_line(line)
                if event is not None:
                    done = done or event.event == "done"
                    yield _check_event(event)
        except httpx.HTTPError as exc:
            raise AnankeStreamError(f"stream from {self.base_url} broke off: {exc}") from exc
        finally:
            response.close()
        if not done:
            raise AnankeStreamError("stream ended without its final event (the server stopped?)")


class AsyncAnankeClient(_Base):
    """Asynchronous client for the Ananke service."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._client = httpx.AsyncClient(**self._client_kwargs())

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _send(
        self, method: str, path: str, body: dict[str, Any] | None, stream: bool
    ) -> httpx.Response:
        import asyncio

        started, attempt = time.monotonic(), 0
        while True:
            response: httpx.Response | None = None
            exc: Exception | None = None
            try:
                response = await self._client.send(self._request(method, path, body), stream=stream)
                if stream and not response.is_success:
                    await response.aread()
            except (*_RETRYABLE_EXC, httpx.TimeoutException) as err:
                exc = err
            error = self._outcome(exc, response)
            if error is None:
                assert response is not None  # noqa: S101
                return response
            wait = self.retry.delay(attempt, _retry_after(response))
            if not (self._retryable(error) and self.retry.should_retry(attempt, started, wait)):
                raise self._give_up(error, attempt, started, wait) from exc
            await asyncio.sleep(wait)
            attempt += 1

    async def generate(self, request: GenerateRequest) -> GenerateResponse | BatchGenerateResponse:
        """``POST /generate_api`` (non-streaming)."""
        response = await self._send("POST", "/generate_api", self._body(request), stream=False)
        return parse_response(json.loads(response.content))

    async def stream(self, request: GenerateRequest) -> AsyncIterator[StreamEvent]:
        """``POST /generate_api`` with ``stream=true``: token events, then ``done``."""
        body = self._body(request) | {"stream": True}
        response = await self._send("POST", "/generate_api", body, stream=True)
        done = False
        try:
            async for line in response.aiter_lines():
                event = decode_sse_line(line)
                if event is not None:
                    done = done or event.event == "done"
                    yield _check_event(event)
        except httpx.HTTPError as exc:
            raise AnankeStreamError(f"stream from {self.base_url} broke off: {exc}") from exc
        finally:
            await response.aclose()
        if not done:
            raise AnankeStreamError("stream ended without its final event (the server stopped?)")
