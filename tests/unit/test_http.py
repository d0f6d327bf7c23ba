"""The HTTP layer against scripted answers (``httpx.MockTransport``): retries, errors, SSE decoding.

Fakes are used here only to inject faults (503s, dropped connections, truncated streams) that the real
service cannot be made to produce on demand.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from langchain_ananke import _http
from langchain_ananke._http import (
    AnankeClient,
    AsyncAnankeClient,
    RetryPolicy,
    decode_sse_line,
    parse_response,
)
from langchain_ananke.errors import (
    AnankeAPIError,
    AnankeConnectionError,
    AnankeError,
    AnankeRequestTimeoutError,
    AnankeStreamError,
    AnankeTimeoutError,
)
from langchain_ananke.protocol import BatchGenerateResponse, GenerateRequest, GenerateResponse

BASE = "http://ananke.test"
REQUEST = GenerateRequest(prompt="Say 42", constraints={"regex": "[0-9]+"}, max_tokens=8)
RESULT: dict[str, Any] = {
    "generated_text": "42",
    "tokens_generated": 1,
    "generation_time_ms": 5.0,
    "metadata": {"model": "tiny"},
    "constraint_satisfied": True,
    "finish_reason": "stop",
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}
FAST = RetryPolicy(max_retries=2, initial_delay=0.0, max_delay=0.01)

Reply = httpx.Response | Exception


class Script:
    """A MockTransport handler answering with ``replies`` in order, recording every request."""

    def __init__(self, *replies: Reply) -> None:
        self.replies = list(replies)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        reply = self.replies[min(len(self.requests), len(self.replies)) - 1]
        if isinstance(reply, Exception):
            raise reply
        return reply

    @property
    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(r.content) for r in self.requests]


def _bare(cls: type[Any], retry: RetryPolicy, **kwargs: Any) -> Any:
    # The constructor's real connection pool loads the CA bundle (~0.1 s each); the mock needs none.
    client = cls.__new__(cls)
    _http._Base.__init__(client, BASE, retry=retry, **kwargs)
    return client


def sync_client(script: Script, retry: RetryPolicy = FAST, **kwargs: Any) -> AnankeClient:
    client: AnankeClient = _bare(AnankeClient, retry, **kwargs)
    client._client = httpx.Client(
        base_url=BASE, headers=client._headers, transport=httpx.MockTransport(script)
    )
    return client


def async_client(script: Script, retry: RetryPolicy = FAST) -> AsyncAnankeClient:
    client: AsyncAnankeClient = _bare(AsyncAnankeClient, retry)
    client._client = httpx.AsyncClient(base_url=BASE, transport=httpx.MockTransport(script))
    return client


def error(status: int, code: str, message: str, **headers: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": message}}, headers=headers)


def ok() -> httpx.Response:
    return httpx.Response(200, json=RESULT)


def sse(*frames: dict[str, Any] | str) -> httpx.Response:
    lines = [f if isinstance(f, str) else "data: " + json.dumps(f) for f in frames]
    body = "".join(line + "\n\n" for line in lines)
    return httpx.Response(200, content=body.encode(), headers={"content-type": "text/event-stream"})


TOKEN_A = {"event": "token", "text": "4", "token_ids": [19]}
TOKEN_B = {"event": "token", "text": "2", "token_ids": [17]}
DONE = {"event": "done", "response": RESULT}


def connect_error() -> httpx.ConnectError:
    return httpx.ConnectError("connection refused")


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Records backoff waits instead of sleeping."""
    waits: list[float] = []
    monkeypatch.setattr(_http.time, "sleep", waits.append)
    return waits


# ----------------------------------------------------------------------------- pure helpers


@pytest.mark.parametrize(
    "line",
    ["", ": keep-alive", ":", "event: token", "id: 3", "data:", "data:   ", "data: [DONE]", "retry: 100"],
)
def test_decode_sse_line_ignores_non_events(line: str) -> None:
    assert decode_sse_line(line) is None


@pytest.mark.parametrize(
    ("line", "event", "text"),
    [
        ('data: {"event": "token", "text": "ab"}', "token", "ab"),
        ('data:{"event":"token","text":" x"}', "token", " x"),
        ("data: " + json.dumps(DONE), "done", ""),
        ('data: {"event": "error", "error": {"code": "engine_error", "message": "boom"}}', "error", ""),
    ],
)
def test_decode_sse_line_events(line: str, event: str, text: str) -> None:
    decoded = decode_sse_line(line)
    assert decoded is not None
    assert decoded.event == event
    assert decoded.text == text


@pytest.mark.parametrize("line", ["data: {", 'data: {"event": "bogus"}', "data: 42"])
def test_decode_sse_line_malformed_raises(line: str) -> None:
    with pytest.raises(AnankeStreamError, match="malformed stream event"):
        decode_sse_line(line)


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (RESULT, GenerateResponse),
        (
            {"results": [RESULT, RESULT], "generation_time_ms": 1.0, "usage": RESULT["usage"]},
            BatchGenerateResponse,
        ),
    ],
)
def test_parse_response(data: dict[str, Any], kind: type) -> None:
    assert isinstance(parse_response(data), kind)


@pytest.mark.parametrize("data", [{}, {"generated_text": "x"}, [], {"results": "nope"}])
def test_parse_response_rejects_unexpected_bodies(data: Any) -> None:
    with pytest.raises(AnankeError, match="unexpected response from the service"):
        parse_response(data)


@pytest.mark.parametrize(
    ("retry_after", "max_delay", "expected"),
    [(3.0, 10.0, 3.0), (60.0, 10.0, 10.0), (0.0, 10.0, 0.0), (5.0, 0.5, 0.5)],
)
def test_delay_respects_retry_after_capped(retry_after: float, max_delay: float, expected: float) -> None:
    assert RetryPolicy(max_delay=max_delay).delay(0, retry_after) == expected


@pytest.mark.parametrize(
    ("attempt", "bound"),
    [(0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (10, 10.0)],
)
def test_delay_backoff_is_jittered_below_an_exponential_bound(attempt: int, bound: float) -> None:
    policy = RetryPolicy(initial_delay=0.5, max_delay=10.0)
    waits = [policy.delay(attempt, None) for _ in range(200)]
    assert all(0 <= w <= bound for w in waits)
    assert max(waits) > bound / 2  # jitter spans the range, not a constant


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "7"}, 7.0),
        ({"Retry-After": "1.5"}, 1.5),
        ({"Retry-After": "Wed, 21 Oct 2025"}, None),
        ({}, None),
    ],
)
def test_retry_after_header(headers: dict[str, str], expected: float | None) -> None:
    assert _http._retry_after(httpx.Response(503, headers=headers)) == expected


@pytest.mark.parametrize(
    ("status", "retryable"),
    [
        (429, True),
        (502, True),
        (503, True),
        (504, True),
        (400, False),
        (401, False),
        (422, False),
        (500, False),
    ],
)
def test_api_error_retryable(status: int, retryable: bool) -> None:
    assert AnankeAPIError("x", status_code=status).retryable is retryable


TIMEOUT_BODY = {
    "error": {
        "code": "timeout",
        "message": "the request's timeout of 0.5 s passed; aborted after 7 generated tokens",
        "detail": {"timeout_s": 0.5, "tokens_generated": 7},
    }
}


def test_service_timeout_is_typed_and_not_retried(sleeps: list[float]) -> None:
    """504 ``timeout`` is the service's own deadline: retrying would time out again. A gateway's
    504 (any other code) is still retried (cold starts)."""
    script = Script(httpx.Response(504, json=TIMEOUT_BODY), ok())
    with pytest.raises(AnankeRequestTimeoutError) as info:
        sync_client(script).generate(REQUEST)
    err = info.value
    assert isinstance(err, AnankeAPIError)
    assert isinstance(err, AnankeTimeoutError)
    assert (err.status_code, err.code) == (504, "timeout")
    assert err.detail == {"timeout_s": 0.5, "tokens_generated": 7}
    assert not err.retryable
    assert len(script.requests) == 1
    assert sleeps == []


def test_stream_timeout_event_raises_the_typed_error() -> None:
    script = Script(sse(TOKEN_A, {"event": "error", "error": TIMEOUT_BODY["error"]}))
    events = sync_client(script).stream(REQUEST)
    assert next(events).text == "4"
    with pytest.raises(AnankeRequestTimeoutError, match=r"timeout of 0\.5 s") as info:
        next(events)
    assert info.value.status_code == 504
    assert info.value.detail == {"timeout_s": 0.5, "tokens_generated": 7}


@pytest.mark.parametrize(
    ("code", "status"), [("engine_unavailable", 503), ("invalid_request", 422), ("internal_error", 500)]
)
def test_stream_error_events_carry_their_status(code: str, status: int) -> None:
    script = Script(sse({"event": "error", "error": {"code": code, "message": "m"}}))
    with pytest.raises(AnankeAPIError) as info:
        list(sync_client(script).stream(REQUEST))
    assert (info.value.status_code, info.value.code) == (status, code)
    assert not isinstance(info.value, AnankeRequestTimeoutError)


# ----------------------------------------------------------------------------- sync client


@pytest.mark.parametrize("cls", [AnankeClient, AsyncAnankeClient])
@pytest.mark.parametrize(("api_key", "auth"), [("sk-test", "Bearer sk-test"), (None, None)])
def test_constructors_configure_the_connection(cls: type[Any], api_key: str | None, auth: str | None) -> None:
    client = cls(BASE + "/", api_key=api_key, headers={"X-Team": "ml"})
    assert client.base_url == BASE
    assert client._client.base_url.join("/generate_api") == httpx.URL(BASE + "/generate_api")
    assert client._client.headers.get("authorization") == auth
    assert client._client.headers["x-team"] == "ml"
    assert client._client.headers["accept"] == "application/json"


def test_generate_posts_the_request_without_nulls() -> None:
    script = Script(ok())
    client = sync_client(script, api_key="sk-test")
    response = client.generate(REQUEST)
    assert isinstance(response, GenerateResponse)
    assert response.generated_text == "42"
    sent = script.requests[0]
    assert sent.method == "POST"
    assert sent.url.path == "/generate_api"
    assert sent.headers["authorization"] == "Bearer sk-test"
    body = script.bodies[0]
    assert body["prompt"] == "Say 42"
    assert body["constraints"]["regex"] == "[0-9]+"
    assert None not in body["constraints"].values()
    assert "messages" not in body
    assert "seed" not in body


@pytest.mark.parametrize(
    "failures",
    [
        [error(503, "engine_unavailable", "loading")],
        [error(429, "overloaded", "busy"), error(502, "http_error", "bad gateway")],
        [connect_error()],
        [connect_error(), error(504, "http_error", "gateway timeout")],
        [httpx.RemoteProtocolError("server disconnected")],
    ],
    ids=["503", "429-502", "connect", "connect-504", "remote-protocol"],
)
def test_transient_failures_are_retried_then_succeed(failures: list[Reply], sleeps: list[float]) -> None:
    script = Script(*failures, ok())
    response = sync_client(script).generate(REQUEST)
    assert isinstance(response, GenerateResponse)
    assert response.generated_text == "42"
    assert len(script.requests) == len(failures) + 1
    assert len(sleeps) == len(failures)
    assert script.bodies[0] == script.bodies[-1]


@pytest.mark.parametrize(
    ("status", "code", "message"),
    [
        (422, "invalid_constraint", "llguidance rejected the regex constraint"),
        (401, "unauthorized", "missing or invalid API key"),
        (400, "malformed_json", "request body is not valid JSON"),
        (500, "internal_error", "RuntimeError: boom"),
    ],
)
def test_client_errors_are_not_retried(status: int, code: str, message: str, sleeps: list[float]) -> None:
    answer = httpx.Response(
        status,
        json={"error": {"code": code, "message": message, "detail": {"at": 3}}},
        headers={"x-request-id": "req-1"},
    )
    script = Script(answer, ok())
    with pytest.raises(AnankeAPIError) as info:
        sync_client(script).generate(REQUEST)
    err = info.value
    assert (err.status_code, err.code, err.message) == (status, code, message)
    assert err.detail == {"at": 3}
    assert err.request_id == "req-1"
    assert not err.retryable
    assert f"[{status} {code}] {message}" in str(err)
    assert len(script.requests) == 1
    assert sleeps == []


@pytest.mark.parametrize(
    ("answer", "code", "message"),
    [
        (httpx.Response(400, text="upstream exploded"), "http_error", "upstream exploded"),
        (httpx.Response(404, json={"detail": "Not Found"}), "http_error", "Not Found"),
        (httpx.Response(403, json={"error": "forbidden here"}), "http_error", '{"error":"forbidden here"}'),
    ],
    ids=["text", "fastapi-default", "error-string"],
)
def test_error_bodies_from_proxies_are_translated(answer: httpx.Response, code: str, message: str) -> None:
    with pytest.raises(AnankeAPIError) as info:
        sync_client(Script(answer)).generate(REQUEST)
    assert (info.value.status_code, info.value.code, info.value.message) == (
        answer.status_code,
        code,
        message,
    )


@pytest.mark.parametrize("max_retries", [0, 1, 3])
def test_retries_stop_at_max_retries(max_retries: int, sleeps: list[float]) -> None:
    script = Script(error(503, "engine_unavailable", "still loading"))
    retry = RetryPolicy(max_retries=max_retries, initial_delay=0.0)
    with pytest.raises(AnankeAPIError) as info:
        sync_client(script, retry).generate(REQUEST)
    assert info.value.status_code == 503
    assert info.value.message.endswith("still loading")
    if max_retries:  # after retries, one message names the effort and the cause
        assert f"after {max_retries + 1} attempts" in info.value.message
    assert len(script.requests) == max_retries + 1
    assert len(sleeps) == max_retries


def test_connection_errors_exhaust_into_connection_error(sleeps: list[float]) -> None:
    script = Script(connect_error())
    with pytest.raises(AnankeConnectionError, match="cannot reach the Ananke service") as info:
        sync_client(script).generate(REQUEST)
    assert isinstance(info.value.__cause__, httpx.ConnectError)
    assert len(script.requests) == FAST.max_retries + 1
    assert len(sleeps) == FAST.max_retries


def test_timeouts_become_timeout_errors(sleeps: list[float]) -> None:
    script = Script(httpx.ReadTimeout("read timed out"))
    with pytest.raises(AnankeTimeoutError, match="timed out"):
        sync_client(script).generate(REQUEST)


@pytest.mark.parametrize(
    ("retry_after", "max_delay", "expected_wait"),
    [("0.25", 10.0, 0.25), ("30", 2.0, 2.0), ("3", 5.0, 3.0)],
)
def test_retry_after_is_respected_and_capped(
    retry_after: str, max_delay: float, expected_wait: float, sleeps: list[float]
) -> None:
    script = Script(error(503, "engine_unavailable", "loading", **{"Retry-After": retry_after}), ok())
    retry = RetryPolicy(max_retries=2, initial_delay=0.0, max_delay=max_delay)
    sync_client(script, retry).generate(REQUEST)
    assert sleeps == [expected_wait]


def test_no_retry_when_the_wait_would_pass_the_deadline(sleeps: list[float]) -> None:
    script = Script(error(503, "engine_unavailable", "loading", **{"Retry-After": "60"}), ok())
    retry = RetryPolicy(max_retries=5, max_delay=60.0, deadline=10.0)
    with pytest.raises(AnankeAPIError, match="loading"):
        sync_client(script, retry).generate(REQUEST)
    assert len(script.requests) == 1
    assert sleeps == []


def test_stream_yields_tokens_then_done() -> None:
    script = Script(sse(": keep-alive", TOKEN_A, TOKEN_B, DONE, "data: [DONE]"))
    events = list(sync_client(script).stream(REQUEST))
    assert [e.event for e in events] == ["token", "token", "done"]
    assert "".join(e.text for e in events) == "42"
    assert events[0].token_ids == [19]
    assert events[-1].response is not None
    assert events[-1].response.generated_text == "42"
    assert script.bodies[0]["stream"] is True


def test_stream_without_done_raises_after_the_tokens() -> None:
    script = Script(sse(TOKEN_A, TOKEN_B))
    seen: list[str] = []
    with pytest.raises(AnankeStreamError, match="without its final event"):
        seen.extend(event.text for event in sync_client(script).stream(REQUEST))
    assert seen == ["4", "2"]


def test_stream_error_event_raises_api_error() -> None:
    frame = {"event": "error", "error": {"code": "engine_error", "message": "CUDA out of memory"}}
    script = Script(sse(TOKEN_A, frame))
    seen: list[str] = []
    with pytest.raises(AnankeAPIError) as info:
        seen.extend(event.text for event in sync_client(script).stream(REQUEST))
    assert seen == ["4"]
    assert info.value.code == "engine_error"
    assert info.value.message == "CUDA out of memory"


def test_stream_malformed_frame_raises_stream_error() -> None:
    script = Script(sse(TOKEN_A, "data: {not json"))
    with pytest.raises(AnankeStreamError, match="malformed"):
        list(sync_client(script).stream(REQUEST))


def test_stream_is_retried_before_any_body_is_read(sleeps: list[float]) -> None:
    script = Script(error(503, "engine_unavailable", "loading"), sse(TOKEN_A, TOKEN_B, DONE))
    events = list(sync_client(script).stream(REQUEST))
    assert [e.event for e in events] == ["token", "token", "done"]
    assert len(script.requests) == 2
    assert len(sleeps) == 1


def test_stream_error_answer_carries_its_body() -> None:
    script = Script(error(422, "invalid_constraint", "bad regex"))
    with pytest.raises(AnankeAPIError) as info:
        list(sync_client(script).stream(REQUEST))
    assert (info.value.status_code, info.value.code, info.value.message) == (
        422,
        "invalid_constraint",
        "bad regex",
    )
    assert len(script.requests) == 1


@pytest.mark.parametrize(
    ("answer", "status"),
    [
        (httpx.Response(200, json={"status": "ok", "model": "tiny"}), "ok"),
        (httpx.Response(503, json={"status": "loading"}, headers={"Retry-After": "5"}), "loading"),
    ],
)
def test_health_answers_once(answer: httpx.Response, status: str, sleeps: list[float]) -> None:
    script = Script(answer)
    assert sync_client(script).health().status == status
    assert len(script.requests) == 1
    assert sleeps == []


def test_health_unreachable_is_a_connection_error() -> None:
    with pytest.raises(AnankeConnectionError):
        sync_client(Script(connect_error())).health()


MODELS = {
    "object": "list",
    "data": [
        {
            "id": "tiny",
            "object": "model",
            "owned_by": "ananke",
            "max_model_len": 2048,
            "max_output_tokens": 512,
        }
    ],
}


def test_models_reads_the_served_models_limits(sleeps: list[float]) -> None:
    script = Script(httpx.Response(200, json=MODELS))
    models = sync_client(script, api_key="sk-test").models()
    card = models.data[0]
    assert (card.id, card.max_model_len, card.max_output_tokens) == ("tiny", 2048, 512)
    sent = script.requests[0]
    assert (sent.method, sent.url.path) == ("GET", "/v1/models")
    assert sent.headers["authorization"] == "Bearer sk-test"


def test_models_without_limits_parses() -> None:
    # A service that names its model only: the limits are unknown, not an error.
    body = {"object": "list", "data": [{"id": "tiny", "object": "model", "owned_by": "ananke"}]}
    card = sync_client(Script(httpx.Response(200, json=body))).models().data[0]
    assert (card.max_model_len, card.max_output_tokens) == (None, None)


@pytest.mark.parametrize(
    ("answer", "error", "match"),
    [
        (connect_error(), AnankeConnectionError, "cannot reach"),
        (httpx.ReadTimeout("slow"), AnankeTimeoutError, "timed out"),
        (error(401, "unauthorized", "missing or invalid API key"), AnankeAPIError, "unauthorized"),
        (error(503, "engine_unavailable", "loading"), AnankeAPIError, "loading"),
        (httpx.Response(200, json={"data": "nope"}), AnankeError, "unexpected /v1/models answer"),
        (httpx.Response(200, text="<html>"), AnankeError, "unexpected /v1/models answer"),
    ],
    ids=["unreachable", "timeout", "401", "503", "wrong-shape", "not-json"],
)
def test_models_faults_raise_once_without_retrying(
    answer: Reply, error: type[Exception], match: str, sleeps: list[float]
) -> None:
    script = Script(answer, httpx.Response(200, json=MODELS))
    with pytest.raises(error, match=match):
        sync_client(script).models()
    assert len(script.requests) == 1
    assert sleeps == []


# ----------------------------------------------------------------------------- async client


@pytest.fixture
def async_sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    import asyncio

    waits: list[float] = []
    real_sleep = asyncio.sleep

    async def fake_sleep(delay: float, *args: Any) -> Any:
        waits.append(delay)
        return await real_sleep(0)

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    return waits


@pytest.mark.parametrize(
    "failures",
    [[], [error(503, "engine_unavailable", "loading")], [connect_error(), error(429, "overloaded", "busy")]],
    ids=["first-try", "503", "connect-429"],
)
async def test_async_generate_retries_then_succeeds(failures: list[Reply], async_sleeps: list[float]) -> None:
    script = Script(*failures, ok())
    client = async_client(script)
    response = await client.generate(REQUEST)
    await client.aclose()
    assert isinstance(response, GenerateResponse)
    assert response.generated_text == "42"
    assert len(script.requests) == len(failures) + 1
    assert len(async_sleeps) == len(failures)


async def test_async_client_error_is_not_retried(async_sleeps: list[float]) -> None:
    script = Script(error(422, "invalid_request", "max_tokens: too big"), ok())
    with pytest.raises(AnankeAPIError) as info:
        await async_client(script).generate(REQUEST)
    assert (info.value.status_code, info.value.code) == (422, "invalid_request")
    assert len(script.requests) == 1
    assert async_sleeps == []


async def test_async_connection_errors_exhaust(async_sleeps: list[float]) -> None:
    script = Script(connect_error())
    with pytest.raises(AnankeConnectionError):
        await async_client(script).generate(REQUEST)
    assert len(script.requests) == FAST.max_retries + 1


async def test_async_stream_yields_tokens_then_done(async_sleeps: list[float]) -> None:
    script = Script(error(503, "engine_unavailable", "loading"), sse(TOKEN_A, ": ping", TOKEN_B, DONE))
    events = [event async for event in async_client(script).stream(REQUEST)]
    assert [e.event for e in events] == ["token", "token", "done"]
    assert "".join(e.text for e in events) == "42"
    assert script.bodies[-1]["stream"] is True
    assert len(async_sleeps) == 1


async def collect(events: AsyncIterator[Any], into: list[str]) -> None:
    async for event in events:
        into.append(event.text)


async def test_async_stream_without_done_raises() -> None:
    script = Script(sse(TOKEN_A))
    seen: list[str] = []
    with pytest.raises(AnankeStreamError, match="without its final event"):
        await collect(async_client(script).stream(REQUEST), seen)
    assert seen == ["4"]


async def test_async_stream_error_event_raises() -> None:
    frame = {"event": "error", "error": {"code": "timeout", "message": "deadline passed"}}
    with pytest.raises(AnankeAPIError, match="deadline passed"):
        async for _ in async_client(Script(sse(frame))).stream(REQUEST):
            pass
