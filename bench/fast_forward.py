"""Fast-forward (issue 21): decoding steps, latency, identity and validity, with and without it.

Two servers run at once, both ``ananke serve`` with the same settings but ``--fast-forward on`` and
``--fast-forward off``; idle, a vLLM CPU engine uses no CPU here, so each request sees the same machine
whichever server it goes to. The arms:

- ``on``: the ``on`` server, fast-forward as served (``--on-mode async``: that server runs
  ``--fast-forward async``);
- ``req_off``: the ``on`` server, the request's ``fast_forward: false`` (the per-request switch);
- ``off``: the ``off`` server (the service as it was before fast-forward: no speculative-decoding path).

Workloads, every request at temperature 0:

1. **Forced tool calls**: one tool, named ``tool_choice`` (4 tools and prompts), single stream. The arms
   take turns request by request, in a rotating order, so they share the machine's noise.
2. **JSON extraction**: ``bench.structured``'s tasks (text -> a Pydantic model's schema), single stream,
   the same rotation.
3. **JSONSchemaBench dev** (the 300 schemas in ``tests/data/jsonschemabench-dev``): each schema on
   ``on`` and ``off`` in turn, single stream: steps per token, byte identity, and validity checked
   here with ``jsonschema`` (``bench.conformance``'s check).
4. **c=64**: unconstrained text, JSON extraction and forced tool calls, 64 in flight, in A-B-B-A blocks
   (``on``, ``off``, ``off``, ``on``): aggregate tokens/s.

``decode_steps`` and ``forced_tokens`` come from each answer's metadata (the engine's count). A lie is
an output marked ``constraint_satisfied: true`` that fails the independent check; there must be none.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import jsonschema

from bench._server import OURS_ARGS, ServerProcess
from bench.agents import git_state
from bench.common import (
    RESULTS,
    end_record,
    load_avg,
    machine_info,
    other_engines,
    pct,
    rnd,
    versions,
    write_json,
)
from bench.conformance import independent_check, load_cases, prompt_for
from bench.structured import TASKS, messages_for, valid

ARMS = ("on", "req_off", "off")


def _tool(name: str, description: str, properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": properties, "required": list(properties)},
        },
    }


TOOL_CASES: list[tuple[str, dict[str, Any]]] = [
    (
        "What's the weather in Paris right now?",
        _tool(
            "get_weather",
            "Current weather for a city.",
            {
                "city": {"type": "string", "maxLength": 40},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
        ),
    ),
    (
        "Find me a flight from Rome to Madrid for two people.",
        _tool(
            "search_flights",
            "Find flights between two cities.",
            {
                "origin": {"type": "string", "maxLength": 30},
                "destination": {"type": "string", "maxLength": 30},
                "passengers": {"type": "integer", "minimum": 1, "maximum": 9},
            },
        ),
    ),
    (
        "Put a team meeting called Budget review on 2026-03-14 in room B.",
        _tool(
            "create_event",
            "Add an event to the calendar.",
            {
                "title": {"type": "string", "maxLength": 40},
                "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
                "location": {"type": "string", "maxLength": 30},
                "all_day": {"type": "boolean"},
            },
        ),
    ),
    (
        "What is 17 times 23? Use the calculator.",
        _tool(
            "calculator",
            "Do arithmetic on two integers.",
            {
                "a": {"type": "integer"},
                "op": {"type": "string", "enum": ["add", "subtract", "multiply", "divide"]},
                "b": {"type": "integer"},
            },
        ),
    ),
]
TOOL_MAX_TOKENS = 160
EXTRACT_MAX_TOKENS = 160
SCHEMA_MAX_TOKENS = 64
UNCONSTRAINED_PROMPT = (
    "<|im_start|>user\nWrite a short story about a lighthouse keeper.<|im_end|>\n<|im_start|>assistant\n"
)


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------- requests
def tool_body(i: int) -> dict[str, Any]:
    prompt, tool = TOOL_CASES[i % len(TOOL_CASES)]
    return {
        "messages": [{"role": "user", "content": prompt}],
        "tools": [tool],
        "tool_choice": tool["function"]["name"],
        "max_tokens": TOOL_MAX_TOKENS,
        "temperature": 0,
        "seed": 0,
    }


def tool_valid(i: int, resp: dict[str, Any]) -> bool:
    _, tool = TOOL_CASES[i % len(TOOL_CASES)]
    calls = resp.get("tool_calls") or []
    try:
        for call in calls:
            jsonschema.validate(call["arguments"], tool["function"]["parameters"])
    except jsonschema.ValidationError:
        return False
    return bool(calls) and all(c["name"] == tool["function"]["name"] for c in calls)


def extract_body(i: int) -> dict[str, Any]:
    model, text = TASKS[i % len(TASKS)]
    return {
        "messages": [
            {"role": role.replace("human", "user"), "content": c} for role, c in messages_for(model, text)
        ],
        "constraints": {"json_schema": model.model_json_schema()},
        "max_tokens": EXTRACT_MAX_TOKENS,
        "temperature": 0,
        "seed": 0,
    }


def extract_valid(i: int, resp: dict[str, Any]) -> bool:
    return valid(TASKS[i % len(TASKS)][0], resp["generated_text"])


def schema_body(case: tuple[str, str, dict[str, Any]]) -> dict[str, Any]:
    _, name, schema = case
    return {
        "prompt": prompt_for(name, schema),
        "constraints": {"json_schema": schema, "max_attempts": 2},
        "max_tokens": SCHEMA_MAX_TOKENS,
        "temperature": 0,
        "seed": 1,
    }


def unconstrained_body(i: int) -> dict[str, Any]:
    return {"prompt": UNCONSTRAINED_PROMPT, "max_tokens": 64, "temperature": 0, "seed": i}


WORKLOADS: dict[str, tuple[Callable[[int], dict[str, Any]], Callable[[int, dict[str, Any]], bool] | None]] = {
    "tool_call": (tool_body, tool_valid),
    "extraction": (extract_body, extract_valid),
    "unconstrained": (unconstrained_body, None),
}


def record(resp: httpx.Response, wall_s: float) -> dict[str, Any]:
    row: dict[str, Any] = {"status": resp.status_code, "wall_ms": round(wall_s * 1000, 2)}
    if resp.status_code != 200:
        row["error"] = resp.text[:300]
        return row
    data = resp.json()
    meta = data.get("metadata", {})
    row |= {
        "tokens": data["tokens_generated"],
        "decode_steps": meta.get("decode_steps"),
        "forced_tokens": meta.get("forced_tokens"),
        "text": data["generated_text"],
        "tool_calls": [
            {"name": c["name"], "arguments": c["arguments"]} for c in data.get("tool_calls") or []
        ],
        "satisfied": data.get("constraint_satisfied"),
        "finish": data.get("finish_reason"),
        "attempts": meta.get("attempts"),
    }
    return row


def post(client: httpx.Client, url: str, body: dict[str, Any]) -> tuple[httpx.Response, float]:
    started = time.perf_counter()
    resp = client.post(f"{url}/generate_api", json=body)
    return resp, time.perf_counter() - started


def arm_target(arm: str, urls: dict[str, str], body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    if arm == "req_off":
        return urls["on"], body | {"fast_forward": False}
    return urls[arm], body


# --------------------------------------------------------------------------------- single stream
def single_stream(urls: dict[str, str], workload: str, n: int) -> list[dict[str, Any]]:
    """``n`` requests per arm, one at a time, the arms taking turns in a rotating order."""
    make, check = WORKLOADS[workload]
    rows = []
    with httpx.Client(timeout=600) as client:
        for i in range(n):
            body = make(i)
            order = ARMS[i % 3 :] + ARMS[: i % 3]
            for arm in order:
                url, sent = arm_target(arm, urls, body)
                resp, wall = post(client, url, sent)
                row = record(resp, wall) | {"i": i, "arm": arm, "workload": workload}
                if check is not None and row["status"] == 200:
                    row["valid"] = check(i, resp.json())
                rows.append(row)
    return rows


def dev_schemas(urls: dict[str, str], cases: list[tuple[str, str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Every dev schema on ``on`` and ``off`` in turn (alternating which goes first), single stream."""
    rows = []
    with httpx.Client(timeout=600) as client:
        for i, case in enumerate(cases):
            body = schema_body(case)
            for arm in ("on", "off") if i % 2 == 0 else ("off", "on"):
                resp, wall = post(client, urls[arm], body)
                row = record(resp, wall) | {
                    "i": i,
                    "arm": arm,
                    "workload": "dev_schema",
                    "name": f"{case[0]}/{case[1]}",
                }
                if row["status"] == 200:
                    row["check"] = independent_check(case[2], row["text"])[0]
                rows.append(row)
            if i % 50 == 49:
                _log(f"  dev schemas: {i + 1}/{len(cases)}")
    return rows


def divergences(
    urls: dict[str, str], rows: list[dict[str, Any]], body_for: Callable[[int], dict[str, Any]]
) -> list[dict[str, Any]]:
    """For each request whose ``on`` and ``off`` outputs differ: both again with logprobs, and where
    they part, how far apart the two tokens were in the ``off`` run's distribution (``gap``, nats). A
    gap near 0 is a near-tie that the rounding of a multi-token forward pass (bf16) can flip. Where both
    runs hit ``max_tokens``, closing on budget may have cut them at different places: the first token
    that differs is then one closing added (``on_added_by_closing``), and the engine's own divergence
    lies in the dropped tail."""
    by_i: dict[int, dict[str, dict[str, Any]]] = {}
    for r in rows:
        if r["status"] == 200:
            by_i.setdefault(r["i"], {})[r["arm"]] = r
    out = []
    with httpx.Client(timeout=600) as client:
        for i, pair in sorted(by_i.items()):
            if "on" not in pair or "off" not in pair or _same(pair["on"], pair["off"]):
                continue
            body = body_for(i) | {"logprobs": 5}
            on = client.post(f"{urls['on']}/generate_api", json=body).json()
            off = client.post(f"{urls['off']}/generate_api", json=body).json()
            row: dict[str, Any] = {
                "name": pair["on"].get("name", f"{pair['on']['workload']} #{i}"),
                "reproduced": on["generated_text"] != off["generated_text"],
            }
            for k, (a, b) in enumerate(
                zip(on.get("logprobs") or [], off.get("logprobs") or [], strict=False)
            ):
                if a["token_id"] != b["token_id"]:
                    alt = {t["token_id"]: t["logprob"] for t in b["top"]}
                    gap = (
                        b["logprob"] - alt[a["token_id"]]
                        if a["token_id"] in alt and b["logprob"] is not None
                        else None
                    )
                    row |= {
                        "position": k,
                        "on_token": a["token"],
                        "on_added_by_closing": a["logprob"] is None,
                        "off_token": b["token"],
                        "gap_in_off": rnd(gap, 4),
                    }
                    break
            out.append(row)
    return out


# ------------------------------------------------------------------------------------ c = 64
async def _block(url: str, workload: str, n: int, c: int, extra: dict[str, Any]) -> dict[str, Any]:
    make, _ = WORKLOADS[workload]
    sem = asyncio.Semaphore(c)
    rows: list[dict[str, Any]] = []
    async with httpx.AsyncClient(timeout=1800, limits=httpx.Limits(max_connections=c + 8)) as client:

        async def one(i: int) -> None:
            async with sem:
                started = time.perf_counter()
                resp = await client.post(f"{url}/generate_api", json=make(i) | extra)
                rows.append(record(resp, time.perf_counter() - started))

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        wall = time.perf_counter() - started
    ok = [r for r in rows if r["status"] == 200]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "n": n,
        "ok": len(ok),
        "wall_s": round(wall, 3),
        "tokens": tokens,
        "tok_s": round(tokens / wall, 2),
        "decode_steps": sum(r["decode_steps"] or 0 for r in ok),
        "forced_tokens": sum(r["forced_tokens"] or 0 for r in ok),
        "lat_p50_ms": rnd(pct([r["wall_ms"] for r in ok], 50)),
        "texts": [r.get("text") for r in rows],
    }


def concurrent(
    urls: dict[str, str], workloads: list[str], n: int, c: int, blocks: int
) -> list[dict[str, Any]]:
    out = []
    for workload in workloads:
        for b in range(blocks):
            arm = ("on", "off", "off", "on")[b % 4]
            block = asyncio.run(_block(urls[arm], workload, n, c, {}))
            block |= {"workload": workload, "arm": arm, "block": b, "load": load_avg()}
            out.append(block)
            _log(f"  c={c} {workload} {arm}: {block['tok_s']} tok/s, {block['wall_s']} s")
    return out


# ----------------------------------------------------------------------------------- summaries
def _ok(rows: list[dict[str, Any]], arm: str) -> list[dict[str, Any]]:
    return [r for r in rows if r["arm"] == arm and r["status"] == 200]


def summarize_single(rows: list[dict[str, Any]]) -> dict[str, Any]:
    arms = sorted({r["arm"] for r in rows}, key=ARMS.index)
    out: dict[str, Any] = {"arms": {}}
    for arm in arms:
        ok = _ok(rows, arm)
        tokens = sum(r["tokens"] for r in ok)
        steps = sum(r["decode_steps"] or 0 for r in ok)
        forced = sum(r["forced_tokens"] or 0 for r in ok)
        engine_tokens = steps + forced  # before closing on budget dropped or added any
        out["arms"][arm] = {
            "n": len(ok),
            "errors": sum(1 for r in rows if r["arm"] == arm and r["status"] != 200),
            "tokens": tokens,
            "steps_per_token": rnd(steps / engine_tokens, 3) if engine_tokens else None,
            "forced_share": rnd(forced / engine_tokens, 3) if engine_tokens else None,
            "lat_p50_ms": rnd(pct([r["wall_ms"] for r in ok], 50)),
            "lat_mean_ms": rnd(statistics.mean(r["wall_ms"] for r in ok)) if ok else None,
            "ms_per_token_p50": rnd(pct([r["wall_ms"] / r["tokens"] for r in ok if r["tokens"]], 50), 3),
            "lies": sum(1 for r in ok if r["satisfied"] and r.get("valid", r.get("check", True)) is False),
            "invalid": sum(1 for r in ok if r.get("valid", r.get("check", True)) is False),
        }
    by_i: dict[int, dict[str, dict[str, Any]]] = {}
    for r in rows:
        if r["status"] == 200:
            by_i.setdefault(r["i"], {})[r["arm"]] = r
    pairs = [p for p in by_i.values() if "on" in p and "off" in p]
    same = [p for p in pairs if _same(p["on"], p["off"])]
    out["identical_on_off"] = f"{len(same)}/{len(pairs)}"
    out["differing"] = [p["on"].get("name", p["on"]["i"]) for p in pairs if not _same(p["on"], p["off"])][:20]
    if any("req_off" in p for p in by_i.values()):
        pairs_r = [p for p in by_i.values() if "on" in p and "req_off" in p]
        out["identical_on_req_off"] = f"{sum(_same(p['on'], p['req_off']) for p in pairs_r)}/{len(pairs_r)}"
    # per-request speed-up (paired: the same request on both arms, back to back)
    ratios = [p["off"]["wall_ms"] / p["on"]["wall_ms"] for p in pairs if p["on"]["wall_ms"] > 0]
    out["speedup_paired_median"] = rnd(statistics.median(ratios), 3) if ratios else None
    # the headline: only pairs with the same output, so both arms did the same work
    if same:
        out["speedup_identical"] = rnd(
            sum(p["off"]["wall_ms"] for p in same) / sum(p["on"]["wall_ms"] for p in same), 3
        )
        out["speedup_identical_median"] = rnd(
            statistics.median(p["off"]["wall_ms"] / p["on"]["wall_ms"] for p in same), 3
        )
        forced = sum(p["on"]["forced_tokens"] or 0 for p in same)
        out["forced_share_identical"] = rnd(
            forced / (forced + sum(p["on"]["decode_steps"] or 0 for p in same)), 3
        )
    a_on, a_off = out["arms"].get("on"), out["arms"].get("off")
    if a_on and a_off and a_on["lat_mean_ms"]:
        out["speedup_mean_latency"] = rnd(a_off["lat_mean_ms"] / a_on["lat_mean_ms"], 3)
        out["speedup_p50_latency"] = rnd(a_off["lat_p50_ms"] / a_on["lat_p50_ms"], 3)
    return out


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return bool(a["text"] == b["text"] and a["tokens"] == b["tokens"] and a["tool_calls"] == b["tool_calls"])


def _engine_tokens(blocks: list[dict[str, Any]], arm: str) -> int:
    """Tokens the engine generated (``decode_steps + forced_tokens``; results without the forced count,
    from before it was recorded per block: the answers' tokens)."""
    return sum(
        b["tokens"] if b.get("forced_tokens") is None else b["decode_steps"] + b["forced_tokens"]
        for b in blocks
        if b["arm"] == arm
    )


def summarize_concurrent(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for workload in sorted({b["workload"] for b in blocks}):
        mine = [b for b in blocks if b["workload"] == workload]
        tok = {arm: [b["tok_s"] for b in mine if b["arm"] == arm] for arm in ("on", "off")}
        tokens = {arm: sum(b["tokens"] for b in mine if b["arm"] == arm) for arm in ("on", "off")}
        walls = {arm: sum(b["wall_s"] for b in mine if b["arm"] == arm) for arm in ("on", "off")}
        on_texts = [t for b in mine if b["arm"] == "on" for t in b["texts"]]
        off_texts = [t for b in mine if b["arm"] == "off" for t in b["texts"]]
        out[workload] = {
            "tok_s_on": tok["on"],
            "tok_s_off": tok["off"],
            "ratio_tok_s": rnd((tokens["on"] / walls["on"]) / (tokens["off"] / walls["off"]), 3),
            "steps_per_token_on": rnd(
                sum(b["decode_steps"] for b in mine if b["arm"] == "on") / (_engine_tokens(mine, "on") or 1),
                3,
            ),
            "same_texts": sorted(map(str, on_texts)) == sorted(map(str, off_texts)),
        }
    return out


# ------------------------------------------------------------------------------------- plotting
def plot(result: dict[str, Any], path: Path) -> Path:
    """Per request with the same output on both arms: latency against the forced-token share
    (``forced_tokens / (decode_steps + forced_tokens)`` of the ``on`` answer), on and off, with the
    means of 10 %-wide share bins; and the speed-up against the share, next to ``1 / (1 - share)``
    (what fast-forward would give if a step cost the same whatever it verifies)."""
    from bench.plots import pyplot

    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    markers = {"tool_call": "^", "extraction": "s", "dev_schema": "o"}
    bins: dict[str, dict[int, list[float]]] = {"on": {}, "off": {}}
    top = 0.0
    for workload, rows in result["single"].items():
        by_i: dict[int, dict[str, dict[str, Any]]] = {}
        for r in rows:
            if r["status"] == 200 and r.get("decode_steps"):
                by_i.setdefault(r["i"], {})[r["arm"]] = r
        pts = []
        for p in by_i.values():
            if "on" in p and "off" in p and _same(p["on"], p["off"]):
                on, off = p["on"], p["off"]
                n = on["decode_steps"] + on["forced_tokens"]
                pts.append(
                    (
                        on["forced_tokens"] / n,
                        on["wall_ms"] / n,
                        off["wall_ms"] / n,
                        off["wall_ms"] / on["wall_ms"],
                    )
                )
        if not pts:
            continue
        m = markers.get(workload, "o")
        xs = [x for x, *_ in pts]
        for arm, k, color in (("off", 2, "tab:blue"), ("on", 1, "tab:orange")):
            ys = [pt[k] for pt in pts]
            ax1.scatter(xs, ys, marker=m, s=12, alpha=0.45, color=color, label=f"{arm}, {workload}")
            for x, y in zip(xs, ys, strict=True):
                bins[arm].setdefault(min(int(x * 10), 9), []).append(y)
            top = max(top, pct(ys, 95) or 0)
        ax2.scatter(xs, [pt[3] for pt in pts], marker=m, s=12, alpha=0.5, color="tab:green", label=workload)
    for arm, color in (("off", "tab:blue"), ("on", "tab:orange")):
        keys = sorted(bins[arm])
        means = [statistics.mean(bins[arm][k]) for k in keys]
        ax1.plot([k / 10 + 0.05 for k in keys], means, "-", color=color, lw=2, label=f"{arm}, bin means")
    grid = [i / 100 for i in range(0, 86)]
    ax2.plot(grid, [1 / (1 - x) for x in grid], "--", color="gray", label="1 / (1 - share)")
    ax2.axhline(1.0, color="black", lw=0.8)
    ax1.set_xlabel("forced-token share (fast-forward on)")
    ax1.set_ylabel("latency per generated token (ms)")
    ax1.set_ylim(0, top * 1.3 if top else None)
    ax1.set_title("Single-stream latency per token, same output on and off")
    ax2.set_xlabel("forced-token share")
    ax2.set_ylabel("latency off / latency on (same request)")
    ax2.set_title("Speed-up of fast-forward")
    ax2.set_ylim(0, 6)
    for ax in (ax1, ax2):
        ax.set_xlim(-0.02, 1.0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    machine = result.get("machine", {})
    fig.suptitle(
        f"SmolLM2-135M, {machine.get('cores', '?')} CPU cores ({machine.get('cpu', '?')}), temperature 0, "
        f"shared box (load average {result.get('load_start', ['?'])[0]} at the start)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| workload | arm | requests | tokens | steps per token | forced share | latency p50 (ms) "
        "| mean (ms) | invalid | lies |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for workload, s in result["summary"]["single"].items():
        for arm, a in s["arms"].items():
            lines.append(
                f"| {workload} | {arm} | {a['n']} | {a['tokens']} | {a['steps_per_token']} "
                f"| {a['forced_share']} | {a['lat_p50_ms']} | {a['lat_mean_ms']} "
                f"| {a['invalid']} | {a['lies']} |"
            )
    lines += [
        "",
        "| workload | identical on/off | on/req_off | forced share (identical) "
        "| speed-up, identical pairs (sum / median) | speed-up p50 / mean, all | paired median, all |",
        "|---|---|---|---|---|---|---|",
    ]
    for workload, s in result["summary"]["single"].items():
        lines.append(
            f"| {workload} | {s['identical_on_off']} | {s.get('identical_on_req_off', '-')} "
            f"| {s.get('forced_share_identical')} "
            f"| {s.get('speedup_identical')} / {s.get('speedup_identical_median')} "
            f"| {s.get('speedup_p50_latency')} / {s.get('speedup_mean_latency')} "
            f"| {s['speedup_paired_median']} |"
        )
    gaps = [d["gap_in_off"] for d in result.get("divergences", []) if d.get("gap_in_off") is not None]
    lines += [
        "",
        f"Differing outputs looked at again with logprobs: {len(result.get('divergences', []))}; "
        f"the fast-forward run's token was within {max(gaps, default=0)} nats of the other run's choice "
        f"(largest gap), {sum(1 for d in result.get('divergences', []) if d.get('gap_in_off') is None)} "
        "without a gap (not reproduced, or the token outside the top 5).",
    ]
    if result["summary"].get("concurrent"):
        lines += [
            "",
            "| concurrent workload | tok/s on (blocks) | tok/s off (blocks) | on/off | steps per token on "
            "| same texts |",
            "|---|---|---|---|---|---|",
        ]
        for workload, s in result["summary"]["concurrent"].items():
            lines.append(
                f"| {workload} | {s['tok_s_on']} | {s['tok_s_off']} | {s['ratio_tok_s']} "
                f"| {s['steps_per_token_on']} | {s['same_texts']} |"
            )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ main
def start(name: str, logdir: Path, fast_forward: str, dtype: str) -> ServerProcess:
    args = [*OURS_ARGS, "--fast-forward", fast_forward, "--dtype", dtype]
    server = ServerProcess(args, logdir / f"{name}.log", name=name)
    server.start()
    return server


def run_all(args: argparse.Namespace, logdir: Path, result: dict[str, Any], out_json: Path) -> None:
    """Start both servers, run every workload not skipped into ``result``, stop the servers."""
    skip = set(filter(None, args.skip.split(",")))
    servers = {
        "on": start("on", logdir, args.on_mode, args.dtype),
        "off": start("off", logdir, "off", args.dtype),
    }
    try:
        for name, server in servers.items():
            health = server.wait_for("ok")
            result[f"health_{name}"] = health
            _log(f"{name} ready: fast_forward={health.get('fast_forward')}")
        urls = {name: s.url for name, s in servers.items()}
        single_stream(urls, "tool_call", 4)  # warm-up: compile caches, first requests
        single_stream(urls, "extraction", 3)
        for workload in ("tool_call", "extraction"):
            if workload in skip:
                continue
            _log(f"single stream: {workload}")
            result["single"][workload] = single_stream(urls, workload, args.rounds)
            write_json(out_json, result)
        cases = load_cases(args.per_category)[: args.schemas]
        if "dev_schema" not in skip:
            _log(f"dev schemas ({len(cases)})")
            result["single"]["dev_schema"] = dev_schemas(urls, cases)
            write_json(out_json, result)
        makers: dict[str, Callable[[int], dict[str, Any]]] = {
            "tool_call": tool_body,
            "extraction": extract_body,
            "dev_schema": lambda i: schema_body(cases[i]),
        }
        result["divergences"] = [
            d for w, rows in result["single"].items() for d in divergences(urls, rows, makers[w])
        ]
        _log(f"  {len(result['divergences'])} differing outputs, looked at with logprobs")
        write_json(out_json, result)
        if "concurrent" not in skip:
            result["concurrent"] = concurrent(
                urls, ["unconstrained", "extraction", "tool_call"], args.block, args.c, args.blocks
            )
    finally:
        for server in servers.values():
            server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fast_forward", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--rounds", type=int, default=12, help="single-stream requests per arm and workload")
    parser.add_argument("--schemas", type=int, default=None, help="first N dev schemas (default all)")
    parser.add_argument("--per-category", type=int, default=None, help="first N dev schemas of each category")
    parser.add_argument("--c", type=int, default=64, help="concurrency of the throughput blocks")
    parser.add_argument("--block", type=int, default=128, help="requests per throughput block")
    parser.add_argument("--blocks", type=int, default=4, help="blocks per workload (A-B-B-A order)")
    parser.add_argument(
        "--skip", default="", help="comma-separated: tool_call,extraction,dev_schema,concurrent"
    )
    parser.add_argument("--dtype", default="auto", help="both servers' --dtype")
    parser.add_argument(
        "--on-mode",
        choices=("on", "async"),
        default="on",
        help="the on server's --fast-forward (async: vLLM's async scheduling, the drafts one step late)",
    )
    parser.add_argument("--plot", type=Path, help="only draw the plot of this result file")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.plot:
        drawn = json.loads(args.plot.read_text())
        print(plot(drawn, args.plot.with_name(f"{drawn['stamp']}-fast_forward.png")))
        return 0

    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    logdir = Path(tempfile.mkdtemp(prefix=f"ananke-ff-{stamp}-"))
    started = time.perf_counter()
    result: dict[str, Any] = {
        "stamp": stamp,
        "command": " ".join(["python -m bench.fast_forward", *sys.argv[1:]]),
        "config": vars(args) | {"out": str(args.out)},
        "machine": machine_info(),
        "git": git_state(),
        "versions": versions(),
        "load_start": load_avg(),
        "other_processes_at_start": other_engines(),
        "server_logs": str(logdir),
        "single": {},
        "concurrent": [],
    }
    out_json = args.out / f"fast_forward-{stamp}.json"
    run_all(args, logdir, result, out_json)
    result["summary"] = {
        "single": {w: summarize_single(rows) for w, rows in result["single"].items()},
        "concurrent": summarize_concurrent(result["concurrent"]) if result["concurrent"] else {},
    }
    end_record(result, started)
    for block in result["concurrent"]:
        block.pop("texts", None)
    write_json(out_json, result)
    if result["single"]:
        try:
            result["plot"] = str(plot(result, args.out / f"{stamp}-fast_forward.png"))
        except ImportError as exc:  # matplotlib is not a dependency: --plot draws it later
            _log(f"no plot ({exc}): python -m bench.fast_forward --plot {out_json}")
    write_json(out_json, result)
    print(markdown(result))
    _log(f"done in {result['wall_s']:.0f} s: {out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
