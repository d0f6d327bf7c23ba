"""PNG plots of one run's results (matplotlib, Agg): axes labelled with units."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def throughput_vs_concurrency(result: dict[str, Any], path: Path) -> Path:
    """Ours unconstrained vs JSON across concurrency, with the peer's points on the same workload."""
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {
        ("ours", "none"): ("tab:blue", "o", "ours, unconstrained"),
        ("ours", "json"): ("tab:orange", "o", "ours, JSON schema"),
        ("peer", "none"): ("tab:blue", "s", "vLLM server, unconstrained"),
        ("peer", "json"): ("tab:orange", "s", "vLLM server, JSON schema"),
    }
    for (target, mode), (color, marker, label) in styles.items():
        pts = sorted(
            (p["c"], p)
            for p in result.get("overhead", []) + result.get("peer_raw", [])
            if p["target"] == target and p["mode"] == mode and not p.get("stream")
        )
        if not pts:
            continue
        xs = [c for c, _ in pts]
        ls = "-" if target == "ours" else "--"
        ax1.plot(xs, [p["tok_s"] for _, p in pts], ls, marker=marker, color=color, label=label)
        ax2.plot(xs, [p["ms_per_token_p50"] for _, p in pts], ls, marker=marker, color=color, label=label)
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests")
        ax.grid(alpha=0.3)
    ax1.set_ylabel("aggregate output tokens/s")
    ax1.set_ylim(bottom=0)
    ax1.set_title("Throughput vs concurrency")
    ax2.set_ylabel("ms per output token (p50, per request)")
    ax2.set_title("Per-request token time")
    ax1.legend(fontsize=8)
    fig.suptitle(
        f"SmolLM2-135M on {result['machine']['cores']} CPU cores, max_tokens "
        f"{result['config']['overhead_max_tokens']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def structured_side_by_side(result: dict[str, Any], path: Path) -> Path:
    plt = pyplot()
    rows = result.get("structured", [])
    labels = {
        "ours": "(b) ChatAnanke",
        "peer_json_schema": "(a) vLLM + ChatOpenAI\njson_schema",
        "peer_parse_retry": "(c) ChatOpenAI\nparse + 2 retries",
    }
    names = [labels[r["method"]] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    colors = ["tab:green" if r["method"] == "ours" else "tab:gray" for r in rows]
    specs = [
        ("validity", "valid outputs (%)", 100),
        ("tok_s", "aggregate output tokens/s", 1),
        ("lat_p50_s", "e2e latency p50 (s)", 1),
    ]
    for ax, (key, label, scale) in zip(axes, specs, strict=True):
        vals = [(r[key] or 0) * scale for r in rows]
        ax.bar(names, vals, color=colors)
        ax.set_ylabel(label)
        for i, v in enumerate(vals):
            ax.annotate(f"{v:.3g}", (i, v), ha="center", va="bottom", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(
        f"Structured output via LangChain, {rows[0]['c'] if rows else '?'} concurrent, "
        "same prompts and schemas",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def conformance(result: dict[str, Any], path: Path) -> Path:
    plt = pyplot()
    conf = result.get("conformance", {})
    ours, peer = conf.get("ours"), conf.get("peer")
    cats = sorted((ours or peer or {}).get("per_category", {}))
    fig, ax = plt.subplots(figsize=(12, 4.5))
    width = 0.4
    keys = [
        ("valid", "tab:green"),
        ("truncated", "tab:orange"),
        ("invalid", "tab:red"),
        ("rejected", "tab:gray"),
        ("5xx", "black"),
    ]
    for offset, (name, res) in ((-width / 2, ("ours", ours)), (width / 2, ("vLLM", peer))):
        if res is None:
            continue
        bottom = [0.0] * len(cats)
        for key, color in keys:
            vals = []
            for cat in cats:
                counts = res["per_category"].get(cat, {})
                if key == "valid":
                    vals.append(sum(v for k, v in counts.items() if k.startswith("valid")))
                else:
                    vals.append(counts.get(key, 0))
            xs = [i + offset for i in range(len(cats))]
            ax.bar(
                xs,
                vals,
                width * 0.95,
                bottom=bottom,
                color=color,
                label=key if name == "ours" else None,
                alpha=1.0 if name == "ours" else 0.55,
                edgecolor="white",
            )
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.set_xticks(range(len(cats)))
    ax.set_xticklabels(cats, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("schemas (left bar ours, right bar vLLM server)")
    mt = (ours or peer or {}).get("max_tokens")
    ax.set_title(f"JSONSchemaBench dev: outcome per category (max_tokens {mt})", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def scaling(result: dict[str, Any], path: Path) -> Path:
    plt = pyplot()
    sc = result.get("scaling", {})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for mode, color in (("none", "tab:blue"), ("json", "tab:orange")):
        pts = sorted((p["max_tokens"], p) for p in sc.get("length", []) if p["mode"] == mode)
        if pts:
            ax1.plot(
                [x for x, _ in pts],
                [p["ms_per_step_p50"] for _, p in pts],
                "-o",
                color=color,
                label="JSON schema" if mode == "json" else "unconstrained",
            )
    ax1.set_xscale("log", base=2)
    ax1.set_ylim(bottom=0)
    ax1.set_xlabel("output length (max_tokens)")
    ax1.set_ylabel("ms per decode step (p50, server side)")
    ax1.set_title("Output length")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    # A phase whose every request failed has no timings (its errors are in the raw file).
    pts = sorted((p["n_props"], p) for p in sc.get("schema_size", []) if "compile_ms_p50" in p)
    if pts:
        ax2.plot(
            [x for x, _ in pts],
            [p["compile_ms_p50"] for _, p in pts],
            "-o",
            color="tab:purple",
            label="grammar compile ms (p50, cold)",
        )
        ax2b = ax2.twinx()
        ax2b.plot(
            [x for x, _ in pts],
            [p["ms_per_step_p50"] for _, p in pts],
            "-s",
            color="tab:orange",
            label="ms per decode step (p50)",
        )
        ax2b.set_ylabel("ms per decode step (p50)")
        ax2b.set_ylim(bottom=0)
        ax2b.legend(fontsize=8, loc="lower right")
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("properties per object in the schema")
    ax2.set_ylabel("compile ms (p50)")
    ax2.set_title("Schema size")
    ax2.legend(fontsize=8, loc="upper left")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw(result: dict[str, Any], out: Path, stamp: str) -> dict[str, str]:
    """Every plot the result has data for, as ``<out>/<stamp>-<name>.png``; returns name -> path."""
    makers = {
        "throughput": throughput_vs_concurrency,
        "structured": structured_side_by_side,
        "conformance": conformance,
        "scaling": scaling,
    }
    return {
        key: str(fn(result, out / f"{stamp}-{key}.png"))
        for key, fn in makers.items()
        if key == "throughput" or result.get(key)
    }


def main(argv: list[str]) -> None:
    """``python -m bench.plots bench/results/bench-<stamp>.json``: redraw a run's plots from its raw file."""
    import json

    path = Path(argv[0])
    result = json.loads(path.read_text())
    for png in draw(result, path.parent, result["stamp"]).values():
        print(png)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
