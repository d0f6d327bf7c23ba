"""The server process of one engine setting (``python -m bench.gpu._serve SPEC``; run_gpu_bench starts it).

It builds the service as ``ananke serve`` does (``Engine`` + ``create_app``, with the limits of the GPU
bench) and adds bench-only routes to the same app: ``/_bench/info`` (versions and vLLM's resolved
settings), ``/_bench/raw`` (the same requests straight on ``AsyncLLM``, no HTTP, no wrapper),
``/_bench/trace`` (per-request timestamps of this process, read and cleared) and ``/_bench/gc_freeze``.
``so_probe``'s stack sampler runs here too. With ``"fake": true`` in SPEC the engine is a stand-in
(real app, generator and compiler; fake tokens) for checking the driver without vLLM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
import types
from pathlib import Path
from typing import Any

from bench.gpu._plan import MAX_TOKENS, TEMPERATURE, constraints_for, prompt_for
from bench.gpu._shared import ROOT, VOCAB


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
        from modal_service.engine.engine import Delta, Engine

        class FakeEngine(Engine):
            def _build(self) -> None:
                import llguidance.hf
                from transformers import PreTrainedTokenizerFast

                from modal_service.constraints.compiler import ConstraintCompiler

                tok = PreTrainedTokenizerFast(tokenizer_file=str(Path(self.config.model) / "tokenizer.json"))
                with contextlib.suppress(OSError, KeyError):
                    cfg = json.loads((Path(self.config.model) / "tokenizer_config.json").read_text())
                    tok.chat_template = cfg["chat_template"]
                self.tokenizer = tok
                self.eos_token_ids = frozenset({151645})
                ll_tok = llguidance.hf.from_tokenizer(tok, n_vocab=VOCAB)
                self.compiler = ConstraintCompiler(ll_tok, vocab_size=VOCAB, eos_token_ids=self.eos_token_ids)

            async def sleep(self, level: int = 1) -> float:
                self.state = "sleeping"
                return 0.01

            async def wake(self) -> float:
                self.state = "ok"
                return 0.01

            async def stream(self, prompt: str, **kw: Any) -> Any:  # type: ignore[override]
                text = '[{"id":1,"name":"a","ok":true}' if kw.get("constraint") else "x"
                for i in range(kw["max_tokens"]):
                    await asyncio.sleep(0.001)
                    last = i == kw["max_tokens"] - 1
                    yield Delta(
                        text=text if i == 0 else "1",
                        token_ids=[16],
                        finish_reason="length" if last else None,
                    )

        return FakeEngine(config)


def add_bench_routes(app: Any, engine: Any, fake: bool) -> None:
    """``/_bench/info`` and ``/_bench/raw``: the same requests straight on AsyncLLM, in this process."""
    from fastapi import Body

    from langchain_ananke.protocol import Constraints

    @app.get("/_bench/info")
    async def info() -> dict[str, Any]:
        out: dict[str, Any] = {
            "state": engine.state,
            "error": engine.error,
            "engine_start_s": engine.start_seconds,
            "pid": os.getpid(),
            "fast_forward": getattr(engine, "fast_forward", None),
        }
        for mod in ("vllm", "torch", "llguidance", "fastapi", "uvicorn", "pydantic", "transformers"):
            with contextlib.suppress(Exception):
                out[f"{mod}_version"] = __import__(mod).__version__
        out["python"] = sys.version.split()[0]
        from modal_service.engine import vllm_patches

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
        cons = constraints_for(mode)
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
                    max_tokens=max_tokens,
                    temperature=TEMPERATURE,
                    top_p=1.0,
                    structured_outputs=so,
                    output_kind=RequestOutputKind.DELTA if delta else RequestOutputKind.FINAL_ONLY,
                )
                rid = f"raw-{time.time_ns()}-{i}"
                async for out in engine._llm.generate(prompt_for(i, mode), params, rid):
                    got = len(out.outputs[0].token_ids)
                    if got and first is None:
                        first = time.perf_counter()
                    tokens = tokens + got if delta else got
                    if out.finished:
                        finish = out.outputs[0].finish_reason
            done = time.perf_counter()
            records.append(
                {
                    "latency_ms": (done - started) * 1000,
                    "tokens": tokens,
                    "finish": finish,
                    "t_start": started - t_begin,
                    "ttft_ms": (first - started) * 1000 if (first and delta) else None,
                    "gen_ms": (done - started) * 1000,
                    "t_end": done - t_begin,
                }
            )

        async def worker() -> None:
            for i in counter:
                await one(i)

        await asyncio.gather(*(worker() for _ in range(c)))
        return {"records": records, "wall_s": time.perf_counter() - t_begin}


def add_sleep_routes(app: Any, engine: Any) -> None:
    """``/_bench/sleep``, ``/_bench/wake``: ``Engine.sleep`` / ``Engine.wake`` (vLLM sleep mode), timed."""
    from fastapi import Body

    @app.post("/_bench/sleep")
    async def sleep(body: dict[str, Any] = Body(...)) -> dict[str, Any]:  # noqa: B008
        """vLLM's sleep mode (engine started with ``enable_sleep_mode``): level 1 offloads the weights to
        CPU memory and drops the KV cache, as before a GPU memory snapshot."""
        level = int(body.get("level", 1))
        t = time.perf_counter()
        took = await engine.sleep(level)  # the service's own call, as modal_service/app.py makes it
        return {"level": level, "sleep_s": round(time.perf_counter() - t, 3), "engine_s": round(took, 3)}

    @app.post("/_bench/wake")
    async def wake() -> dict[str, Any]:
        t = time.perf_counter()
        took = await engine.wake()
        wall = round(time.perf_counter() - t, 3)
        return {"wake_s": wall, "engine_s": round(took, 3), "state": engine.state}


def serve(spec: dict[str, Any]) -> None:
    _stub_client_package()
    # The service's mask-fill patch is off by default since vLLM 0.32; the bench switches it per phase
    # (so_probe), so it must be applied to begin with.
    os.environ.setdefault("ANANKE_VLLM_PATCHES", "1")
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("modal_service").setLevel(logging.INFO)  # the vllm_patches lines, in EngineCore too
    import uvicorn

    from modal_service.engine.engine import Engine, EngineConfig
    from modal_service.http.app import create_app
    from modal_service.limits import Limits

    config = EngineConfig(
        model=spec["model"],
        max_model_len=4096,
        gpu_memory_utilization=spec.get("gpu_memory_utilization", 0.9),
        enforce_eager=spec["enforce_eager"],
        max_num_seqs=256,
        load_format="dummy",
        sleep_mode=spec.get("sleep_mode", False),
        fast_forward=spec.get("fast_forward", False),
        fast_forward_async=spec.get("fast_forward_async", False),
        extra=spec.get("extra", {}),
    )
    engine = _FakeEngine.make(config) if spec.get("fake") else Engine(config)
    app = create_app(engine, limits=Limits(max_tokens=2048, max_inflight=1024))
    add_bench_routes(app, engine, bool(spec.get("fake")))
    add_sleep_routes(app, engine)
    from bench.gpu import so_probe

    so_probe.start_sampler()
    uvicorn.run(
        _traced(app, engine), host="127.0.0.1", port=spec["port"], log_level="warning", access_log=False
    )


#: Per-request timestamps in the server process (wall clock), read and cleared by ``/_bench/trace``.
TRACE: list[dict[str, Any]] = []


def _traced(app: Any, engine: Any) -> Any:  # noqa: PLR0915
    """Timestamps of each ``/generate_api`` request: arrival, planning (which thread), engine call,
    end; plus the event loop's lateness. Wraps the app, ``Generator.plan`` and ``Engine.stream``."""
    import gc
    import threading

    state = app.state  # the app keeps its Generator in its Lifecycle (since the observability work)
    generator = state.lifecycle.generator if hasattr(state, "lifecycle") else state.generator
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
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        if scope["type"] == "http" and scope["path"] == "/_bench/trace":
            body = json.dumps([*TRACE, {"k": "cpu", "t": time.time(), "cpu_s": time.process_time()}]).encode()
            TRACE.clear()
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
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


if __name__ == "__main__":
    serve(json.loads(sys.argv[1]))
