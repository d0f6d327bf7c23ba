"""What ``GET /metrics`` costs: throughput at c=16 with a scrape every second, against none.

``python -m bench.metrics_cost`` starts ``ananke serve`` (:func:`bench._server.start_ours`) and warms
it up with one unreported phase of the same shape (the first c=16 phase of a fresh engine ran at 40 %
of the later ones' speed). Then it runs the raw JSON workload of ``bench.run``
(:func:`bench.load.run_phase`: ``n`` requests from 16 closed-loop workers, every request to
``max_tokens``) in phases that alternate A-B-A-B: A without scrapes, B with a ``GET /metrics`` every
second for the whole phase, so a drift in the machine's load hits both alike. vLLM's stat logger runs
in both (it is always on); the comparison is the scrape. Raw results go to
``bench/results/metrics-<stamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench import load
from bench._server import start_ours
from bench.common import RESULTS, end_record, pct, rnd, run_record, write_json


async def _scraper(url: str, every_s: float, samples: list[dict[str, float]], stop: asyncio.Event) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        while not stop.is_set():
            started = time.perf_counter()
            r = await client.get("/metrics")
            samples.append({"ms": (time.perf_counter() - started) * 1000, "bytes": len(r.content)})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every_s)


async def phases(url: str, *, rounds: int, n: int, c: int, max_tokens: int) -> list[dict[str, Any]]:
    await load.run_phase(
        "warmup",
        url,
        target="ours",
        mode="json",
        c=c,
        n=2 * c,
        max_tokens=max_tokens,
        close=False,
        caps=False,
    )
    out = []
    for i in range(rounds):
        for scrape in (False, True):
            samples: list[dict[str, float]] = []
            stop = asyncio.Event()
            task = asyncio.create_task(_scraper(url, 1.0, samples, stop)) if scrape else None
            phase = await load.run_phase(
                f"c{c}_json_{'scrape' if scrape else 'none'}#{i}",
                url,
                target="ours",
                mode="json",
                c=c,
                n=n,
                max_tokens=max_tokens,
                close=False,  # every request runs to max_tokens: equal lengths in both arms
                caps=False,
                log=print,
            )
            stop.set()
            if task is not None:
                await task
            ms = [s["ms"] for s in samples]
            phase["scrape"] = scrape
            phase["scrapes"] = len(samples)
            phase["scrape_ms_p50"] = rnd(pct(ms, 50), 2)
            phase["scrape_ms_max"] = rnd(max(ms), 2) if ms else None
            phase["scrape_bytes"] = int(samples[-1]["bytes"]) if samples else None
            out.append(phase)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.metrics_cost", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--rounds", type=int, default=2, help="A-B rounds (default 2: A-B-A-B)")
    parser.add_argument("--requests", type=int, default=192, help="requests per phase")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    result = run_record(
        stamp,
        "python -m bench.metrics_cost",
        vars(args) | {"c": 16, "scrape_every_s": 1.0, "out": str(args.out)},
    )
    started = time.perf_counter()
    server = start_ours(Path(tempfile.mkdtemp(prefix=f"ananke-metrics-{stamp}-")))
    try:
        result["phases"] = asyncio.run(
            phases(server.url, rounds=args.rounds, n=args.requests, c=16, max_tokens=args.max_tokens)
        )
    finally:
        server.stop()
    end_record(result, started)
    for arm in (False, True):
        runs = [p for p in result["phases"] if p["scrape"] is arm]
        tok_s = sum(p["out_tokens"] for p in runs) / sum(p["wall_s"] for p in runs)
        result[f"tok_s_{'scrape' if arm else 'none'}"] = round(tok_s, 2)
    result["ratio_scrape_over_none"] = round(result["tok_s_scrape"] / result["tok_s_none"], 3)
    write_json(args.out / f"metrics-{stamp}.json", result)
    print(
        f"tok/s without scrapes {result['tok_s_none']}, with a scrape every second {result['tok_s_scrape']} "
        f"(ratio {result['ratio_scrape_over_none']}); {args.out / f'metrics-{stamp}.json'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
