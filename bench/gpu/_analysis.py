"""What the server side recorded during a phase, summarised: ``so_probe``'s records from EngineCore and
the API process (mask fill, engine steps, stack samples), the server's own timeline (``/_bench/trace``)
and the facts in vLLM's log.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

from bench.gpu._shared import percentile


def probe_records(probe_dir: Path) -> list[dict[str, Any]]:
    recs: list[dict[str, Any]] = []
    for f in probe_dir.glob("probe-*.jsonl"):
        pid = f.stem.split("-", 1)[1]
        for line in f.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            r["pid"] = pid
            recs.append(r)
    return recs


def probe_summary(  # noqa: PLR0917
    probe_dir: Path,
    t0: float,
    t1: float,
    c: int,
    api_pid: Any = None,
    recs: list[dict[str, Any]] | None = None,
) -> dict[str, Any] | None:
    recs = probe_records(probe_dir) if recs is None else recs
    bm = [r for r in recs if r["k"] == "bm" and t0 <= r["t0"] <= t1]
    st = [r for r in recs if r["k"] == "st" and t0 <= r["t1"] <= t1]
    sampled = [r for r in recs if r["k"] in ("stk", "lag") and t0 <= r["t"] <= t1]
    if not bm and not st and not sampled:
        return None
    out: dict[str, Any] = {"bitmask_calls": len(bm), "steps": len(st)}
    if bm:
        full = [r for r in bm if r["n"] >= max(1, int(0.75 * c))] or bm
        out["bitmask_ms_p50"] = round(percentile([(r["t1"] - r["t0"]) * 1000 for r in full], 50) or 0, 3)
        out["bitmask_ms_mean"] = round(sum((r["t1"] - r["t0"]) * 1000 for r in full) / len(full), 3)
        out["bitmask_n_mean"] = round(sum(r["n"] for r in full) / len(full), 1)
        out["accept_ms_mean"] = round(sum(r["acc_ms"] for r in full) / len(full), 3)
        out["bitmask_modes"] = sorted({r["mode"] for r in bm})
    if len(st) > 2:
        ts = sorted(r["t1"] for r in st)
        gaps = [(b - a) * 1000 for a, b in itertools.pairwise(ts)]
        out["step_interval_ms_p50"] = round(percentile(gaps, 50) or 0, 3)
    if st:  # where the engine spent a stall: one long step, or no steps at all
        out["step_ms_max"] = round(max(r["dt"] for r in st), 1)
        out["first_step_s"] = round(min(r["t1"] for r in st) - t0, 3)
        out["last_step_s"] = round(max(r["t1"] for r in st) - t0, 3)
        if len(st) > 1:
            ts = sorted(r["t1"] for r in st)
            out["step_gap_ms_max"] = round(max((b - a) * 1000 for a, b in itertools.pairwise(ts)), 1)
    stacks = stack_summary(sampled, api_pid)
    if stacks:
        out["stacks"] = stacks
    return out


_IDLE = (
    "threading.py:wait",
    "queue.py:get",
    "selectors.py:select",
    "base_events.py:_run_once",
    "runners.py:run",  # uvloop: the event loop is in C (idle, or in a C callback)
    "so_probe.py:_flusher",
    "socket.py:recv",
    "poll",
    "thread.py:_worker",
)


def stack_summary(recs: list[dict[str, Any]], api_pid: Any, top: int = 8) -> dict[str, Any]:
    """Per process (API / EngineCore): samples, sampler lateness, and the most frequent busy stacks
    (a thread whose innermost frame is an idle wait is counted as idle)."""
    out: dict[str, Any] = {}
    for pid in sorted({r["pid"] for r in recs}):
        mine = [r for r in recs if r["pid"] == pid]
        name = "api" if str(pid) == str(api_pid) else f"pid{pid}"
        counts: dict[str, int] = {}
        idle = 0
        for r in mine:
            if r["k"] != "stk":
                continue
            leaf = r["s"].split(" < ", 1)[0]
            if any(mark in leaf for mark in _IDLE):
                idle += 1
                continue
            thread = re.sub(r"[_-]?\d+$", "", r["th"])
            key = f"{thread}: {r['s']}"
            counts[key] = counts.get(key, 0) + 1
        lags = [r["ms"] for r in mine if r["k"] == "lag"]
        ticks = len({r["t"] for r in mine if r["k"] == "stk"})
        out[name] = {
            "ticks": ticks,
            "idle_samples": idle,
            "sampler_late_ms_max": max(lags, default=0),
            "sampler_late_ms_sum": round(sum(lags), 1),
            "busy": sorted(counts.items(), key=lambda kv: -kv[1])[:top],
        }
    return out


def trace_summary(trace: list[dict[str, Any]], t0: float) -> dict[str, Any]:
    """Server-side timeline of a phase, in seconds after its start: when requests arrived, were
    planned (on how many threads), reached the engine and got their first token."""

    def spread(vals: list[float]) -> list[float] | None:
        if not vals:
            return None
        return [round(min(vals), 3), round(percentile(vals, 50) or 0, 3), round(max(vals), 3)]

    http = [r for r in trace if r["k"] == "http"]
    plans = [r for r in trace if r["k"] == "plan"]
    eng = [r for r in trace if r["k"] == "engine"]
    loop = [r["ms"] for r in trace if r["k"] == "loop" and r["t"] >= t0]
    cpu = [r["cpu_s"] for r in trace if r["k"] == "cpu"]
    gcs = [r for r in trace if r["k"] == "gc" and r["t"] >= t0]
    return {
        "gc_over_20ms": len(gcs),
        "gc_ms_max": max((r["ms"] for r in gcs), default=0),
        "gc_ms_sum": round(sum(r["ms"] for r in gcs), 1),
        "gc_gens": sorted({r["gen"] for r in gcs}),
        "process_cpu_s": cpu[-1] if cpu else None,
        "arrive_s": spread([r["t0"] - t0 for r in http]),
        "plan_start_s": spread([r["t0"] - t0 for r in plans]),
        "plan_ms": spread([(r["t1"] - r["t0"]) * 1000 for r in plans]),
        "plan_threads": len({r["th"] for r in plans}),
        "engine_call_s": spread([r["t0"] - t0 for r in eng]),
        "first_token_s": spread([r["first"] - t0 for r in eng if r.get("first")]),
        "engine_ms": spread([(r["t1"] - r["t0"]) * 1000 for r in eng]),
        "loop_late_ms_max": max(loop, default=0),
        "loop_late_ms_sum": round(sum(loop), 1),
    }


def parse_server_log(path: Path) -> dict[str, Any]:
    text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
    pats = {
        "model_load_gib": r"Model loading took ([\d.]+) GiB",
        "model_load_s": r"Model loading took [\d.]+ GiB (?:memory )?and ([\d.]+) s",
        "kv_cache_tokens": r"GPU KV cache size: ([\d,]+) tokens",
        "max_concurrency": r"Maximum concurrency for [\d,]+ tokens per request: ([\d.]+)x",
        "graph_capture_s": r"Graph capturing finished in ([\d.]+) sec",
        "init_engine_s": r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) s",
        "attention_backend": r"Using (\w+) attention backend",
        "mp_method": r"(?:multiproc|multiprocessing).*?method[^\w]*(fork|spawn)",
        "vllm_patch": r"vLLM patch parallel_mask_fill: (.*)",
        "parallel_mask_fill_in_engine_core": r"parallel (?:structured-output )?mask fill (on|off: .*)",
    }
    out: dict[str, Any] = {}
    for key, pat in pats.items():
        m = re.search(pat, text)
        if m:
            out[key] = m.group(1)
    out["errors"] = [ln[:300] for ln in text.splitlines() if "Error" in ln or "Traceback" in ln][:8]
    return out
