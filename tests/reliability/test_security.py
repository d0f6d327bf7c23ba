"""Security: the key guards every path but /health, is compared in constant time, never logged, never
sent to another host; ``ananke serve`` binds loopback and warns when exposed without a key.
"""

from __future__ import annotations

import http.server
import logging
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from langchain_ananke._http import AnankeClient, AsyncAnankeClient, RetryPolicy
from langchain_ananke.errors import AnankeAPIError
from langchain_ananke.protocol import GenerateRequest
from modal_service import cli
from tests.reliability.conftest import Service, chat

KEYLESS = [
    {},
    {"Authorization": "Bearer wrong-key"},
    {"Authorization": "Basic cmVsOnRlc3Q="},
    {"Authorization": "Bearer"},
    {"Authorization": "Token rel-test-key-Zx81"},
    {"X-Api-Key": "rel-test-key-Zx81"},
]


# ------------------------------------------------------------------------------ the server
@pytest.mark.integration
def test_every_path_but_health_needs_the_key(service: Service) -> None:
    with service.client() as http:
        spec = http.get("/openapi.json").json()
    routes = [(m.upper(), p) for p, ops in spec["paths"].items() for m in ops]
    extra = [
        ("GET", "/openapi.json"),
        ("GET", "/docs"),
        ("GET", "/redoc"),
        ("GET", "/nope"),
        ("POST", "/v2/x"),
    ]
    assert ("POST", "/generate_api") in routes
    assert ("POST", "/v1/chat/completions") in routes
    checked = 0
    for method, path in routes + extra:
        for headers in KEYLESS:
            r = httpx.request(method, service.url + path, headers=headers, json={"prompt": "x"}, timeout=30)
            if path == "/health":
                assert r.status_code == 200
                continue
            assert r.status_code == 401, (method, path, headers, r.status_code)
            assert r.json()["error"]["code"] == "unauthorized"
            assert r.headers["www-authenticate"] == "Bearer"
            checked += 1
    print(f"{checked} keyless requests over {len(routes) + len(extra)} paths: all 401")
    with service.client() as http:
        assert http.get("/v1/models").status_code == 200
        assert http.get("/docs").status_code == 200


@pytest.mark.integration
def test_keys_and_prompts_are_never_logged(service: Service) -> None:
    if service.external:
        pytest.skip("reads the log of a server this session started")
    marker = f"secret-prompt-{uuid.uuid4().hex}"
    wrong = f"wrong-key-{uuid.uuid4().hex}"
    with service.client() as http:
        ok = http.post("/generate_api", json={"prompt": chat(marker), "max_tokens": 2})
        assert ok.status_code == 200
        bad = http.post("/generate_api", json={"prompt": marker + "x" * 5000, "max_tokens": 99_999})
        assert bad.status_code == 422
        http.post("/generate_api", json={"prompt": chat(marker), "stream": True, "max_tokens": 2})
    httpx.post(
        f"{service.url}/generate_api", headers={"Authorization": f"Bearer {wrong}"}, json={"prompt": marker}
    )
    log = service.log_text()
    assert '"POST /generate_api HTTP/1.1" 200' in log  # the access log is on, and sees these requests
    assert marker not in log
    assert wrong not in log
    assert service.api_key not in log


def test_keys_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both sides are hashed to 32 bytes and compared with hmac.compare_digest (no length leak)."""
    from starlette.datastructures import Headers

    from modal_service.http import guard as server

    calls: list[tuple[bytes, bytes]] = []
    real = server.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(server.hmac, "compare_digest", spy)
    guard = server.ApiKey("k" * 40)
    assert guard.authorized(Headers({"authorization": "Bearer " + "k" * 40}))
    assert not guard.authorized(Headers({"authorization": "Bearer short"}))
    assert not guard.authorized(Headers({"authorization": "Bearer " + "k" * 39 + "j"}))
    assert len(calls) == 3
    assert all(len(a) == len(b) == 32 for a, b in calls)


# -------------------------------------------------------------------------------- the CLI
def test_serve_binds_loopback_by_default() -> None:
    args = cli.build_parser().parse_args(["serve"])
    assert args.host == "127.0.0.1"


@pytest.mark.parametrize(
    ("host", "key", "warns"),
    [
        ("127.0.0.1", None, False),
        ("localhost", None, False),
        ("::1", None, False),
        ("127.0.0.2", None, False),
        ("0.0.0.0", None, True),  # noqa: S104
        ("::", None, True),
        ("192.168.1.20", None, True),
        ("example.internal", None, True),
        ("0.0.0.0", "k", False),  # noqa: S104
    ],
)
def test_exposure_warning(host: str, key: str | None, warns: bool) -> None:
    warning = cli.exposure_warning(host, key)
    assert (warning is not None) is warns
    if warning:
        assert "without an API key" in warning


def test_serve_warns_when_exposed_without_a_key(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The real ``ananke serve`` code path up to uvicorn (which is replaced: nothing is bound)."""
    ran: list[Any] = []

    class NoServer:
        def __init__(self, config: Any) -> None:
            self.config = config

        def run(self) -> None:
            ran.append(self.config)

    monkeypatch.setattr(cli, "draining_server", lambda config, *_: NoServer(config))
    monkeypatch.delenv("ANANKE_API_KEY", raising=False)
    with caplog.at_level(logging.WARNING, logger="ananke"):
        assert cli.main(["serve", "--host", "0.0.0.0", "--port", "1"]) == 0  # noqa: S104
    assert any("without an API key" in r.message for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ananke"):
        assert cli.main(["serve", "--port", "1"]) == 0
    assert not any("without an API key" in r.message for r in caplog.records)
    assert ran[-1].host == "127.0.0.1"


def test_api_key_file(tmp_path: Any) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("  from-a-file\n")
    args = cli.build_parser().parse_args(["serve", "--api-key-file", str(key_file), "--api-key", "cli"])
    assert cli._api_key(args) == "from-a-file"


# ------------------------------------------------------------------------- the client
class _Recorder(http.server.BaseHTTPRequestHandler):
    """Records each request's headers; answers per ``mode`` (redirect elsewhere, or OK)."""

    seen: list[dict[str, str]]
    location: str = ""

    def _answer(self) -> None:
        self.seen.append({k.lower(): v for k, v in self.headers.items()})
        length = int(self.headers.get("content-length") or 0)
        self.rfile.read(length)
        if self.location:
            self.send_response(307)
            self.send_header("Location", self.location)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = b'{"status":"ok"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args: Any) -> None:
        pass


def _serve(location: str = "") -> tuple[http.server.ThreadingHTTPServer, list[dict[str, str]]]:
    seen: list[dict[str, str]] = []
    handler = type("H", (_Recorder,), {"seen": seen, "location": location})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, seen


@pytest.fixture
def redirect_pair() -> Iterator[tuple[str, list[dict[str, str]], list[dict[str, str]]]]:
    """A 'service' on one loopback port that redirects to an 'attacker' on another."""
    attacker, attacker_seen = _serve()
    target = f"http://127.0.0.1:{attacker.server_address[1]}/steal"
    service, service_seen = _serve(location=target)
    try:
        yield f"http://127.0.0.1:{service.server_address[1]}", service_seen, attacker_seen
    finally:
        service.shutdown()
        attacker.shutdown()


REQUEST = GenerateRequest(prompt="x", max_tokens=1)


def test_client_does_not_follow_redirects_with_the_key(
    redirect_pair: tuple[str, list[dict[str, str]], list[dict[str, str]]],
) -> None:
    base, service_seen, attacker_seen = redirect_pair
    client = AnankeClient(base, api_key="sk-secret", retry=RetryPolicy(max_retries=0))
    with pytest.raises(AnankeAPIError, match="redirect") as info:
        client.generate(REQUEST)
    assert info.value.status_code == 307
    assert info.value.code == "redirect"
    with pytest.raises(AnankeAPIError, match="redirect"):
        list(client.stream(REQUEST))
    assert service_seen[0]["authorization"] == "Bearer sk-secret"
    assert attacker_seen == []


async def test_async_client_does_not_follow_redirects_with_the_key(
    redirect_pair: tuple[str, list[dict[str, str]], list[dict[str, str]]],
) -> None:
    base, _, attacker_seen = redirect_pair
    client = AsyncAnankeClient(base, api_key="sk-secret", retry=RetryPolicy(max_retries=0))
    with pytest.raises(AnankeAPIError, match="redirect"):
        await client.generate(REQUEST)
    await client.aclose()
    assert attacker_seen == []


def test_key_is_stripped_from_requests_to_any_other_origin() -> None:
    """Even if the underlying httpx client were told to follow redirects, or sent an absolute URL."""
    seen: dict[str, tuple[str | None, ...]] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen[str(request.url)] = tuple(
            request.headers.get(h) for h in ("authorization", "modal-key", "modal-secret")
        )
        if request.url.host == "ananke.test":
            return httpx.Response(307, headers={"location": "https://evil.test/steal"})
        return httpx.Response(200, json={})

    client = AnankeClient("http://ananke.test", api_key="sk-secret", modal_key="mk", modal_secret="ms")  # noqa: S106
    kwargs = client._client_kwargs() | {"follow_redirects": True}
    client._client = httpx.Client(**kwargs, transport=httpx.MockTransport(handler))
    client._client.post("/generate_api", json={})
    client._client.get("http://ananke.test:8080/other-port")
    assert seen["http://ananke.test/generate_api"] == ("Bearer sk-secret", "mk", "ms")
    assert seen["https://evil.test/steal"] == (None, None, None)
    assert seen["http://ananke.test:8080/other-port"] == (None, None, None)
    assert client._client_kwargs()["follow_redirects"] is False
