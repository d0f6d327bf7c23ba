"""Faults: disconnects abort engine work, timeouts are reported, unreached requests are retried.

Engine load is read from ``/health`` (``inflight``: admitted requests; ``engine_unfinished``: requests
vLLM is still generating for).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any

import httpx
import pytest

from langchain_ananke._http import AnankeClient, RetryPolicy
from langchain_ananke.protocol import GenerateRequest
from tests.reliability.conftest import MAX_INFLIGHT, MAX_TOKENS_CAP, NEVER_ENDS, Service, chat, wait_until

pytestmark = pytest.mark.integration

LONG = {
    "prompt": chat("Write a very long story about the sea, with many chapters."),
    "max_tokens": MAX_TOKENS_CAP,
    # Never ends before the cap, so the request is still running when we leave.
    "constraints": NEVER_ENDS,
    "temperature": 0.8,
    "seed": 3,
}


def _idle(service: Service) -> bool:
    health = service.health()
    return health["inflight"] == 0 and health["engine_unfinished"] == 0


def _raw_post(service: Service, body: dict[str, Any]) -> bytes:
    payload = json.dumps(body).encode()
    head = (
        "POST /generate_api HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {service.api_key}\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


def test_stream_disconnect_aborts_the_engine_request(service: Service) -> None:
    wait_until(lambda: _idle(service), 30)
    with service.client() as http, http.stream("POST", "/generate_api", json=LONG | {"stream": True}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        tokens = 0
        while tokens < 3:
            if next(lines).startswith('data: {"event":"token"'):
                tokens += 1
        health = service.health()
        assert health["inflight"] == 1
        assert health["engine_unfinished"] == 1
        left = time.monotonic()
    # The response is closed here: the connection is gone with ~250 tokens still to generate.
    drained = wait_until(lambda: _idle(service), 5)
    print(f"engine idle {drained:.2f} s after the client left ({time.monotonic() - left:.2f} s)")
    assert "client disconnected; request cancelled" in service.log_text() or service.external


def test_non_stream_disconnect_aborts_the_engine_request(service: Service) -> None:
    wait_until(lambda: _idle(service), 30)
    errors: list[Exception] = []

    def call() -> None:
        try:
            # 3 s: long enough for the request to reach the engine on a loaded 2-core box (with 1.5 s
            # the client once left while it was still being planned), far short of its ~9 s of tokens.
            httpx.post(f"{service.url}/generate_api", json=LONG, headers=service.headers, timeout=3.0)
        except httpx.TimeoutException as exc:  # the client gives up: the server must notice
            errors.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    wait_until(lambda: service.health()["engine_unfinished"] == 1, 10)
    thread.join()
    assert errors, "the request finished before the client timed out; make it longer"
    drained = wait_until(lambda: _idle(service), 5)
    print(f"engine idle {drained:.2f} s after the client timed out")


def test_abrupt_disconnects_leak_no_admission_slots(service: Service) -> None:
    """Clients that vanish at every stage (before the body, right after it, mid-stream)."""
    wait_until(lambda: _idle(service), 30)
    raw = _raw_post(service, LONG | {"stream": True})
    for cut in ("headers", "body", "first-byte") * 4:
        with socket.create_connection(("127.0.0.1", int(service.url.rsplit(":", 1)[1]))) as sock:
            if cut == "headers":
                sock.sendall(raw[: raw.index(b"\r\n\r\n")])
            else:
                sock.sendall(raw)
                if cut == "first-byte":
                    sock.recv(1)
    wait_until(lambda: _idle(service), 10)
    # All MAX_INFLIGHT slots are free again: that many concurrent requests are all admitted.
    with service.client() as http:
        results: list[int] = []

        def short() -> None:
            body = {"prompt": chat("Hi"), "max_tokens": 2, "temperature": 0.0}
            results.append(http.post("/generate_api", json=body).status_code)

        threads = [threading.Thread(target=short) for _ in range(MAX_INFLIGHT)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert results == [200] * MAX_INFLIGHT


@pytest.mark.parametrize("stream", [False, True])
def test_request_timeout_is_a_clear_error_and_aborted(service: Service, stream: bool) -> None:
    """``timeout_s`` ends the request in the engine: a 504 ``timeout`` (non-streaming), or the stream's
    last event is an ``error`` with that code (never ``done``)."""
    wait_until(lambda: _idle(service), 30)
    # Long enough for some tokens to stream (planning counts too: compiling LONG's regex).
    body = LONG | {"timeout_s": 1.5, "stream": stream}
    started = time.monotonic()
    with service.client() as http:
        response = http.post("/generate_api", json=body)
    elapsed = time.monotonic() - started
    if stream:
        assert response.status_code == 200, response.text
        frames = [json.loads(x[5:]) for x in response.text.splitlines() if x.startswith("data:")]
        assert all(f["event"] != "done" for f in frames)
        assert frames[-1]["event"] == "error"
        error = frames[-1]["error"]
        tokens = sum(len(f["token_ids"]) for f in frames if f["event"] == "token")
    else:
        assert response.status_code == 504, response.text
        error = response.json()["error"]
        tokens = None
    assert error["code"] == "timeout"
    assert "timeout of 1.5 s passed" in error["message"]
    assert error["detail"]["timeout_s"] == 1.5
    if tokens is not None:  # streamed: the count is known, and is what the client received
        assert error["detail"]["tokens_generated"] == tokens < MAX_TOKENS_CAP
    else:  # non-streaming: known too, since the loop guard has the engine report every step
        assert 0 < error["detail"]["tokens_generated"] < MAX_TOKENS_CAP
    assert elapsed < 30
    drained = wait_until(lambda: _idle(service), 5)
    n = error["detail"]["tokens_generated"]
    print(f"{response.status_code} after {elapsed:.2f} s, {n} tokens, engine idle {drained:.2f} s later")


@pytest.mark.parametrize("stream", [False, True])
def test_openai_route_timeout_is_a_clear_error(service: Service, stream: bool) -> None:
    wait_until(lambda: _idle(service), 30)
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "Write a very long story about the sea."}],
        "max_tokens": MAX_TOKENS_CAP,
        "timeout_s": 0.5,
        "stream": stream,
    }
    with service.client() as http:
        response = http.post("/v1/chat/completions", json=body)
    if stream:
        assert response.status_code == 200, response.text
        frames = [x[5:].strip() for x in response.text.splitlines() if x.startswith("data:")]
        errors = [json.loads(f)["error"] for f in frames if f != "[DONE]" and "error" in json.loads(f)]
        assert len(errors) == 1
        error = errors[0]
        assert not any('"finish_reason": "timeout"' in f for f in frames)
    else:
        assert response.status_code == 504, response.text
        error = response.json()["error"]
    assert error["code"] == "timeout"
    wait_until(lambda: _idle(service), 5)


def test_client_raises_the_typed_timeout_error_without_retrying(service: Service) -> None:
    from langchain_ananke.errors import AnankeRequestTimeoutError

    wait_until(lambda: _idle(service), 30)
    sent: list[httpx.Request] = []
    client = AnankeClient(service.url, api_key=service.api_key, retry=RetryPolicy(max_retries=3))
    client._client = httpx.Client(**client._client_kwargs(), event_hooks={"request": [sent.append]})
    request = GenerateRequest.model_validate(LONG | {"timeout_s": 0.5})
    with pytest.raises(AnankeRequestTimeoutError) as info:
        client.generate(request)
    assert info.value.status_code == 504
    assert len(sent) == 1
    with pytest.raises(AnankeRequestTimeoutError):
        list(client.stream(request))
    assert len(sent) == 2
    wait_until(lambda: _idle(service), 5)


def test_unreached_request_is_retried_once_and_answered(service: Service) -> None:
    """A connection that fails before the request is sent is retried; the server sees it once."""
    real = httpx.HTTPTransport()
    sent: list[httpx.Request] = []

    class FirstConnectFails(httpx.BaseTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            sent.append(request)
            if len(sent) == 1:
                raise httpx.ConnectError("connection refused (injected)", request=request)
            return real.handle_request(request)

    client = AnankeClient(
        service.url, api_key=service.api_key, retry=RetryPolicy(max_retries=2, initial_delay=0.01)
    )
    client._client = httpx.Client(**client._client_kwargs(), transport=FirstConnectFails())
    response = client.generate(
        GenerateRequest(prompt=chat("A number"), max_tokens=4, constraints={"regex": "[0-9]{2}"})
    )
    assert len(sent) == 2
    assert response.constraint_satisfied is True  # type: ignore[union-attr]


def test_unreachable_service_raises_a_typed_error_after_bounded_retries() -> None:
    from langchain_ananke.errors import AnankeConnectionError

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = AnankeClient(f"http://127.0.0.1:{port}", retry=RetryPolicy(max_retries=2, initial_delay=0.01))
    started = time.monotonic()
    with pytest.raises(AnankeConnectionError, match="cannot reach"):
        client.generate(GenerateRequest(prompt="x", max_tokens=1))
    assert time.monotonic() - started < 10
