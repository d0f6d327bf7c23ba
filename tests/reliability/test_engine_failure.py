"""Engine failure: a model that cannot load, or an engine that dies while serving, is reported by
/health (503, ``error``), every generation request gets 503, and nothing pretends to be healthy.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import httpx
import pytest

from bench._server import ServerProcess
from langchain_ananke._http import AnankeClient, RetryPolicy
from langchain_ananke.errors import AnankeAPIError
from langchain_ananke.protocol import GenerateRequest
from tests.reliability.conftest import Service, chat, wait_until


def _assert_refuses(url: str, headers: dict[str, str] | None = None) -> None:
    for path, body in (
        ("/generate_api", {"prompt": "hi", "max_tokens": 2}),
        ("/generate_api", {"prompt": "hi", "max_tokens": 2, "stream": True}),
        ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
    ):
        r = httpx.post(url + path, json=body, headers=headers or {}, timeout=30)
        assert r.status_code == 503, (path, r.text[:300])
        assert r.json()["error"]["code"] == "engine_unavailable"


@pytest.mark.integration
def test_a_model_that_cannot_load_is_reported(tmp_path: Path) -> None:
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "no_such_arch", "architectures": ["X"]}))
    server = ServerProcess(["--model", str(broken)], tmp_path / "serve.log")
    server.start()
    try:
        body = server.wait_for("error", timeout=300)
        status, body = server.health()
        assert status == 503
        assert body["status"] == "error"
        assert "no_such_arch" in str(body["detail"])
        _assert_refuses(server.url)
        # The typed client error, not a hang: 503 is retried (bounded), then raised.
        client = AnankeClient(
            server.url, retry=RetryPolicy(max_retries=1, initial_delay=0.01, max_delay=0.05)
        )
        with pytest.raises(AnankeAPIError) as info:
            client.generate(GenerateRequest(prompt="hi", max_tokens=1))
        assert info.value.status_code == 503
        assert "failed to start" in info.value.message
        assert server.alive  # still up, answering honestly
    finally:
        server.stop()


@pytest.mark.stress
def test_engine_death_while_serving_is_reported(service_handle: Service) -> None:
    """Kill vLLM's EngineCore under a running service (needs its own server start: ``stress``)."""
    server = service_handle.take()
    pids = server.engine_pids()
    assert pids, "no EngineCore process found"
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as http:
        with http.stream(
            "POST",
            "/generate_api",
            json={"prompt": chat("Tell a long story"), "max_tokens": 200, "stream": True},
        ) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data:"))
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            rest = [line for line in lines if line.startswith("data:")]
        last = json.loads(rest[-1][5:]) if rest else {}
        # The stream ends with an error event (never a 'done' with a half answer).
        assert last.get("event") == "error", rest[-3:]
        assert last["error"]["code"] == "engine_unavailable"
    wait_until(lambda: server.health()[0] == 503, 30)
    _, body = server.health()
    assert body["status"] == "error"
    assert "died" in str(body["detail"])
    _assert_refuses(server.url, server.headers)
    server.stop()


@pytest.mark.stress
def test_deep_constraints_do_not_kill_the_engine(service_handle: Service) -> None:
    """The API process compiles these on 256 MiB-stack threads, but vLLM compiles them again in
    EngineCore on default 8 MiB stacks. They must be refused up front (422) or survive there."""
    from tests.reliability.test_hostile import CRASH_SHAPES

    server = service_handle.take()
    try:
        for name, constraint in sorted(CRASH_SHAPES.items()):
            r = httpx.post(
                f"{server.url}/generate_api",
                json={"prompt": "x", "max_tokens": 8, "constraints": constraint},
                headers=server.headers,
                timeout=300,
            )
            status, body = server.health()
            print(f"{name}: {r.status_code} {r.text[:120]} -> health {status} {body.get('detail')}")
            assert status == 200, f"{name} killed the engine: {body}"
            assert r.status_code in (200, 422)
    finally:
        server.stop()
