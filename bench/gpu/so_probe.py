"""A vLLM general plugin, for the GPU benchmark only: times the structured-output path inside EngineCore.

``run_gpu_bench.py`` writes a throwaway ``*.dist-info`` whose ``vllm.general_plugins`` entry point is
:func:`register`, and puts it on the server's ``PYTHONPATH``. vLLM then calls :func:`register` in every
process it starts (the EngineCore too, fork or spawn). Nothing here is part of the service.

Per process it appends JSON lines to ``$ANANKE_BENCH_PROBE_DIR/probe-<pid>.jsonl``:

- ``{"k": "bm", "t0", "t1", "n", "acc_ms", "mode"}`` per ``StructuredOutputManager.grammar_bitmask`` call:
  the CPU time of one step's token masks for ``n`` constrained requests, plus the time
  ``GuidanceGrammar.accept_tokens`` took since the previous record (the grammar advance of the step);
- ``{"k": "st", "t1", "dt"}`` per engine step that returned outputs;
- while ``ctl.json`` has ``"sample": true``, ``{"k": "stk", "t", "th", "s"}`` every 50 ms per Python
  thread (its innermost frames, a poor man's profiler for the first-burst stall) and
  ``{"k": "lag", "t", "ms"}`` when the sampler itself woke over 100 ms late (the GIL was held).

A control file (``$ANANKE_BENCH_PROBE_DIR/ctl.json``, re-read when its mtime changes) switches how the
masks are filled, to compare fills on the same engine:

- ``{"mode": "service"}`` (default): whatever the service runs, i.e. with
  ``modal_service.engine.vllm_patches``' parallel fill when it applied;
- ``{"mode": "vllm"}``: vLLM 0.26 as shipped (serial below 129 requests, threads of 16 above), with the
  service's patch bypassed on this manager;
- ``{"mode": "threads", "batch": 8}``: vLLM's own thread-pool path at every batch size;
- ``{"mode": "llexec"}``: one ``llguidance.torch.fill_next_token_bitmask_par`` call (Rust threads).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import threading
import time
from typing import Any

_STATE: dict[str, Any] = {
    "pid": None,
    "buf": [],
    "lock": threading.Lock(),
    "ctl_mtime": None,
    "ctl": {"mode": "service"},
    "acc_ms": 0.0,
    "exec": None,
}


def _dir() -> str | None:
    return os.environ.get("ANANKE_BENCH_PROBE_DIR")


def _flusher(path: str) -> None:
    while True:
        time.sleep(0.25)
        _flush(path)


def _flush(path: str) -> None:
    with _STATE["lock"]:
        buf, _STATE["buf"] = _STATE["buf"], []
    if buf:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in buf))


def _record(rec: dict[str, Any]) -> None:
    pid = os.getpid()
    if _STATE["pid"] != pid:  # first record in this process (threads do not survive fork)
        _STATE["pid"], _STATE["buf"] = pid, []
        base = _dir()
        if base:
            path = os.path.join(base, f"probe-{pid}.jsonl")
            threading.Thread(target=_flusher, args=(path,), daemon=True, name="so-probe").start()
    with _STATE["lock"]:
        _STATE["buf"].append(rec)


def _control() -> dict[str, Any]:
    base = _dir()
    if not base:
        return _STATE["ctl"]
    path = os.path.join(base, "ctl.json")
    try:
        mtime = os.stat(path).st_mtime_ns
    except OSError:
        return _STATE["ctl"]
    if mtime != _STATE["ctl_mtime"]:
        _STATE["ctl_mtime"] = mtime
        try:
            with open(path, encoding="utf-8") as fh:
                _STATE["ctl"] = json.load(fh)
        except (OSError, ValueError):
            pass
    return _STATE["ctl"]


def _stack(frame: Any, depth: int = 10) -> str:
    parts = []
    while frame is not None and len(parts) < depth:
        code = frame.f_code
        parts.append(f"{os.path.basename(code.co_filename)}:{code.co_name}:{frame.f_lineno}")
        frame = frame.f_back
    return " < ".join(parts)


def _sampler() -> None:
    me = threading.get_ident()
    period = 0.05
    while True:
        t = time.time()
        time.sleep(period)
        late = (time.time() - t - period) * 1000
        if not _control().get("sample"):
            continue
        now = time.time()
        if late > 100:
            _record({"k": "lag", "t": now, "ms": round(late, 1)})
        names = {th.ident: th.name for th in threading.enumerate()}
        for ident, frame in sys._current_frames().items():
            if ident != me:
                _record({"k": "stk", "t": now, "th": names.get(ident, str(ident)), "s": _stack(frame)})


def start_sampler() -> None:
    """Start the stack sampler of this process once (it records only while ctl says ``sample``)."""
    if _dir() and _STATE.get("sampler_pid") != os.getpid():
        _STATE["sampler_pid"] = os.getpid()
        threading.Thread(target=_sampler, daemon=True, name="so-probe-sampler").start()


def _llexec_fill(self: Any, requests: Any, ids: list[str]) -> Any:
    """All masks of the step in one llguidance call that fans out over Rust threads."""
    import llguidance
    import llguidance.torch as llt

    if _STATE["exec"] is None:
        _STATE["exec"] = llguidance.LLExecutor()
    bitmask = self._grammar_bitmask
    pairs = []
    for idx, rid in enumerate(ids):
        request = requests[rid]
        grammar = request.structured_output_request.grammar
        if self.should_fill_bitmask(request) and not grammar.is_terminated():
            pairs.append((grammar.ll_matcher, idx))
        else:
            bitmask[idx].fill_(self._full_mask)
    if pairs:
        llt.fill_next_token_bitmask_par(_STATE["exec"], pairs, bitmask)
    n = len(ids)
    return (bitmask[:n] if n < bitmask.shape[0] else bitmask).numpy()


def _bypass_service_patch(manager: Any) -> None:
    """Bind vLLM's own fill methods on this manager, shadowing ``modal_service.engine.vllm_patches``' ones."""
    import types

    from modal_service.engine import vllm_patches

    for name in ("_fill_bitmasks", "_async_submit_fill_bitmask"):
        orig = vllm_patches.ORIGINALS.get(name)
        if orig is not None:
            setattr(manager, name, types.MethodType(orig, manager))


def _switch(manager: Any, mode: str, ctl: dict[str, Any]) -> None:
    """Set up ``manager`` for the vLLM fill modes, or restore what the service runs with."""
    from concurrent.futures import ThreadPoolExecutor

    if mode in {"vllm", "threads"}:
        _bypass_service_patch(manager)
        if mode == "threads":
            manager.fill_bitmask_parallel_threshold = 0
            manager.fill_bitmask_parallel_batch_size = int(ctl.get("batch", 8))
        else:
            manager.fill_bitmask_parallel_threshold = 128
            manager.fill_bitmask_parallel_batch_size = 16
        if getattr(manager, "executor_for_fillmask", None) is None:
            manager.executor_for_fillmask = ThreadPoolExecutor(max_workers=8)
    else:  # service: undo any bypass
        for name in ("_fill_bitmasks", "_async_submit_fill_bitmask"):
            vars(manager).pop(name, None)
        manager.fill_bitmask_parallel_threshold, manager.fill_bitmask_parallel_batch_size = (
            manager._probe_service
        )


def register() -> None:
    """Entry point (``vllm.general_plugins``): wrap the structured-output hot path once per process."""
    if not _dir() or _STATE.get("registered"):
        return
    _STATE["registered"] = True
    start_sampler()
    os.register_at_fork(after_in_child=start_sampler)  # EngineCore forks: threads do not survive it
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.structured_output import StructuredOutputManager
    from vllm.v1.structured_output.backend_guidance import GuidanceGrammar

    orig_bitmask = StructuredOutputManager.grammar_bitmask

    @functools.wraps(orig_bitmask)  # vllm_patches checks the wrapped method's code
    def grammar_bitmask(self: Any, requests: Any, ids: list[str], spec: Any) -> Any:
        ctl = _control()
        mode = ctl.get("mode", "service")
        if "_probe_service" not in vars(self):  # the settings the service runs with
            self._probe_service = (
                self.fill_bitmask_parallel_threshold,
                getattr(self, "fill_bitmask_parallel_batch_size", 16),
            )
        t0 = time.time()
        if (
            mode == "llexec"
            and ids
            and self._grammar_bitmask is not None
            and self.vllm_config.num_speculative_tokens == 0
            and hasattr(requests[ids[0]].structured_output_request.grammar, "ll_matcher")
        ):
            out = _llexec_fill(self, requests, ids)
        else:
            _switch(self, mode, ctl)
            out = orig_bitmask(self, requests, ids, spec)
        t1 = time.time()
        if ids:
            acc, _STATE["acc_ms"] = _STATE["acc_ms"], 0.0
            _record({"k": "bm", "t0": t0, "t1": t1, "n": len(ids), "acc_ms": round(acc, 4), "mode": mode})
        return out

    orig_accept = GuidanceGrammar.accept_tokens

    def accept_tokens(self: Any, request_id: str, tokens: list[int]) -> bool:
        t0 = time.perf_counter()
        try:
            return bool(orig_accept(self, request_id, tokens))
        finally:
            _STATE["acc_ms"] += (time.perf_counter() - t0) * 1000

    def timed_step(orig: Any) -> Any:
        def step(self: Any, *args: Any, **kwargs: Any) -> Any:
            start_sampler()  # in case the fork hook did not run (spawned EngineCore)
            t0 = time.time()
            result = orig(self, *args, **kwargs)
            if result and result[0]:
                t1 = time.time()
                _record({"k": "st", "t1": t1, "dt": round((t1 - t0) * 1000, 4)})
            return result

        return step

    StructuredOutputManager.grammar_bitmask = grammar_bitmask  # type: ignore[method-assign]
    GuidanceGrammar.accept_tokens = accept_tokens  # type: ignore[method-assign]
    EngineCore.step = timed_step(EngineCore.step)  # type: ignore[method-assign]
    EngineCore.step_with_batch_queue = timed_step(  # type: ignore[method-assign]
        EngineCore.step_with_batch_queue
    )
