"""Request ids offline: which client ids the service keeps, the header on every answer, the id in log
lines, and the client's side (sent once per call, kept across retries, on every error)."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient

from langchain_ananke._http import AnankeClient, RetryPolicy
from langchain_ananke.errors import AnankeAPIError, AnankeRequestTimeoutError
from langchain_ananke.protocol import GenerateRequest
from modal_service.engine.engine import Engine, EngineConfig
from modal_service.http.app import create_app
from modal_service.http.request_id import LOG_FORMAT, RequestIdFilter, request_id_for
from modal_service.limits import Limits

FAST = RetryPolicy(max_retries=2, initial_delay=0.0, max_delay=0.0)
REQUEST = GenerateRequest(prompt="x", max_tokens=4)


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("abc-123", True),
        ("trace:4bf92f3577b34da6a3ce929d0e0e4736/00f067aa0ba902b7", True),
        ("a.b_c+d=e", True),
        ("x" * 128, True),
        ("x" * 129, False),  # bounded
        ("", False),
        ("has space", False),
        ('quote"d', False),
        ("line\nbreak", False),
        ("ünïcode", False),
        ("<script>", False),
    ],
)
def test_client_ids_are_kept_only_when_sane(given: str, kept: bool) -> None:
    rid = request_id_for({"x-request-id": given})
    assert (rid == given) is kept
    assert 1 <= len(rid) <= 128


def test_a_new_id_when_the_client_sends_none() -> None:
    a, b = request_id_for({}), request_id_for({})
    assert a != b
    assert len(a) == 32


def _app() -> TestClient:
    engine = Engine(EngineConfig(model="/nowhere/tiny"))
    app = create_app(engine, api_key="k", limits=Limits(max_body_bytes=100), start_engine=False)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("kaput")

    return TestClient(app, raise_server_exceptions=False)


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status"),
    [
        ("get", "/health", {}, 503),
        ("post", "/generate_api", {}, 401),
        ("post", "/openapi.json", {"headers": {"Authorization": "Bearer k"}, "content": b"x" * 101}, 413),
        ("post", "/generate_api", {"headers": {"Authorization": "Bearer k"}, "json": {"prompt": "x"}}, 503),
        ("get", "/nowhere", {"headers": {"Authorization": "Bearer k"}}, 404),
        ("get", "/boom", {"headers": {"Authorization": "Bearer k"}}, 500),
        ("get", "/metrics", {"headers": {"Authorization": "Bearer k"}}, 200),
    ],
)
def test_every_answer_carries_the_request_id(
    method: str, path: str, kwargs: dict[str, object], status: int
) -> None:
    with _app() as client:
        r = client.request(method, path, **kwargs)  # type: ignore[arg-type]
        assert r.status_code == status
        assert len(r.headers["x-request-id"]) == 32
        headers = dict(kwargs.get("headers", {})) | {"X-Request-ID": "mine-1"}  # type: ignore[call-overload]
        r = client.request(method, path, **(kwargs | {"headers": headers}))  # type: ignore[arg-type]
        assert r.headers.get_list("x-request-id") == ["mine-1"]


@pytest.fixture
def service_log() -> Iterator[io.StringIO]:
    """What the service's loggers write, through the filter and format ``ananke serve`` uses."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(RequestIdFilter())
    logger = logging.getLogger("modal_service")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield out
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_log_lines_about_a_request_carry_its_id(service_log: io.StringIO) -> None:
    with _app() as client:
        client.get("/boom", headers={"Authorization": "Bearer k", "X-Request-ID": "boom-42"})
    logging.getLogger("modal_service.test").info("outside any request")
    lines = service_log.getvalue().splitlines()
    assert "ERROR modal_service.http.errors [boom-42]: unhandled error" in lines
    assert "INFO modal_service.test [-]: outside any request" in lines


# ------------------------------------------------------------------------------- the client
class Recorder:
    def __init__(self, *replies: httpx.Response) -> None:
        self.replies = list(replies)
        self.sent: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.sent.append(request)
        return self.replies[min(len(self.sent), len(self.replies)) - 1]

    @property
    def ids(self) -> list[str | None]:
        return [r.headers.get("x-request-id") for r in self.sent]


def _client(recorder: Recorder, **kwargs: object) -> AnankeClient:
    client = AnankeClient("http://ananke.test", retry=FAST, **kwargs)  # type: ignore[arg-type]
    client._client = httpx.Client(
        base_url="http://ananke.test", headers=client._headers, transport=httpx.MockTransport(recorder)
    )
    return client


def _error(status: int, code: str, **headers: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": "m"}}, headers=headers)


def test_one_id_per_call_kept_across_retries() -> None:
    recorder = Recorder(_error(503, "engine_unavailable"), _error(422, "invalid_request"))
    client = _client(recorder)
    with pytest.raises(AnankeAPIError) as info:
        client.generate(REQUEST)
    first = recorder.ids
    assert len(first) == 2
    assert first[0] == first[1] == info.value.request_id  # a proxy-like answer: the id that was sent
    with pytest.raises(AnankeAPIError):
        client.generate(REQUEST)
    assert recorder.ids[2] != first[0]


def test_the_callers_id_is_sent_and_the_services_answer_wins() -> None:
    recorder = Recorder(_error(422, "invalid_constraint", **{"X-Request-ID": "server-side"}))
    with pytest.raises(AnankeAPIError) as info:
        _client(recorder).generate(REQUEST, request_id="caller-1")
    assert recorder.ids == ["caller-1"]
    assert info.value.request_id == "server-side"


def test_a_stream_error_event_carries_the_request_id() -> None:
    frame = 'data: {"event":"error","error":{"code":"timeout","message":"deadline"}}\n\n'
    answer = httpx.Response(200, content=frame.encode(), headers={"X-Request-ID": "s-1"})
    with pytest.raises(AnankeRequestTimeoutError) as info:
        list(_client(Recorder(answer)).stream(REQUEST, request_id="s-1"))
    assert info.value.request_id == "s-1"


def test_a_configured_header_is_sent_as_it_is() -> None:
    recorder = Recorder(_error(422, "invalid_request"))
    with pytest.raises(AnankeAPIError):
        _client(recorder, headers={"x-request-id": "fixed"}).generate(REQUEST, request_id="ignored")
    assert recorder.sent[0].headers.get_list("x-request-id") == ["fixed"]
