"""Markdown tables from ``run_gpu_bench.py``'s results: ``python -m bench.gpu.report results.json``."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from bench.gpu._shared import HBM_TBPS
from bench.report import cell, ratio


def render(res: dict[str, Any]) -> str:
    out: list[str] = []
    bw = res.get("copy_bandwidth_tbps")
    out.append(
        f"Device: {res.get('device')}; device-to-device copy bandwidth measured {bw} TB/s "
        f"(datasheet {HBM_TBPS}). max_tokens {res.get('max_tokens')}, temperature "
        f"{res.get('temperature')}.\n"
    )
    for name, eng in res.get("engines", {}).items():
        ph = eng.get("phases", {})
        info = eng.get("info", {})
        sl = eng.get("server_log", {})
        w = eng.get("weights", {})
        out.append(f"### {name} ({eng.get('arch')}, enforce_eager={eng.get('enforce_eager')})\n")
        if eng.get("start_error") or eng.get("failure"):
            out.append(f"Failed: {eng.get('start_error') or eng.get('failure')}\n")
        out.append(
            f"Engine start {cell(info.get('engine_start_s'))} s (server process to ready "
            f"{cell(eng.get('ready_wall_s'))} s); weights {sl.get('model_load_gib')} GiB; KV cache "
            f"{sl.get('kv_cache_tokens')} tokens; graph capture {sl.get('graph_capture_s')} s; "
            f"cudagraph_mode {info.get('cudagraph_mode')}; async scheduling {info.get('async_scheduling')}; "
            f"vLLM {info.get('vllm_version')}, torch {info.get('torch_version')}, llguidance "
            f"{info.get('llguidance_version')}.\n"
        )
        # single stream vs roofline
        rows = []
        for mode in ("unc", "json"):
            p = ph.get(f"c1_{mode}")
            if not p or not p.get("tpot_p50_ms"):
                continue
            tpot = p["tpot_p50_ms"]
            tok_s = 1000 / tpot
            roof_total = HBM_TBPS * 1e12 / w["bytes_total"]
            roof_read = HBM_TBPS * 1e12 / w["bytes_read_per_step"]
            eff_bw = w["bytes_read_per_step"] / (tpot / 1000) / 1e12
            rows.append(
                f"| {mode} | {tpot:.2f} | {tok_s:.1f} | {roof_total:.1f} | "
                f"{tok_s / roof_total:.0%} | {tok_s / roof_read:.0%} | {eff_bw:.2f} | "
                f"{(eff_bw / bw) if bw else 0:.0%} | {cell(p.get('ttft_p50_ms'))} |"
            )
        if rows:
            out.append(
                "| single stream | ms/step (TPOT p50) | tok/s | roofline tok/s (4.8 TB/s ÷ all "
                "weights) | of roofline | of roofline (bytes read/step) | effective TB/s | "
                "of measured copy BW | TTFT p50 ms |"
            )
            out.append("|---|---|---|---|---|---|---|---|---|")
            out.extend(rows)
            out.append("")
        # throughput vs concurrency
        out.append(
            "| c | unconstrained tok/s | JSON tok/s | JSON/unc | TPOT unc / JSON ms | latency p50/p95 "
            "unc s | latency p50/p95 JSON s | TTFT p50/p95 unc ms | TTFT p50/p95 JSON ms | "
            "mask ms/step (probe) |"
        )
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        for c in (1, 8, 64, 256):
            u, j = ph.get(f"c{c}_unc"), ph.get(f"c{c}_json")
            if not u and not j:
                continue
            u, j = u or {}, j or {}
            probe = j.get("probe") or {}
            out.append(
                f"| {c} | {cell(u.get('agg_tok_s'))} | {cell(j.get('agg_tok_s'))} | "
                f"{ratio(j.get('agg_tok_s'), u.get('agg_tok_s'))} | {cell(u.get('tpot_p50_ms'), 2)} / "
                f"{cell(j.get('tpot_p50_ms'), 2)} | {_s(u, 'lat_p50_ms')}/{_s(u, 'lat_p95_ms')} | "
                f"{_s(j, 'lat_p50_ms')}/{_s(j, 'lat_p95_ms')} | {cell(u.get('ttft_p50_ms'), 0)}/"
                f"{cell(u.get('ttft_p95_ms'), 0)} | {cell(j.get('ttft_p50_ms'), 0)}/"
                f"{cell(j.get('ttft_p95_ms'), 0)} | "
                f"{cell(probe.get('bitmask_ms_p50'), 2)} |"
            )
        out.append("")
        # everything else, one row per phase
        out.append(
            "| phase | kind | c | req | tok/s | TPOT p50 ms | lat p50 ms | TTFT p50 ms | finish | "
            "satisfied | ws outside strings | compile ms p50/max | mask ms p50 (n) | accept ms | "
            "step gap ms |"
        )
        out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for pname, p in ph.items():
            pr = p.get("probe") or {}
            ws = p.get("ws_outside_strings_total", p.get("flex_ws_outside_strings_total"))
            out.append(
                f"| {pname} | {p.get('kind', 'http')}{'/' + p['output_kind'] if p.get('output_kind') else ''}"
                f"{' ' + p['ctl']['mode'] if p.get('ctl', {}).get('mode', 'vllm') != 'vllm' else ''} | "
                f"{p.get('c')} | {p.get('requests')} | {cell(p.get('agg_tok_s'))} | "
                f"{cell(p.get('tpot_p50_ms'), 2)} | "
                f"{cell(p.get('lat_p50_ms'), 0)} | {cell(p.get('ttft_p50_ms'), 0)} | {p.get('finish')} | "
                f"{cell(p.get('satisfied'))} | {cell(ws)} | {cell(p.get('compile_ms_p50'), 2)}/"
                f"{cell(p.get('compile_ms_max'), 2)} | {cell(pr.get('bitmask_ms_p50'), 2)} "
                f"({cell(pr.get('bitmask_n_mean'))}) | {cell(pr.get('accept_ms_mean'), 2)} | "
                f"{cell(pr.get('step_interval_ms_p50'), 2)} |{' ' + p['error'] if p.get('error') else ''}"
            )
        out.append("")
    out.extend(_run4(res))
    if res.get("skipped"):
        out.append("Skipped for time: " + "; ".join(res["skipped"]) + "\n")
    return "\n".join(out)


def _run4(res: dict[str, Any]) -> list[str]:
    """Run 4's views: the server timeline of the warm-up rounds, A-B-B-A blocks, the GEMV floor."""
    out: list[str] = []
    gemv = res.get("gemv")
    if gemv:
        out.append("| GEMV floor (one CUDA graph) | ms | GB | TB/s |")
        out.append("|---|---|---|---|")
        out.extend(
            f"| {k} ({v['gemvs']} GEMVs) | {v['ms']} | {v['gb']} | {v['tbps']} |"
            for k, v in gemv.items()
            if isinstance(v, dict)
        )
        if gemv.get("tiny_kernel_us"):
            out.append(
                f"\nSmall kernel in a graph: {gemv['tiny_kernel_us']} µs; all GEMVs + 7 small kernels "
                f"per layer: {gemv.get('layers_with_7_tiny_ms')} ms."
            )
        out.append("")
    for name, eng in res.get("engines", {}).items():
        ph = eng.get("phases", {})
        rows = []
        for pname, p in ph.items():
            srv = p.get("server")
            if not srv or not (pname.startswith(("first_", "second_", "raw_first_", "warm"))):
                continue
            pr = p.get("probe") or {}
            rows.append(
                f"| {pname} | {p.get('c')} | {cell(p.get('wall_s'), 3)} | "
                f"{srv.get('plan_start_s')} | {srv.get('engine_call_s')} | "
                f"{srv.get('plan_threads')} | {srv.get('loop_late_ms_max')} | "
                f"{srv.get('gc_ms_max', '–')} | "
                f"{cell(pr.get('first_step_s'), 3)} | {cell(pr.get('step_ms_max'))} |"
            )
        if rows:
            out.append(
                f"### {name}: warm-up rounds, server timeline (s after the round starts: min, p50, max)\n"
            )
            out.append(
                "| round | c | wall s | planned | engine call | plan threads | loop late max ms | "
                "gc max ms | first engine step s | longest step ms |"
            )
            out.append("|---|---|---|---|---|---|---|---|---|---|")
            out.extend(rows)
            out.append("")
        seq = [(k, p) for k, p in ph.items() if re.fullmatch(r"c64_(unc|json)_f?\d+", k)]
        blocks = [seq[i : i + 4] for i in range(0, len(seq) - 3, 4)]
        if blocks:
            out.append(f"### {name}: A-B-B-A blocks at c=64\n")
            out.append("| phases | unc tok/s | JSON tok/s | block ratio | loop late max ms | gc max ms |")
            out.append("|---|---|---|---|---|---|")
            for b in blocks:
                u = [p["agg_tok_s"] for k, p in b if "_unc_" in k]
                j = [p["agg_tok_s"] for k, p in b if "_json_" in k]
                late = max((p.get("server") or {}).get("loop_late_ms_max") or 0 for _, p in b)
                gcs = [(p.get("server") or {}).get("gc_ms_max") for _, p in b]
                gcm = max((g for g in gcs if g is not None), default="–")  # runs before 4c did not record it
                ratio = f"{sum(j) / sum(u):.3f}" if u and j else "–"
                out.append(
                    f"| {b[0][0]}..{b[-1][0]} | {', '.join(map(str, u))} | {', '.join(map(str, j))} | "
                    f"{ratio} | {late} | {gcm} |"
                )
            out.append("")
    return out


def _s(p: dict[str, Any], key: str) -> str:
    v = p.get(key)
    return f"{v / 1000:.2f}" if v else "–"


def main() -> int:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "results.json")
    print(render(json.loads(path.read_text(encoding="utf-8"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
