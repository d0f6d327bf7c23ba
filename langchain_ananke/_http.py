"""All HTTP code: a sync and an async httpx client over one retry and decision core.

Data flow: a protocol :class:`GenerateRequest` -> :class:`_Call` builds the JSON POST, with one
``X-Request-ID`` for the call (the caller's ``request_id``, or a new one; the same on every retry, so
the service's logs tie the attempts together) -> the client sends it (the only step that differs
between sync and async) -> :meth:`_Call.outcome` decides: use the answer; or wait and send again
(connection errors and 429/502/503/504, exponential backoff with jitter, up to ``max_retries`` and a
cold-start deadline; never the service's own 504 ``timeout``, raised as
:class:`AnankeRequestTimeoutError`); or raise the translated error, with the request id ->
:func:`parse_response` gives a :class:`GenerateResponse` / :class:`BatchGenerateResponse`, or, for
``stream=True``, :class:`_EventReader` turns ``data:`` lines into :class:`StreamEvent`. A request is
retried only before any response body has been consumed, so nothing is generated twice for the caller.

One module (a little over 450 lines) because the house keeps all HTTP code in one place: the two
clients are thin shells around the shared core, and splitting them would split the core from them.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
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
    ModelList,
    StreamEvent,
)

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
#: The header that carries a request's id both ways; the service echoes a sane one (up to 128 of
#: ``A-Z a-z 0-9 . _ : + = / -``) and makes its own otherwise.
REQUEST_ID_HEADER = "X-Request-ID"


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, bounded by attempts and a wall-clock deadline."""

    max_retries: int = 2
    initial_delay: float = 0.5
    max_delay: float = 10.0
    deadline: float = 300.0
    """Seconds to keep retrying a cold start (a scaled-to-zero GPU container takes minutes)."""

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait before retry number ``attempt + 1``; the server's ``Retry-After`` wins."""
        if retry_after is not None:
            return min(retry_after, self.max_delay)
        return random.uniform(0, min(self.max_delay, self.initial_delay * 2**attempt))  # noqa: S311

    def should_retry(self, attempt: int, started: float, wait: float) -> bool:
        """Whether another attempt fits in both the attempt count and the deadline."""
        return attempt < self.max_retries and time.monotonic() - started + wait < self.deadline


def api_error(
    message: str, *, status_code: int, code: str, detail: Any = None, request_id: str | None = None
) -> AnankeAPIError:
    """The typed error for one error answer: :class:`AnankeRequestTimeoutError` for the service's
    own timeout, :class:`AnankeAPIError` otherwise."""
    cls = AnankeRequestTimeoutError if code == "timeout" else AnankeAPIError
    return cls(message, status_code=status_code, code=code, detail=detail, request_id=request_id)


def _answer_error(response: httpx.Response) -> AnankeAPIError:
    """Translate an error answer: the service's body shape, anything a proxy sent, or a redirect."""
    if response.is_redirect:
        location = response.headers.get("location", "?")
        return AnankeAPIError(
            f"the service answered with a redirect to {location}; redirects are not followed "
            "(so the API key never leaves the configured base_url): fix base_url",
            status_code=response.status_code,
            code="redirect",
        )
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
        message, status_code=response.status_code, code=code, detail=detail, request_id=_request_id(response)
    )


def _request_id(response: httpx.Response) -> str | None:
    """The id the service answered with; else (a proxy's answer, say) the one that was sent."""
    answered: str | None = response.headers.get(REQUEST_ID_HEADER)
    if answered is not None:
        return answered
    try:
        sent: str | None = response.request.headers.get(REQUEST_ID_HEADER)
    except RuntimeError:  # a response built without its request
        return None
    return sent


def _transport_error(exc: Exception, base_url: str) -> AnankeError:
    """Translate an httpx transport failure."""
    if isinstance(exc, httpx.TimeoutException):
        return AnankeTimeoutError(f"request to {base_url} timed out: {exc}")
    return AnankeConnectionError(f"cannot reach the Ananke service at {base_url}: {exc}")


def _retryable(error: AnankeError) -> bool:
    return isinstance(error, AnankeConnectionError) or (isinstance(error, AnankeAPIError) and error.retryable)


def _retry_after(response: httpx.Response | None) -> float | None:
    if response is None:
        return None
    value = response.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


#: HTTP status of a stream's ``error`` event, by code (the status the request would have had).
_STREAM_ERROR_STATUS = {
    "timeout": 504,
    "engine_unavailable": 503,
    "invalid_request": 422,
    "invalid_constraint": 422,
}

#: Transport failures worth another attempt (no answer came, so nothing was generated for us).
_TRANSPORT_ERRORS = (
    httpx.ConnectError,
    httpx.RemoteProtocolError,
    httpx.ReadError,
    httpx.WriteError,
    httpx.TimeoutException,
)


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


class _EventReader:
    """Stream lines -> events; an ``error`` event raises, a stream without ``done`` raises at the end."""

    def __init__(self, request_id: str | None = None) -> None:
        self._done = False
        self.request_id = request_id

    def read(self, line: str) -> StreamEvent | None:
        event = decode_sse_line(line)
        if event is None:
            return None
        if event.event == "error":
            err = event.error
            code = err.code if err else "error"
            raise api_error(
                err.message if err else "stream error",
                status_code=_STREAM_ERROR_STATUS.get(code, 500),
                code=code,
                detail=err.detail if err else None,
                request_id=self.request_id,
            )
        self._done = self._done or event.event == "done"
        return event

    def finish(self) -> None:
        if not self._done:
            raise AnankeStreamError("stream ended without its final event (the server stopped?)")


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


class _Base:
    """Configuration and request building, shared by both clients."""

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
        self._fixed_request_id = any(k.lower() == REQUEST_ID_HEADER.lower() for k in self._headers)
        """``headers`` already carry an ``X-Request-ID``: it is sent as it is, no per-call id."""

    def _request(
        self, method: str, path: str, body: dict[str, Any] | None, request_id: str | None = None
    ) -> httpx.Request:
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
        headers = self._json_headers
        if request_id is not None and not self._fixed_request_id:
            headers = {**headers, REQUEST_ID_HEADER: request_id}
        return httpx.Request(method, url, content=content, headers=headers)

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
    def _body(request: GenerateRequest, stream: bool) -> dict[str, Any]:
        body = request.model_dump(mode="json", exclude_none=True)
        return body | {"stream": True} if stream else body

    @staticmethod
    def _parse(response: httpx.Response) -> GenerateResponse | BatchGenerateResponse:
        return parse_response(json.loads(response.content))


class _Call:
    """The retry and decision core of one ``POST /generate_api``. The clients only send and sleep."""

    def __init__(self, client: _Base, body: dict[str, Any], request_id: str | None = None) -> None:
        self._client, self._body = client, body
        self._started, self._attempt = time.monotonic(), 0
        self.request_id = request_id or uuid.uuid4().hex

    def request(self) -> httpx.Request:
        """The request for the next attempt (every attempt carries the call's one request id)."""
        return self._client._request("POST", "/generate_api", self._body, self.request_id)

    def outcome(self, answer: httpx.Response | Exception) -> httpx.Response | float:
        """The usable response, or the seconds to wait before sending again.

        ``answer`` is this attempt's response (an error body already read) or its transport failure.

        Raises:
            AnankeError: the translated error, when it is not retryable or the retries are spent.
        """
        error: AnankeError
        if isinstance(answer, httpx.Response):
            if answer.is_success:
                return answer
            error, response, cause = _answer_error(answer), answer, None
        else:
            error, response, cause = _transport_error(answer, self._client.base_url), None, answer
        retry = self._client.retry
        wait = retry.delay(self._attempt, _retry_after(response))
        if not (_retryable(error) and retry.should_retry(self._attempt, self._started, wait)):
            raise self._give_up(error, wait) from cause
        self._attempt += 1
        return wait

    def _give_up(self, error: AnankeError, wait: float) -> AnankeError:
        """The error to raise: after retries, one message that names the cause and the effort."""
        if self._attempt == 0 or not _retryable(error):
            return error
        retry, elapsed = self._client.retry, time.monotonic() - self._started
        cause = (
            f"after {self._attempt + 1} attempts over {elapsed:.0f} s the service at "
            f"{self._client.base_url} still answers: {error}"
        )
        if self._attempt < retry.max_retries and elapsed + wait >= retry.deadline:
            return AnankeTimeoutError(f"cold-start deadline of {retry.deadline:.0f} s passed; {cause}")
        if isinstance(error, AnankeAPIError):
            return api_error(
                cause,
                status_code=error.status_code,
                code=error.code,
                detail=error.detail,
                request_id=error.request_id,
            )
        return AnankeConnectionError(cause)


class AnankeClient(_Base):
    """Synchronous client for the Ananke service."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._client = httpx.Client(**self._client_kwargs())

    def close(self) -> None:
        self._client.close()

    def _send(self, body: dict[str, Any], stream: bool, request_id: str | None = None) -> httpx.Response:
        call = _Call(self, body, request_id)
        while True:
            try:
                response = self._client.send(call.request(), stream=stream)
                if stream and not response.is_success:
                    response.read()
            except _TRANSPORT_ERRORS as exc:
                outcome = call.outcome(exc)
            else:
                outcome = call.outcome(response)
            if isinstance(outcome, httpx.Response):
                return outcome
            time.sleep(outcome)

    def _get_once(self, path: str) -> httpx.Response:
        """``GET path`` once, no retries: a status answer, not work to protect."""
        try:
            return self._client.send(self._request("GET", path, None))
        except httpx.HTTPError as exc:
            raise _transport_error(exc, self.base_url) from exc

    def health(self) -> HealthResponse:
        """``GET /health`` once (503 while loading is an answer here)."""
        return HealthResponse.model_validate(self._get_once("/health").json())

    def models(self) -> ModelList:
        """``GET /v1/models`` once: the served model, its context length and output cap.

        Raises:
            AnankeError: no answer, an error answer or an unexpected body.
        """
        response = self._get_once("/v1/models")
        if not response.is_success:
            raise _answer_error(response)
        try:
            return ModelList.model_validate_json(response.content)
        except ValidationError as exc:
            raise AnankeError(f"unexpected /v1/models answer from the service: {exc}") from exc

    def generate(
        self, request: GenerateRequest, *, request_id: str | None = None
    ) -> GenerateResponse | BatchGenerateResponse:
        """``POST /generate_api`` (non-streaming). ``request_id`` is sent as ``X-Request-ID`` (default:
        a new one); it comes back in ``metadata["request_id"]`` and on errors as ``.request_id``."""
        return self._parse(self._send(self._body(request, False), False, request_id))

    def stream(self, request: GenerateRequest, *, request_id: str | None = None) -> Iterator[StreamEvent]:
        """``POST /generate_api`` with ``stream=true``: token events, then ``done`` (``request_id`` as
        in :meth:`generate`)."""
        response = self._send(self._body(request, True), True, request_id)
        reader = _EventReader(_request_id(response))
        try:
            for line in response.iter_lines():
                if (event := reader.read(line)) is not None:
                    yield event
        except httpx.HTTPError as exc:
            raise AnankeStreamError(f"stream from {self.base_url} broke off: {exc}") from exc
        finally:
            response.close()
        reader.finish()


class AsyncAnankeClient(_Base):
    """Asynchronous client for the Ananke service."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._client = httpx.AsyncClient(**self._client_kwargs())

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _send(
        self, body: dict[str, Any], stream: bool, request_id: str | None = None
    ) -> httpx.Response:
        call = _Call(self, body, request_id)
        while True:
            try:
                response = await self._client.send(call.request(), stream=stream)
                if stream and not response.is_success:
                    await response.aread()
            except _TRANSPORT_ERRORS as exc:
                outcome = call.outcome(exc)
            else:
                outcome = call.outcome(response)
            if isinstance(outcome, httpx.Response):
                return outcome
            await asyncio.sleep(outcome)

    async def generate(
        self, request: GenerateRequest, *, request_id: str | None = None
    ) -> GenerateResponse | BatchGenerateResponse:
        """``POST /generate_api`` (non-streaming); ``request_id`` as in :meth:`AnankeClient.generate`."""
        return self._parse(await self._send(self._body(request, False), False, request_id))

    async def stream(
        self, request: GenerateRequest, *, request_id: str | None = None
    ) -> AsyncIterator[StreamEvent]:
        """``POST /generate_api`` with ``stream=true``: token events, then ``done``."""
        response = await self._send(self._body(request, True), True, request_id)
        reader = _EventReader(_request_id(response))
        try:
            async for line in response.aiter_lines():
                if (event := reader.read(line)) is not None:
                    yield event
        except httpx.HTTPError as exc:
            raise AnankeStreamError(f"stream from {self.base_url} broke off: {exc}") from exc
        finally:
            await response.aclose()
        reader.finish()
