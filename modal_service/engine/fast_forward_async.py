"""Fast-forward under async scheduling: the forced drafts arrive one step late.

vLLM 0.32 turns async scheduling off for a ``custom_class`` proposer, and on the GPU that, not the
fast-forward path, is what fast-forward cost (an H100, the 32B shape, unconstrained text at 64
concurrent: 0.833 of the app's setting, against 0.837 for the app with async scheduling off alone;
BENCHMARKS.md section 8). Under async scheduling the scheduler plans step S while step S-1 is still on
the GPU, so it knows each grammar only up to the tokens of step S-2. The drafts below are what that
knowledge allows:

- The step in flight (S-1) carries drafts ``D`` (at most :data:`~.fast_forward.MAX_FORCED`) and samples
  one more token. Forced drafts are the only tokens the mask allows, so the scheduler predicts that
  the step accepts the part of ``D`` that is valid in the grammar's state, and that its own token is
  the first token the grammar forces after that, if it forces one.
- Then step S drafts the rest of that forced run. If the grammar forces nothing after ``D``, the
  step in flight samples a free token and S has no drafts; the step after it samples the run's first
  token, and the step after that takes the rest. A run of k forced tokens costs two steps instead of
  the one it costs without async scheduling (k without fast-forward).
- A prediction can be wrong (the model may spell forced bytes with other tokens). Before step S's
  mask is computed, once step S-1's tokens are known, every draft is checked against the grammar
  (``validate_tokens``); from the first invalid one on the scheduler's copy becomes vLLM's ``-1``
  padding, so the mask is filled only along the valid drafts. The worker already has step S and
  verifies the drafts it was sent: the mask row of the first invalid one excludes it, so it is
  rejected and the model's own token under the mask is kept. As for any draft, the output is what
  decoding without drafts gives, and a wrong prediction costs compute, never output.

What runs where:

- :class:`AsyncFastForwardScheduler` (the engine process): vLLM's ``AsyncScheduler``, which gives every
  scheduled request ``-1`` placeholders that the worker's own proposer fills. Here the scheduler has
  the drafts, so it schedules them instead, after each step's output (``update_from_output``), and
  checks them before the deferred mask of the next step (``get_grammar_bitmask``).
- :func:`patch_async_drafts` (the worker, applied by ``NoDraftProposer``): vLLM's model runner has no
  async path for a proposer that is not on the GPU. It wraps two of its methods: ``_prepare_input_ids``
  writes the scheduled drafts into the GPU's input ids (under async scheduling the runner takes them
  from its proposer's GPU tensor, which this proposer does not have), and ``_bookkeeping_sync`` gives
  the runner, for a batch with drafts, the last valid token of each request and the count of valid
  tokens, as vLLM's GPU drafters do (the next step's input and the correction of positions where a
  draft was rejected).
- :func:`finish_config` turns async scheduling on in the engine's ``VllmConfig`` after vLLM's checks
  (which refuse it with a ``custom_class`` proposer, and which the CPU platform always turns off).

Each wrap checks what it relies on and reports ``not applied: <why>``; where anything is missing, the
engine runs fast-forward without async scheduling (:func:`check`).

It is opt-in (``ananke serve --fast-forward async``, ``EngineConfig.fast_forward_async``): on the CPU
its output is checked byte for byte against decoding without drafts (vLLM's CPU platform never
schedules asynchronously on its own, so the CPU gains nothing from it); what it gives on a GPU, where
async scheduling pays, has not been measured yet (bench/gpu: engines ``32b-ab-ffa`` and ``32b-ffa``).
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Sequence
from typing import Any

from modal_service.engine import fast_forward as ff

log = logging.getLogger(__name__)

ASYNC_SCHEDULER = "modal_service.engine.fast_forward_async.AsyncFastForwardScheduler"
_MARK = "_ananke_async_drafts"
_IN_FLIGHT = "_ananke_in_flight_drafts"
"""Attribute of vLLM's ``Request``: the drafts of its step in flight (set at scheduling)."""

_RUNNER_METHODS = {
    "_prepare_input_ids": [
        "self",
        "scheduler_output",
        "num_reqs",
        "total_num_scheduled_tokens",
        "cu_num_tokens",
    ],
    "_bookkeeping_sync": [
        "self",
        "scheduler_output",
        "sampler_output",
        "logits",
        "hidden_states",
        "num_scheduled_tokens",
    ],
}


def lagged_drafts(request: Any, in_flight: Sequence[int], limit: int) -> list[int]:
    """The drafts of ``request``'s next step, scheduled while its step with drafts ``in_flight`` runs.

    Where no step is in flight (``request.num_output_placeholders == 0``), what the grammar forces now,
    as without async scheduling. Otherwise the forced run after the in-flight step's valid drafts, less
    its first token, which the in-flight step samples itself. The grammar is left as it was."""
    matcher = ff.constrained_matcher(request, limit)
    if matcher is None:
        return []
    if getattr(request, "num_output_placeholders", 0) <= 0:
        return ff.forced_drafts(request, limit)
    # vLLM pads some steps with -1 drafts (a uniform batch shape): they and what follows are not tokens.
    tokens = list(in_flight)
    if -1 in tokens:
        tokens = tokens[: tokens.index(-1)]
    valid = tokens[: matcher.validate_tokens(tokens)] if tokens else []
    consumed = matcher.try_consume_tokens(valid) if valid else 0
    try:
        if consumed != len(valid):
            return []
        forced = list(matcher.compute_ff_tokens()[: limit + 1])
    finally:
        if consumed:
            matcher.rollback(consumed)
    # The in-flight step yields its valid drafts and one token: the first forced one.
    forced = ff.trim_forced(request, forced, pending=len(valid))
    return forced[1:]


def draft_checks(manager: Any, requests: Any, scheduled: dict[str, list[int]]) -> dict[str, int]:
    """Replace each scheduled draft list's part that the grammar rejects (from the first invalid token
    on) by ``-1`` padding, in place; returns the number replaced per request (vLLM's
    ``num_invalid_spec_tokens``)."""
    invalid: dict[str, int] = {}
    for req_id, drafts in scheduled.items():
        request = requests.get(req_id)
        if request is None or not drafts or not getattr(request, "use_structured_output", False):
            continue
        valid = manager.validate_tokens(request, list(drafts))
        if len(valid) < len(drafts):
            invalid[req_id] = len(drafts) - len(valid)
            scheduled[req_id] = list(valid) + [-1] * invalid[req_id]
    return invalid


def _build_scheduler() -> type:
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler

    class AsyncFastForwardScheduler(AsyncScheduler):
        """vLLM's async scheduler with the grammar's forced tokens as drafts, one step late."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            status = ff.apply_no_draft_rpc(self.vllm_config)
            logging.getLogger("vllm.ananke").info(
                "ananke fast-forward (async) no-draft round trip: %s", status
            )

        def _update_after_schedule(self, scheduler_output: Any) -> None:
            super()._update_after_schedule(scheduler_output)
            scheduled = scheduler_output.scheduled_spec_decode_tokens
            for req_id in scheduler_output.num_scheduled_tokens:
                request = self.requests[req_id]
                # No placeholders for the worker's proposer: the drafts are set after the step's output.
                request.spec_token_ids = []
                setattr(request, _IN_FLIGHT, scheduled.get(req_id, ()))

        def update_from_output(self, scheduler_output: Any, model_runner_output: Any) -> Any:
            outputs = super().update_from_output(scheduler_output, model_runner_output)
            if scheduler_output.scheduled_spec_decode_tokens:
                ff.counts_for_stop_strings(
                    outputs, scheduler_output.scheduled_spec_decode_tokens, self.requests
                )
            for request in self.running:
                if request.is_finished() or request.is_prefill_chunk:
                    continue
                try:
                    drafts = lagged_drafts(request, getattr(request, _IN_FLIGHT, ()), self.num_spec_tokens)
                except Exception:  # a draft is an optimisation: never fail the step for it
                    log.exception("fast-forward: computing forced tokens failed for %s", request.request_id)
                    drafts = []
                # Set even when empty: drafts left from an earlier output assumed another step in flight.
                request.spec_token_ids = drafts
            return outputs

        def get_grammar_bitmask(self, scheduler_output: Any) -> Any:
            scheduled = scheduler_output.scheduled_spec_decode_tokens
            if scheduled:
                invalid = draft_checks(self.structured_output_manager, self.requests, scheduled)
                if invalid:
                    scheduler_output.num_invalid_spec_tokens = invalid
            return super().get_grammar_bitmask(scheduler_output)

    AsyncFastForwardScheduler.__module__ = __name__
    AsyncFastForwardScheduler.__qualname__ = "AsyncFastForwardScheduler"
    return AsyncFastForwardScheduler


def __getattr__(name: str) -> Any:
    # Built on first access, as fast_forward.FastForwardScheduler: importing this module must not
    # import vLLM's scheduler. The engine's config carries the class itself, so a spawned EngineCore
    # builds it (and patches the config's checks) when it unpickles the config, before vLLM checks it.
    if name == "AsyncFastForwardScheduler":
        status = patch_config_checks()
        ff.STATUS["config_checks"] = status
        logging.getLogger("vllm.ananke").info("ananke fast-forward (async) config checks: %s", status)
        cls = _build_scheduler()
        globals()[name] = cls
        return cls
    raise AttributeError(name)


_CONFIG_MARK = "_ananke_async_fast_forward"


def _ours(vllm_config: Any) -> bool:
    cls = getattr(getattr(vllm_config, "scheduler_config", None), "scheduler_cls", None)
    if isinstance(cls, str):
        return cls == ASYNC_SCHEDULER
    return f"{getattr(cls, '__module__', '')}.{getattr(cls, '__qualname__', '')}" == ASYNC_SCHEDULER


def _config_class() -> type:
    from vllm.config import VllmConfig

    return VllmConfig


def config_check(config_cls: type | None = None) -> str | None:
    """Why :func:`patch_config_checks` cannot apply to the installed vLLM (or ``config_cls``), or None."""
    if (why := ff.release_mismatch()) is not None:
        return why
    try:
        cls: Any = config_cls if config_cls is not None else _config_class()
    except ImportError as exc:
        return f"vLLM internals not importable ({exc})"
    code = getattr(inspect.unwrap(cls.__post_init__), "__code__", None)
    if code is None or "async_scheduling" not in code.co_names:
        return "vLLM's VllmConfig.__post_init__ no longer decides async scheduling"
    return None


def patch_config_checks(config_cls: type | None = None) -> str:
    """Let a config with :class:`AsyncFastForwardScheduler` keep async scheduling through vLLM's
    checks (``VllmConfig.__post_init__``, which EngineCore runs again after its handshake): they run
    with it off, and it is turned back on after them. Other configs are checked as they are."""
    cls = config_cls if config_cls is not None else _config_class()

    def wrapper(original: Any) -> Any:
        def __post_init__(self: Any) -> None:
            ours = _ours(self)
            if ours:
                self.scheduler_config.async_scheduling = False
            original(self)
            if ours:
                self.scheduler_config.async_scheduling = True

        return __post_init__

    return ff.wrap_method(cls, "__post_init__", _CONFIG_MARK, lambda: config_check(cls), wrapper)


def runner_check(runner_cls: type | None = None) -> str | None:
    """Why :func:`patch_async_drafts` cannot apply to the installed vLLM's model runner (or
    ``runner_cls``), or None when it can."""
    if (why := ff.release_mismatch()) is not None:
        return why
    try:
        cls: Any = runner_cls if runner_cls is not None else ff.runner_base()
    except ImportError as exc:
        return f"vLLM internals not importable ({exc})"
    for name, parameters in _RUNNER_METHODS.items():
        method = getattr(cls, name, None)
        if not callable(method) or list(inspect.signature(method).parameters) != parameters:
            return f"vLLM's model runner {name} takes other arguments"
    code = getattr(inspect.unwrap(cls._prepare_input_ids), "__code__", None)
    if code is None or not {"_draft_token_ids", "prev_sampled_token_ids"} <= set(code.co_names):
        return "vLLM's model runner _prepare_input_ids no longer fills drafts from its proposer"
    if not callable(getattr(cls, "_copy_valid_sampled_token_count", None)):
        return "vLLM's model runner has no _copy_valid_sampled_token_count"
    return None


def _set_valid_counts(runner: Any, next_tokens: Any, counts: Any) -> None:
    """What vLLM's GPU drafters hand the runner after sampling: each request's last valid token (the
    next step's input) and its count of valid tokens (the correction where a draft was rejected)."""
    if next_tokens.device.type == "cuda":
        runner._copy_valid_sampled_token_count(next_tokens, counts)
        return
    # The CPU runner (tests): the same, without CUDA streams.
    if runner.valid_sampled_token_count_cpu is not None:
        runner.valid_sampled_token_count_cpu[: counts.shape[0]].copy_(counts)
    if runner.use_async_spec_decode:
        runner.valid_sampled_token_count_gpu = counts
    runner.input_batch.prev_sampled_token_ids = next_tokens.unsqueeze(1)


def patch_async_drafts(runner_cls: type) -> str:
    """Wrap ``runner_cls._prepare_input_ids`` and ``_bookkeeping_sync`` (see the module's docstring);
    returns ``applied``, ``applied (already)`` or ``not applied: <why>``."""
    import torch

    def prepare_wrapper(prepare: Any) -> Any:
        def _prepare_input_ids(
            self: Any,
            scheduler_output: Any,
            num_reqs: int,
            total_num_scheduled_tokens: int,
            cu_num_tokens: Any,
        ) -> None:
            # This proposer never has drafts of its own (its lists are empty, and vLLM puts a zeros tensor
            # there near max_model_len): nothing to scatter from it, nor to take for penalties.
            self._draft_token_ids = None
            self._draft_token_req_ids = None
            prepare(self, scheduler_output, num_reqs, total_num_scheduled_tokens, cu_num_tokens)
            scheduled = scheduler_output.scheduled_spec_decode_tokens
            if not scheduled:
                return
            positions: list[int] = []
            tokens: list[int] = []
            for index, req_id in enumerate(self.input_batch.req_ids[:num_reqs]):
                drafts = scheduled.get(req_id)
                if drafts:
                    end = int(cu_num_tokens[index])
                    positions.extend(range(end - len(drafts), end))
                    # As they are: vLLM's -1 padding stays -1 here (its rejection sampler rejects it, and
                    # the embedding lookup clamps it later), as in the input ids vLLM builds itself.
                    tokens.extend(drafts)
            if positions:
                pin = self.device.type == "cuda"
                where = torch.tensor(positions, dtype=torch.int64, pin_memory=pin)
                values = torch.tensor(tokens, dtype=self.input_ids.gpu.dtype, pin_memory=pin)
                self.input_ids.gpu.index_copy_(
                    0, where.to(self.device, non_blocking=True), values.to(self.device, non_blocking=True)
                )

        return _prepare_input_ids

    def bookkeeping_wrapper(bookkeeping: Any) -> Any:
        def _bookkeeping_sync(self: Any, scheduler_output: Any, sampler_output: Any, *rest: Any) -> Any:
            sampled = sampler_output.sampled_token_ids
            batch = self.input_batch
            if self.use_async_scheduling and batch.prev_sampled_token_ids is None and sampled.shape[-1] > 1:
                valid = (sampled >= 0) & (sampled < batch.vocab_size)
                counts = valid.sum(dim=1, dtype=torch.int32)
                last = (counts.to(torch.int64) - 1).clamp(min=0).unsqueeze(1)
                next_tokens = sampled.gather(1, last).squeeze(1).clamp(min=0).to(torch.int32)
                _set_valid_counts(self, next_tokens, counts)
            return bookkeeping(self, scheduler_output, sampler_output, *rest)

        return _bookkeeping_sync

    check = functools.partial(runner_check, runner_cls)
    statuses = [
        ff.wrap_method(runner_cls, name, f"{_MARK}{name}", check, wrapper)
        for name, wrapper in (
            ("_prepare_input_ids", prepare_wrapper),
            ("_bookkeeping_sync", bookkeeping_wrapper),
        )
    ]
    return statuses[0] if len(set(statuses)) == 1 else "; ".join(statuses)


def check() -> str | None:
    """Why fast-forward cannot run under async scheduling here, or None when it can."""
    if (why := runner_check()) is not None:
        return why
    try:
        from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    except ImportError as exc:
        return f"vLLM internals not importable ({exc})"
    if (why := config_check()) is not None:
        return why
    for name in ("_update_after_schedule", "update_from_output", "get_grammar_bitmask"):
        if not callable(getattr(AsyncScheduler, name, None)):
            return f"vLLM's AsyncScheduler has no {name}"
    try:
        import llguidance
    except ImportError as exc:
        return f"llguidance not importable ({exc})"
    for name in ("validate_tokens", "consume_tokens", "rollback"):
        if not callable(getattr(llguidance.LLMatcher, name, None)):
            return f"llguidance's LLMatcher has no {name}"
    return None


def choose(requested: bool) -> bool:
    """Whether fast-forward runs under async scheduling (``EngineConfig.fast_forward_async``); records
    why not in ``fast_forward.STATUS["async_scheduling"]``."""
    if not requested:
        status = "off"
    elif (why := check()) is not None:
        status = f"not applied: {why}"
        log.warning("fast-forward under async scheduling not applied: %s", why)
    else:
        status = "on"
    ff.STATUS["async_scheduling"] = status
    return status == "on"


def label(status: str, requested: bool) -> str:
    """``/health``'s ``fast_forward``: fast-forward's ``status`` with what :func:`choose` decided, where
    fast-forward runs and async scheduling was asked for (``on (async scheduling)``, ``on (async
    scheduling: not applied: <why>)``, each with the shortcuts' notes after a ``;``)."""
    if not requested or not status.startswith("on"):
        return status
    state = ff.STATUS.get("async_scheduling", "off")
    mine = "async scheduling" if state == "on" else f"async scheduling: {state}"
    notes = status.removeprefix("on").strip().removeprefix("(").removesuffix(")")
    return f"on ({mine}; {notes})" if notes else f"on ({mine})"


def config_refusal(vllm_config: Any) -> str | None:
    """What in ``vllm_config`` vLLM's async checks would refuse, of the checks :func:`patch_config_checks`
    lets pass by (it runs them all with async scheduling off), or None."""
    from vllm.v1.executor.abstract import Executor

    parallel = vllm_config.parallel_config
    if parallel.pipeline_parallel_size > 1:
        return "pipeline parallelism (vLLM's V1 model runner has no async scheduling with it)"
    if parallel.data_parallel_size > 1:
        return "data parallelism (not checked with it)"
    executor = Executor.get_class(vllm_config)
    if not executor.supports_async_scheduling():
        return f"vLLM's {executor.__name__} has no async scheduling"
    return None


def finish_config(vllm_config: Any) -> bool:
    """Turn async scheduling on with :class:`AsyncFastForwardScheduler` in ``vllm_config`` (built with
    fast-forward's engine keywords and async scheduling off); False, with the reason in
    ``fast_forward.STATUS["async_scheduling"]``, where :func:`config_refusal` finds one (the config is
    then left as it is: fast-forward without async scheduling)."""
    import sys

    if (why := config_refusal(vllm_config)) is not None:
        ff.STATUS["async_scheduling"] = f"not applied: {why}"
        log.warning("fast-forward under async scheduling not applied: %s", why)
        return False
    scheduler = vllm_config.scheduler_config
    scheduler.async_scheduling = True
    scheduler.scheduler_cls = sys.modules[__name__].AsyncFastForwardScheduler
    return True
