"""GPU benchmark of the service's own code path on one H200 (issue 9). One device call runs all of it.

For each engine setting (32B shape with CUDA graphs, 32B eager, 7B with CUDA graphs) it starts a server
process that builds ``modal_service.engine.Engine`` + ``modal_service.server.create_app`` and serves it
with uvicorn on loopback, then drives ``POST /generate_api`` over HTTP from this process. Weights are
vLLM's ``load_format="dummy"`` (random, real shapes); the tokenizer is the real Qwen2.5 one.

Measured per phase (concurrency c, closed loop): aggregate output tok/s, client p50/p95 latency, TTFT
(server metadata), ms per decode step (TPOT), finish reasons, the constraint re-check, whitespace outside
JSON strings, grammar compile time; and, from ``so_probe`` inside EngineCore, the CPU time of the token
masks per step. Bench-only routes added to the same app run the same requests straight on vLLM's
``AsyncLLM`` (no HTTP, no wrapper) for the wrapper-overhead ratio.

Since run 4, every phase also carries the server's own timeline (``/_bench/trace``: when requests
arrived, were planned and on how many threads, reached the engine, got a first token; how late the
event loop ran) and, for the warm-up rounds, stack samples of the API process and EngineCore
(``so_probe``'s sampler). ``--first-bursts`` meets each new concurrency level on the raw route first,
then on ours; ``--gemv`` times cuBLAS bf16 GEMVs over a 32B step's weights before the engines start.

Device call (after the payload parts; see bench/gpu/README.md)::

    . .gpu/last/env.sh && python3 -m bench.gpu.run_gpu_bench --out $OUT

Locally, ``--fake`` runs the whole HTTP/driver path against a fake engine (no vLLM engine is started).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
T_START = time.time()

MAX_TOKENS = 128
TEMPERATURE = 1.0
HBM_TBPS = 4.8  # H200 datasheet HBM3e bandwidth

# Practically never closes within MAX_TOKENS, so constrained and unconstrained requests generate the
# same number of tokens: its shortest output is 122 Qwen2.5 tokens (12 items of ~10), and sampled items
# are longer (multi-digit ids, non-empty names). The service answers 422 to a schema whose shortest
# output exceeds max_tokens, hence not more items. Strings, integers, booleans and punctuation: the
# mask work of an ordinary record list.
LIST_SCHEMA: dict[str, Any] = {
    "type": "array",
    "minItems": 12,
    "items": {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "name": {"type": "string", "maxLength": 16},
            "ok": {"type": "boolean"},
        },
        "required": ["id", "name", "ok"],
        "additionalProperties": False,
    },
}
# Closes by itself: checks that outputs satisfy the schema and are compact.
CLOSING_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 99999},
        "name": {"type": "string", "maxLength": 12},
        "ok": {"type": "boolean"},
    },
    "required": ["id", "name", "ok"],
    "additionalProperties": False,
}

ARCH = {  # published configs (see ../shared/tools/gpu-dummy-model)
    "qwen2.5-coder-32b": {"hidden": 5120, "layers": 64, "heads": 40, "kv_heads": 8, "inter": 27648},
    "qwen2.5-coder-7b": {"hidden": 3584, "layers": 28, "heads": 28, "kv_heads": 4, "inter": 18944},
}
VOCAB = 152064

GRAPHS = {"compilation_config": {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY",
                                 "max_cudagraph_capture_size": 256}}
# name, arch, enforce_eager, extra engine args, latest end (s after start), step estimates (ms) by c.
# "compile" is what modal_service/app.py ships: enforce_eager=False and vLLM's default compilation
# (torch.compile + piecewise and full CUDA graphs).
ENGINES: list[dict[str, Any]] = [
    {"name": "32b-graphs", "arch": "qwen2.5-coder-32b", "enforce_eager": False, "extra": GRAPHS,
     "end_by": 300, "start_est": 110, "step": {1: 17, 8: 19, 64: 28, 256: 45}},
    {"name": "32b-compile", "arch": "qwen2.5-coder-32b", "enforce_eager": False, "extra": {},
     "end_by": 480, "start_est": 150, "step": {1: 17, 8: 19, 64: 28, 256: 45}},
    {"name": "7b-graphs", "arch": "qwen2.5-coder-7b", "enforce_eager": False, "extra": GRAPHS,
     "end_by": 555, "start_est": 50, "step": {1: 6, 8: 7, 64: 12, 256: 25}},
    {"name": "32b-eager", "arch": "qwen2.5-coder-32b", "enforce_eager": True, "extra": {},
     "end_by": 555, "start_est": 80, "step": {1: 40, 8: 42, 64: 50, 256: 70}},
    # The app's setting on vLLM's V1 model runner (0.26 picks the V2 runner for dense models): a cheap
    # single-stream variant (different input preparation and sampler, same model kernels).
    {"name": "32b-compile-v1", "arch": "qwen2.5-coder-32b", "enforce_eager": False, "extra": {},
     "env": {"VLLM_USE_V2_MODEL_RUNNER": "0"}, "diag": False,
     "end_by": 555, "start_est": 100, "step": {1: 17, 8: 19, 64: 28, 256: 45}},
]
DEFAULT_ENGINES = ["32b-graphs", "32b-compile", "7b-graphs"]


def variant_engine(name: str) -> dict[str, Any]:
    """``32b+VARIANT`` (run 5): the app's setting plus one of ``step_split.VARIANTS``' engine keywords,
    with the c=1 phases, to check a setting found there on the service's HTTP path."""
    from bench.gpu.step_split import VARIANTS  # step_split imports this module: here, not at the top

    v = VARIANTS[name.removeprefix("32b+")]
    return {"name": name, "arch": "qwen2.5-coder-32b", "enforce_eager": False, "extra": v["kwargs"],
            "diag": False, "end_by": 555, "start_est": 130, "step": {1: 17, 8: 19, 64: 28, 256: 45}}
UPSTREAM = {"mode": "vllm"}  # so_probe: vLLM's own mask fill, the service's patch bypassed
SAMPLED = {"mode": "service", "sample": True}  # so_probe: stack samples of both processes


def _p(name: str, kind: str, c: int, n: int, mode: str, prio: int, **kw: Any) -> dict[str, Any]:  # noqa: PLR0917
    return {"name": name, "kind": kind, "c": c, "n": n, "mode": mode, "prio": prio, **kw}


def _matrix(*cs: int) -> list[dict[str, Any]]:
    n = {1: 3, 8: 16, 64: 128, 256: 256}
    return [_p(f"c{c}_{m}", "http", c, n[c], m, 1) for c in cs for m in ("unc", "json")]


# Priority 1 first; priority 2 phases run while the engine's window has time left. Every phase runs
# with the service's own mask fill (modal_service.vllm_patches) unless ``ctl`` says otherwise.
PHASES: dict[str, list[dict[str, Any]]] = {
    "32b-graphs": [
        *_matrix(1, 64),
        _p("c64_json_vllm", "http", 64, 128, "json", 1, ctl=UPSTREAM),
        *_matrix(8, 256),
        _p("raw_c64_unc", "raw", 64, 128, "unc", 1),
        _p("c64_json_closing", "http", 64, 64, "json_closing", 2),
        _p("c64_json_close", "http", 64, 128, "json_close", 2),
        _p("c64_unc_r2", "http", 64, 128, "unc", 2), _p("c64_json_r2", "http", 64, 128, "json", 2),
        _p("c64_json_vllm_r2", "http", 64, 128, "json", 2, ctl=UPSTREAM),
        _p("raw_c64_json", "raw", 64, 128, "json", 2),
        _p("c256_json_vllm", "http", 256, 256, "json", 2, ctl=UPSTREAM),
        _p("raw_c1_unc", "raw", 1, 2, "unc", 2),
    ],
    "32b-compile": [
        *_matrix(1),
        # Run 4: A-B-B-A blocks at c=64 (unconstrained / JSON), so the ratio has a spread, then closing
        # on budget on / off / on (every JSON request is cut at max_tokens).
        *[_p(f"c64_{m}_{4 * b + i}", "http", 64, 128, m, 1) for b in range(3)
          for i, m in enumerate(("unc", "json", "json", "unc"), start=1)],
        _p("c64_json_close_1", "http", 64, 128, "json_close", 1),
        _p("c64_json_off_1", "http", 64, 128, "json", 1),
        _p("c64_json_close_2", "http", 64, 128, "json_close", 1),
        _p("c64_json_close_min1", "http", 64, 128, "json_close_min1", 1, ctl=SAMPLED),
        _p("c64_json_min1", "http", 64, 128, "json_min1", 1),
        _p("c64_json_close_s", "http", 64, 128, "json_close", 1, ctl=SAMPLED),
        # Run 4c: two more A-B-B-A blocks, then gc.freeze() in the server, then two more.
        *[_p(f"c64_{m}_{4 * b + i}", "http", 64, 128, m, 1) for b in range(3, 5)
          for i, m in enumerate(("unc", "json", "json", "unc"), start=1)],
        *[{**_p(f"c64_{m}_f{4 * b + i}", "http", 64, 128, m, 1), "gc_freeze": b == 0 and i == 1}
          for b in range(2) for i, m in enumerate(("unc", "json", "json", "unc"), start=1)],
        *_matrix(64, 8, 256),
        _p("c64_json_vllm", "http", 64, 128, "json", 2, ctl=UPSTREAM),
        _p("c256_json_vllm", "http", 256, 256, "json", 2, ctl=UPSTREAM),
        _p("raw_c1_unc", "raw", 1, 2, "unc", 2),
    ],
    "7b-graphs": [
        *_matrix(1, 64),
        _p("c64_json_vllm", "http", 64, 128, "json", 1, ctl=UPSTREAM),
        *_matrix(256),
        *[{**ph, "prio": 2} for ph in _matrix(8)],
        _p("raw_c64_unc", "raw", 64, 128, "unc", 2),
    ],
    "32b-compile-v1": [*_matrix(1), _p("raw_c1_unc", "raw", 1, 2, "unc", 1)],
    "32b-eager": [
        *_matrix(64, 1),
        _p("c64_json_vllm", "http", 64, 128, "json", 1, ctl=UPSTREAM),
    ],
}


# Device-side helper shared by the GEMV floors here and in step_split.py: fn captured in one CUDA graph
# (warmed on a side stream first); returns the graph and ms per replay.
GRAPH_CODE = r"""
def graph(fn):
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(3): g.replay()
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(20): g.replay()
    torch.cuda.synchronize()
    return g, (time.perf_counter() - t) / 20 * 1000
"""

# bf16 GEMVs (M=1, torch F.linear = cuBLAS, what vLLM's unquantized linear layers run) over every
# weight matrix one 32B decode step reads, distinct buffers (61 GiB, far beyond L2), in one CUDA graph:
# the step time of the weight reads alone with these kernels, to set against the engine's step.
GEMV_CODE = r"""
import json, time, torch
import torch.nn.functional as F
H, KV, I, V, L = 5120, 1024, 27648, 152064, 64
dt = torch.bfloat16
shapes = {"qkv": (H + 2 * KV, H), "o": (H, H), "gate_up": (2 * I, H), "down": (H, I)}
W = {k: [torch.empty(s, dtype=dt, device="cuda").fill_(0.01) for _ in range(L)] for k, s in shapes.items()}
W["lm_head"] = [torch.empty((V, H), dtype=dt, device="cuda").fill_(0.01)]
x = {k: torch.randn(1, w[0].shape[1], dtype=dt, device="cuda") for k, w in W.items()}
""" + GRAPH_CODE + r"""
def graph_ms(fn):
    return graph(fn)[1]
def timed(kinds):
    def run():
        for k in kinds:
            for w in W[k]:
                F.linear(x[k], w)
    ms = graph_ms(run)
    nbytes = sum(w.numel() * 2 for k in kinds for w in W[k])
    return {"ms": round(ms, 3), "gb": round(nbytes / 1e9, 3), "tbps": round(nbytes / ms / 1e9, 3),
            "gemvs": sum(len(W[k]) for k in kinds)}
out = {k: timed([k]) for k in W}
out["all"] = timed(list(W))
# The small kernels of a batch-1 layer (norms, rotary, KV write, attention, activation) move almost no
# data; inside a CUDA graph each still costs its launch and ramp. 7 per layer, between the 4 GEMVs.
h = torch.randn(1, H, dtype=dt, device="cuda")
def tiny(n):
    for _ in range(n):
        h.mul_(1.0)
out["tiny_kernel_us"] = round(graph_ms(lambda: tiny(1000)) / 1000 * 1000, 3)
def layers():
    for l in range(L):
        F.linear(x["qkv"], W["qkv"][l]); tiny(3)
        F.linear(x["o"], W["o"][l]); tiny(1)
        F.linear(x["gate_up"], W["gate_up"][l]); tiny(1)
        F.linear(x["down"], W["down"][l]); tiny(2)
    F.linear(x["lm_head"], W["lm_head"][0])
out["layers_with_7_tiny_ms"] = round(graph_ms(layers), 3)
print(json.dumps(out))
"""


def host_facts() -> dict[str, Any]:
    """Facts of this host that bear on the first-burst stall: CPUs as Python sees them (the default
    executor has min(32, cpu_count + 4) threads), the listen backlog cap, THP, and what creating 32
    threads costs with the default stack and with the service's 256 MiB compile stack."""
    import threading

    out: dict[str, Any] = {"cpu_count": os.cpu_count()}
    with contextlib.suppress(Exception):
        out["affinity_cpus"] = len(os.sched_getaffinity(0))
    for key, path in {"somaxconn": "/proc/sys/net/core/somaxconn",
                      "thp": "/sys/kernel/mm/transparent_hugepage/enabled",
                      "overcommit": "/proc/sys/vm/overcommit_memory"}.items():
        with contextlib.suppress(Exception):
            out[key] = Path(path).read_text().strip()
    for label, size in (("threads32_default_ms", 0), ("threads32_256mib_ms", 256 << 20)):
        old = threading.stack_size(size)
        t = time.perf_counter()
        ths = [threading.Thread(target=time.sleep, args=(0.001,)) for _ in range(32)]
        for th in ths:
            th.start()
        for th in ths:
            th.join()
        out[label] = round((time.perf_counter() - t) * 1000, 2)
        threading.stack_size(old)
    return out


def log(msg: str) -> None:
    print(f"[{time.time() - T_START:7.1f}s] {msg}", flush=True)


def weight_bytes(arch: str) -> dict[str, float]:
    """bf16 parameter bytes: all weights, and those one decode step reads (one embedding row)."""
    a = ARCH[arch]
    h, kv = a["hidden"], a["hidden"] // a["heads"] * a["kv_heads"]
    per_layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * a["inter"] + 2 * h
    total = 2 * VOCAB * h + a["layers"] * per_layer + h
    read = total - VOCAB * h + h
    return {"params": total, "bytes_total": 2 * total, "bytes_read_per_step": 2 * read}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


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


def constraints_for(mode: str, i: int) -> dict[str, Any] | None:
    if mode == "unc":
        return None
    if mode == "json_closing":
        return {"json_schema": CLOSING_SCHEMA}
    if mode.startswith("json_new:"):  # a schema no request has used yet, the same for the whole burst
        return {"json_schema": {**CLOSING_SCHEMA, "title": mode.split(":", 1)[1]}}
    schema = LIST_SCHEMA
    if mode.endswith("_min1"):  # closing only has to finish the item it is in and close the list
        schema = {**LIST_SCHEMA, "minItems": 1}
        mode = mode.removesuffix("_min1")
    if mode == "json_unique":  # a new schema per request: compiles on the hot path, no cache hit
        schema = {**LIST_SCHEMA, "title": f"records-{i}-{time.time_ns()}"}
    # Budget-cut output is reported as is, not finished by the closing search (json_close: it is).
    c: dict[str, Any] = {"json_schema": schema, "close_on_budget": mode == "json_close"}
    if mode == "json_flex":
        c["whitespace"] = "flexible"
    return c


def prompt_for(i: int) -> str:
    return f"Request {i}. List the records of the inventory as a JSON array of objects with id, name, ok.\n"


# ------------------------------------------------------------------------------------------ server side
def _stub_client_package() -> None:
    """``langchain_ananke/__init__`` imports langchain_core, which the device lacks; the service needs only
    ``langchain_ananke.protocol``, so register the package without running its ``__init__``."""
    if "langchain_ananke" in sys.modules:
        return
    try:
        import langchain_core  # noqa: F401
    except ImportError:
        pkg = types.ModuleType("langchain_ananke")
        pkg.__path__ = [str(ROOT / "langchain_ananke")]
        sys.modules["langchain_ananke"] = pkg


class _FakeEngine:
    """Stand-in for local checks of the driver: real app, generator and compiler; fake tokens."""

    @staticmethod
    def make(config: Any) -> Any:
        from modal_service.engine import Delta, Engine

        class FakeEngine(Engine):
            def _build(self) -> None:
                import llguidance.hf
                from transformers import PreTrainedTokenizerFast

                from modal_service.constraints import ConstraintCompiler

                tok = PreTrainedTokenizerFast(tokenizer_file=str(Path(self.config.model) / "tokenizer.json"))
                self.tokenizer = tok
                self.eos_token_ids = frozenset({151645})
                ll_tok = llguidance.hf.from_tokenizer(tok, n_vocab=VOCAB)
                self.compiler = ConstraintCompiler(ll_tok, vocab_size=VOCAB, eos_token_ids=self.eos_token_ids)

            async def stream(self, prompt: str, **kw: Any) -> Any:  # type: ignore[override]
                text = '[{"id":1,"name":"a","ok":true}' if kw.get("constraint") else "x"
                for i in range(kw["max_tokens"]):
                    await asyncio.sleep(0.001)
                    last = i == kw["max_tokens"] - 1
                    yield Delta(text=text if i == 0 else "1", token_ids=[16], prompt_tokens=5,
                                finish_reason="length" if last else None)

        return FakeEngine(config)


def add_bench_routes(app: Any, engine: Any, fake: bool) -> None:
    """``/_bench/info`` and ``/_bench/raw``: the same requests straight on AsyncLLM, in this process."""
    from fastapi import Body

    from langchain_ananke.protocol import Constraints

    @app.get("/_bench/info")
    async def info() -> dict[str, Any]:
        out: dict[str, Any] = {"state": engine.state, "error": engine.error,
                               "engine_start_s": engine.start_seconds, "pid": os.getpid()}
        for mod in ("vllm", "torch", "llguidance", "fastapi", "uvicorn", "pydantic", "transformers"):
            with contextlib.suppress(Exception):
                out[f"{mod}_version"] = __import__(mod).__version__
        out["python"] = sys.version.split()[0]
        from modal_service import vllm_patches

        out["vllm_patches"] = dict(vllm_patches.STATUS)
        llm = getattr(engine, "_llm", None)
        if llm is not None:
            vc = llm.vllm_config
            getters = {
                "async_scheduling": lambda: vc.scheduler_config.async_scheduling,
                "cudagraph_mode": lambda: str(vc.compilation_config.cudagraph_mode),
                "compilation_mode": lambda: str(vc.compilation_config.mode),
                "cudagraph_capture_sizes": lambda: list(vc.compilation_config.cudagraph_capture_sizes or []),
                "structured_outputs_config": lambda: str(vc.structured_outputs_config),
                "max_num_seqs": lambda: vc.scheduler_config.max_num_seqs,
                "vocab_size": llm.model_config.get_vocab_size,
                "tokenizer_len": lambda: len(engine.tokenizer),
                "enable_prefix_caching": lambda: vc.cache_config.enable_prefix_caching,
            }
            for key, get in getters.items():
                with contextlib.suppress(Exception):
                    out[key] = get()
        return out

    @app.post("/_bench/raw")
    async def raw(body: dict[str, Any] = Body(...)) -> dict[str, Any]:  # noqa: B008
        c, n, mode = int(body["c"]), int(body["n"]), body["mode"]
        max_tokens = int(body.get("max_tokens", MAX_TOKENS))
        delta = body.get("output_kind") == "delta"
        so = None
        cons = constraints_for(mode, 0)
        if cons is not None:
            so = engine.compiler.compile(Constraints(**cons), max_tokens)[0].structured_outputs
        records: list[dict[str, Any]] = []
        counter = iter(range(n))
        t_begin = time.perf_counter()

        async def one(i: int) -> None:
            started = time.perf_counter()
            first: float | None = None
            tokens, finish = 0, None
            if fake:
                for _ in range(max_tokens):
                    await asyncio.sleep(0.001)
                tokens, finish = max_tokens, "length"
            else:
                from vllm import SamplingParams
                from vllm.sampling_params import RequestOutputKind

                params = SamplingParams(
                    max_tokens=max_tokens, temperature=TEMPERATURE, top_p=1.0, structured_outputs=so,
                    output_kind=RequestOutputKind.DELTA if delta else RequestOutputKind.FINAL_ONLY)
                async for out in engine._llm.generate(prompt_for(i), params, f"raw-{time.time_ns()}-{i}"):
                    got = len(out.outputs[0].token_ids)
                    if got and first is None:
                        first = time.perf_counter()
                    tokens = tokens + got if delta else got
                    if out.finished:
                        finish = out.outputs[0].finish_reason
            done = time.perf_counter()
            records.append({"latency_ms": (done - started) * 1000, "tokens": tokens, "finish": finish,
                            "t_start": started - t_begin,
                            "ttft_ms": (first - started) * 1000 if (first and delta) else None,
                            "gen_ms": (done - started) * 1000, "t_end": done - t_begin})

        async def worker() -> None:
            for i in counter:
                await one(i)

        await asyncio.gather(*(worker() for _ in range(c)))
        return {"records": records, "wall_s": time.perf_counter() - t_begin}


def serve(spec: dict[str, Any]) -> None:
    _stub_client_package()
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("modal_service").setLevel(logging.INFO)  # the vllm_patches lines, in EngineCore too
    import uvicorn

    from modal_service.engine import Engine, EngineConfig
    from modal_service.generation import Limits
    from modal_service.server import create_app

    config = EngineConfig(
        model=spec["model"],
        max_model_len=4096,
        gpu_memory_utilization=spec.get("gpu_memory_utilization", 0.9),
        enforce_eager=spec["enforce_eager"],
        max_num_seqs=256,
        load_format="dummy",
        extra=spec.get("extra", {}),
    )
    engine = _FakeEngine.make(config) if spec.get("fake") else Engine(config)
    app = create_app(engine, limits=Limits(max_tokens=2048, max_inflight=1024))
    add_bench_routes(app, engine, bool(spec.get("fake")))
    from bench.gpu import so_probe

    so_probe.start_sampler()
    uvicorn.run(_traced(app, engine), host="127.0.0.1", port=spec["port"], log_level="warning",
                access_log=False)


#: Per-request timestamps in the server process (wall clock), read and cleared by ``/_bench/trace``.
TRACE: list[dict[str, Any]] = []


def _traced(app: Any, engine: Any) -> Any:  # noqa: PLR0915
    """Timestamps of each ``/generate_api`` request: arrival, planning (which thread), engine call,
    end; plus the event loop's lateness. Wraps the app, ``Generator.plan`` and ``Engine.stream``."""
    import gc
    import threading

    generator = app.state.generator
    plan, stream = generator.plan, engine.stream

    def traced_plan(req: Any) -> Any:
        t0 = time.time()
        try:
            return plan(req)
        finally:
            TRACE.append({"k": "plan", "t0": t0, "t1": time.time(), "th": threading.current_thread().name})

    async def traced_stream(prompt: str, **kw: Any) -> Any:
        t0, first = time.time(), None
        async for delta in stream(prompt, **kw):
            first = first or time.time()
            yield delta
        TRACE.append({"k": "engine", "t0": t0, "first": first, "t1": time.time()})

    generator.plan, engine.stream = traced_plan, traced_stream
    loop_lag: dict[str, Any] = {"task": None}
    gc_started: dict[str, float] = {}

    def on_gc(phase: str, info: dict[str, Any]) -> None:  # collections over 20 ms, any thread
        if phase == "start":
            gc_started["t"] = time.perf_counter()
            return
        ms = (time.perf_counter() - gc_started.get("t", time.perf_counter())) * 1000
        if ms > 20:
            TRACE.append({"k": "gc", "t": time.time(), "gen": info["generation"], "ms": round(ms, 1)})

    gc.callbacks.append(on_gc)

    async def watch_loop() -> None:
        while True:
            t = time.time()
            await asyncio.sleep(0.01)
            late = (time.time() - t - 0.01) * 1000
            if late > 50:
                TRACE.append({"k": "loop", "t": time.time(), "ms": round(late, 1)})

    async def wrapper(scope: Any, receive: Any, send: Any) -> None:
        if loop_lag["task"] is None:
            loop_lag["task"] = asyncio.ensure_future(watch_loop())
        if scope["type"] == "http" and scope["path"] == "/_bench/gc_freeze":
            # what a server could do once its engine is up: move every object alive now out of the
            # collector's generations, so a full collection no longer walks them
            gc.collect()
            gc.freeze()
            body = json.dumps({"frozen": gc.get_freeze_count()}).encode()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": body})
            return
        if scope["type"] == "http" and scope["path"] == "/_bench/trace":
            body = json.dumps([*TRACE, {"k": "cpu", "t": time.time(), "cpu_s": time.process_time()}]).encode()
            TRACE.clear()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": body})
            return
        if scope["type"] != "http" or scope["path"] != "/generate_api":
            await app(scope, receive, send)
            return
        t0 = time.time()
        try:
            await app(scope, receive, send)
        finally:
            TRACE.append({"k": "http", "t0": t0, "t1": time.time()})

    return wrapper


# ------------------------------------------------------------------------------------------ client side
def summarize(records: list[dict[str, Any]], wall_s: float, c: int) -> dict[str, Any]:
    ok = [r for r in records if r.get("tokens")]
    toks = [r["tokens"] for r in ok]
    lat = [r["latency_ms"] for r in ok]
    ttft = [r["ttft_ms"] for r in ok if r.get("ttft_ms")]
    tpot = [(r["gen_ms"] - r["ttft_ms"]) / (r["tokens"] - 1) for r in ok
            if r.get("ttft_ms") and r["tokens"] > 1]
    ms_tok = [r["gen_ms"] / r["tokens"] for r in ok]
    finishes: dict[str, int] = {}
    for r in records:
        finishes[str(r.get("finish"))] = finishes.get(str(r.get("finish")), 0) + 1
    out: dict[str, Any] = {
        "c": c, "requests": len(records), "ok": len(ok),
        "errors": sum(1 for r in records if r.get("error")),
        "tokens": sum(toks), "mean_tokens": sum(toks) / len(toks) if toks else 0,
        "wall_s": round(wall_s, 3), "agg_tok_s": round(sum(toks) / wall_s, 1) if wall_s > 0 else 0,
        "lat_p50_ms": percentile(lat, 50), "lat_p95_ms": percentile(lat, 95),
        "ttft_p50_ms": percentile(ttft, 50), "ttft_p95_ms": percentile(ttft, 95),
        "tpot_p50_ms": percentile(tpot, 50), "tpot_p95_ms": percentile(tpot, 95),
        "ms_per_token_p50": percentile(ms_tok, 50), "finish": finishes,
    }
    # Tokens of requests that finished in the middle 80 % of the wall time. Only meaningful with many
    # rounds per worker; the one-to-two-round phases here make it noise, and the report ignores it.
    ends = sorted((r["t_end"], r["tokens"]) for r in ok if "t_end" in r)
    if len(ends) >= 4 and c > 1:
        lo, hi = 0.1 * wall_s, 0.9 * wall_s
        mid = [t for te, t in ends if lo <= te <= hi]
        out["steady_tok_s"] = round(sum(mid) / (hi - lo), 1) if mid else None
    sat = [r["satisfied"] for r in records if r.get("satisfied") is not None]
    if sat:
        out["satisfied"] = sum(1 for s in sat if s)
    ws = [r["ws"] for r in records if r.get("ws") is not None]
    if ws:
        out["ws_outside_strings_total"] = sum(ws)
        out["requests_with_ws"] = sum(1 for w in ws if w)
    ws_flex = [r["ws_flex"] for r in records if r.get("ws_flex") is not None]
    if ws_flex:
        out["flex_ws_outside_strings_total"] = sum(ws_flex)
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
    sample = next((r["text"] for r in ok if r.get("text")), None)
    if sample:
        out["sample"] = sample[:160]
    return out


async def http_phase(  # noqa: PLR0917
    port: int, c: int, n: int, mode: str, timeout_s: float, max_tokens: int = MAX_TOKENS
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
                body: dict[str, Any] = {"prompt": prompt_for(i), "max_tokens": max_tokens,
                                        "temperature": TEMPERATURE}
                cons = constraints_for(mode, i)
                if cons is not None:
                    body["constraints"] = cons
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
                    rec.update(tokens=data.get("tokens_generated", 0), gen_ms=data.get("generation_time_ms"),
                               ttft_ms=md.get("time_to_first_token_ms"), finish=data.get("finish_reason"),
                               satisfied=data.get("constraint_satisfied"),
                               compile_ms=md.get("compile_time_ms"), cache_hit=md.get("cache_hit"),
                               text=text, closed=md.get("closed_on_budget"))
                    if cons is not None and mode != "json_flex":
                        rec["ws"] = ws_outside_strings(text)
                    elif mode == "json_flex":
                        rec["ws_flex"] = ws_outside_strings(text)
                records.append(rec)

        await asyncio.gather(*(worker() for _ in range(c)))
    return records, time.perf_counter() - t_begin


async def raw_phase(  # noqa: PLR0917
    port: int, c: int, n: int, mode: str, output_kind: str, timeout_s: float, max_tokens: int = MAX_TOKENS
) -> tuple[list[dict], float]:
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as sess, sess.post(
        f"http://127.0.0.1:{port}/_bench/raw",
        json={"c": c, "n": n, "mode": mode, "max_tokens": max_tokens, "output_kind": output_kind},
    ) as resp:
        data = await resp.json(content_type=None)
        if resp.status != 200:
            raise RuntimeError(f"raw phase: {resp.status} {json.dumps(data)[:400]}")
    return data["records"], data["wall_s"]


def _probe_records(probe_dir: Path) -> list[dict[str, Any]]:
    recs: list[dict[str, Any]] = []
    for f in probe_dir.glob("probe-*.jsonl"):
        pid = f.stem.split("-", 1)[1]
        for line in f.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            r["pid"] = pid
            recs.append(r)
    return recs


def probe_summary(  # noqa: PLR0917
    probe_dir: Path, t0: float, t1: float, c: int, api_pid: Any = None,
    recs: list[dict[str, Any]] | None = None,
) -> dict[str, Any] | None:
    recs = _probe_records(probe_dir) if recs is None else recs
    bm = [r for r in recs if r["k"] == "bm" and t0 <= r["t0"] <= t1]
    st = [r for r in recs if r["k"] == "st" and t0 <= r["t1"] <= t1]
    sampled = [r for r in recs if r["k"] in ("stk", "lag") and t0 <= r["t"] <= t1]
    if not bm and not st and not sampled:
        return None
    out: dict[str, Any] = {"bitmask_calls": len(bm), "steps": len(st)}
    if bm:
        full = [r for r in bm if r["n"] >= max(1, int(0.75 * c))] or bm
        out["bitmask_ms_p50"] = round(percentile([(r["t1"] - r["t0"]) * 1000 for r in full], 50) or 0, 3)
        out["bitmask_ms_mean"] = round(sum((r["t1"] - r["t0"]) * 1000 for r in full) / len(full), 3)
        out["bitmask_n_mean"] = round(sum(r["n"] for r in full) / len(full), 1)
        out["accept_ms_mean"] = round(sum(r["acc_ms"] for r in full) / len(full), 3)
        out["bitmask_modes"] = sorted({r["mode"] for r in bm})
    if len(st) > 2:
        ts = sorted(r["t1"] for r in st)
        gaps = [(b - a) * 1000 for a, b in itertools.pairwise(ts)]
        out["step_interval_ms_p50"] = round(percentile(gaps, 50) or 0, 3)
    if st:  # where the engine spent a stall: one long step, or no steps at all
        out["step_ms_max"] = round(max(r["dt"] for r in st), 1)
        out["first_step_s"] = round(min(r["t1"] for r in st) - t0, 3)
        out["last_step_s"] = round(max(r["t1"] for r in st) - t0, 3)
        if len(st) > 1:
            ts = sorted(r["t1"] for r in st)
            out["step_gap_ms_max"] = round(max((b - a) * 1000 for a, b in itertools.pairwise(ts)), 1)
    stacks = stack_summary(sampled, api_pid)
    if stacks:
        out["stacks"] = stacks
    return out


_IDLE = ("threading.py:wait", "queue.py:get", "selectors.py:select", "base_events.py:_run_once",
         "runners.py:run",  # uvloop: the event loop is in C (idle, or in a C callback)
         "so_probe.py:_flusher", "socket.py:recv", "poll", "thread.py:_worker")


def stack_summary(recs: list[dict[str, Any]], api_pid: Any, top: int = 8) -> dict[str, Any]:
    """Per process (API / EngineCore): samples, sampler lateness, and the most frequent busy stacks
    (a thread whose innermost frame is an idle wait is counted as idle)."""
    out: dict[str, Any] = {}
    for pid in sorted({r["pid"] for r in recs}):
        mine = [r for r in recs if r["pid"] == pid]
        name = "api" if str(pid) == str(api_pid) else f"pid{pid}"
        counts: dict[str, int] = {}
        idle = 0
        for r in mine:
            if r["k"] != "stk":
                continue
            leaf = r["s"].split(" < ", 1)[0]
            if any(mark in leaf for mark in _IDLE):
                idle += 1
                continue
            thread = re.sub(r"[_-]?\d+$", "", r["th"])
            key = f"{thread}: {r['s']}"
            counts[key] = counts.get(key, 0) + 1
        lags = [r["ms"] for r in mine if r["k"] == "lag"]
        ticks = len({r["t"] for r in mine if r["k"] == "stk"})
        out[name] = {"ticks": ticks, "idle_samples": idle, "sampler_late_ms_max": max(lags, default=0),
                     "sampler_late_ms_sum": round(sum(lags), 1),
                     "busy": sorted(counts.items(), key=lambda kv: -kv[1])[:top]}
    return out


def trace_summary(trace: list[dict[str, Any]], t0: float) -> dict[str, Any]:
    """Server-side timeline of a phase, in seconds after its start: when requests arrived, were
    planned (on how many threads), reached the engine and got their first token."""

    def spread(vals: list[float]) -> list[float] | None:
        if not vals:
            return None
        return [round(min(vals), 3), round(percentile(vals, 50) or 0, 3), round(max(vals), 3)]

    http = [r for r in trace if r["k"] == "http"]
    plans = [r for r in trace if r["k"] == "plan"]
    eng = [r for r in trace if r["k"] == "engine"]
    loop = [r["ms"] for r in trace if r["k"] == "loop" and r["t"] >= t0]
    cpu = [r["cpu_s"] for r in trace if r["k"] == "cpu"]
    gcs = [r for r in trace if r["k"] == "gc" and r["t"] >= t0]
    return {
        "gc_over_20ms": len(gcs), "gc_ms_max": max((r["ms"] for r in gcs), default=0),
        "gc_ms_sum": round(sum(r["ms"] for r in gcs), 1), "gc_gens": sorted({r["gen"] for r in gcs}),
        "process_cpu_s": cpu[-1] if cpu else None,
        "arrive_s": spread([r["t0"] - t0 for r in http]),
        "plan_start_s": spread([r["t0"] - t0 for r in plans]),
        "plan_ms": spread([(r["t1"] - r["t0"]) * 1000 for r in plans]),
        "plan_threads": len({r["th"] for r in plans}),
        "engine_call_s": spread([r["t0"] - t0 for r in eng]),
        "first_token_s": spread([r["first"] - t0 for r in eng if r.get("first")]),
        "engine_ms": spread([(r["t1"] - r["t0"]) * 1000 for r in eng]),
        "loop_late_ms_max": max(loop, default=0), "loop_late_ms_sum": round(sum(loop), 1),
    }


def parse_server_log(path: Path) -> dict[str, Any]:
    text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
    pats = {
        "model_load_gib": r"Model loading took ([\d.]+) GiB",
        "model_load_s": r"Model loading took [\d.]+ GiB (?:memory )?and ([\d.]+) s",
        "kv_cache_tokens": r"GPU KV cache size: ([\d,]+) tokens",
        "max_concurrency": r"Maximum concurrency for [\d,]+ tokens per request: ([\d.]+)x",
        "graph_capture_s": r"Graph capturing finished in ([\d.]+) sec",
        "init_engine_s": r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) s",
        "attention_backend": r"Using (\w+) attention backend",
        "mp_method": r"(?:multiproc|multiprocessing).*?method[^\w]*(fork|spawn)",
        "vllm_patch": r"vLLM patch parallel_mask_fill: (.*)",
        "parallel_mask_fill_in_engine_core": r"parallel (?:structured-output )?mask fill (on|off: .*)",
    }
    out: dict[str, Any] = {}
    for key, pat in pats.items():
        m = re.search(pat, text)
        if m:
            out[key] = m.group(1)
    out["errors"] = [ln[:300] for ln in text.splitlines() if "Error" in ln or "Traceback" in ln][:8]
    return out


class Bench:
    def __init__(  # noqa: PLR0917
        self, out_dir: Path, deadline: float, fake: bool, only: list[str] | None, first_bursts: bool,
        windows: list[float] | None, gemv: bool = False,
    ) -> None:
        self.gemv = gemv
        self._last_cpu_s: float | None = None
        self.first_bursts = first_bursts
        self.windows = windows or []
        self.out = out_dir
        self.deadline = deadline
        self.fake = fake
        self.only = only
        self.results: dict[str, Any] = {"started_unix": T_START, "max_tokens": MAX_TOKENS,
                                        "temperature": TEMPERATURE, "list_schema": LIST_SCHEMA,
                                        "closing_schema": CLOSING_SCHEMA, "engines": {}, "skipped": []}

    def elapsed(self) -> float:
        return time.time() - T_START

    def save(self) -> None:
        tmp = self.out / "results.json.tmp"
        tmp.write_text(json.dumps(self.results, indent=1, default=str), encoding="utf-8")
        tmp.replace(self.out / "results.json")

    def device_info(self) -> None:
        self.results["host"] = host_facts()
        log(f"host {self.results['host']}")
        if self.fake:
            return
        with contextlib.suppress(Exception):
            self.results["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,"
                 "power.limit", "--format=csv"], check=False, capture_output=True, text=True,
                timeout=20).stdout
        code = (
            "import torch,time\n"
            "x=torch.empty(4<<30,dtype=torch.uint8,device='cuda');y=torch.empty_like(x)\n"
            "for _ in range(3): y.copy_(x)\n"
            "torch.cuda.synchronize();t=time.perf_counter()\n"
            "for _ in range(20): y.copy_(x)\n"
            "torch.cuda.synchronize();dt=time.perf_counter()-t\n"
            "print(2*20*x.numel()/dt/1e12, torch.cuda.get_device_name(), torch.__version__,"
            " torch.version.cuda)\n"
        )
        res = None
        try:
            res = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                                 timeout=90)
            bw, *rest = res.stdout.split()
            self.results["copy_bandwidth_tbps"] = round(float(bw), 3)
            self.results["device"] = " ".join(rest[:-2])
            self.results["torch_device"] = {"torch": rest[-2], "cuda": rest[-1]}
            log(f"device copy bandwidth {float(bw):.2f} TB/s on {self.results['device']}")
        except Exception as exc:
            self.results["copy_bandwidth_error"] = f"{exc}"
        if self.gemv:
            res = None
            try:
                res = subprocess.run([sys.executable, "-c", GEMV_CODE], check=False, capture_output=True,
                                     text=True, timeout=120)
                self.results["gemv"] = json.loads(res.stdout.strip().splitlines()[-1])
                log(f"gemv {self.results['gemv']}")
            except Exception as exc:
                self.results["gemv_error"] = f"{type(exc).__name__}: {exc} {res.stderr[-500:] if res else ''}"

    def warmups(self, eng: dict[str, Any]) -> list[tuple[str, str, str, int, int, int]]:
        """(name, kind, mode, c, n, max_tokens) of the warm-up rounds, all measured and traced.

        With ``--first-bursts`` (the first-burst stall: run 2 and 3 saw the first burst at a new
        concurrency level take 5-26 s longer), the engine's own route meets each new level first
        (``raw_first_*``, no HTTP, no wrapper), then our HTTP route at the same level, then again:
        a stall on the raw route is vLLM's, one only on ours is ours. Then 256 concurrent requests
        with one new schema, twice (compile of a schema many requests share at once)."""
        rounds = [("cold_first_json", "http", "json", 1, 1, MAX_TOKENS)]
        if not self.first_bursts or not eng.get("diag", True):
            return [*rounds, ("warmup_unc", "http", "unc", 8, 8, 32),
                    ("warmup_json", "http", "json", 8, 8, MAX_TOKENS)]
        tag = f"{eng['name']}-{int(time.time())}"
        for c in (8, 256):
            rounds += [(f"raw_first_c{c}_unc", "raw", "unc", c, c, 32),
                       (f"first_c{c}_unc", "http", "unc", c, c, 32),
                       (f"second_c{c}_unc", "http", "unc", c, c, 32)]
        rounds += [("first_c256_json_new", "http", f"json_new:{tag}", 256, 256, 64),
                   ("second_c256_json_new", "http", f"json_new:{tag}", 256, 256, 64),
                   ("warm_c64_unc", "http", "unc", 64, 64, 32),
                   ("warm_c64_json", "http", "json", 64, 64, MAX_TOKENS)]
        return rounds

    def est(self, eng: dict[str, Any], ph: dict[str, Any]) -> float:
        c = ph["c"]
        step = eng["step"][c] + (0.45 * c if c <= 128 else 0.06 * c) * (ph["mode"] != "unc")
        return math.ceil(ph["n"] / c) * MAX_TOKENS * step / 1000 * 1.2 + 2

    def run_engine(self, eng: dict[str, Any]) -> None:
        name = eng["name"]
        end_by = min(eng["end_by"], self.deadline)
        if self.elapsed() + eng["start_est"] + 20 > end_by:
            self.results["skipped"].append(f"engine {name}: not enough time ({self.elapsed():.0f}s)")
            log(f"skip engine {name}")
            return
        model = (Path(os.environ.get("GPU_PL", ROOT / ".gpu/models")) / f"{eng['arch']}-dummy").as_posix()
        port = 18000 + len(self.results["engines"])
        probe_dir = Path(tempfile.mkdtemp(prefix=f"probe-{name}-"))
        self._last_cpu_s = None
        plugin_dir = probe_dir / "plugin"
        dist = plugin_dir / "ananke_bench_probe-0.1.dist-info"
        dist.mkdir(parents=True)
        (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ananke-bench-probe\nVersion: 0.1\n")
        (dist / "entry_points.txt").write_text(
            "[vllm.general_plugins]\nananke_bench_probe = bench.gpu.so_probe:register\n")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT), str(plugin_dir), *filter(None, [env.get("PYTHONPATH")])])
        env["ANANKE_BENCH_PROBE_DIR"] = str(probe_dir)
        env.update(eng.get("env", {}))
        spec = {"model": model, "enforce_eager": eng["enforce_eager"], "extra": eng["extra"],
                "port": port, "fake": self.fake}
        log_path = self.out / f"server-{name.replace('+', '_')}.log"  # "+" does not come back from $OUT
        res: dict[str, Any] = {"arch": eng["arch"], "enforce_eager": eng["enforce_eager"],
                               "extra": eng["extra"], "env": eng.get("env", {}),
                               "weights": weight_bytes(eng["arch"]), "phases": {}}
        self.results["engines"][name] = res
        t_launch = time.time()
        with open(log_path, "w", encoding="utf-8") as logf:
            proc = subprocess.Popen(
                [sys.executable, "-m", "bench.gpu.run_gpu_bench", "serve", json.dumps(spec)],
                cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                self._drive(eng, res, proc, port, t_launch, end_by, probe_dir)
            finally:
                self._stop(proc, res)
                res["server_log"] = parse_server_log(log_path)
                self.save()

    def _wait_ready(self, proc: subprocess.Popen[bytes], port: int, limit: float) -> dict[str, Any]:
        import urllib.request

        while time.time() < limit:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            with contextlib.suppress(Exception), urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    break
            info: dict[str, Any] = {}
            with contextlib.suppress(Exception), urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/_bench/info", timeout=2) as r:
                info = json.loads(r.read())
            if info.get("state") == "ok":  # ready even if /health itself fails
                break
            if info.get("state") == "error":
                raise RuntimeError(f"engine failed: {info.get('error')}")
            time.sleep(0.5)
        else:
            raise TimeoutError("engine did not become ready in time")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/_bench/info", timeout=5) as r:
            return dict(json.loads(r.read()))

    def _drive(  # noqa: PLR0917
        self, eng: dict[str, Any], res: dict[str, Any], proc: subprocess.Popen[bytes], port: int,
        t_launch: float, end_by: float, probe_dir: Path,
    ) -> None:
        name = eng["name"]
        try:
            info = self._wait_ready(proc, port, T_START + end_by - 15)
        except Exception as exc:
            res["start_error"] = f"{type(exc).__name__}: {exc}"
            log(f"engine {name} failed to start: {exc}")
            return
        res["info"] = info
        res["ready_wall_s"] = round(time.time() - t_launch, 2)
        log(f"engine {name} ready: engine {info.get('engine_start_s')}s, process {res['ready_wall_s']}s")
        self.save()
        # warm-up; the very first constrained request initialises the llguidance backend in EngineCore
        for wname, kind, mode, c, n, max_tokens in self.warmups(eng):
            self._phase(res, {"name": wname, "kind": kind, "c": c, "n": n, "mode": mode,
                              "max_tokens": max_tokens, "ctl": {"mode": "service", "sample": True}},
                        port, 60, probe_dir)
        log(f"{name} warm-up done; first JSON request "
            f"{res['phases']['cold_first_json'].get('lat_p50_ms')} ms")
        phases = PHASES.get(name) or PHASES["32b-compile-v1"]  # a 32b+VARIANT engine: c=1 only
        for prio in (1, 2):
            for ph in phases:
                if ph["prio"] != prio or (self.only and ph["name"] not in self.only):
                    continue
                est = self.est(eng, ph)
                if self.elapsed() + est + 12 > end_by:
                    self.results["skipped"].append(f"{name}/{ph['name']} (est {est:.0f}s)")
                    continue
                self._phase(res, ph, port, est, probe_dir)
        time.sleep(0.6)  # let the probe flush its last records
        recs = _probe_records(probe_dir)
        for summary in res["phases"].values():
            win = summary.pop("_window", None)
            if win:
                summary["probe"] = probe_summary(
                    probe_dir, win[0], win[1], summary["c"], info.get("pid"), recs)

    def _phase(self, res: dict[str, Any], ph: dict[str, Any], port: int, est: float, probe_dir: Path) -> None:
        ctl = ph.get("ctl", {"mode": "service"})
        if ph.get("gc_freeze"):
            import urllib.request

            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_bench/gc_freeze", timeout=60) as r:
                self.results["gc_freeze"] = json.loads(r.read())
                log(f"  gc.freeze(): {self.results['gc_freeze']}")
        (probe_dir / "ctl.json").write_text(json.dumps(ctl))
        time.sleep(0.05)
        t0 = time.time()
        try:
            max_tokens = ph.get("max_tokens", MAX_TOKENS)
            if ph["kind"] == "raw":
                recs, wall = asyncio.run(raw_phase(port, ph["c"], ph["n"], ph["mode"],
                                                   ph.get("output_kind", "final"), max(60, 4 * est),
                                                   max_tokens))
            else:
                recs, wall = asyncio.run(http_phase(port, ph["c"], ph["n"], ph["mode"], max(60, 4 * est),
                                                    max_tokens=max_tokens))
            summary = summarize(recs, wall, ph["c"])
        except Exception as exc:
            summary = {"c": ph["c"], "error": f"{type(exc).__name__}: {exc}"}
        with contextlib.suppress(Exception):
            import urllib.request

            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_bench/trace", timeout=10) as r:
                summary["server"] = trace_summary(json.loads(r.read()), t0)
            cpu = summary["server"]["process_cpu_s"]
            if cpu is not None and self._last_cpu_s is not None:  # the API process's CPU seconds in the phase
                summary["server"]["phase_cpu_s"] = round(cpu - self._last_cpu_s, 2)
            self._last_cpu_s = cpu
        summary.update(kind=ph["kind"], mode=ph["mode"], ctl=ctl, est_s=round(est, 1), t0_unix=t0,
                       _window=(t0, time.time()))
        if ph.get("output_kind"):
            summary["output_kind"] = ph["output_kind"]
        res["phases"][ph["name"]] = summary
        (probe_dir / "ctl.json").write_text(json.dumps({"mode": "service"}))
        srv = summary.get("server") or {}
        log(f"  {ph['name']:<22} c={ph['c']:<3} {summary.get('agg_tok_s')} tok/s  "
            f"wall {summary.get('wall_s')} s  "
            f"lat p50/max {summary.get('lat_p50_ms') and round(summary['lat_p50_ms'])}/"
            f"{summary.get('lat_max_ms') and round(summary['lat_max_ms'])} ms  "
            f"finish {summary.get('finish')}  "
            f"plan start {srv.get('plan_start_s')} engine call {srv.get('engine_call_s')} "
            f"first tok {srv.get('first_token_s')} loop late max {srv.get('loop_late_ms_max')}  "
            f"{summary.get('error', '')}")
        self.save()

    def _stop(self, proc: subprocess.Popen[bytes], res: dict[str, Any]) -> None:
        t0 = time.time()
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=25)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # the EngineCore child, if it outlived the server
        res["shutdown_s"] = round(time.time() - t0, 1)
        if not self.fake:  # wait until the GPU memory is back before the next engine
            for _ in range(40):
                with contextlib.suppress(Exception):
                    used = subprocess.run(
                        ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                        check=False, capture_output=True, text=True, timeout=10).stdout
                    if int(used.split()[0]) < 4000:
                        break
                time.sleep(0.5)

    def run(self, engines: list[str] | None) -> None:
        self.device_info()
        self.save()
        by_name = {e["name"]: e for e in ENGINES}
        for i, name in enumerate(engines or DEFAULT_ENGINES):
            eng = by_name[name] if name in by_name else variant_engine(name)
            if i < len(self.windows):
                eng = {**eng, "end_by": self.windows[i]}
            try:
                self.run_engine(eng)
            except Exception as exc:
                log(f"engine {eng['name']} failed: {type(exc).__name__}: {exc}")
                failure = f"{type(exc).__name__}: {exc}"
                self.results["engines"].setdefault(eng["name"], {})["failure"] = failure
        self.results["total_wall_s"] = round(self.elapsed(), 1)
        self.save()
        log(f"done in {self.elapsed():.0f}s")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "serve":
        serve(json.loads(argv[1]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-gpu-out"))
    ap.add_argument("--deadline-s", type=float, default=548.0, help="stop starting work after this")
    ap.add_argument("--engines", nargs="*", default=DEFAULT_ENGINES,
                    help="in this order, from: " + ", ".join(e["name"] for e in ENGINES)
                    + ", or 32b+VARIANT (a step_split variant)")
    ap.add_argument("--only", nargs="*", help="only these phase names (plus warm-up)")
    ap.add_argument("--fake", action="store_true", help="fake engine, for checking the driver locally")
    ap.add_argument("--first-bursts", action="store_true",
                    help="before the phases: two short unconstrained rounds at c=64 and at c=256")
    ap.add_argument("--gemv", action="store_true",
                    help="before the engines: cuBLAS bf16 GEMVs over a 32B step's weights in a CUDA graph")
    ap.add_argument("--windows", nargs="*", type=float,
                    help="latest end (s after start) of each engine in --engines, replacing end_by")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bench = Bench(out, args.deadline_s, args.fake, args.only, args.first_bursts, args.windows, args.gemv)
    bench.run(args.engines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
