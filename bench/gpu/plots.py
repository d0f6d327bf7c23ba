"""PNG plots of the H200 runs (matplotlib, Agg): ``python -m bench.gpu.plots RUN3.json RUN2.json --out DIR``.

Reads the ``results.json`` files that ``run_gpu_bench`` writes. RUN3 (the run with warm concurrency
levels) gives the throughput curves and single-stream bars; RUN2 adds its repeats and the 7B shape to the
mask-fill comparison. Engine ms/step is the EngineCore step interval (p50) from ``so_probe``.
Roofline lines are computed, not measured: all bf16 weights read once per decode step at the datasheet's
4.8 TB/s, capped by 989 TFLOP/s of dense bf16 compute (2 FLOP per parameter per token).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.gpu._shared import HBM_TBPS, weight_bytes
from bench.plots import pyplot

BF16_TFLOPS = 989.0  # H200 datasheet, dense
CS = (1, 8, 64, 256)
ARCH_32B = "qwen2.5-coder-32b"


def _phase(run: dict[str, Any], engine: str, name: str) -> dict[str, Any] | None:
    return run.get("engines", {}).get(engine, {}).get("phases", {}).get(name)


def _step(phase: dict[str, Any] | None) -> float | None:
    probe = (phase or {}).get("probe") or {}
    return probe.get("step_interval_ms_p50")


def _mask(phase: dict[str, Any] | None) -> float | None:
    probe = (phase or {}).get("probe") or {}
    return probe.get("bitmask_ms_p50")


def roofline_tok_s(arch: str, c: float) -> float:
    w = weight_bytes(arch)
    return min(c * HBM_TBPS * 1e12 / w["bytes_total"], BF16_TFLOPS * 1e12 / (2 * w["params"]))


def throughput(run3: dict[str, Any], path: Path) -> Path:
    """Aggregate tok/s and engine ms/step against concurrency, 32B shape, JSON vs unconstrained."""
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    series = [
        ("32b-compile", "unc", "tab:blue", "-", "o", "compile + graphs (app.py), unconstrained"),
        ("32b-compile", "json", "tab:orange", "-", "o", "compile + graphs (app.py), JSON schema"),
        ("32b-graphs", "unc", "tab:blue", "--", "s", "graphs only, unconstrained"),
        ("32b-graphs", "json", "tab:orange", "--", "s", "graphs only, JSON schema"),
    ]
    for engine, mode, color, ls, marker, label in series:
        pts = [(c, _phase(run3, engine, f"c{c}_{mode}")) for c in CS]
        pts = [(c, p) for c, p in pts if p and p.get("agg_tok_s")]
        ax1.plot(
            [c for c, _ in pts], [p["agg_tok_s"] for _, p in pts], ls, marker=marker, color=color, label=label
        )
        steps = [(c, _step(p)) for c, p in pts if _step(p)]
        ax2.plot([c for c, _ in steps], [s for _, s in steps], ls, marker=marker, color=color, label=label)
    for engine, c, marker in (("32b-graphs", 64, "s"), ("32b-compile", 256, "o")):
        p = _phase(run3, engine, f"c{c}_json_vllm")
        if p:
            ax1.plot(
                [c],
                [p["agg_tok_s"]],
                marker=marker,
                color="tab:red",
                linestyle="none",
                markerfacecolor="none",
                markersize=9,
            )
            if _step(p):
                ax2.plot(
                    [c],
                    [_step(p)],
                    marker=marker,
                    color="tab:red",
                    linestyle="none",
                    markerfacecolor="none",
                    markersize=9,
                )
    ax1.plot(
        [],
        [],
        marker="o",
        color="tab:red",
        linestyle="none",
        markerfacecolor="none",
        label="JSON, vLLM's own mask fill (patch bypassed)",
    )
    xs = [1, 2, 4, 8, 16, 32, 64, 128, 256]
    ax1.plot(
        xs,
        [roofline_tok_s(ARCH_32B, c) for c in xs],
        ":",
        color="black",
        label="roofline, estimated (4.8 TB/s weights per step; 989 TFLOP/s cap)",
    )
    ax1.set(
        xscale="log",
        yscale="log",
        xlabel="concurrent requests (closed loop)",
        ylabel="output tokens/s (aggregate)",
        title="32B shape, one H200: throughput",
    )
    ax2.set(
        xscale="log",
        xlabel="concurrent requests (closed loop)",
        ylabel="engine ms per decode step (p50)",
        title="32B shape: engine step time",
    )
    single = weight_bytes(ARCH_32B)["bytes_total"] / (HBM_TBPS * 1e12) * 1000
    ax2.axhline(single, color="black", linestyle=":", label=f"roofline step, estimated ({single:.1f} ms)")
    for ax in (ax1, ax2):
        ax.set_xticks(CS, [str(c) for c in CS])
        ax.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=7.5, loc="upper left")
    ax2.legend(fontsize=7.5, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def single_stream(runs: list[tuple[str, dict[str, Any]]], path: Path) -> Path:
    """Single-stream decode tok/s (1000 / engine ms per step) against the HBM roofline, 32B shape."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.4))
    labels, values, colors = [], [], []
    for run_name, run in runs:
        for engine in ("32b-graphs", "32b-compile"):
            for mode, color in (("unc", "tab:blue"), ("json", "tab:orange")):
                step = _step(_phase(run, engine, f"c1_{mode}"))
                if step:
                    labels.append(f"{run_name}\n{engine[4:]}\n{'JSON' if mode == 'json' else 'unc.'}")
                    values.append(1000 / step)
                    colors.append(color)
    bars = ax.bar(range(len(values)), values, color=colors)
    roof = roofline_tok_s(ARCH_32B, 1)
    for v, b in zip(values, bars, strict=True):
        ax.text(
            b.get_x() + b.get_width() / 2,
            v / 2,
            f"{v:.1f}\n{v / roof:.1%}",
            ha="center",
            fontsize=8,
            color="white",
        )
    ax.axhline(
        roof, color="black", linestyle=":", label=f"HBM roofline, 4.8 TB/s datasheet ({roof:.1f} tok/s)"
    )
    ax.axhline(0.8 * roof, color="tab:red", linestyle="--", label=f"issue target, 80 % ({0.8 * roof:.1f})")
    copy = runs[0][1].get("copy_bandwidth_tbps")
    if copy:
        at_copy = copy * 1e12 / weight_bytes(ARCH_32B)["bytes_total"]
        ax.axhline(
            at_copy,
            color="tab:gray",
            linestyle="-.",
            label=f"roofline at the measured copy bandwidth, {copy:.2f} TB/s ({at_copy:.1f})",
        )
    ax.set_xticks(range(len(labels)), labels, fontsize=7.5)
    ax.set(
        ylabel="tokens/s, one stream (1000 / engine ms per step)",
        ylim=(0, roof * 1.12),
        title="32B shape, one H200: single-stream decode against the roofline",
    )
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def mask_fill(runs: list[tuple[str, dict[str, Any]]], path: Path) -> Path:
    """Engine step and mask time at c=64/256: the service's parallel fill against vLLM's own."""
    plt = pyplot()
    runs_by_name = dict(runs)
    # Unconstrained reference phases whose concurrency level was warm (run 2's first phase at a new
    # level stalled in the API process; its 32B-compile c=64 reference is left out, 7B uses the raw one).
    picks = [
        ("run 3", "32b-graphs", 64, "c64_unc", "c64_json", "c64_json_vllm"),
        ("run 3", "32b-compile", 256, "c256_unc", "c256_json", "c256_json_vllm"),
        ("run 2", "32b-graphs", 64, "c64_unc_r2", "c64_json", "c64_json_vllm"),
        ("run 2", "32b-graphs", 64, "c64_unc_r2", "c64_json_r2", "c64_json_vllm_r2"),
        ("run 2", "32b-compile", 64, None, "c64_json", "c64_json_vllm"),
        ("run 2", "7b-graphs", 64, "raw_c64_unc", "c64_json", "c64_json_vllm"),
    ]
    rows = []
    for run_name, engine, c, unc_name, ours_name, theirs_name in picks:
        run = runs_by_name[run_name]
        unc = _step(_phase(run, engine, unc_name)) if unc_name else None
        ours, theirs = _phase(run, engine, ours_name), _phase(run, engine, theirs_name)
        rows.append(
            (f"{run_name}\n{engine} c={c}", unc, _step(ours), _step(theirs), _mask(ours), _mask(theirs))
        )
    fig, ax = plt.subplots(figsize=(11, 4.4))
    width = 0.18
    for i, (label, unc, s_ours, s_theirs, m_ours, m_theirs) in enumerate(rows):
        vals = [
            (unc, "tab:blue", "engine step, unconstrained"),
            (s_ours, "tab:orange", "engine step, JSON, service's parallel fill"),
            (s_theirs, "tab:red", "engine step, JSON, vLLM's own fill"),
            (m_ours, "navajowhite", "mask fill per step, service"),
            (m_theirs, "lightcoral", "mask fill per step, vLLM's own"),
        ]
        for j, (v, color, name) in enumerate(vals):
            if v is not None:
                ax.bar(i + (j - 2) * width, v, width, color=color, label=name if i == 0 else None)
        del label
    ax.set_xticks(range(len(rows)), [r[0] for r in rows], fontsize=7.5)
    ax.set(
        ylabel="ms per engine step (p50)", title="Where the JSON step time goes (so_probe, inside EngineCore)"
    )
    ax.legend(fontsize=7.5, ncol=2)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run3", type=Path)
    ap.add_argument("run2", type=Path)
    ap.add_argument("--out", type=Path, default=Path("bench/gpu/results"))
    ap.add_argument("--prefix", default="h200-2026-11-29")
    args = ap.parse_args()
    run3 = json.loads(args.run3.read_text(encoding="utf-8"))
    run2 = json.loads(args.run2.read_text(encoding="utf-8"))
    runs = [("run 3", run3), ("run 2", run2)]
    for p in (
        throughput(run3, args.out / f"{args.prefix}-throughput.png"),
        single_stream(runs, args.out / f"{args.prefix}-single-stream.png"),
        mask_fill(runs, args.out / f"{args.prefix}-mask-fill.png"),
    ):
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
