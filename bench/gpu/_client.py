"""The client side of a phase: ``c`` closed-loop workers sending ``n`` requests to ``/generate_api`` over
HTTP (or one call to the raw route, which runs them inside the server), and the phase's summary.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from bench.gpu._plan import MAX_TOKENS, TEMPERATURE, request_body
from bench.gpu._shared import percentile


def ws_outside_strings(text: str) -> int:
    """Whitespace characters outside JSON string literals (0 for compact JSON)."""
    n, in_str, esc = 0, False, False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in " \t\r\n":
            n += 1
    return n


def summarize(records: list[dict[str, Any]], wall_s: float, c: int) -> dict[str, Any]:
    ok = [r for r in records if r.get("tokens")]
    toks = [r["tokens"] for r in ok]
    lat = [r["latency_ms"] for r in ok]
    ttft = [r["ttft_ms"] for r in ok if r.get("ttft_ms")]
    tpot = [
        (r["gen_ms"] - r["ttft_ms"]) / (r["tokens"] - 1) for r in ok if r.get("ttft_ms") and r["tokens"] > 1
    ]
    ms_tok = [r["gen_ms"] / r["tokens"] for r in ok]
    finishes: dict[str, int] = {}
    for r in records:
        finishes[str(r.get("finish"))] = finishes.get(str(r.get("finish")), 0) + 1
    out: dict[str, Any] = {
        "c": c,
        "requests": len(records),
        "ok": len(ok),
        "errors": sum(1 for r in records if r.get("error")),
        "tokens": sum(toks),
        "mean_tokens": sum(toks) / len(toks) if toks else 0,
        "wall_s": round(wall_s, 3),
        "agg_tok_s": round(sum(toks) / wall_s, 1) if wall_s > 0 else 0,
        "lat_p50_ms": percentile(lat, 50),
        "lat_p95_ms": percentile(lat, 95),
        "ttft_p50_ms": percentile(ttft, 50),
        "ttft_p95_ms": percentile(ttft, 95),
        "tpot_p50_ms": percentile(tpot, 50),
        "tpot_p95_ms": percentile(tpot, 95),
        "ms_per_token_p50": percentile(ms_tok, 50),
        "finish": finishes,
    }
    sat = [r["satisfied"] for r in records if r.get("satisfied") is not None]
    if sat:
        out["satisfied"] = sum(1 for s in sat if s)
    ws = [r["ws"] for r in records if r.get("ws") is not None]
    if ws:
        out["ws_outside_strings_total"] = sum(ws)
        out["requests_with_ws"] = sum(1 for w in ws if w)
    comp = [r["compile_ms"] for r in records if r.get("compile_ms") is not None]
    if comp:
        out["compile_ms_p50"] = percentile(comp, 50)
        out["compile_ms_max"] = max(comp)
        out["cache_hits"] = sum(1 for r in records if r.get("cache_hit"))
    closed = [r["closed"] for r in records if r.get("closed")]
    if closed:
        out["closed_on_budget"] = len(closed)
        for key in ("dropped_tokens", "added_tokens", "search_nodes"):
            vals = [cl[key] for cl in closed if key in cl]
            if vals:
                out[f"closing_{key}_p50"], out[f"closing_{key}_max"] = percentile(vals, 50), max(vals)
    if lat:
        out["lat_min_ms"], out["lat_max_ms"] = round(min(lat), 1), round(max(lat), 1)
    starts = [r["t_start"] for r in records if "t_start" in r]
    if starts:
        out["last_start_s"] = round(max(starts), 3)
    errs = [r["error"] for r in records if r.get("error")]
    if errs:
        out["first_error"] = errs[0][:300]
    steps = [r for r in ok if r.get("decode_steps") is not None]
    if steps:  # fast-forward: decoding steps per generated token, forced tokens
        out["decode_steps"] = sum(r["decode_steps"] for r in steps)
        out["forced_tokens"] = sum(r.get("forced_tokens") or 0 for r in steps)
        out["steps_per_token"] = round(out["decode_steps"] / max(1, sum(r["tokens"] for r in steps)), 3)
    if c == 1:  # single stream: each output, for the on/off identity check
        out["outputs"] = {str(r["i"]): r.get("text") for r in ok if "i" in r}
    sample = next((r["text"] for r in ok if r.get("text")), None)
    if sample:
        out["sample"] = sample[:160]
    return out


async def http_phase(  # noqa: PLR0917
    port: int,
    c: int,
    n: int,
    mode: str,
    timeout_s: float,
    max_tokens: int = MAX_TOKENS,
    temperature: float = TEMPERATURE,
) -> tuple[list[dict], float]:
    import aiohttp

    records: list[dict[str, Any]] = []
    counter = iter(range(n))
    url = f"http://127.0.0.1:{port}/generate_api"
    conn = aiohttp.TCPConnector(limit=0, force_close=False)
    t_begin = time.perf_counter()
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=timeout_s)) as sess:

        async def worker() -> None:
            for i in counter:
                body = request_body(i, mode, max_tokens, temperature)
                cons = body.get("constraints")
                started = time.perf_counter()
                rec: dict[str, Any] = {}
                try:
                    async with sess.post(url, json=body) as resp:
                        data = await resp.json(content_type=None)
                        if resp.status != 200:
                            rec["error"] = f"{resp.status} {json.dumps(data)[:300]}"
                except Exception as exc:
                    rec["error"] = f"{type(exc).__name__}: {exc}"
                    data = {}
                done = time.perf_counter()
                rec["latency_ms"] = (done - started) * 1000
                rec["t_start"], rec["t_end"] = started - t_begin, done - t_begin
                if "error" not in rec:
                    md = data.get("metadata", {})
                    text = data.get("generated_text", "")
                    rec.update(
                        tokens=data.get("tokens_generated", 0),
                        gen_ms=data.get("generation_time_ms"),
                        ttft_ms=md.get("time_to_first_token_ms"),
                        finish=data.get("finish_reason"),
                        satisfied=data.get("constraint_satisfied"),
                        compile_ms=md.get("compile_time_ms"),
                        cache_hit=md.get("cache_hit"),
                        text=text,
                        closed=md.get("closed_on_budget"),
                        decode_steps=md.get("decode_steps"),
                        forced_tokens=md.get("forced_tokens"),
                        i=i,
                    )
                    if cons is not None:
                        rec["ws"] = ws_outside_strings(text)
                records.append(rec)

        await asyncio.gather(*(worker() for _ in range(c)))
    return records, time.perf_counter() - t_begin


async def raw_phase(  # noqa: PLR0917
    port: int, c: int, n: int, mode: str, output_kind: str, timeout_s: float, max_tokens: int = MAX_TOKENS
) -> tuple[list[dict], float]:
    import aiohttp

    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as sess,
        sess.post(
            f"http://127.0.0.1:{port}/_bench/raw",
            json={"c": c, "n": n, "mode": mode, "max_tokens": max_tokens, "output_kind": output_kind},
        ) as resp,
    ):
        data = await resp.json(content_type=None)
        if resp.status != 200:
            raise RuntimeError(f"raw phase: {resp.status} {json.dumps(data)[:400]}")
    return data["records"], data["wall_s"]
