"""Shared fixtures: the real local service, started once per test session.

Set ``ANANKE_TEST_BASE_URL`` to reuse a service that is already running (e.g. ``ananke serve``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVER_START_TIMEOUT = 600


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_healthy(url: str, proc: subprocess.Popen[bytes] | None, log: Path | None) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-4000:] if log else ""
            raise RuntimeError(f"ananke serve exited with {proc.returncode}:\n{tail}")
        try:
            if httpx.get(f"{url}/health", timeout=5).json().get("status") == "ok":
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(2)
    raise RuntimeError(f"service at {url} not healthy after {SERVER_START_TIMEOUT} s")


@pytest.fixture(scope="session")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a real local service running the real model."""
    existing = os.environ.get("ANANKE_TEST_BASE_URL")
    if existing:
        _wait_healthy(existing, None, None)
        yield existing
        return
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "modal_service.cli",
                "serve",
                "--port",
                str(port),
                "--max-tokens-cap",
                "4096",
            ],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=300) as client:
        yield client


def chat_prompt(text: str) -> str:
    """SmolLM2's ChatML turn for raw /generate_api prompts."""
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


def stream_generate(http: httpx.Client, body: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
    """A streamed ``/generate_api`` call: the text of its ``token`` events, and the ``done`` event's
    response (None if the stream ended without one)."""
    text, done = "", None
    with http.stream("POST", "/generate_api", json=body | {"stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                if event["event"] == "token":
                    text += event["text"]
                elif event["event"] == "done":
                    done = event["response"]
    return text, done
