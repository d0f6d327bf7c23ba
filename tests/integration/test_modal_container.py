"""The Modal container's start (``modal_service.app.start_server``, what ``@modal.enter(snap=True)`` runs)
on the real engine and model, on the CPU: the service comes up on a background thread's loop, warmed,
and answers constrained requests, plain and through the openai SDK; then it stops cleanly. Modal
itself, the GPU snapshot and the sleep/wake cycle can only run on a GPU (see bench/gpu)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import IO

import httpx
import jsonschema
import pytest

from modal_service.app import SMOKE_SCHEMA, WARM_UP_TOOL
from modal_service.model_prep import cache_dir
from tests.conftest import ROOT, _free_port

pytestmark = pytest.mark.integration

KEY = "container-test-key"


def _read_until(stream: IO[str], prefix: str, proc: subprocess.Popen[str], timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    lines: list[str] = []
    for line in stream:
        lines.append(line)
        if line.startswith(prefix):
            return line
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise AssertionError(f"no {prefix!r} line; the container printed:\n{''.join(lines)[-4000:]}")


@pytest.fixture(scope="module")
def container() -> Iterator[tuple[str, subprocess.Popen[str], dict[str, object]]]:
    model = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if not (model / "config.json").is_file():
        pytest.skip("the local model is not pulled (ananke model pull)")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.integration.container_main", str(model), str(port), KEY],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    ready = _read_until(proc.stdout, "READY ", proc, timeout_s=600)
    try:
        yield f"http://127.0.0.1:{port}", proc, json.loads(ready.split(" ", 1)[1])
    finally:
        if proc.poll() is None:
            proc.kill()


def test_the_container_start_returns_a_ready_warmed_service(
    container: tuple[str, subprocess.Popen[str], dict[str, object]],
) -> None:
    url, _, ready = container
    assert ready["state"] == "ok"
    health = httpx.get(f"{url}/health", timeout=10)
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    headers = {"Authorization": f"Bearer {KEY}"}
    assert httpx.post(f"{url}/generate_api", json={"prompt": "x"}, timeout=10).status_code == 401
    body = {
        "messages": [{"role": "user", "content": "Describe one open-source project as JSON."}],
        "constraints": {"json_schema": SMOKE_SCHEMA},
        "max_tokens": 96,
        "temperature": 0.0,
    }
    answer = httpx.post(f"{url}/generate_api", json=body, headers=headers, timeout=120).json()
    assert answer["constraint_satisfied"] is True
    jsonschema.validate(json.loads(answer["generated_text"]), SMOKE_SCHEMA)


def test_the_openai_sdk_gets_a_tool_call(
    container: tuple[str, subprocess.Popen[str], dict[str, object]],
) -> None:
    openai = pytest.importorskip("openai")
    url, _, _ = container
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY)
    out = client.chat.completions.create(
        model="any",
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WARM_UP_TOOL],  # type: ignore[list-item]
        tool_choice="required",
        max_tokens=48,
        temperature=0.0,
    )
    (call,) = out.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    args = json.loads(call.function.arguments)  # type: ignore[union-attr]
    jsonschema.validate(args, WARM_UP_TOOL["function"]["parameters"])


def test_the_container_stops_cleanly(container: tuple[str, subprocess.Popen[str], dict[str, object]]) -> None:
    url, proc, _ = container
    assert proc.stdin is not None
    assert proc.stdout is not None
    proc.stdin.close()
    stopped = _read_until(proc.stdout, "STOPPED ", proc, timeout_s=120)
    assert stopped.split()[1] == "idle"  # the lifespan drained and shut the engine down
    assert proc.wait(timeout=60) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health", timeout=5)
