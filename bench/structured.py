"""Peer side by side through LangChain: the three ways a user gets structured output.

- (a) ``peer_json_schema``: vLLM's OpenAI server + ``ChatOpenAI(base_url=peer/v1)
  .with_structured_output(Model, method="json_schema")``;
- (b) ``ours``: ``ChatAnanke(base_url=ours).with_structured_output(Model)``;
- (c) ``peer_parse_retry``: plain ``ChatOpenAI`` on vLLM's server, JSON extracted leniently
  (:func:`extract_json`: code fences, else first ``{`` to last ``}``) + validation, up to 2 retries on
  failure (at temperature 0.7 with a new seed: at temperature 0 a retry would repeat the same answer).

All three get the same chat messages (the task text and the JSON Schema in one user turn), temperature
0, the same ``max_tokens``, 16 requests in flight. Validity is checked here, independently: the raw
output text parses as JSON *and* validates against the model's JSON Schema with ``jsonschema``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from typing import Any, Literal

import jsonschema
from pydantic import BaseModel, Field

from bench.common import SERVED_NAME, load_avg, mean, pct, rnd


class Person(BaseModel):
    name: str = Field(max_length=40)
    age: int = Field(ge=0, le=130)
    city: str = Field(max_length=40)


class Item(BaseModel):
    product: str = Field(max_length=30)
    quantity: int = Field(ge=1, le=100)


class Order(BaseModel):
    order_id: int
    items: list[Item] = Field(min_length=1, max_length=4)
    express: bool


class Meeting(BaseModel):
    title: str = Field(max_length=60)
    day: Literal["monday", "tuesday", "wednesday", "thursday", "friday"]
    priority: Literal["low", "medium", "high"]
    attendees: list[str] = Field(max_length=5)


TASKS: list[tuple[type[BaseModel], str]] = [
    (Person, "Alice Smith is 31 years old and lives in Paris."),
    (Order, "Order 1042: two lamps and one desk, express delivery."),
    (Meeting, "Team sync on Monday, high priority, with Ann and Raj."),
    (Person, "Bob Jones, 45, moved to Berlin last year."),
    (Order, "Order 77: five pens, standard shipping."),
    (Meeting, "Low-priority book club on Friday with Mia."),
    (Person, "Carla is a 27-year-old designer based in Lisbon."),
    (Order, "Order 9: one chair and three mugs, express."),
]
METHODS = ("ours", "peer_json_schema", "peer_parse_retry")


def messages_for(model: type[BaseModel], text: str) -> list[tuple[str, str]]:
    schema = json.dumps(model.model_json_schema(), separators=(",", ":"))
    return [("human", f"Extract the data from the text as JSON.\nText: {text}\nJSON Schema: {schema}")]


def valid(model: type[BaseModel], text: str) -> bool:
    try:
        jsonschema.validate(json.loads(text), model.model_json_schema())
    except (ValueError, jsonschema.ValidationError, jsonschema.SchemaError):
        return False
    return True


def extract_json(text: str) -> str:
    """What a parse-and-retry user would do: ``parse_json_markdown`` (code fences), else the span from
    the first ``{`` to the last ``}``. Returns JSON text, or raises ``ValueError``."""
    from langchain_core.utils.json import parse_json_markdown

    try:
        return json.dumps(parse_json_markdown(text, parser=json.loads))
    except ValueError:
        pass
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        raise ValueError("no JSON object in the output")
    candidate = text[start : end + 1]
    json.loads(candidate)
    return candidate


def _exc_tokens(exc: Exception) -> int:
    """Tokens the server generated for a call that raised (openai's ``LengthFinishReasonError`` keeps
    the completion): otherwise they would be missing from the throughput."""
    usage = getattr(getattr(exc, "completion", None), "usage", None)
    return int(getattr(usage, "completion_tokens", 0) or 0)


def _tokens(message: Any) -> int:
    usage = getattr(message, "usage_metadata", None) or {}
    return int(usage.get("output_tokens") or 0)


async def run_method(
    method: str, base_url: str, *, n: int, c: int, max_tokens: int, log: Any = print
) -> dict[str, Any]:
    """``n`` calls (cycling through :data:`TASKS`), ``c`` in flight."""
    from langchain_openai import ChatOpenAI

    from langchain_ananke import ChatAnanke

    if method == "ours":
        chat: Any = ChatAnanke(
            base_url=base_url, temperature=0, max_tokens=max_tokens, timeout=1800, max_retries=0
        )
    else:
        chat = ChatOpenAI(
            base_url=f"{base_url}/v1",
            api_key="unused",
            model=SERVED_NAME,
            temperature=0,
            max_tokens=max_tokens,
            timeout=1800,
            max_retries=0,
        )
    bound = {
        m: (
            chat.with_structured_output(m, include_raw=True)
            if method == "ours"
            else chat.with_structured_output(m, method="json_schema", include_raw=True)
        )
        for m in {t[0] for t in TASKS}
    }
    sem = asyncio.Semaphore(c)

    async def one(i: int) -> dict[str, Any]:
        model, text = TASKS[i % len(TASKS)]
        msgs = messages_for(model, text)
        async with sem:
            started = time.perf_counter()
            row: dict[str, Any] = {"task": i % len(TASKS), "model": model.__name__}
            try:
                if method == "peer_parse_retry":
                    row |= await _parse_retry(chat, model, msgs)
                else:
                    out = await bound[model].ainvoke(msgs)
                    raw = out["raw"]
                    row |= {
                        "text": raw.content,
                        "tokens": _tokens(raw),
                        "attempts": 1,
                        "parsed": out["parsed"] is not None,
                        "finish": raw.response_metadata.get("finish_reason"),
                    }
                    if out.get("parsing_error") is not None:
                        row["error"] = str(out["parsing_error"])[:200]
            except Exception as exc:
                row |= {
                    "text": "",
                    "tokens": _exc_tokens(exc),
                    "attempts": 1,
                    "parsed": False,
                    "error": f"{type(exc).__name__}: {exc}"[:200],
                }
                if "LengthFinishReason" in type(exc).__name__:
                    row["finish"] = "length"
            row["lat_s"] = time.perf_counter() - started
        row["valid"] = valid(model, row["text"])
        return row

    before = load_avg()
    started = time.perf_counter()
    rows = await asyncio.gather(*(one(i) for i in range(n)))
    wall = time.perf_counter() - started
    summary = summarize(method, list(rows), wall, c=c, max_tokens=max_tokens, before=before)
    log(
        f"  structured {method:<17} valid {summary['valid']}/{n}  {summary['tok_s']} tok/s  "
        f"p50 {summary['lat_p50_s']} s  p95 {summary['lat_p95_s']} s  load {before[0]}"
    )
    return summary


def summarize(
    method: str, rows: list[dict[str, Any]], wall: float, *, c: int, max_tokens: int, before: list[float]
) -> dict[str, Any]:
    lat = [r["lat_s"] for r in rows]
    tokens = sum(r["tokens"] for r in rows)
    n_valid = sum(r["valid"] for r in rows)
    return {
        "method": method,
        "n": len(rows),
        "c": c,
        "max_tokens": max_tokens,
        "wall_s": rnd(wall, 3),
        "valid": n_valid,
        "validity": rnd(n_valid / len(rows), 4),
        "parsed": sum(bool(r.get("parsed")) for r in rows),
        "out_tokens": tokens,
        "tok_s": rnd(tokens / wall, 2),
        "valid_per_s": rnd(n_valid / wall, 4),
        "lat_p50_s": rnd(pct(lat, 50), 3),
        "lat_p95_s": rnd(pct(lat, 95), 3),
        "mean_tokens": rnd(mean([r["tokens"] for r in rows]), 1),
        "attempts": dict(Counter(r["attempts"] for r in rows)),
        "finish": dict(Counter(str(r.get("finish")) for r in rows)),
        "errors": sorted({r["error"] for r in rows if r.get("error")})[:5],
        "load_before": before,
        "load_after": load_avg(),
        "rows": rows,
    }


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Repeats of one method as one: rows pooled, wall times summed."""
    rows = [r for run in runs for r in run["rows"]]
    out = summarize(
        runs[0]["method"],
        rows,
        sum(run["wall_s"] for run in runs),
        c=runs[0]["c"],
        max_tokens=runs[0]["max_tokens"],
        before=runs[0]["load_before"],
    )
    out["load_after"] = runs[-1]["load_after"]
    out["reps"] = len(runs)
    return out


async def _parse_retry(chat: Any, model: type[BaseModel], msgs: list[tuple[str, str]]) -> dict[str, Any]:
    tokens = 0
    text = ""
    finish = None
    for attempt in range(3):
        extra = {} if attempt == 0 else {"temperature": 0.7, "seed": attempt}
        msg = await chat.ainvoke(msgs, **extra)
        tokens += _tokens(msg)
        text = msg.content if isinstance(msg.content, str) else ""
        finish = msg.response_metadata.get("finish_reason")
        try:
            text = extract_json(text)
            model.model_validate(json.loads(text))
        except ValueError:
            continue
        return {"text": text, "tokens": tokens, "attempts": attempt + 1, "parsed": True, "finish": finish}
    return {"text": text, "tokens": tokens, "attempts": 3, "parsed": False, "finish": finish}
