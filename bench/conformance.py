"""Conformance and coverage on JSONSchemaBench (the dev sample in ``tests/data/jsonschemabench-dev``).

Every schema goes to our ``/generate_api`` and to vLLM's ``/v1/completions`` (guidance backend,
``response_format: json_schema``) with the same prompt string (tests/integration/test_conformance.py's
ChatML prompt), temperature 0, seed 1, the same ``max_tokens``. Ours resamples JSON that fails the
full-schema check (``max_attempts`` 2, as the integration test sends). Each output is then checked
here, independently, with ``jsonschema`` (format checking on, as in the test).

Outcomes:
- ``valid_exact`` / ``valid_approximate`` (ours) or ``valid`` (peer): the output validates.
- ``truncated``: not valid, finish ``length`` (ran out of tokens before the JSON closed).
- ``invalid``: not valid, the JSON closed (a validation failure; ours marks it
  ``constraint_satisfied: false``).
- ``rejected``: a 4xx answer (the schema is not accepted).
- ``5xx``: a server error.
- ``lie`` (ours only): marked satisfied but fails the independent check; must be zero.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import httpx
import jsonschema

from bench.common import DATA, SERVED_NAME, load_avg, pct, rnd
from bench.workloads import chat_prompt

OUTCOMES_OURS = ("valid_exact", "valid_approximate", "truncated", "invalid", "rejected", "5xx")
OUTCOMES_PEER = ("valid", "truncated", "invalid", "rejected", "5xx")


def load_cases(per_category: int | None = None) -> list[tuple[str, str, dict[str, Any]]]:
    """``(category, file name, schema)``; the first ``per_category`` files of each category if set."""
    by_cat: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(DATA.glob("*/*.json")):
        by_cat[path.parent.name].append(path)
    cases = []
    for cat in sorted(by_cat):
        for path in by_cat[cat][:per_category]:
            cases.append((cat, path.name, json.loads(path.read_text())))
    return cases


def prompt_for(name: str, schema: dict[str, Any]) -> str:
    title = schema.get("title") or schema.get("description") or name
    return chat_prompt(f"Write one realistic JSON example for: {str(title)[:200]}")


def independent_check(schema: dict[str, Any], text: str) -> tuple[bool, str | None]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        return False, f"not JSON: {exc}"[:200]
    try:
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        cls(schema, format_checker=cls.FORMAT_CHECKER).validate(value)
    except jsonschema.ValidationError as exc:
        return False, f"invalid: {exc.message}"[:200]
    except Exception as exc:  # a schema jsonschema itself cannot handle
        return False, f"check failed: {type(exc).__name__}: {exc}"[:200]
    return True, None


async def _send(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], cat: str, name: str
) -> tuple[httpx.Response | None, dict[str, Any]]:
    """POST ``body``: the answer and its row, the row's outcome already set (5xx) for a transport error
    or a server error."""
    started = time.perf_counter()
    try:
        resp = await client.post(path, json=body)
    except httpx.HTTPError as exc:
        return None, {"category": cat, "name": name, "status": 0, "outcome": "5xx", "error": repr(exc)[:200]}
    row: dict[str, Any] = {
        "category": cat,
        "name": name,
        "status": resp.status_code,
        "lat_s": rnd(time.perf_counter() - started, 3),
    }
    if resp.status_code >= 500:
        row |= {"outcome": "5xx", "error": resp.text[:300]}
    return resp, row


async def _ours(
    client: httpx.AsyncClient,
    case: tuple[str, str, dict[str, Any]],
    max_tokens: int,
    *,
    close: bool = True,
    guard: bool | None = None,
) -> dict[str, Any]:
    cat, name, schema = case
    body: dict[str, Any] = {
        "prompt": prompt_for(name, schema),
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "seed": 1,
        "constraints": {"json_schema": schema, "max_attempts": 2, "close_on_budget": close},
    }
    if guard is not None:
        body["constraints"]["loop_guard"] = guard
    resp, row = await _send(client, "/generate_api", body, cat, name)
    if resp is None or "outcome" in row:
        return row
    data = resp.json()
    if resp.status_code >= 400:
        return row | {"outcome": "rejected", "error": str(data.get("error", {}).get("message", ""))[:300]}
    meta = data.get("metadata") or {}
    ok, why = independent_check(schema, data["generated_text"])
    mode = meta.get("constraint_mode", "exact")
    outcome = f"valid_{mode}" if ok else ("truncated" if data["finish_reason"] == "length" else "invalid")
    return row | {
        "outcome": outcome,
        "satisfied": data["constraint_satisfied"],
        "independent": ok,
        "why": why,
        "lie": bool(data["constraint_satisfied"]) and not ok,
        "mode": mode,
        "finish": data["finish_reason"],
        "tokens": data["tokens_generated"],
        "attempts": meta.get("attempts"),
        "compile_ms": meta.get("compile_time_ms"),
        "cache_hit": meta.get("cache_hit"),
        "constraint_error": (data.get("constraint_error") or "")[:200],
        "closed": "closed_on_budget" in meta,
        "rebuilt": bool((meta.get("closed_on_budget") or {}).get("rebuilt")),
        "loop_guard": meta.get("loop_guard"),
        "text": data["generated_text"],
    }


async def _peer(
    client: httpx.AsyncClient, case: tuple[str, str, dict[str, Any]], max_tokens: int
) -> dict[str, Any]:
    cat, name, schema = case
    body = {
        "model": SERVED_NAME,
        "prompt": prompt_for(name, schema),
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "seed": 1,
        "response_format": {"type": "json_schema", "json_schema": {"name": "schema", "schema": schema}},
    }
    resp, row = await _send(client, "/v1/completions", body, cat, name)
    if resp is None or "outcome" in row:
        return row
    if resp.status_code >= 400:
        try:
            msg = str(resp.json().get("error", {}).get("message", ""))
        except ValueError:
            msg = resp.text
        return row | {"outcome": "rejected", "error": msg[:300]}
    data = resp.json()
    choice = data["choices"][0]
    ok, why = independent_check(schema, choice["text"])
    outcome = "valid" if ok else ("truncated" if choice["finish_reason"] == "length" else "invalid")
    return row | {
        "outcome": outcome,
        "independent": ok,
        "why": why,
        "finish": choice["finish_reason"],
        "tokens": data["usage"]["completion_tokens"],
    }


async def run(
    target: str,
    base_url: str,
    cases: list[tuple[str, str, dict[str, Any]]],
    *,
    max_tokens: int,
    concurrency: int,
    log: Any = print,
) -> dict[str, Any]:
    if target == "ours_noclose":  # ours with closing on budget turned off: its effect, same run

        async def send(client: httpx.AsyncClient, case: Any, max_tokens: int) -> dict[str, Any]:
            return await _ours(client, case, max_tokens, close=False)

    elif target in ("ours_guard", "ours_noguard"):  # the loop guard on / off (bench.loop_guard)

        async def send(client: httpx.AsyncClient, case: Any, max_tokens: int) -> dict[str, Any]:
            return await _ours(client, case, max_tokens, guard=target == "ours_guard")

    else:
        send = _ours if target == "ours" else _peer
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    before = load_avg()
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=base_url, timeout=1800, limits=limits) as client:

        async def one(case: tuple[str, str, dict[str, Any]]) -> dict[str, Any]:
            async with sem:
                return await send(client, case, max_tokens)

        rows = await asyncio.gather(*(one(c) for c in cases))
    wall = time.perf_counter() - started
    summary = summarize(target, rows)
    summary |= {
        "max_tokens": max_tokens,
        "concurrency": concurrency,
        "wall_s": rnd(wall, 2),
        "load_before": before,
        "load_after": load_avg(),
        "rows": rows,
    }
    tot = summary["total"]
    log(
        f"  conformance {target:<5} {len(rows)} schemas in {wall:.0f} s: valid {summary['valid']} "
        f"({summary['valid_share']:.1%}), truncated {tot.get('truncated', 0)}, "
        f"invalid {tot.get('invalid', 0)}, rejected {tot.get('rejected', 0)}, 5xx {tot.get('5xx', 0)}"
    )
    return summary


def summarize(target: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    by_cat: dict[str, Counter[str]] = defaultdict(Counter)
    for row in rows:
        by_cat[row["category"]][row["outcome"]] += 1
    total: Counter[str] = Counter()
    for counts in by_cat.values():
        total.update(counts)
    valid = sum(v for k, v in total.items() if k.startswith("valid"))
    accepted = len(rows) - total["rejected"]
    out: dict[str, Any] = {
        "target": target,
        "n": len(rows),
        "per_category": {k: dict(v) for k, v in sorted(by_cat.items())},
        "total": dict(total),
        "valid": valid,
        "valid_share": valid / len(rows) if rows else 0.0,
        "accepted": accepted,
        "accepted_share": accepted / len(rows) if rows else 0.0,
        "valid_of_accepted": valid / accepted if accepted else 0.0,
        "truncated": total["truncated"],
        "rejection_messages": dict(
            Counter(_short(r.get("error", "")) for r in rows if r["outcome"] == "rejected").most_common(12)
        ),
        "tokens_p50": pct([r["tokens"] for r in rows if r.get("tokens") is not None], 50),
        "lat_p50_s": rnd(pct([r["lat_s"] for r in rows if r.get("lat_s") is not None], 50), 3),
    }
    if target.startswith("ours"):
        comp = [r["compile_ms"] for r in rows if r.get("compile_ms") is not None]
        out |= {
            "lies": sum(bool(r.get("lie")) for r in rows),
            "compile_ms_p50": rnd(pct(comp, 50), 2),
            "compile_ms_p99": rnd(pct(comp, 99), 2),
            "compile_ms_max": rnd(max(comp), 2) if comp else None,
            "compile_n": len(comp),
            "attempts": dict(Counter(str(r.get("attempts")) for r in rows if r["status"] == 200)),
            "approximate_accepted": sum(r.get("mode") == "approximate" for r in rows),
            "valid_closed_on_budget": sum(
                bool(r.get("closed")) and r["outcome"].startswith("valid") for r in rows
            ),
            "valid_rebuilt": sum(bool(r.get("rebuilt")) and r["outcome"].startswith("valid") for r in rows),
            "rejected_max_tokens_too_small": sum(
                "cannot hold" in r.get("error", "") for r in rows if r["outcome"] == "rejected"
            ),
        }
    return out


def _short(message: str) -> str:
    """A rejection message without the schema-specific tail, to count kinds."""
    text = " ".join(message.split())
    for sep in (" at ", ": {", " (", "; "):
        if sep in text[40:]:
            text = text[: 40 + text[40:].index(sep)]
    return text[:140]
