"""Client overhead: LangChain ``invoke`` -> request build -> HTTP -> response parse, against an instant
fake server on loopback that answers one fixed, valid response in both our format (``/generate_api``)
and OpenAI's (``/v1/chat/completions``).

The fake runs in its own process (``python -m bench.client_overhead --serve PORT``), so its work does not
share the client's interpreter. ``http_floor`` is a bare ``httpx.Client`` POST + ``.json()`` to the same
fake: the loopback round trip and the fake's own time, which every client pays. "overhead" = a client's
time per call minus that floor. Everything is sequential (one call at a time, sync ``invoke``).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

from bench._server import free_port
from bench.common import OtherCpu, load_avg, wait_for_quiet

CONTENT = '{"name":"Bob","age":31,"city":"Oslo"}'
OURS_RESPONSE = json.dumps(
    {
        "generated_text": CONTENT,
        "tokens_generated": 14,
        "generation_time_ms": 1.0,
        "metadata": {
            "model": "fake",
            "constraint_type": "json_schema",
            "constraint_mode": "exact",
            "compile_time_ms": 0.1,
            "cache_hit": True,
            "attempts": 1,
            "time_to_first_token_ms": None,
        },
        "constraint_satisfied": True,
        "constraint_error": None,
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 20, "completion_tokens": 14, "total_tokens": 34},
        "tool_calls": None,
    }
).encode()
OPENAI_RESPONSE = json.dumps(
    {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "fake",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": CONTENT, "refusal": None},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {"prompt_tokens": 20, "completion_tokens": 14, "total_tokens": 34},
    }
).encode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else headers and body in two writes cost a 40 ms delayed ACK

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        body = OPENAI_RESPONSE if self.path.startswith("/v1/") else OURS_RESPONSE
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        body = b'{"status":"ok","model":"fake"}'
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def serve(port: int) -> None:
    ThreadingHTTPServer(("127.0.0.1", port), _Handler).serve_forever()


def _time(fn: Callable[[], Any], n: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        started = time.perf_counter_ns()
        fn()
        out.append((time.perf_counter_ns() - started) / 1000)
    return out


def run(n: int = 400, warmup: int = 50, log: Any = print) -> dict[str, Any]:
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel

    from langchain_ananke import ChatAnanke
    from langchain_ananke._http import parse_response

    class Person(BaseModel):
        name: str
        age: int
        city: str

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.client_overhead", "--serve", str(port)])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(url + "/health", timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        ours = ChatAnanke(base_url=url, temperature=0, max_tokens=64, max_retries=0)
        theirs = ChatOpenAI(
            base_url=f"{url}/v1", api_key="unused", model="fake", temperature=0, max_tokens=64, max_retries=0
        )
        ours_so = ours.with_structured_output(Person)
        theirs_so = theirs.with_structured_output(Person, method="json_schema")
        raw = httpx.Client(base_url=url)
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 64, "temperature": 0.0}
        assert ours_so.invoke("hi") == theirs_so.invoke("hi") == Person(name="Bob", age=31, city="Oslo")

        from langchain_core.messages import HumanMessage

        msgs = [HumanMessage("hi")]
        data = json.loads(OURS_RESPONSE)
        cases: dict[str, Callable[[], Any]] = {
            "http_floor": lambda: raw.post("/generate_api", json=body).json(),
            "ours_invoke": lambda: ours.invoke("hi"),
            "openai_invoke": lambda: theirs.invoke("hi"),
            "ours_structured": lambda: ours_so.invoke("hi"),
            "openai_structured": lambda: theirs_so.invoke("hi"),
            "ours_request_build": lambda: ours._chat_request(msgs, None, False),
            "ours_response_parse": lambda: parse_response(data),
        }
        before = load_avg()
        # The passes are sequential and short, so other work on the machine shows up directly in
        # the figures: wait until the rest of the machine is quiet, and record how busy it was.
        quiet = wait_for_quiet([os.getpid(), proc.pid], below=0.03, timeout=90.0)
        share, waited = quiet["other_cpu_share"], quiet["waited_s"]
        log(f"  client: other processes used {share:.0%} of the CPU (after waiting {waited} s)")
        others = OtherCpu([os.getpid(), proc.pid])
        results: dict[str, Any] = {}
        # Interleave rounds so drifting machine load hits every case alike.
        samples: dict[str, list[float]] = {k: [] for k in cases}
        rounds = 4
        for _ in range(rounds):
            for name, fn in cases.items():
                samples[name] += _time(fn, n // rounds, warmup if not samples[name] else 5)
        floor = statistics.median(samples["http_floor"])
        for name, values in samples.items():
            med = statistics.median(values)
            results[name] = {
                "median_us": round(med, 1),
                "mean_us": round(statistics.fmean(values), 1),
                "p95_us": round(sorted(values)[int(len(values) * 0.95)], 1),
                "n": len(values),
                "over_floor_us": round(med - floor, 1) if not name.startswith(("http", "ours_re")) else None,
            }
            log(f"  client {name:<20} median {med:8.1f} µs  over floor {results[name]['over_floor_us']}")
        raw.close()
        return {
            "cases": results,
            "load_before": before,
            "load_after": load_avg(),
            "quiet_wait": quiet,
            "other_cpu_share_during": round(others.share(), 3),
            "n": n,
        }
    finally:
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        serve(int(sys.argv[2]))
    else:
        print(json.dumps(run(), indent=1))
