"""Engine.sleep / Engine.wake (vLLM's sleep mode, for Modal's GPU snapshots) and what the service says
while the engine sleeps: /health 503 ``sleeping`` with Retry-After, requests 503 ``engine_unavailable``.
vLLM's sleep mode needs a GPU; here its two calls are stood in for (bench/gpu measures the real ones)."""

from __future__ import annotations

import asyncio

import pytest
from fastapi.testclient import TestClient

pytest.importorskip("vllm")

from langchain_ananke.protocol import HealthResponse
from modal_service.engine.engine import Engine, EngineConfig, EngineNotReady
from modal_service.http.app import create_app


class _SleepyLLM:
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def sleep(self, level: int = 1) -> None:
        self.calls.append(f"sleep {level}")

    async def wake_up(self) -> None:
        self.calls.append("wake")


def _engine(*, sleep_mode: bool = True) -> tuple[Engine, _SleepyLLM]:
    engine = Engine(EngineConfig(model="stand-in", sleep_mode=sleep_mode))
    llm = _SleepyLLM()
    engine._llm, engine.state = llm, "ok"
    return engine, llm


def test_sleep_then_wake_and_what_the_service_answers_meanwhile() -> None:
    engine, llm = _engine()
    client = TestClient(create_app(engine, start_engine=False))  # no `with`: no lifespan, no vLLM
    assert asyncio.run(engine.sleep()) >= 0
    assert engine.state == "sleeping"
    health = client.get("/health")
    assert health.status_code == 503
    assert health.headers["retry-after"] == "5"
    assert HealthResponse.model_validate(health.json()).status == "sleeping"  # the client's model reads it
    refused = client.post("/generate_api", json={"prompt": "x", "max_tokens": 4})
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "engine_unavailable"
    with pytest.raises(EngineNotReady):
        asyncio.run(engine.sleep())  # asleep already
    assert asyncio.run(engine.wake()) >= 0
    assert engine.state == "ok"
    assert llm.calls == ["sleep 1", "wake"]
    with pytest.raises(RuntimeError, match="not sleeping"):
        asyncio.run(engine.wake())


def test_sleep_needs_sleep_mode() -> None:
    engine, llm = _engine(sleep_mode=False)
    with pytest.raises(RuntimeError, match="without sleep_mode"):
        asyncio.run(engine.sleep())
    assert llm.calls == []
    assert engine.state == "ok"
