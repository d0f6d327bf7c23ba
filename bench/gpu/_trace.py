"""A profiled window of decode steps split kernel by kernel (``step_split``'s analysis of vLLM's torch
profiler traces): per step the GPU busy time against the step interval, the idle gaps and the kernels
on either side of them, time by kernel category and by kernel name. :func:`fake_trace` makes a trace
for checking the analysis without a GPU.
"""

from __future__ import annotations

import gzip
import itertools
import json
import re
import statistics
from pathlib import Path
from typing import Any

CATEGORIES: list[tuple[str, str]] = [  # first match wins; FA3's names carry cutlass:: templates
    ("attention", r"flash|fmha|attn|attention|paged"),
    ("bitmask", r"bitmask"),
    (
        "sampler",
        r"gumbel|sample|argmax|temperature|softmax|top_?k|top_?p|sort|exponential|min_p|logit|"
        r"penalt|nan",
    ),
    ("gemm", r"gemm|gemv|nvjet|cutlass|xmma|cublas|splitk"),
    ("norm", r"rms|norm|rsqrt"),
    ("rotary_kv", r"rotary|rope|_cos|_sin|cos_|sin_|cache"),
    ("activation", r"silu|act_and_mul|gelu"),
    ("copy", r"memcpy|memset|copy|fill|index|gather|scatter|cat_|elementwise"),
]


def category(name: str) -> str:
    low = name.lower()
    for cat, pat in CATEGORIES:
        if re.search(pat, low):
            return cat
    return "other"


def _short(name: str, n: int = 90) -> str:
    return name if len(name) <= n else name[: n - 1] + "…"


def split_trace(events: list[dict[str, Any]], n_steps_hint: int) -> dict[str, Any]:  # noqa: PLR0915
    """Per-step split of a profiled window: GPU activity (kernels, copies, sets) only.

    A step is the interval between two starts of one kernel that runs once per step (the longest-running
    such kernel, found by its count); steps longer than 1.5x the median (prefill, the window's ends)
    are left out."""
    gpu = sorted(
        (e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
        key=lambda e: float(e["ts"]),
    )
    if not gpu:
        return {"error": "no GPU events in the trace (CUPTI missing?)"}
    counts: dict[str, int] = {}
    totals: dict[str, float] = {}
    for e in gpu:
        counts[e["name"]] = counts.get(e["name"], 0) + 1
        totals[e["name"]] = totals.get(e["name"], 0.0) + float(e.get("dur", 0))
    once = [n for n, c in counts.items() if 0.7 * n_steps_hint <= c <= 1.3 * n_steps_hint]
    if not once:
        return {"error": f"no once-per-step kernel (hint {n_steps_hint})", "kernels": len(gpu)}
    marker = max(once, key=lambda n: totals[n])
    starts = [float(e["ts"]) for e in gpu if e["name"] == marker]
    intervals = list(itertools.pairwise(starts))
    med = statistics.median(b - a for a, b in intervals)
    steady = [(a, b) for a, b in intervals if b - a <= 1.5 * med]
    per_step: list[dict[str, Any]] = []
    cat_us: dict[str, float] = {}
    name_us: dict[str, float] = {}
    name_n: dict[str, int] = {}
    gap_at: dict[str, float] = {}
    i = 0
    for a, b in steady:
        while i < len(gpu) and float(gpu[i]["ts"]) < a:
            i += 1
        j = i
        busy, cursor, idle_big, n_k = 0.0, a, 0.0, 0
        prev = "(step start)"
        while j < len(gpu) and float(gpu[j]["ts"]) < b:
            e = gpu[j]
            ts, dur = float(e["ts"]), float(e.get("dur", 0))
            end = min(ts + dur, b)
            if ts > cursor:
                gap = ts - cursor
                if gap >= 5.0:  # µs; smaller ones are the launch spacing inside a graph
                    key = f"{_short(prev, 60)} -> {_short(e['name'], 60)}"
                    gap_at[key] = gap_at.get(key, 0.0) + gap
                    idle_big += gap
            if end > cursor:
                busy += end - max(ts, cursor)
                cursor = end
            cat = "copy" if e.get("cat") != "kernel" else category(e["name"])
            cat_us[cat] = cat_us.get(cat, 0.0) + dur
            name_us[e["name"]] = name_us.get(e["name"], 0.0) + dur
            name_n[e["name"]] = name_n.get(e["name"], 0) + 1
            prev = e["name"]
            n_k += 1
            j += 1
        per_step.append(
            {
                "interval_us": b - a,
                "busy_us": busy,
                "idle_us": b - a - busy,
                "idle_gaps_ge5us_us": idle_big,
                "kernels": n_k,
            }
        )
        i = j
    k = len(steady)
    if not k:
        return {"error": "no steady steps", "marker": marker}

    def p50(key: str) -> float:
        return round(float(statistics.median(float(s[key]) for s in per_step)), 1)

    top = sorted(name_us, key=lambda n: -name_us[n])[:30]
    return {
        "marker": _short(marker),
        "steps": k,
        "steps_left_out": len(intervals) - k,
        "interval_us_p50": p50("interval_us"),
        "busy_us_p50": p50("busy_us"),
        "idle_us_p50": p50("idle_us"),
        "idle_gaps_ge5us_us_p50": p50("idle_gaps_ge5us_us"),
        "kernels_per_step_p50": p50("kernels"),
        "sum_kernel_us_per_step": round(sum(cat_us.values()) / k, 1),
        "category_us_per_step": {c: round(v / k, 1) for c, v in sorted(cat_us.items(), key=lambda x: -x[1])},
        "top_kernels": [
            {
                "name": _short(n, 140),
                "category": category(n),
                "per_step": round(name_n[n] / k, 2),
                "us_per_step": round(name_us[n] / k, 1),
                "us_each": round(name_us[n] / name_n[n], 2),
            }
            for n in top
        ],
        "idle_gaps_us_per_step": {
            g: round(v / k, 1) for g, v in sorted(gap_at.items(), key=lambda x: -x[1])[:8]
        },
        "graph_kernels": sum(
            1 for e in gpu if "graph id" in e.get("args", {}) or "graph node id" in e.get("args", {})
        ),
    }


def load_trace(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return list(json.load(f).get("traceEvents", []))


def fake_trace(steps: int) -> list[dict[str, Any]]:
    """A made-up trace of ``steps`` decode steps (64 layers of GEMMs and small kernels, a sampler, a gap)."""
    ev: list[dict[str, Any]] = []
    t = 0.0
    for _ in range(steps):
        for _layer in range(64):
            for name, dur in (
                ("triton_red_fused_add_rsqrt_0", 3.0),
                ("nvjet_tst_gemm_qkv", 22.0),
                ("flash::FlashAttnFwdSm90<cutlass::bf16>", 6.0),
                ("nvjet_tst_gemm_o", 16.0),
                ("triton_poi_fused_silu_mul_1", 3.0),
                ("nvjet_tst_gemm_gate_up", 137.0),
                ("nvjet_tst_gemm_down", 72.0),
            ):
                ev.append({"ph": "X", "cat": "kernel", "name": name, "ts": t, "dur": dur})
                t += dur + 1.5
        for name, dur in (("nvjet_tst_gemm_lm_head", 370.0), ("_gumbel_sample_kernel", 8.0)):
            ev.append({"ph": "X", "cat": "kernel", "name": name, "ts": t, "dur": dur})
            t += dur + 2.0
        t += 120.0
    return ev
