"""One command for every benchmark table: ``python -m bench.run [--quick]`` (``make bench`` /
``make bench-quick``).

Both engines run at once, each on a free loopback port with the same engine settings: our service
(``ananke serve``) and vLLM's own OpenAI server (``bench/peer_server.py``). Only one is loaded at a time;
their phases alternate, mirrored (A B B A), so both meet the same load on a shared machine. Order:

1. client overhead against an instant fake server (no engine);
2. the raw workload at 1/4/16/64 concurrent, unconstrained and JSON, ours and vLLM's interleaved:
   constraint overhead (ours), ours against vLLM; then TTFT (streaming) the same way;
3. closing on budget (ours): a record list cut by ``max_tokens``, closing on/off, valid share and cost;
4. LangChain structured output: (b) ChatAnanke and (a) ChatOpenAI on vLLM interleaved, then (c);
5. JSONSchemaBench conformance, all 300 schemas: ours, then vLLM's;
6. scaling (ours): output length and schema size.

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
from bench._server import ServerProcess, start_ours, start_peer
from bench.common import RESULTS, load_avg, machine_info, other_engines, versions, write_json
from bench.workloads import RECORD_LIST, wide_record_list, wide_record_list_prompt


def _log(msg: str) -> None:
    print(msg, flush=True)


def config_for(quick: bool, args: argparse.Namespace) -> dict[str, Any]:
    """Workload sizes for the 2-core CPU box. The engine runs float32 there (no bf16 instructions):
    ~13 tok/s at c=1 and ~80 tok/s at c=16 on one quiet core. The full run fits 20 minutes, the
    quick one 5."""
    per_cat = args.conformance_per_category
    cfg: dict[str, Any] = {
        "quick": quick,
        "interleaved": True,
        "overhead_concurrency": [1, 16] if quick else [1, 4, 16, 64],
        "overhead_max_tokens": 16 if quick else 24,
        "overhead_requests": {1: 1, 16: 16} if quick else {1: 2, 4: 8, 16: 32, 64: 64},
        "ttft_concurrency": [1] if quick else [1, 16],
        "ttft_max_tokens": 8,
        "closing_c": 0 if quick else 16,
        "closing_max_tokens": 14,
        "structured_n": 8 if quick else 16,
        "structured_c": 8 if quick else 16,
        "structured_max_tokens": 96,
        "conformance_per_category": per_cat if per_cat is not None else (1 if quick else 0),
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


def _abba(targets: list[str], modes: list[str]) -> list[tuple[str, str]]:
    """The interleaved order of one concurrency level: every (target, mode) twice, mirrored
    (A B C D D C B A), so a load drift during the level hits every cell alike."""
    first = [(t, m) for m in modes for t in (targets if m == modes[0] else targets[::-1])]
    return first + first[::-1]


async def _raw_level(
    urls: dict[str, str], c: int, n: int, cfg: dict[str, Any], *, stream: bool = False, max_tokens: int
) -> dict[tuple[str, str], list[dict[str, Any]]]:
    reps: dict[tuple[str, str], list[dict[str, Any]]] = {}
    order = _abba(list(urls), ["none", "json"]) * cfg.get("abba_rounds", 1)
    for rep, (target, mode) in enumerate(order):
        name = f"{'ttft_' if stream else ''}{'' if target == 'ours' else 'peer_'}c{c}_{mode}#{rep}"
        reps.setdefault((target, mode), []).append(
            await load.run_phase(
                name,
                urls[target],
                target=target,
                mode=mode,
                c=c,
                n=n,
                max_tokens=max_tokens,
                stream=stream,
                close=False,  # runs to max_tokens: equal lengths, no closing search measured
                caps=False,  # the array unbounded, as the peer's
                log=_log,
            )
        )
    return reps


async def raw_phases(urls: dict[str, str], cfg: dict[str, Any], result: dict[str, Any]) -> None:
    """Constraint overhead (ours) and the same workload on vLLM's server, interleaved per level."""
    _log("warm-up (not reported)")
    for target, url in urls.items():
        for mode in ("none", "json"):
            await load.run_phase(
                f"warmup_{mode}",
                url,
                target=target,
                mode=mode,
                c=4,
                n=4,
                max_tokens=8,
                close=False,
                caps=False,
                log=lambda _m: None,
            )
    _log("1. constraint overhead, ours and vLLM's server interleaved (non-streaming)")
    for c in cfg["overhead_concurrency"]:
        reps = await _raw_level(
            urls, c, cfg["overhead_requests"][c], cfg, max_tokens=cfg["overhead_max_tokens"]
        )
        for (target, _mode), phases in reps.items():
            key = "overhead" if target == "ours" else "peer_raw"
            result.setdefault(key, []).append(load.combine(phases))
            result.setdefault(f"{key}_reps", []).extend(phases)
    if cfg.get("only_overhead") or not _due(result, "ttft", 0.5):
        return
    _log("   time to first token (streaming)")
    for c in cfg["ttft_concurrency"]:
        reps = await _raw_level(urls, c, max(c, 2), cfg, stream=True, max_tokens=cfg["ttft_max_tokens"])
        for (target, _mode), phases in reps.items():
            result.setdefault("ttft" if target == "ours" else "peer_raw", []).append(load.combine(phases))


async def closing_phases(url: str, cfg: dict[str, Any], result: dict[str, Any]) -> None:
    """What closing on budget costs and buys: a record list cut by max_tokens, closing on/off, A-B-B-A."""
    if not cfg["closing_c"] or not _due(result, "closing", 0.6):
        return
    _log("   closing on budget: cut record lists, on / off")
    c = cfg["closing_c"]
    reps: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
    for rep, close in enumerate([True, False, False, True]):
        reps[close].append(
            await load.run_phase(
                f"close_{'on' if close else 'off'}#{rep}",
                url,
                target="ours",
                mode="json",
                c=c,
                n=c,
                max_tokens=cfg["closing_max_tokens"],
                schema=RECORD_LIST,
                close=close,
                validate=True,
                log=_log,
            )
        )
    result["closing"] = []
    for phases in reps.values():
        merged = load.combine(phases)
        merged["valid"] = sum(p["valid"] for p in phases)
        merged["closed"] = sum(p["closed"] for p in phases)
        result["closing"].append(merged)


async def structured_phases(urls: dict[str, str], cfg: dict[str, Any], result: dict[str, Any]) -> None:
    """LangChain structured output: (b) ours and (a) vLLM interleaved b-a-a-b, then (c) on vLLM."""
    if not _due(result, "structured", 0.7):
        return
    _log("2. structured output via LangChain: (b) ChatAnanke, (a) and (c) on vLLM's server")
    methods = [m for m in ("ours", "peer_json_schema") if ("ours" if m == "ours" else "peer") in urls]
    order = methods + methods[::-1]
    if "peer" in urls:
        order.append("peer_parse_retry")
    runs: dict[str, list[dict[str, Any]]] = {}
    for method in order:
        runs.setdefault(method, []).append(
            await structured.run_method(
                method,
                urls["ours" if method == "ours" else "peer"],
                n=cfg["structured_n"],
                c=cfg["structured_c"],
                max_tokens=cfg["structured_max_tokens"],
                log=_log,
            )
        )
    result["structured"] = [structured.combine(r) if len(r) > 1 else r[0] for r in runs.values()]
    result["structured_reps"] = [r for rs in runs.values() for r in rs]


async def scaling_phases(url: str, cfg: dict[str, Any], result: dict[str, Any]) -> None:
    if not (cfg["scaling_lengths"] or cfg["scaling_props"]) or not _due(result, "scaling", 0.8):
        return
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
                    close=False,
                    caps=False,
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
            schema=wide_record_list(k),
            unique_schema=True,
            stream=True,
            close=False,
            caps=False,
            prompt=wide_record_list_prompt(k),
            log=_log,
        )
        phase["n_props"] = k
        sizes.append(phase)
    result["scaling"] = {"length": length, "schema_size": sizes}


async def all_phases(urls: dict[str, str], cfg: dict[str, Any], result: dict[str, Any]) -> None:
    """Every section against the servers in ``urls`` ("ours", "peer"), both up at once."""
    if cfg.get("only_conformance"):
        for target in ("ours", "ours_noclose", "peer"):
            if target.removesuffix("_noclose") in urls:
                await conformance_phase(target, urls[target.removesuffix("_noclose")], cfg, result)
        return
    await raw_phases(urls, cfg, result)
    if cfg.get("only_overhead"):
        return
    if "ours" in urls:
        await closing_phases(urls["ours"], cfg, result)
    await structured_phases(urls, cfg, result)
    for target in ("ours", "peer"):
        if target in urls and _due(result, f"conformance ({target})", 0.8):
            await conformance_phase(target, urls[target], cfg, result)
    if "ours" in urls:
        await scaling_phases(urls["ours"], cfg, result)


def _with_servers(
    wanted: dict[str, str | None], logdir: Path, cfg: dict[str, Any], result: dict[str, Any]
) -> None:
    """Start the servers not given by URL (at the same time), run every phase, stop them."""
    from concurrent.futures import ThreadPoolExecutor

    from modal_service.model_prep import resolve_model

    urls = {k: u for k, u in wanted.items() if u is not None}
    for kind in urls:
        result["servers"][kind] = {"url": "given", "load": load_avg()}
    to_start = [k for k, u in wanted.items() if u is None]
    servers: dict[str, ServerProcess] = {}
    if to_start:
        _log(f"starting {', '.join(to_start)} ...")
        starters = {
            "ours": lambda: start_ours(logdir),
            "peer": lambda: start_peer(resolve_model(None), logdir),
        }
        with ThreadPoolExecutor(len(to_start)) as pool:
            futures = {k: pool.submit(starters[k]) for k in to_start}
            for kind, fut in futures.items():
                try:
                    servers[kind] = fut.result()
                except Exception as exc:
                    result["servers"][kind] = {"failed": f"{type(exc).__name__}: {exc}"}
                    _log(f"  {kind} failed to start: {exc}")
    try:
        for kind, server in servers.items():
            result["servers"][kind] = {"start_s": round(server.start_s, 1), "load": load_avg()}
            _log(f"  {kind} ready in {server.start_s:.0f} s (both started together)")
            urls[kind] = server.url
        urls = {k: urls[k] for k in ("ours", "peer") if k in urls}
        asyncio.run(all_phases(urls, cfg, result))
    finally:
        for kind, server in servers.items():
            code = server.returncode
            if code is not None:  # it died during the phases: keep the evidence in the results
                result["servers"][kind] |= {"died": code, "log_tail": server.tail()}
                _log(f"  {kind} server exited with {code} during the run (log: {server.log})")
            server.stop()


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
        help="schemas per category (default 0 = all 300; quick 1)",
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
        help="only the raw workload at c=16 and 64, ours and vLLM's server interleaved, 2 rounds",
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
        cfg |= {"only_overhead": True, "overhead_concurrency": [16, 64], "abba_rounds": 2}
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
    wanted = {} if args.skip_ours else {"ours": args.ours_url}
    if not args.skip_peer:
        wanted["peer"] = args.peer_url
    _with_servers(wanted, logdir, cfg, result)
    if "client" in result:
        _log("4'. client overhead again (end of run)")
        result["client_end"] = client_overhead.run(n=cfg["client_calls"], log=_log)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    result["load_end"] = load_avg()
    result["other_processes_at_end"] = other_engines()
    write_json(out_json, result)

    pngs = plots.draw(result, args.out, stamp)
    result["plots"] = pngs
    write_json(out_json, result)
    text = report.markdown(result)
    (args.out / f"{name}.md").write_text(text)
    print(text)
    _log(f"done in {result['wall_s']:.0f} s: {out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
