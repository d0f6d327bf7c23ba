"""The loop guard (issue 19): how often it fires on the 300 dev schemas, validity with it on and off,
and what it costs a request that does not loop.

``python -m bench.loop_guard`` starts ``ananke serve`` (:func:`bench._server.start_ours`), then:

1. **Conformance, guard off then on.** Every schema of ``tests/data/jsonschemabench-dev`` through
   ``/generate_api`` as :mod:`bench.conformance` sends it (temperature 0, seed 1, ``max_attempts`` 2,
   closing on budget on), with ``max_tokens`` 256 so that a loop has room to run, and
   ``constraints.loop_guard`` false, then true. Each output is checked independently with
   ``jsonschema``. At temperature 0 both arms write the same tokens until the guard fires, so the
   schemas where it fired are the whole difference; they are listed with both outputs.
2. **Cost, A-B-A-B.** With the guard on, a non-streaming request takes per-step outputs from the
   engine (it watches the output grow) instead of one at the end. The raw JSON workload of
   :mod:`bench.load` (c=16, every request to ``max_tokens``) with ``loop_guard`` false (A) and true
   (B), alternating so a drift in the machine's load hits both alike.

Raw results go to ``bench/results/loop-guard-<stamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import conformance, load
from bench._server import start_ours
from bench.common import RESULTS, end_record, pct, rnd, run_record, write_json


def _arm(summary: dict[str, Any]) -> dict[str, Any]:
    rows = summary["rows"]
    fired = [r for r in rows if (r.get("loop_guard") or {}).get("fired")]
    return {
        "valid": summary["valid"],
        "accepted": summary["accepted"],
        "lies": summary["lies"],
        "truncated": summary["truncated"],
        "fired": len(fired),
        "detected_not_fired": sum(
            1 for r in rows if r.get("loop_guard") and not r["loop_guard"].get("fired")
        ),
        "tokens_total": sum(r.get("tokens") or 0 for r in rows),
        "tokens_p50": summary["tokens_p50"],
        "wall_s": summary["wall_s"],
    }


def _fired_pairs(off: dict[str, Any], on: dict[str, Any]) -> list[dict[str, Any]]:
    """The schemas where the guard fired: both arms' outcome, tokens and (shortened) text."""
    by_name = {r["name"]: r for r in off["rows"]}
    out = []
    for r in on["rows"]:
        guard = r.get("loop_guard") or {}
        if not guard:
            continue
        o = by_name[r["name"]]
        out.append(
            {
                "name": f"{r['category']}/{r['name']}",
                "fired": guard.get("fired"),
                "period": guard.get("period_tokens"),
                "share": guard.get("match_share"),
                "dropped": guard.get("dropped_tokens"),
                "on": {
                    "outcome": r["outcome"],
                    "tokens": r.get("tokens"),
                    "text": (r.get("text") or "")[:160],
                },
                "off": {
                    "outcome": o["outcome"],
                    "tokens": o.get("tokens"),
                    "text": (o.get("text") or "")[:160],
                },
            }
        )
    return out


async def _cost(url: str, *, rounds: int, n: int, c: int, max_tokens: int) -> list[dict[str, Any]]:
    common: dict[str, Any] = {
        "target": "ours",
        "mode": "json",
        "c": c,
        "max_tokens": max_tokens,
        "close": False,
    }
    await load.run_phase("warmup", url, n=2 * c, caps=False, guard=False, log=lambda _: None, **common)
    out = []
    for i in range(rounds):
        for guard in (False, True):
            phase = await load.run_phase(
                f"c{c}_json_guard_{'on' if guard else 'off'}#{i}", url, n=n, caps=False, guard=guard, **common
            )
            phase["guard"] = guard
            phase["fired"] = sum(bool(r.get("loop_guard_fired")) for r in phase["rows"])
            out.append(phase)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loop_guard", description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-tokens", type=int, default=256, help="conformance max_tokens (default 256)")
    parser.add_argument("--per-category", type=int, default=None, help="schemas per category (default: all)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="cost A-B rounds (default 2: A-B-A-B)")
    parser.add_argument("--requests", type=int, default=64, help="requests per cost phase")
    parser.add_argument("--cost-max-tokens", type=int, default=128)
    parser.add_argument("--cost-only", action="store_true", help="only the A-B cost phases (no conformance)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    result = run_record(stamp, "python -m bench.loop_guard", vars(args) | {"out": str(args.out)})
    started = time.perf_counter()
    cases = conformance.load_cases(args.per_category)
    server = start_ours(Path(tempfile.mkdtemp(prefix=f"ananke-loop-guard-{stamp}-")))
    try:
        arms = {}
        for target in () if args.cost_only else ("ours_noguard", "ours_guard"):
            arms[target] = asyncio.run(
                conformance.run(
                    target, server.url, cases, max_tokens=args.max_tokens, concurrency=args.concurrency
                )
            )
        if arms:
            result["conformance"] = {"off": _arm(arms["ours_noguard"]), "on": _arm(arms["ours_guard"])}
            result["fired"] = _fired_pairs(arms["ours_noguard"], arms["ours_guard"])
            result["conformance_rows"] = {k: v["rows"] for k, v in arms.items()}
        result["cost_phases"] = asyncio.run(
            _cost(server.url, rounds=args.rounds, n=args.requests, c=16, max_tokens=args.cost_max_tokens)
        )
    finally:
        server.stop()
    end_record(result, started)
    for guard in (False, True):
        runs = [p for p in result["cost_phases"] if p["guard"] is guard]
        name = "on" if guard else "off"
        result[f"tok_s_{name}"] = round(
            sum(p["out_tokens"] for p in runs) / sum(p["wall_s"] for p in runs), 2
        )
        result[f"ms_per_token_p50_{name}"] = rnd(
            pct([r["ms_per_token"] for p in runs for r in p["rows"] if r.get("ms_per_token")], 50), 2
        )
    result["ratio_on_over_off"] = round(result["tok_s_on"] / result["tok_s_off"], 3)
    path = args.out / f"loop-guard-{stamp}.json"
    write_json(path, result)
    if "conformance" in result:
        c = result["conformance"]
        print(
            f"fired {c['on']['fired']} of {len(cases)}; valid off {c['off']['valid']} on {c['on']['valid']}; "
            f"lies off {c['off']['lies']} on {c['on']['lies']}"
        )
    print(
        f"cost: tok/s off {result['tok_s_off']} on {result['tok_s_on']} "
        f"(ratio {result['ratio_on_over_off']}); {path}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
