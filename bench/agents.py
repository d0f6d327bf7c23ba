"""The same LangChain 1.x agent on vLLM's own server and on this service: ``python -m bench.agents``.

The agent is ``create_agent(llm, [calculator], response_format=ProviderStrategy(Report))`` with no
middleware: every turn sends the calculator *and* the answer schema, and the model picks between a
call and the final answer (``tool_choice`` left to the server's default, ``auto``). A run ends with
``state["structured_response"]``, an exception, or LangGraph's recursion limit (``--max-turns``
model calls, :func:`recursion_limit`). Arms, run one after another:

- ``peer``: ``ChatOpenAI(base_url=<vLLM>/v1)`` on vLLM's own server started as a user would for tool
  calls: ``--enable-auto-tool-choice --tool-call-parser hermes``, vLLM's default structured-output
  backend (``auto``), and a chat template that shows the tools (:data:`TOOLS_TEMPLATE`: SmolLM2's own
  template drops them) in the words and call format of ours, less the answer schema (a chat template
  does not see ``response_format``; ours puts it in the prompt);
- ``ours_openai``: the same ``ChatOpenAI`` code against this service's ``/v1``;
- ``ours_ananke``: ``ChatAnanke`` against this service.

Before the agents, :func:`probe` sends raw requests with the openai SDK to each server: the agent's
first turn (question, calculator tool, ``response_format`` for ``Report``), with and without the
``response_format``, and records ``message.tool_calls``, ``content`` and whether each validates. vLLM
is probed in three configurations (:data:`PEERS`): as the CPU bench starts it (no tool parser,
guidance backend), with the hermes parser on the guidance backend, and the agent's configuration.

One server runs at a time (each is stopped before the next starts); the agent runs go 4 in flight.
Raw results go to ``bench/results/agents-<UTC stamp>.json``; the summary table is printed. The
defaults are the BENCHMARKS.md run (40 runs per arm, 6 model calls at most): about 8 minutes on the
2-core CPU box.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import operator
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import httpx
from langchain.agents import create_agent
from langchain.agents.structured_output import ProviderStrategy, StructuredOutputValidationError
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.outputs import LLMResult
from langchain_core.tools import tool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from bench._server import ServerProcess, start_ours, start_peer
from bench.common import (
    RESULTS,
    ROOT,
    SERVED_NAME,
    end_record,
    load_avg,
    machine_info,
    mean,
    other_engines,
    pct,
    rnd,
    versions,
    write_json,
)

OPS: dict[str, Callable[[int, int], int]] = {"+": operator.add, "-": operator.sub, "*": operator.mul}


class Calculation(BaseModel):
    """Two integers and an operator (the calculator's arguments; as in tests/integration)."""

    model_config = ConfigDict(extra="forbid")

    a: int = Field(ge=-1000, le=1000, description="Left operand")
    op: Literal["+", "-", "*"] = Field(description="Operator")
    b: int = Field(ge=-1000, le=1000, description="Right operand")


@tool(args_schema=Calculation)
def calculator(a: int, op: str, b: int) -> int:
    """Compute `a op b` for two integers."""
    return OPS[op](a, b)


class Report(BaseModel):
    """The agent's final answer."""

    result: int = Field(ge=-1_000_000, le=1_000_000, description="The number the calculator returned")
    summary: str = Field(max_length=60, description="One short sentence")


QUESTIONS: list[tuple[int, str, int, str]] = [
    (17, "*", 23, "What is 17 times 23?"),
    (345, "+", 678, "What is 345 plus 678?"),
    (902, "-", 457, "What is 902 minus 457?"),
    (48, "*", 12, "What is 48 times 12?"),
    (250, "+", 125, "What is 250 plus 125?"),
]
"""Run ``i`` asks question ``i % 5`` with seed ``i``; every arm gets the same (question, seed) list."""

SUFFIX = " Use the calculator, then report the result."


def recursion_limit(max_turns: int) -> int:
    """LangGraph steps for at most ``max_turns`` model calls: model, tools, model, ... call
    ``max_turns + 1`` would be step ``2 * max_turns + 1``, over the limit."""
    return 2 * max_turns


TEMPERATURE = 0.7
MAX_TOKENS = 128
"""A call is ~35 tokens and an answer ~30; 128 leaves room for whitespace-flexible JSON on vLLM."""

TOOLS_TEMPLATE = """\
{%- set has_system = messages[0]['role'] == 'system' -%}
{{- '<|im_start|>system\\n' -}}
{%- if has_system -%}{{- messages[0]['content'] -}}
{%- elif not tools -%}{{- 'You are a helpful AI assistant named SmolLM, trained by Hugging Face' -}}
{%- endif -%}
{%- if tools -%}
{%- if has_system -%}{{- '\\n\\n' -}}{%- endif -%}
{{- 'You have access to these tools:\\n' -}}
{%- for t in tools -%}{{- t['function'] | tojson -}}{{- '\\n' -}}{%- endfor -%}
{{- 'Call a tool when it helps; otherwise give the final answer. To call a tool, write ' -}}
{{- '<tool_call>{"name": <tool name>, "arguments": <arguments object>}</tool_call>' -}}
{%- endif -%}
{{- '<|im_end|>\\n' -}}
{%- for m in (messages[1:] if has_system else messages) -%}
{{- '<|im_start|>' + m['role'] + '\\n' -}}{{- m['content'] or '' -}}
{%- if m['role'] == 'assistant' and m['tool_calls'] is defined and m['tool_calls'] -%}
{%- for c in m['tool_calls'] -%}
{%- set args = c['function']['arguments'] -%}
{{- '<tool_call>{"name": ' -}}{{- c['function']['name'] | tojson -}}{{- ', "arguments": ' -}}
{%- if args is string -%}{{- args -}}{%- else -%}{{- args | tojson -}}{%- endif -%}
{{- '}</tool_call>' -}}
{%- endfor -%}
{%- endif -%}
{{- '<|im_end|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}
"""
"""SmolLM2's ChatML with the tools in the system turn, worded as this service's fallback prompt
(``modal_service/engine/prompts.py``) and in the format vLLM's hermes parser reads. The answer schema is
not in it: a chat template does not see ``response_format``."""

HERMES = ("--enable-auto-tool-choice", "--tool-call-parser", "hermes")
PEERS: dict[str, dict[str, Any]] = {
    "peer_plain": {
        "extra": [],
        "template": False,
        "about": "as bench.run starts it: no tool parser, guidance",
    },
    "peer_hermes_guidance": {
        "extra": [*HERMES],
        "template": True,
        "about": "hermes tool parser, tools template, guidance backend (the CPU bench's setting)",
    },
    "peer": {
        "extra": [*HERMES, "--structured-outputs-config", json.dumps({"backend": "auto"})],
        "template": True,
        "about": "hermes tool parser, tools template, vLLM's default structured-output backend (auto)",
    },
}
AGENT_PEER = "peer"
ARMS = ("peer", "ours_openai", "ours_ananke")


def _log(msg: str) -> None:
    print(msg, flush=True)


def git_state() -> dict[str, Any]:
    """The commit the servers run, and tracked files modified in the working tree (they run too)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], check=True, cwd=ROOT, capture_output=True, text=True).stdout

    return {
        "commit": git("rev-parse", "--short", "HEAD").strip(),
        "modified": [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()],
    }


def question(i: int) -> tuple[str, int]:
    a, op, b, text = QUESTIONS[i % len(QUESTIONS)]
    return text + SUFFIX, OPS[op](a, b)


def _report(text: str) -> Report | None:
    try:
        return Report.model_validate_json(text)
    except ValidationError:
        return None


def _call_valid(name: str, arguments: Any) -> bool:
    if name != "calculator":
        return False
    try:
        args = json.loads(arguments) if isinstance(arguments, str) else arguments
        Calculation.model_validate(args)
    except (ValueError, ValidationError):
        return False
    return True


# ------------------------------------------------------------------------------------ raw probe
def probe(base_url: str, *, seeds: Sequence[int]) -> list[dict[str, Any]]:
    """The agent's first turn, raw, through the openai SDK: with the answer schema and without it."""
    import openai

    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", timeout=600, max_retries=0)
    tools = [convert_to_openai_tool(calculator, strict=True)]
    response_format = ProviderStrategy(Report).to_model_kwargs()["response_format"]
    rows = []
    for with_schema in (True, False):
        for seed in seeds:
            text, _ = question(seed)
            row: dict[str, Any] = {"response_format": with_schema, "seed": seed, "question": text}
            extra = {"response_format": response_format} if with_schema else {}
            started = time.perf_counter()
            try:
                out = client.chat.completions.create(
                    model=SERVED_NAME,
                    messages=[{"role": "user", "content": text}],
                    tools=tools,  # type: ignore[arg-type]
                    temperature=TEMPERATURE,
                    seed=seed,
                    max_tokens=MAX_TOKENS,
                    **extra,
                )
            except openai.APIError as exc:
                row |= {"outcome": "error", "error": _error_kind(exc), "message": str(exc)[:400]}
            else:
                choice = out.choices[0]
                calls = [
                    {
                        "name": c.function.name,
                        "arguments": c.function.arguments,
                        "valid": _call_valid(c.function.name, c.function.arguments),
                    }
                    for c in choice.message.tool_calls or []
                    if c.type == "function"
                ]
                content = choice.message.content or ""
                answer = _report(content) is not None
                if calls:
                    outcome = "calls" if all(c["valid"] for c in calls) else "calls_invalid"
                elif answer:
                    outcome = "answer"
                elif "<tool_call>" in content:
                    outcome = "call_as_text"
                else:
                    outcome = "text"
                row |= {
                    "outcome": outcome,
                    "finish_reason": choice.finish_reason,
                    "tool_calls": calls,
                    "content": content[:400],
                    "content_is_report": answer,
                    "completion_tokens": out.usage.completion_tokens if out.usage else None,
                }
            row["wall_s"] = rnd(time.perf_counter() - started, 2)
            rows.append(row)
    return rows


def probe_counts(rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for key, label in ((True, "tools+response_format"), (False, "tools only")):
        out[label] = dict(Counter(r["outcome"] for r in rows if r["response_format"] is key))
    return out


# ------------------------------------------------------------------------------------ agent runs
class Turns(BaseCallbackHandler):
    """Each model call of one run: what came back, whatever happens to the run after."""

    run_inline = True

    def __init__(self) -> None:
        self.started = 0
        self.turns: list[dict[str, Any]] = []
        self.tool_results: list[str] = []

    def on_chat_model_start(self, *args: Any, **kwargs: Any) -> None:
        self.started += 1

    def on_tool_end(self, output: Any, **kwargs: Any) -> None:
        self.tool_results.append(str(getattr(output, "content", output))[:80])

    def on_llm_end(self, response: LLMResult, **kwargs: Any) -> None:
        message = getattr(response.generations[0][0], "message", None)
        if not isinstance(message, AIMessage):
            return
        meta = message.response_metadata
        self.turns.append(
            {
                "tool_calls": [{"name": c["name"], "args": c["args"]} for c in message.tool_calls],
                "invalid_tool_calls": len(message.invalid_tool_calls),
                "content": str(message.content)[:2000],
                "finish_reason": meta.get("finish_reason"),
                "branch": (meta.get("metadata") or {}).get("branch"),
                "output_tokens": message.usage_metadata["output_tokens"] if message.usage_metadata else None,
            }
        )


def _error_kind(exc: BaseException) -> str:
    """A failure's class, short: what went wrong, not the message."""
    from langgraph.errors import GraphRecursionError

    from langchain_ananke.errors import AnankeAPIError

    if isinstance(exc, GraphRecursionError):
        return "recursion_limit"
    if isinstance(exc, StructuredOutputValidationError):
        text = str(getattr(exc.ai_message, "content", "") or "")
        try:
            json.loads(text)
        except ValueError:
            return "answer_not_json" if text.strip() else "answer_empty"
        return "answer_fails_schema"
    status = getattr(exc, "status_code", None)
    if isinstance(exc, AnankeAPIError) or status is not None:
        return f"http_{status}"
    return type(exc).__name__


def chat_model(arm: str, url: str, seed: int) -> BaseChatModel:
    params: dict[str, Any] = {"temperature": TEMPERATURE, "max_tokens": MAX_TOKENS, "seed": seed}
    if arm == "ours_ananke":
        from langchain_ananke import ChatAnanke

        return ChatAnanke(base_url=url, timeout=600, max_retries=0, **params)
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        base_url=f"{url}/v1",
        api_key=SecretStr("unused"),
        model=SERVED_NAME,
        timeout=600,
        max_retries=0,
        **params,
    )


def run_one(arm: str, url: str, i: int, max_turns: int) -> dict[str, Any]:
    """One agent run: question ``i % 5``, seed ``i``, at most ``max_turns`` model calls."""
    text, expected = question(i)
    agent = create_agent(chat_model(arm, url, i), [calculator], response_format=ProviderStrategy(Report))
    turns = Turns()
    row: dict[str, Any] = {"arm": arm, "i": i, "seed": i, "question": text, "expected": expected}
    started = time.perf_counter()
    state: dict[str, Any] = {}
    try:
        state = agent.invoke(
            {"messages": [HumanMessage(text)]},
            {"recursion_limit": recursion_limit(max_turns), "callbacks": [turns]},
        )
    except Exception as exc:
        row |= {"error": _error_kind(exc), "message": f"{type(exc).__name__}: {exc}"[:400]}
    row["wall_s"] = rnd(time.perf_counter() - started, 2)
    report = state.get("structured_response")
    tool_results = turns.tool_results
    calls = [c for t in turns.turns for c in t["tool_calls"]]
    row |= {
        "valid": isinstance(report, Report),
        "report": report.model_dump() if isinstance(report, Report) else None,
        "model_calls": turns.started,
        "output_tokens": sum(t["output_tokens"] or 0 for t in turns.turns),
        "tool_calls": len(calls),
        "tool_calls_valid": sum(_call_valid(c["name"], c["args"]) for c in calls),
        "tool_results": tool_results,
        "turns": turns.turns,
    }
    if isinstance(report, Report):
        row["correct"] = report.result == expected
        row["matches_tool"] = bool(tool_results) and str(report.result) == tool_results[-1]
    return row


def run_arm(arm: str, url: str, n: int, concurrency: int, max_turns: int) -> dict[str, Any]:
    before = load_avg()
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        rows = list(pool.map(lambda i: run_one(arm, url, i, max_turns), range(n)))
    wall = time.perf_counter() - started
    summary = summarize(arm, rows, wall, concurrency=concurrency, before=before)
    _log(
        f"  {arm:<12} valid {summary['valid']}/{n}  used the tool {summary['used_tool']}  "
        f"correct {summary['correct']}  turns {summary['turns_mean']}  failures {summary['failures']}  "
        f"{summary['wall_s']} s"
    )
    return {"summary": summary, "runs": rows}


def summarize(
    arm: str, rows: list[dict[str, Any]], wall: float, *, concurrency: int, before: list[float]
) -> dict[str, Any]:
    ok = [r for r in rows if r["valid"]]
    turns = [float(r["model_calls"]) for r in ok]
    per_run = [r["wall_s"] for r in rows]
    return {
        "arm": arm,
        "n": len(rows),
        "concurrency": concurrency,
        "valid": len(ok),
        "called_tool": sum(r["tool_calls"] > 0 for r in rows),
        "used_tool": sum(r["valid"] and r["tool_calls"] > 0 for r in rows),
        "correct": sum(bool(r.get("correct")) for r in rows),
        "matches_tool": sum(bool(r.get("matches_tool")) for r in rows),
        "turns_mean": rnd(mean(turns)),
        "turns_median": rnd(pct(turns, 50)),
        "turns_hist": dict(sorted(Counter(r["model_calls"] for r in ok).items())),
        "tool_calls": sum(r["tool_calls"] for r in rows),
        "output_tokens": sum(r["output_tokens"] for r in rows),
        "tool_calls_valid": sum(r["tool_calls_valid"] for r in rows),
        "failures": dict(Counter(r["error"] for r in rows if not r["valid"] and "error" in r)),
        "wall_s": rnd(wall, 1),
        "run_wall_mean_s": rnd(mean(per_run)),
        "run_wall_p50_s": rnd(pct(per_run, 50)),
        "run_wall_max_s": rnd(max(per_run)),
        "load_before": before,
        "load_after": load_avg(),
    }


# ------------------------------------------------------------------------------------ servers
def _peer(name: str, logdir: Path) -> ServerProcess:
    from modal_service.model_prep import resolve_model

    spec = PEERS[name]
    extra = list(spec["extra"])
    if spec["template"]:
        path = logdir / "smollm2-tools.jinja"
        path.write_text(TOOLS_TEMPLATE)
        extra += ["--chat-template", str(path)]
    return start_peer(resolve_model(None), logdir, extra=extra, name=name)


def with_server(
    name: str, start: Callable[[], ServerProcess], result: dict[str, Any], work: Callable[[str], None]
) -> None:
    """Start one server, run ``work(url)``, stop it; a start failure or a death is recorded."""
    _log(f"starting {name} ...")
    entry: dict[str, Any] = result["servers"].setdefault(name, {})
    try:
        server = start()
    except Exception as exc:
        entry["failed"] = f"{type(exc).__name__}: {exc}"[:2000]
        _log(f"  {name} failed to start: {exc}")
        return
    entry |= {"start_s": round(server.start_s, 1), "load": load_avg(), "log": str(server.log)}
    _log(f"  ready in {server.start_s:.0f} s")
    try:
        work(server.url)
    finally:
        if server.returncode is not None:
            entry |= {"died": server.returncode, "log_tail": server.tail()}
            _log(f"  {name} exited with {server.returncode} during the run (log: {server.log})")
        server.stop()


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| arm | valid `Report` | runs that called the calculator | valid after a call | result correct "
        "| model calls to a valid answer (mean / median) | failures | wall total (s) "
        "| per run mean / p50 / max (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in ARMS:
        s = result["agents"].get(arm, {}).get("summary")
        if s is None:
            continue
        fails = ", ".join(f"{k}: {v}" for k, v in s["failures"].items()) or "none"
        lines.append(
            f"| {arm} | {s['valid']}/{s['n']} | {s['called_tool']} | {s['used_tool']} | {s['correct']} | "
            f"{s['turns_mean']} / {s['turns_median']} | {fails} | {s['wall_s']} | "
            f"{s['run_wall_mean_s']} / {s['run_wall_p50_s']} / {s['run_wall_max_s']} |"
        )
    lines += ["", "| server | request | outcomes |", "|---|---|---|"]
    for name, rows in result["probes"].items():
        for label, counts in probe_counts(rows).items():
            lines.append(f"| {name} | {label} | {', '.join(f'{k}: {v}' for k, v in counts.items())} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.agents", description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=40, help="agent runs per arm (default 40)")
    parser.add_argument("--max-turns", type=int, default=6, help="model calls per run at most (default 6)")
    parser.add_argument("--concurrency", type=int, default=4, help="agent runs in flight (default 4)")
    parser.add_argument("--probe-seeds", type=int, default=5, help="raw requests per probe kind (default 5)")
    parser.add_argument(
        "--peers",
        default=",".join(PEERS),
        help=f"vLLM configurations to start, in order (default all; agents run on {AGENT_PEER!r})",
    )
    parser.add_argument("--skip-ours", action="store_true", help="only vLLM's server")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.perf_counter()
    logdir = Path(tempfile.mkdtemp(prefix=f"ananke-agents-{stamp}-"))  # kept: server logs
    seeds = list(range(args.probe_seeds))
    result: dict[str, Any] = {
        "stamp": stamp,
        "command": " ".join(["python -m bench.agents", *sys.argv[1:]]),
        "config": {
            "n": args.n,
            "concurrency": args.concurrency,
            "temperature": TEMPERATURE,
            "max_tokens": MAX_TOKENS,
            "recursion_limit": recursion_limit(args.max_turns),
            "max_model_turns": args.max_turns,
            "questions": [q[3] + SUFFIX for q in QUESTIONS],
            "probe_seeds": seeds,
            "peers": {k: PEERS[k] for k in args.peers.split(",") if k},
            "tools_template": TOOLS_TEMPLATE,
        },
        "machine": machine_info(),
        "git": git_state(),
        "versions": versions(),
        "load_start": load_avg(),
        "other_processes_at_start": other_engines(),
        "server_logs": str(logdir),
        "servers": {},
        "probes": {},
        "agents": {},
    }
    out_json = args.out / f"agents-{stamp}.json"

    for name in (k for k in args.peers.split(",") if k):

        def peer_work(url: str, name: str = name) -> None:
            _log(f"  probe {name}")
            result["probes"][name] = probe(url, seeds=seeds)
            _log(f"    {probe_counts(result['probes'][name])}")
            if name == AGENT_PEER:
                _log("  agents on vLLM's server")
                result["agents"]["peer"] = run_arm("peer", url, args.n, args.concurrency, args.max_turns)

        with_server(name, lambda name=name: _peer(name, logdir), result, peer_work)  # type: ignore[misc]
        write_json(out_json, result)

    def ours_work(url: str) -> None:
        health = httpx.get(f"{url}/health", timeout=30).json()
        result["servers"]["ours"]["model"] = health.get("model")
        _log("  probe ours")
        result["probes"]["ours"] = probe(url, seeds=seeds)
        _log(f"    {probe_counts(result['probes']['ours'])}")
        for arm in ("ours_openai", "ours_ananke"):
            _log(f"  agents: {arm}")
            result["agents"][arm] = run_arm(arm, url, args.n, args.concurrency, args.max_turns)

    if not args.skip_ours:
        with_server("ours", lambda: start_ours(logdir), result, ours_work)

    end_record(result, started)
    write_json(out_json, result)
    print(markdown(result))
    _log(f"done in {result['wall_s']:.0f} s: {out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
