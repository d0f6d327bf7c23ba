"""How deterministic is temperature-0 output without fast-forward? (issue 21, the identity target)

Fast-forward verifies a run of forced tokens in one forward pass; one token at a time computes the same
positions in separate steps, and in bfloat16 the two round differently, so a near-tie can go either way.
This measures the same kind of difference where fast-forward plays no part: the JSONSchemaBench dev
schemas at temperature 0 on one ``--fast-forward off`` server, once one request at a time and once
``--c`` at a time (other batch shapes in every step), plus, with ``--ff``, the same requests one at a time
on a ``--fast-forward on`` server. Outputs are compared byte for byte (text and token count).

    python -m bench.batch_identity --off http://127.0.0.1:8802 --ff http://127.0.0.1:8801 --per-category 5

Both servers must run the same model and dtype; the result names the dtype each ``/health`` reports.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import RESULTS, load_avg, machine_info, versions, write_json
from bench.conformance import load_cases
from bench.fast_forward import record, schema_body


async def _run(url: str, bodies: list[dict[str, Any]], c: int) -> list[dict[str, Any]]:
    """Every body at ``url``, ``c`` in flight; outcomes in the bodies' order."""
    gate = asyncio.Semaphore(c)
    async with httpx.AsyncClient(timeout=600) as client:

        async def one(body: dict[str, Any]) -> dict[str, Any]:
            async with gate:
                started = time.perf_counter()
                resp = await client.post(f"{url}/generate_api", json=body)
                return record(resp, time.perf_counter() - started)

        return list(await asyncio.gather(*(one(b) for b in bodies)))


def compare(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> dict[str, Any]:
    """Answered by both, identical (text and token count), and the indices that differ (rows as
    :func:`bench.fast_forward.record` writes them)."""
    both = [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x["status"] == y["status"] == 200]
    differ = [i for i in both if (a[i]["text"], a[i]["tokens"]) != (b[i]["text"], b[i]["tokens"])]
    return {"answered": len(both), "identical": len(both) - len(differ), "differ": differ}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.batch_identity", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--off", required=True, help="URL of a --fast-forward off server")
    parser.add_argument("--ff", help="URL of a --fast-forward on server (optional third arm)")
    parser.add_argument("--per-category", type=int, default=5, help="first N dev schemas of each category")
    parser.add_argument("--c", type=int, default=8, help="requests in flight in the batched arm")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    cases = load_cases(args.per_category)
    bodies = [schema_body(case) for case in cases]
    started = dt.datetime.now(dt.UTC)
    dtypes = {arm: httpx.get(f"{url}/health", timeout=30).json().get("dtype") for arm, url in
              (("off", args.off), ("ff", args.ff)) if url}  # fmt: skip
    arms: dict[str, list[dict[str, Any]]] = {"one_at_a_time": asyncio.run(_run(args.off, bodies, 1))}
    # the batched arm sends them in reverse, so each request meets other neighbours than in order
    arms["batched"] = list(reversed(asyncio.run(_run(args.off, bodies[::-1], args.c))))
    if args.ff:
        arms["fast_forward"] = asyncio.run(_run(args.ff, bodies, 1))
    result: dict[str, Any] = {
        "bench": "batch_identity",
        "started": started.isoformat(timespec="seconds"),
        "machine": machine_info(),
        "versions": versions(),
        "load_avg_end": load_avg(),
        "dtype": dtypes,
        "c": args.c,
        "schemas": [f"{cat}/{name}" for cat, name, _ in cases],
        "batched_vs_one_at_a_time": compare(arms["one_at_a_time"], arms["batched"]),
        "arms": arms,
    }
    if args.ff:
        result["fast_forward_vs_one_at_a_time"] = compare(arms["one_at_a_time"], arms["fast_forward"])
        result["fast_forward_vs_batched"] = compare(arms["batched"], arms["fast_forward"])
    out = args.out / f"batch_identity-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    write_json(out, result)
    for key in ("batched_vs_one_at_a_time", "fast_forward_vs_one_at_a_time", "fast_forward_vs_batched"):
        if key in result:
            r = result[key]
            print(f"{key}: {r['identical']}/{r['answered']} identical; differ: {r['differ']}")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
