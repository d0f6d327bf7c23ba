"""Raw HTTP load: constraint overhead, the peer on the same workload, closing, and scaling.

One *phase* = ``n`` requests sent by ``c`` closed-loop workers (each sends its next request when its
previous one answers). Aggregate tok/s = output tokens of the phase / its wall time.

The JSON workload is :data:`bench.workloads.RECORD_LIST` with a prompt that asks for 500 records. Sent
with ``length_caps: false`` and ``whitespace: "flexible"`` (the peer's grammar exactly), the model keeps
writing records, so constrained requests run to ``max_tokens`` (each phase records its finish reasons);
with our defaults (compact JSON, length caps) the greedy model closes the list after one record, which
the closing phase uses. Our API has no ``ignore_eos``, so the unconstrained request uses the same
prompt (a request for a long list) and may stop early; the per-token rates (ms per output token, ms per
decode step) are the length-independent comparison and are reported next to tok/s.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from bench.common import SERVED_NAME, load_avg, mean, pct, rnd
from bench.workloads import RECORD_LIST, RECORD_LIST_PROMPT

Row = dict[str, Any]


async def closed_loop(n: int, c: int, send: Callable[[int], Awaitable[Row]]) -> tuple[list[Row], float]:
    """``n`` requests from ``c`` workers; returns the rows and the wall time."""
    counter = iter(range(n))
    rows: list[Row] = []

    async def worker() -> None:
        for i in counter:
            rows.append(await send(i))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(c, n))))
    return rows, time.perf_counter() - started


def _error_row(resp: httpx.Response, started: float) -> Row:
    """A non-200 answer (its body already read)."""
    lat = time.perf_counter() - started
    return {"status": resp.status_code, "lat_s": lat, "error": resp.text[:300], "tokens": 0}


# --------------------------------------------------------------------------------- our service
def ours_body(
    mode: str,
    max_tokens: int,
    *,
    schema: dict[str, Any] | None = None,
    stream: bool = False,
    prompt: str = RECORD_LIST_PROMPT,
    close: bool = True,
    caps: bool = True,
    guard: bool | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "seed": 1,
        "stream": stream,
    }
    if mode == "json":
        body["constraints"] = {
            "json_schema": schema or RECORD_LIST,
            "close_on_budget": close,
            "length_caps": caps,
        }
        if not caps:  # the peer's grammar exactly: unbounded, and whitespace between tokens allowed
            body["constraints"]["whitespace"] = "flexible"
        if guard is not None:
            body["constraints"]["loop_guard"] = guard
    return body


async def ours_request(client: httpx.AsyncClient, body: dict[str, Any]) -> Row:
    """One /generate_api call, streaming or not, with client- and server-side timings."""
    started = time.perf_counter()
    if not body.get("stream"):
        resp = await client.post("/generate_api", json=body)
        if resp.status_code != 200:
            return _error_row(resp, started)
        return _ours_row(resp.json(), time.perf_counter() - started, None)
    ttft = None
    final: dict[str, Any] | None = None
    async with client.stream("POST", "/generate_api", json=body) as resp:
        if resp.status_code != 200:
            await resp.aread()
            return _error_row(resp, started)
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            event = json.loads(line[5:])
            if event["event"] == "token" and ttft is None and event.get("token_ids"):
                ttft = time.perf_counter() - started
            elif event["event"] == "done":
                final = event["response"]
            elif event["event"] == "error":
                return {
                    "status": 200,
                    "lat_s": time.perf_counter() - started,
                    "error": str(event),
                    "tokens": 0,
                }
    lat = time.perf_counter() - started
    assert final is not None
    return _ours_row(final, lat, ttft)


def _ours_row(data: dict[str, Any], lat: float, ttft: float | None) -> Row:
    meta = data.get("metadata") or {}
    tokens = int(data["tokens_generated"])
    gen_ms = float(data["generation_time_ms"])
    server_ttft = meta.get("time_to_first_token_ms")
    row: Row = {
        "status": 200,
        "lat_s": lat,
        "tokens": tokens,
        "finish": data["finish_reason"],
        "gen_ms": gen_ms,
        "server_ttft_ms": server_ttft,
        "ttft_s": ttft,
        "compile_ms": meta.get("compile_time_ms"),
        "cache_hit": meta.get("cache_hit"),
        "satisfied": data.get("constraint_satisfied"),
        "closed": "closed_on_budget" in meta,
        "loop_guard_fired": bool((meta.get("loop_guard") or {}).get("fired")),
        "text": data.get("generated_text", ""),
    }
    row["ms_per_token"] = gen_ms / tokens if tokens else None
    if server_ttft is not None and tokens > 1:
        row["ms_per_step"] = (gen_ms - server_ttft) / (tokens - 1)
    elif ttft is not None and tokens > 1:
        row["ms_per_step"] = (lat - ttft) * 1000 / (tokens - 1)
    return row


# ---------------------------------------------------------------------------------- the peer
def peer_body(
    mode: str,
    max_tokens: int,
    *,
    stream: bool = False,
    prompt: str = RECORD_LIST_PROMPT,
    schema: dict[str, Any] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": SERVED_NAME,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "seed": 1,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    if mode == "json":
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "bench", "schema": schema or RECORD_LIST},
        }
    return body


async def peer_request(client: httpx.AsyncClient, body: dict[str, Any]) -> Row:
    """One /v1/completions call on vLLM's server (timings client-side only)."""
    started = time.perf_counter()
    if not body.get("stream"):
        resp = await client.post("/v1/completions", json=body)
        lat = time.perf_counter() - started
        if resp.status_code != 200:
            return _error_row(resp, started)
        data = resp.json()
        tokens = int(data["usage"]["completion_tokens"])
        return {
            "status": 200,
            "lat_s": lat,
            "tokens": tokens,
            "finish": data["choices"][0]["finish_reason"],
            "ms_per_token": lat * 1000 / tokens if tokens else None,
            "text": data["choices"][0]["text"],
        }
    ttft = None
    tokens = 0
    finish = None
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            await resp.aread()
            return _error_row(resp, started)
        async for line in resp.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            for choice in chunk.get("choices") or []:
                if choice.get("text") and ttft is None:
                    ttft = time.perf_counter() - started
                finish = choice.get("finish_reason") or finish
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
    lat = time.perf_counter() - started
    row: Row = {
        "status": 200,
        "lat_s": lat,
        "tokens": tokens,
        "finish": finish,
        "ttft_s": ttft,
        "ms_per_token": lat * 1000 / tokens if tokens else None,
    }
    if ttft is not None and tokens > 1:
        row["ms_per_step"] = (lat - ttft) * 1000 / (tokens - 1)
    return row


# ------------------------------------------------------------------------------------ phases
def summarize(name: str, rows: list[Row], wall: float, extra: dict[str, Any]) -> dict[str, Any]:
    ok = [r for r in rows if r.get("status") == 200 and "error" not in r]
    tokens = sum(r["tokens"] for r in ok)
    lat = [r["lat_s"] for r in ok]
    out = {
        "phase": name,
        **extra,
        "requests": len(rows),
        "ok": len(ok),
        "errors": [r.get("error") for r in rows if r not in ok][:3],
        "wall_s": rnd(wall, 3),
        "out_tokens": tokens,
        "tok_s": rnd(tokens / wall if wall else 0, 2),
        "mean_tokens": rnd(mean([r["tokens"] for r in ok]), 1),
        "finish": dict(Counter(str(r.get("finish")) for r in ok)),
        "lat_p50_s": rnd(pct(lat, 50), 3),
        "lat_p95_s": rnd(pct(lat, 95), 3),
        "ms_per_token_p50": rnd(pct([r.get("ms_per_token") for r in ok], 50), 2),
        "ms_per_step_p50": rnd(pct([r.get("ms_per_step") for r in ok], 50), 2),
    }
    ttft = [r["ttft_s"] * 1000 for r in ok if r.get("ttft_s") is not None]
    if ttft:
        out["ttft_p50_ms"], out["ttft_p95_ms"] = rnd(pct(ttft, 50), 1), rnd(pct(ttft, 95), 1)
    sttft = [r["server_ttft_ms"] for r in ok if r.get("server_ttft_ms") is not None]
    if sttft:
        out["server_ttft_p50_ms"] = rnd(pct(sttft, 50), 1)
    comp = [r["compile_ms"] for r in ok if r.get("compile_ms") is not None]
    if comp:
        out["compile_ms_p50"], out["compile_ms_max"] = rnd(pct(comp, 50), 2), rnd(max(comp), 2)
    return out


async def run_phase(
    name: str,
    base_url: str,
    *,
    target: str,
    mode: str,
    c: int,
    n: int,
    max_tokens: int,
    stream: bool = False,
    schema: dict[str, Any] | None = None,
    prompt: str = RECORD_LIST_PROMPT,
    unique_schema: bool = False,
    close: bool = True,
    caps: bool = True,
    guard: bool | None = None,
    validate: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """One phase against ``target`` ("ours" or "peer"); returns its summary (rows included).

    ``close``: our ``close_on_budget`` (JSON phases). ``caps``: off, the peer's grammar exactly (our
    ``length_caps`` off and ``whitespace: "flexible"``), so both run the same workload. ``validate``:
    judge every output with ``jsonschema`` against the phase's schema, independently of the server
    (``valid`` count)."""
    limits = httpx.Limits(max_connections=c + 4, max_keepalive_connections=c + 4)
    before = load_avg()
    async with httpx.AsyncClient(base_url=base_url, timeout=1800, limits=limits) as client:

        async def send(_: int) -> Row:
            use = schema
            if unique_schema and schema is not None:
                use = {**schema, "title": f"bench-{uuid.uuid4().hex[:12]}"}
            if target == "ours":
                return await ours_request(
                    client,
                    ours_body(
                        mode,
                        max_tokens,
                        schema=use,
                        stream=stream,
                        prompt=prompt,
                        close=close,
                        caps=caps,
                        guard=guard,
                    ),
                )
            return await peer_request(
                client, peer_body(mode, max_tokens, stream=stream, prompt=prompt, schema=use)
            )

        rows, wall = await closed_loop(n, c, send)
    for row in rows:
        text = row.pop("text", None)
        if validate and row.get("status") == 200:
            row["valid"] = json_valid(text or "", schema or RECORD_LIST)
    summary = summarize(
        name,
        rows,
        wall,
        {
            "target": target,
            "mode": mode,
            "c": c,
            "max_tokens": max_tokens,
            "stream": stream,
            "close": close if mode == "json" and target == "ours" else None,
            "load_before": before,
            "load_after": load_avg(),
        },
    )
    if validate:
        summary["valid"] = sum(bool(r.get("valid")) for r in rows)
        summary["closed"] = sum(bool(r.get("closed")) for r in rows)
    log(
        f"  {name:<28} {target:<5} {mode:<5} c={c:<3} n={n:<4} {summary['tok_s']:>8} tok/s "
        f"lat p50 {summary['lat_p50_s']} s  ms/tok {summary['ms_per_token_p50']}  "
        f"ms/step {summary['ms_per_step_p50']}  ttft {summary.get('ttft_p50_ms')}  load {before[0]}"
    )
    summary["rows"] = rows
    return summary


def json_valid(text: str, schema: dict[str, Any]) -> bool:
    """Parses as JSON and validates against ``schema`` (``jsonschema``, independent of the server)."""
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def combine(phases: list[dict[str, Any]]) -> dict[str, Any]:
    """Several repetitions of one (target, mode, c) as one phase: totals over totals."""
    rows = [r for p in phases for r in p["rows"]]
    wall = sum(p["wall_s"] for p in phases)
    first = phases[0]
    extra = {k: first[k] for k in ("target", "mode", "c", "max_tokens", "stream", "close")}
    extra["reps"] = len(phases)
    extra["load_before"] = first["load_before"]
    extra["load_after"] = phases[-1]["load_after"]
    return summarize(first["phase"].rsplit("#", 1)[0], rows, wall, extra)
