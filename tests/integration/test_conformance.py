"""JSONSchemaBench dev sample through the real service: every schema is rejected with a 4xx or
produces output whose satisfied flag agrees with an independent ``jsonschema`` check. Zero 5xx, zero
invalid outputs presented as satisfied, and (with closing on budget) almost no truncations. Prints the
per-category table."""

from __future__ import annotations

import asyncio
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from tests.conftest import ROOT, chat_prompt

pytestmark = pytest.mark.integration

DATA = ROOT / "tests" / "data" / "jsonschemabench-dev"
MAX_TOKENS = 48
CONCURRENCY = 24


def _schemas() -> list[tuple[str, str, dict[str, Any]]]:
    out = []
    for path in sorted(DATA.glob("*/*.json")):
        out.append((path.parent.name, path.name, json.loads(path.read_text())))
    return out


def independent_check(schema: dict[str, Any], text: str) -> bool:
    try:
        value = json.loads(text)
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        cls(schema, format_checker=cls.FORMAT_CHECKER).validate(value)
    except Exception:
        return False
    return True


def _outcome(status: int, body: dict[str, Any]) -> str:
    if status >= 500:
        return "5xx"
    if status >= 400:
        return "rejected"
    if body["constraint_satisfied"]:
        return f"valid_{body['metadata'].get('constraint_mode', 'exact')}"
    return "truncated" if body["finish_reason"] == "length" else "unsatisfied"


async def _run(base_url: str, cases: list[tuple[str, str, dict[str, Any]]]) -> list[dict[str, Any]]:
    sem = asyncio.Semaphore(CONCURRENCY)
    async with httpx.AsyncClient(base_url=base_url, timeout=900) as client:

        async def one(category: str, name: str, schema: dict[str, Any]) -> dict[str, Any]:
            title = schema.get("title") or schema.get("description") or name
            body = {
                "prompt": chat_prompt(f"Write one realistic JSON example for: {str(title)[:200]}"),
                "max_tokens": MAX_TOKENS,
                "temperature": 0.0,
                "seed": 1,
                "constraints": {"json_schema": schema, "max_attempts": 2},
            }
            async with sem:
                resp = await client.post("/generate_api", json=body)
            data = resp.json()
            row = {
                "category": category,
                "name": name,
                "status": resp.status_code,
                "outcome": _outcome(resp.status_code, data),
            }
            if resp.status_code == 200:
                row["satisfied"] = data["constraint_satisfied"]
                row["independent"] = independent_check(schema, data["generated_text"])
                row["compile_ms"] = data["metadata"].get("compile_time_ms")
                closed = data["metadata"].get("closed_on_budget") or {}
                row["closed"], row["rebuilt"] = bool(closed), bool(closed.get("rebuilt"))
            else:
                row["error"] = data.get("error", {}).get("message", "")[:200]
            return row

        return await asyncio.gather(*(one(*case) for case in cases))


@pytest.mark.timeout(2400)
def test_jsonschemabench_dev_conformance(base_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    cases = _schemas()
    assert len(cases) == 300
    rows = asyncio.run(_run(base_url, cases))

    by_cat: dict[str, Counter[str]] = defaultdict(Counter)
    for row in rows:
        by_cat[row["category"]][row["outcome"]] += 1
    columns = ["valid_exact", "valid_approximate", "truncated", "unsatisfied", "rejected", "5xx"]
    lines = [f"{'category':<18}" + "".join(f"{c:>18}" for c in columns)]
    total: Counter[str] = Counter()
    for cat in sorted(by_cat):
        total.update(by_cat[cat])
        lines.append(f"{cat:<18}" + "".join(f"{by_cat[cat][c]:>18}" for c in columns))
    lines.append(f"{'TOTAL':<18}" + "".join(f"{total[c]:>18}" for c in columns))
    report = Path(ROOT / "bench" / "results")
    report.mkdir(parents=True, exist_ok=True)
    (report / "conformance-ci.json").write_text(json.dumps(rows, indent=1))
    closed = sum(bool(r.get("closed")) for r in rows)
    rebuilt = sum(bool(r.get("rebuilt")) for r in rows)
    lines.append(f"closed on budget: {closed}, of which rebuilt whole from the shortest output: {rebuilt}")
    with capsys.disabled():
        print(f"\nJSONSchemaBench dev conformance (max_tokens={MAX_TOKENS}):\n" + "\n".join(lines))

    assert total["5xx"] == 0, [r for r in rows if r["outcome"] == "5xx"]
    lies = [r for r in rows if r.get("satisfied") and not r["independent"]]
    assert not lies, lies  # never presented as satisfied unless it validates
    hidden = [
        r for r in rows if r.get("satisfied") is False and r["independent"] and r["outcome"] != "truncated"
    ]
    assert not hidden, hidden  # the flag agrees with the independent check both ways
    # max_tokens 48 is tight for real schemas. A budget that cannot hold a schema's shortest
    # instance is a 422 up front; closing on budget finishes budget-cut outputs, falling back to
    # the compile-time shortest output; an approximated schema with no valid instance found is a
    # 422. Measured 2026-11-30: every accepted schema valid (258 of 258), 42 rejected; without
    # closing, 221 of 300 were truncated. Floors that catch a regression:
    unfinished = [r for r in rows if r["outcome"] in ("truncated", "unsatisfied")]
    assert len(unfinished) <= 3, unfinished
    assert total["valid_exact"] + total["valid_approximate"] >= 240
