"""One command for every benchmark table: ``python -m bench.run [--quick]`` (``make bench`` /
``make bench-quick``).

Order (one engine at a time, both started here on free loopback ports with the same engine settings):

1. client overhead against an instant fake server (no engine);
2. our service (``ananke serve``): constraint overhead at 1/4/16(/64) concurrent, TTFT (streaming),
   LangChain structured output (b), scaling (full run only), JSONSchemaBench conformance;
3. vLLM's own OpenAI server (``bench/peer_server.py``): the same raw workload at 1 and 16 concurrent,
   LangChain (a) and (c), the same conformance set.

Raw results go to ``bench/results/bench-<UTC stamp>[-quick].json`` (a new file per run, never
overwritten), PNG plots next to it (``<stamp>-*.png``), and the tables as Markdown
(``<stamp>.md``, also printed).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import client_overhead, conformance, load, plots, report, structured
from bench.common import (
    RESULTS,
    Server,
    load_avg,
    machine_info,
    other_engines,
    start_ours,
    start_peer,
    versions,
    write_json,
)


def _log(msg: str) -> None:
    print(msg, flush=True)


def config_for(quick: bool, args: argparse.Namespace) -> dict[str, Any]:
    """Workload sizes. On the 2-core CPU box the engine makes ~14 tok/s at c=1 and ~19 tok/s at c=16
    (bf16 on AVX2), so every phase is small; the full run fits 20 minutes, the quick one 5."""
    per_cat = args.conformance_per_category
    cfg: dict[str, Any] = {
        "quick": quick,
        "overhead_concurrency": [1, 4, 16] if quick else [1, 4, 16, 64],
        "overhead_max_tokens": 16 if quick else 24,
        "overhead_requests": {1: 1, 4: 4, 16: 16} if quick else {1: 2, 4: 4, 16: 16, 64: 64},
        "abba_at": [] if quick else [16],
        "ttft_concurrency": [1] if quick else [1, 16],
        "ttft_max_tokens": 8,
        "peer_concurrency": [1, 16],
        "structured_n": 8 if quick else 16,
        "structured_c": 8 if quick else 16,
        "structured_max_tokens": 96,
        "conformance_per_category": per_cat if per_cat is not None else (1 if quick else 6),
        "conformance_max_tokens": args.conformance_max_tokens or (32 if quick else 48),
        "conformance_concurrency": 32,
        "client_calls": 200 if quick else 400,
        "scaling_lengths": [] if quick else [32, 128, 512],
        "scaling_c": 1,
        "scaling_props": [] if quick else [4, 32, 128],
        "scaling_schema_max_tokens": 16,
    }
    if cfg["conformance_per_category"] == 0:
        cfg["conformance_per_category"] = None  # all schemas
    return cfg


_CLOCK = {"t0": time.perf_counter()}


def _due(result: dict[str, Any], section: str, share: float) -> bool:
    """Whether to run ``section``: the run's ``--budget-min`` is not yet ``share`` spent. A skipped
    section is recorded in the results (so a table's absence is explained, never silent)."""
    budget = result["config"]["budget_s"]
    elapsed = time.perf_counter() - _CLOCK["t0"]
    if budget is None or elapsed < share * budget:
        return True
    result.setdefault("skipped", []).append(f"{section} (at {elapsed:.0f} s of a {budget:.0f} s budget)")
    _log(f"   skipping {section}: {elapsed:.0f} s of the {budget:.0f} s budget spent")
    return False


async def conformance_phase(target: str, url: str, cfg: dict[str, Any], result: dict[str, Any]) -> None:
    _log(f"3. conformance ({target})")
    cases = conformance.load_cases(cfg["conformance_per_category"])
    result.setdefault("conformance", {})[target] = await conformance.run(
        target,
        url,
        cases,
        max_tokens=cfg["conformance_max_tokens"],
        concurrency=cfg["conformance_concurrency"],
        log=_log,
    )


async def ours_phases(url: str, cfg: dict[str, Any], result: dict[str, Any]) -> None:
    if cfg.get("only_conformance"):  # with and without closing on budget, back to back
        for target in ("ours", "ours_noclose"):
            await conformance_phase(target, url, cfg, result)
        return
    mt = cfg["overhead_max_tokens"]
    _log("warm-up (not reported)")
    for mode in ("none", "json"):
        await load.run_phase(
            f"warmup_{mode}", url, target="ours", mode=mode, c=4, n=4, max_tokens=8, log=lambda _m: None
        )

    _log("1. constraint overhead (ours, non-streaming)")
    combined: list[dict[str, Any]] = []
    singles: list[dict[str, Any]] = []
    for i, c in enumerate(cfg["overhead_concurrency"]):
        n = cfg["overhead_requests"][c]
        # ABBA at the headline concurrency, alternating order elsewhere: drifting load hits both modes.
        order = (
            ["none", "json", "json", "none"]
            if c in cfg["abba_at"]
            else (["none", "json"] if i % 2 == 0 else ["json", "none"])
        )
        reps: dict[str, list[dict[str, Any]]] = {"none": [], "json": []}
        for rep, mode in enumerate(order):
            reps[mode].append(
                await load.run_phase(
                    f"c{c}_{mode}#{rep}", url, target="ours", mode=mode, c=c, n=n, max_tokens=mt, log=_log
                )
            )
        for mode in ("none", "json"):
            combined.append(load.combine(reps[mode]) if len(reps[mode]) > 1 else reps[mode][0])
            if len(reps[mode]) > 1:
                singles.extend(reps[mode])
    result["overhead"] = combined
    result["overhead_reps"] = singles

    if cfg.get("only_overhead") or not _due(result, "ttft", 0.5):
        return
    _log("   time to first token (ours, streaming)")
    ttft = []
    for c in cfg["ttft_concurrency"]:
        for mode in ("none", "json"):
            ttft.append(
                await load.run_phase(
                    f"ttft_c{c}_{mode}",
                    url,
                    target="ours",
                    mode=mode,
                    c=c,
                    n=max(c, 2),
                    max_tokens=cfg["ttft_max_tokens"],
                    stream=True,
                    log=_log,
                )
            )
    result["ttft"] = ttft

    if not _due(result, "structured", 0.5):
        return
    _log("2. structured output via LangChain: (b) ChatAnanke")
    result["structured"] = [
        await structured.run_method(
            "ours",
            url,
            n=cfg["structured_n"],
            c=cfg["structured_c"],
            max_tokens=cfg["structured_max_tokens"],
            log=_log,
        )
    ]

    if not _due(result, "conformance", 0.5):
        return
    await conformance_phase("ours", url, cfg, result)

    if (cfg["scaling_lengths"] or cfg["scaling_props"]) and _due(result, "scaling", 0.6):
        _log("5. scaling (ours)")
        length = []
        for mt_ in cfg["scaling_lengths"]:
            for mode in ("none", "json"):
                length.append(
                    await load.run_phase(
                        f"len{mt_}_{mode}",
                        url,
                        target="ours",
                        mode=mode,
                        c=cfg["scaling_c"],
                        n=cfg["scaling_c"],
                        max_tokens=mt_,
                        stream=True,
                        log=_log,
                    )
                )
        sizes = []
        for k in cfg["scaling_props"]:
            phase = await load.run_phase(
                f"props{k}",
                url,
                target="ours",
                mode="json",
                c=2,
                n=2,
                max_tokens=cfg["scaling_schema_max_tokens"],
                schema=load.make_schema(k),
                unique_schema=True,
                stream=True,
                prompt=load.chat_prompt(f"List 500 records as a JSON array; each has fields p0..p{k - 1}."),
                log=_log,
            )
            phase["n_props"] = k
            sizes.append(phase)
        result["scaling"] = {"length": length, "schema_size": sizes}


async def peer_phases(url: str, cfg: dict[str, Any], result: dict[str, Any]) -> None:
    if cfg.get("only_conformance"):
        await conformance_phase("peer", url, cfg, result)
        return
    mt = cfg["overhead_max_tokens"]
    for mode in ("none", "json"):
        await load.run_phase(
            f"warmup_{mode}", url, target="peer", mode=mode, c=4, n=4, max_tokens=8, log=lambda _m: None
        )
    _log("1'. the same raw workload on vLLM's server")
    peer = []
    for c in cfg["peer_concurrency"]:
        n = cfg["overhead_requests"][c]
        for mode in ("none", "json"):
            peer.append(
                await load.run_phase(
                    f"peer_c{c}_{mode}", url, target="peer", mode=mode, c=c, n=n, max_tokens=mt, log=_log
                )
            )
    for c in cfg["ttft_concurrency"]:
        for mode in ("none", "json"):
            peer.append(
                await load.run_phase(
                    f"peer_ttft_c{c}_{mode}",
                    url,
                    target="peer",
                    mode=mode,
                    c=c,
                    n=max(c, 2),
                    max_tokens=cfg["ttft_max_tokens"],
                    stream=True,
                    log=_log,
                )
            )
    result["peer_raw"] = peer

    if not _due(result, "conformance", 1.0):
        return
    await conformance_phase("peer", url, cfg, result)

    if not _due(result, "structured", 1.0):
        return
    _log("2. structured output via LangChain: (a) and (c) on vLLM's server")
    for method in ("peer_json_schema", "peer_parse_retry"):
        result.setdefault("structured", []).append(
            await structured.run_method(
                method,
                url,
                n=cfg["structured_n"],
                c=cfg["structured_c"],
                max_tokens=cfg["structured_max_tokens"],
                log=_log,
            )
        )


def _with_server(
    kind: str, url: str | None, logdir: Path, cfg: dict[str, Any], result: dict[str, Any]
) -> None:
    """Start the server (unless ``url`` is given), run its phases, stop it."""
    phases = ours_phases if kind == "ours" else peer_phases
    if url is not None:
        result["servers"][kind] = {"url": "given", "load": load_avg()}
        asyncio.run(phases(url, cfg, result))
        return
    _log(f"starting {'our service' if kind == 'ours' else 'vLLM OpenAI server (peer)'} ...")
    if kind == "ours":
        server: Server = start_ours(logdir)
    else:
        from modal_service.model_prep import resolve_model

        server = start_peer(resolve_model(None), logdir)
    try:
        result["servers"][kind] = {"start_s": round(server.start_s, 1), "load": load_avg()}
        _log(f"  ready in {server.start_s:.0f} s")
        asyncio.run(phases(server.url, cfg, result))
    finally:
        code = server.proc.poll()
        if code is not None:  # it died during the phases: keep the evidence in the results
            tail = server.log.read_text(errors="replace")[-4000:]
            result["servers"][kind] |= {"died": code, "log_tail": tail}
            _log(f"  {kind} server exited with {code} during the run (log: {server.log})")
        server.stop()


def _plots(result: dict[str, Any], out: Path, stamp: str) -> dict[str, str]:
    makers = {
        "throughput": plots.throughput_vs_concurrency,
        "structured": plots.structured_side_by_side,
        "conformance": plots.conformance,
        "scaling": plots.scaling,
    }
    pngs = {}
    for key, fn in makers.items():
        if key == "scaling" and "scaling" not in result:
            continue
        if key in ("structured", "conformance") and not result.get(key):
            continue
        pngs[key] = str(fn(result, out / f"{stamp}-{key}.png"))
    return pngs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller workloads (under 5 minutes)")
    parser.add_argument("--skip-peer", action="store_true", help="only our service")
    parser.add_argument("--skip-ours", action="store_true", help="only vLLM's server (for debugging)")
    parser.add_argument(
        "--conformance-max-tokens",
        type=int,
        default=None,
        help="max_tokens for the conformance set (default 48; quick 32)",
    )
    parser.add_argument(
        "--conformance-per-category",
        type=int,
        default=None,
        help="schemas per category (default 10; quick 1; 0 = all 300)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--only-conformance",
        action="store_true",
        help="only conformance: ours with and without closing on budget, then vLLM's server",
    )
    parser.add_argument(
        "--only-overhead",
        action="store_true",
        help="only the constraint-overhead phases at c=16 and 64, both A-B-B-A, on our service",
    )
    parser.add_argument(
        "--budget-min",
        type=float,
        default=None,
        help="skip later sections once this much wall time is spent (ours up to half)",
    )
    parser.add_argument("--ours-url", default=None, help="use this running service instead of starting one")
    parser.add_argument(
        "--peer-url", default=None, help="use this running vLLM server instead of starting one"
    )
    args = parser.parse_args(argv)

    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    name = f"bench-{stamp}{'-quick' if args.quick else ''}"
    cfg = config_for(args.quick, args)
    cfg["budget_s"] = args.budget_min * 60 if args.budget_min else None
    if args.only_overhead:
        cfg |= {"only_overhead": True, "overhead_concurrency": [16, 64], "abba_at": [16, 64]}
        args.skip_peer = True
    started = _CLOCK["t0"] = time.perf_counter()
    # SIGTERM unwinds like an exception, so the servers this run started are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    result: dict[str, Any] = {
        "stamp": stamp,
        "command": " ".join(["python -m bench.run", *sys.argv[1:]]),
        "config": cfg,
        "machine": machine_info(),
        "versions": versions(),
        "load_start": load_avg(),
        "other_processes_at_start": other_engines(),
        "servers": {},
    }
    out_json = args.out / f"{name}.json"
    _log(
        f"bench {name}: load average {result['load_start']}, "
        f"{len(result['other_processes_at_start'])} other engine/test processes running"
    )

    if args.only_conformance:
        cfg["only_conformance"] = True
    if not (args.only_overhead or args.only_conformance):
        _log("4. client overhead (instant fake server)")
        result["client"] = client_overhead.run(n=cfg["client_calls"], log=_log)

    logdir = Path(tempfile.mkdtemp(prefix=f"ananke-bench-{stamp}-"))  # kept: server logs
    result["server_logs"] = str(logdir)
    if not args.skip_ours:
        _with_server("ours", args.ours_url, logdir, cfg, result)
        write_json(out_json, result)
    if not args.skip_peer:
        _with_server("peer", args.peer_url, logdir, cfg, result)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    result["load_end"] = load_avg()
    result["other_processes_at_end"] = other_engines()
    write_json(out_json, result)

    pngs = _plots(result, args.out, stamp)
    result["plots"] = pngs
    write_json(out_json, result)
    text = report.markdown(result)
    (args.out / f"{name}.md").write_text(text)
    print(text)
    _log(f"done in {result['wall_s']:.0f} s: {out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
