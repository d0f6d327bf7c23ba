"""modal_service.http.background: the app served from a thread, the engine reached on that thread's loop,
as Modal's snapshot hooks use it (modal_service/app.py); and the container start giving up cleanly."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest
from fastapi import FastAPI

from modal_service.http.background import BackgroundServer
from tests.conftest import _free_port


def _app() -> FastAPI:
    app = FastAPI()

    @app.get("/loop")
    async def loop() -> dict[str, int]:
        return {"loop": id(asyncio.get_running_loop())}

    return app


async def _loop_id() -> int:
    return id(asyncio.get_running_loop())


def test_serves_from_a_thread_and_runs_calls_on_the_serving_loop() -> None:
    port = _free_port()
    server = BackgroundServer(_app(), host="127.0.0.1", port=port, log_level="warning")
    server.start(timeout_s=30)
    try:
        served = httpx.get(f"http://127.0.0.1:{port}/loop", timeout=10).json()["loop"]
        assert server.call(_loop_id, timeout_s=10) == served  # the engine's calls share the requests' loop
        with pytest.raises(RuntimeError, match="already started"):
            server.start()
    finally:
        server.stop(timeout_s=30)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/loop", timeout=5)
    with pytest.raises(RuntimeError, match="not running"):
        server.call(_loop_id)


def test_a_port_in_use_fails_the_start() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = BackgroundServer(_app(), host="127.0.0.1", port=port, log_level="critical")
        with pytest.raises(RuntimeError, match="stopped while starting"):
            server.start(timeout_s=30)


def test_wait_for_names_what_it_waited_for() -> None:
    server = BackgroundServer(_app(), host="127.0.0.1", port=_free_port(), log_level="warning")
    server.start(timeout_s=30)
    try:
        with pytest.raises(TimeoutError, match="engine start: not within 0 s"):
            server.wait_for(lambda: False, timeout_s=0.2, what="engine start", poll_s=0.05)
    finally:
        server.stop(timeout_s=30)


def test_container_start_stops_the_server_when_the_engine_fails(tmp_path: pytest.TempPathFactory) -> None:
    pytest.importorskip("vllm")
    from modal_service.app import load_config, start_server
    from modal_service.engine.engine import Engine, EngineConfig

    missing = str(tmp_path / "no-such-model")
    port = _free_port()
    engine = Engine(EngineConfig(model=missing))
    with pytest.raises(RuntimeError, match=r"the engine failed to start: .*no-such-model"):
        start_server(load_config({"ANANKE_MODEL": missing}), "k", engine=engine, port=port, timeout_s=120)
    with pytest.raises(httpx.ConnectError):  # the port is closed again: Modal restarts the container
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
