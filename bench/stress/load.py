"""A bounded burst against the service, from this (second) process on loopback, with a verdict.

Every request must end in exactly one of:

* a complete, valid answer: HTTP 200 whose body parses; for a constrained request, a claimed
  ``constraint_satisfied: true`` is re-checked here. An answer cut by ``max_tokens`` may claim it only
  where the check applies (regex, choice, JSON Schema: the cut ended on a complete instance); otherwise
  it must say ``false`` (never truncated without saying so). A stream must end with its ``done`` event;
* an honest refusal: 429 or 503 with a ``Retry-After`` header and the one error body.

Anything else is a failure: another status (5xx above all), a malformed body, a stream without its
final event, or a request still unanswered after ``--request-timeout`` (a hang).

Usage (the full stress run; starts its own server unless ``--base-url`` is given)::

    python -m bench.stress.load --requests 500 --concurrency 64 --max-inflight 32
    python -m bench.stress.load --base-url http://127.0.0.1:8000 --requests 200

It prints a summary and writes a JSON report to ``bench/stress/results/``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jsonschema

from bench.workloads import chat_prompt

PHONE = r"[0-9]{3}-[0-9]{4}"
PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
CHOICES = ["red", "green", "blue"]
RESULTS = Path(__file__).resolve().parent / "results"


def make_request(i: int, rng: random.Random) -> dict[str, Any]:
    """A mix: plain, regex, JSON schema, choice; some streamed; some cut short by max_tokens."""
    kind = ("plain", "regex", "schema", "choice")[i % 4]
    body: dict[str, Any] = {"temperature": 0.7, "seed": i, "max_tokens": rng.choice([4, 8, 16, 24])}
    if kind == "plain":
        body["prompt"] = chat_prompt(f"Say something about the number {i}.")
    elif kind == "regex":
        # At least the pattern's 8 tokens: fewer is refused up front (422 max_tokens_too_small).
        body |= {
            "prompt": chat_prompt("A phone number:"),
            "constraints": {"regex": PHONE},
            "max_tokens": rng.choice([8, 16, 24]),
        }
    elif kind == "schema":
        # Some get too few tokens on purpose, with closing on budget off: they must come back
        # marked unsatisfied ("length"). With closing on, the rest are finished within budget.
        tight = rng.random() < 0.5
        body |= {
            "prompt": chat_prompt("Describe a person as JSON."),
            "constraints": {"json_schema": PERSON, "close_on_budget": not tight},
            "max_tokens": 10 if tight else 32,
        }
    else:
        body |= {"prompt": chat_prompt("Pick a colour."), "constraints": {"choice": CHOICES}}
    body["stream"] = i % 5 == 0
    return body


@dataclass
class Outcome:
    index: int
    kind: str
    """ok | refused | failure"""
    status: int | None
    seconds: float
    detail: str = ""
    finish_reason: str | None = None
    truncated: bool = False
    retry_after: str | None = None
    refusals_before: int = 0


@dataclass
class Report:
    requests: int
    concurrency: int
    wall_seconds: float = 0.0
    outcomes: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    finish_reasons: Counter[str] = field(default_factory=Counter)
    truncated_and_flagged: int = 0
    streams: int = 0
    refusals_retried: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)
    latency_p50: float = 0.0
    latency_p99: float = 0.0
    latency_max: float = 0.0
    memory_before: dict[str, int] = field(default_factory=dict)
    memory_after: dict[str, int] = field(default_factory=dict)
    health_after: dict[str, Any] = field(default_factory=dict)
    server_args: list[str] = field(default_factory=list)

    @property
    def lost(self) -> int:
        """Requests with neither a valid answer nor an honest refusal."""
        return self.requests - self.outcomes["ok"] - self.outcomes["refused"]

    @property
    def server_errors(self) -> int:
        return sum(n for s, n in self.statuses.items() if s.isdigit() and int(s) >= 500 and s != "503")

    def as_dict(self) -> dict[str, Any]:
        data = {k: dict(v) if isinstance(v, Counter) else v for k, v in vars(self).items()}
        data |= {"lost": self.lost, "server_errors_5xx_other_than_503": self.server_errors}
        return data


def check_answer(body: dict[str, Any], data: dict[str, Any]) -> str | None:
    """None when ``data`` is a complete, honest answer to ``body``; otherwise what is wrong."""
    for key in ("generated_text", "finish_reason", "tokens_generated"):
        if key not in data:
            return f"answer lacks {key}"
    constraint = body.get("constraints")
    text, finish, satisfied = data["generated_text"], data["finish_reason"], data.get("constraint_satisfied")
    if constraint is None:
        return None if satisfied is None else "unconstrained answer claims a constraint verdict"
    checkable = {"regex", "choice", "json_schema"} & constraint.keys()
    if finish == "length" and satisfied is True and not checkable:
        # A cut that ended on a complete instance may be satisfied, but only where it is checked below.
        return "truncated by max_tokens, marked satisfied, and nothing here to check it against"
    if finish == "length" and satisfied is None:
        return "truncated by max_tokens without a verdict"
    if satisfied is True:
        if "regex" in constraint and not re.fullmatch(constraint["regex"], text):
            return f"claims to match {constraint['regex']!r} but is {text!r}"
        if "choice" in constraint and text not in constraint["choice"]:
            return f"claims to be one of {constraint['choice']} but is {text!r}"
        if "json_schema" in constraint:
            try:
                jsonschema.validate(json.loads(text), constraint["json_schema"])
            except (ValueError, jsonschema.ValidationError) as exc:
                return f"claims to satisfy the schema but: {exc}"
    elif satisfied is not False:
        return "constrained answer without a verdict"
    return None


def check_refusal(response: httpx.Response) -> str | None:
    if "retry-after" not in response.headers:
        return f"{response.status_code} without Retry-After"
    try:
        err = response.json()["error"]
        if not (err["code"] and err["message"]):
            raise ValueError("empty error fields")
    except (ValueError, KeyError, TypeError):
        return f"{response.status_code} without the error body: {response.text[:200]}"
    return None


async def one(
    client: httpx.AsyncClient, i: int, body: dict[str, Any], limit_s: float, retries: int = 0
) -> Outcome:
    """One request; a refusal is retried after its Retry-After up to ``retries`` times."""
    result = await _attempt(client, i, body, limit_s)
    refusals = 0
    while result.kind == "refused" and refusals < retries:
        refusals += 1
        await asyncio.sleep(min(float(result.retry_after or 1), 5.0) * random.uniform(0.5, 1.5))
        result = await _attempt(client, i, body, limit_s)
    result.refusals_before = refusals
    return result


async def _attempt(client: httpx.AsyncClient, i: int, body: dict[str, Any], limit_s: float) -> Outcome:
    started = time.monotonic()

    def outcome(kind: str, status: int | None, detail: str = "", **kw: Any) -> Outcome:
        return Outcome(i, kind, status, round(time.monotonic() - started, 3), detail, **kw)

    try:
        async with asyncio.timeout(limit_s):
            if body["stream"]:
                async with client.stream("POST", "/generate_api", json=body) as response:
                    if response.status_code != 200:
                        await response.aread()
                    else:
                        final: dict[str, Any] | None = None
                        async for line in response.aiter_lines():
                            if line.startswith("data:"):
                                event = json.loads(line[5:])
                                if event["event"] == "error":
                                    return outcome("failure", 200, f"error event: {event}")
                                if event["event"] == "done":
                                    final = event["response"]
                        if final is None:
                            return outcome("failure", 200, "stream ended without its done event")
                        problem = check_answer(body, final)
                        reason = final["finish_reason"]
                        truncated = reason == "length" and final.get("constraint_satisfied") is False
                        if problem:
                            return outcome("failure", 200, problem)
                        return outcome("ok", 200, finish_reason=reason, truncated=truncated)
            else:
                response = await client.post("/generate_api", json=body)
    except TimeoutError:
        return outcome("failure", None, f"no answer within {limit_s} s (hang)")
    except httpx.HTTPError as exc:
        return outcome("failure", None, f"{type(exc).__name__}: {exc}")
    status = response.status_code
    if status == 200:
        try:
            data = response.json()
        except ValueError:
            return outcome("failure", status, "200 with a body that is not JSON")
        problem = check_answer(body, data)
        if problem:
            return outcome("failure", status, problem)
        reason = data["finish_reason"]
        truncated = reason == "length" and data.get("constraint_satisfied") is False
        return outcome("ok", status, finish_reason=reason, truncated=truncated)
    if status in (429, 503):
        problem = check_refusal(response)
        return outcome(
            "failure" if problem else "refused",
            status,
            problem or "",
            retry_after=response.headers.get("retry-after"),
        )
    return outcome("failure", status, response.text[:300])


async def burst(
    base_url: str,
    *,
    requests: int,
    concurrency: int,
    headers: dict[str, str] | None = None,
    request_timeout: float = 180.0,
    seed: int = 0,
    retries: int = 0,
) -> Report:
    """Send ``requests`` requests, ``concurrency`` at a time, and judge every answer."""
    rng = random.Random(seed)
    bodies = [make_request(i, rng) for i in range(requests)]
    report = Report(requests=requests, concurrency=concurrency)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    outcomes: list[Outcome] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=base_url, headers=headers or {}, timeout=request_timeout, limits=limits
    ) as client:

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                outcomes.append(await one(client, i, bodies[i], request_timeout, retries))

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        report.wall_seconds = round(time.monotonic() - started, 2)
    for o in outcomes:
        report.outcomes[o.kind] += 1
        report.statuses[str(o.status)] += 1
        report.streams += bodies[o.index]["stream"]
        if o.finish_reason:
            report.finish_reasons[o.finish_reason] += 1
        report.truncated_and_flagged += o.truncated
        report.refusals_retried += o.refusals_before
        if o.kind == "failure":
            report.failures.append(asdict(o))
    answered = sorted(o.seconds for o in outcomes if o.kind == "ok")
    if answered:
        report.latency_p50 = answered[len(answered) // 2]
        report.latency_p99 = answered[min(len(answered) - 1, int(len(answered) * 0.99))]
        report.latency_max = answered[-1]
    return report


def summary(report: Report) -> str:
    return (
        f"{report.requests} requests, {report.concurrency} concurrent, {report.wall_seconds} s: "
        f"ok={report.outcomes['ok']} refused(429/503+Retry-After)={report.outcomes['refused']} "
        f"failures={report.outcomes['failure']} lost={report.lost} statuses={dict(report.statuses)} "
        f"finish={dict(report.finish_reasons)} truncated+flagged={report.truncated_and_flagged} "
        f"refusals retried={report.refusals_retried} "
        f"latency p50/p99/max={report.latency_p50}/{report.latency_p99}/{report.latency_max} s"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base-url", help="an already running service (default: start one)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-inflight", type=int, default=32, help="for the server this script starts")
    parser.add_argument("--request-timeout", type=float, default=300.0)
    parser.add_argument("--rounds", type=int, default=1, help="bursts in a row (memory drift)")
    parser.add_argument(
        "--retries", type=int, default=0, help="retry a 429/503 after its Retry-After, up to N times"
    )
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)

    from bench._server import ServerProcess

    server: ServerProcess | None = None
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if args.base_url is None:
        server_args = ["--max-inflight", str(args.max_inflight), "--max-tokens-cap", "256"]
        log_dir = Path(tempfile.mkdtemp(prefix="ananke-load-"))
        server = ServerProcess(server_args, log_dir / "serve.log", api_key="stress-key")
        print(f"server log: {log_dir / 'serve.log'}")
        headers = server.headers
        server.start()
        server.wait_for("ok")
        base_url = server.url
    else:
        base_url = args.base_url
    reports: list[dict[str, Any]] = []
    try:
        for round_ in range(args.rounds):
            before = server.rss_bytes() if server else {}
            report = asyncio.run(
                burst(
                    base_url,
                    requests=args.requests,
                    concurrency=args.concurrency,
                    headers=headers,
                    request_timeout=args.request_timeout,
                    seed=round_,
                    retries=args.retries,
                )
            )
            time.sleep(2)
            report.memory_before, report.memory_after = before, server.rss_bytes() if server else {}
            report.health_after = httpx.get(f"{base_url}/health", timeout=10).json()
            report.server_args = server.args if server else []
            print(f"round {round_ + 1}: {summary(report)}")
            if server:
                mb = 1 << 20
                print(
                    f"  server RSS main {before['main'] // mb} -> {report.memory_after['main'] // mb} MiB, "
                    f"tree {before['tree'] // mb} -> {report.memory_after['tree'] // mb} MiB"
                )
            print(f"  health after: {report.health_after}")
            for failure in report.failures[:10]:
                print(f"  FAILURE {failure}")
            reports.append(report.as_dict())
    finally:
        if server:
            server.stop()
    out = args.output or RESULTS / f"load-{stamp}.json"
    out.write_text(json.dumps(reports, indent=2, default=str))
    print(f"report: {out}")
    return 0 if all(r["lost"] == 0 and not r["failures"] for r in reports) else 1


if __name__ == "__main__":
    raise SystemExit(main())
