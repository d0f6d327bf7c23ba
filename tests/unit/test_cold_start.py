"""Cold starts against a real local HTTP server that answers 503 ``loading`` and then becomes ready."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from langchain_ananke import AnankeLLM, AnankeTimeoutError

READY = {
    "generated_text": "42", "tokens_generated": 1, "generation_time_ms": 1.0, "metadata": {},
    "constraint_satisfied": True, "finish_reason": "stop",
}


class ScaleUp(ThreadingHTTPServer):
    """Answers ``loading`` for the first ``cold`` requests, like a container scaling up."""

    def __init__(self, cold: int) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.cold = cold
        self.seen: list[dict[str, str]] = []


class _Handler(BaseHTTPRequestHandler):
    server: ScaleUp

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["content-length"]))
        self.server.seen.append(dict(self.headers))
        if len(self.server.seen) <= self.server.cold:
            body, status = {"error": {"code": "engine_unavailable", "message": "engine is loading"}}, 503
        else:
            body, status = READY, 200
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("retry-after", "0.2")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def scale_up(request: pytest.FixtureRequest) -> Iterator[ScaleUp]:
    server = ScaleUp(cold=request.param)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _llm(server: ScaleUp, **kwargs: Any) -> AnankeLLM:
    return AnankeLLM(base_url=f"http://127.0.0.1:{server.server_address[1]}", **kwargs)


@pytest.mark.parametrize("scale_up", [3], indirect=True)
def test_waits_out_a_cold_start(scale_up: ScaleUp) -> None:
    llm = _llm(scale_up, max_retries=5, api_key="k", modal_key="mk", modal_secret="ms")  # noqa: S106
    assert llm.invoke("x") == "42"
    assert len(scale_up.seen) == 4
    last = {k.lower(): v for k, v in scale_up.seen[-1].items()}
    assert last["authorization"] == "Bearer k"
    assert (last["modal-key"], last["modal-secret"]) == ("mk", "ms")


@pytest.mark.parametrize("scale_up", [10**6], indirect=True)
def test_deadline_gives_one_clear_error(scale_up: ScaleUp) -> None:
    llm = _llm(scale_up, max_retries=1000, cold_start_timeout=1.0)
    with pytest.raises(AnankeTimeoutError, match=r"cold-start deadline of 1 s passed.*engine is loading"):
        llm.invoke("x")
    assert 2 <= len(scale_up.seen) <= 6
