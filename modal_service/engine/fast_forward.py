"""Fast-forward: tokens the grammar forces enter the sequence without a decoding step of their own.

Where a constraint leaves only one way on (``<tool_call>{"name":"``, a tool's name, every key of an
object whose keys are fixed, the closing brackets), llguidance's ``LLMatcher.compute_ff_tokens()``
knows the next tokens before the model runs. They go to vLLM as speculative-decoding drafts, and the
model verifies a whole run of them in one forward pass.

How it is wired: through vLLM's two public extension points, plus two guarded shortcuts (below) that
wrap one vLLM method each, applied only where fast-forward is configured:

- ``speculative_config={"method": "custom_class", "model": PROPOSER}``: vLLM's spec-decode path, with
  :class:`NoDraftProposer`, which proposes nothing. It runs in the model runner, which has no grammar.
- ``scheduler_cls=SCHEDULER``: :class:`FastForwardScheduler`, vLLM's scheduler with one method
  extended. ``update_draft_token_ids`` runs after every step, once ``update_from_output`` has advanced
  each request's grammar by the tokens the step produced; there the scheduler owns the grammars, and
  sets each constrained request's drafts to the tokens its grammar forces next.
- The rejection sampler verifies the drafts against the target distribution under the grammar's mask
  (vLLM computes a mask for every draft position). A forced token is the only token the mask allows,
  so it is accepted; where the grammar forces bytes that more than one tokenization spells, the model
  may prefer another, and then the draft is rejected and the model's own token is used. Either way the
  output is what decoding without drafts gives: at temperature 0 greedy verification accepts a draft
  only where it is the argmax; at a temperature, speculative sampling with a one-token draft keeps the
  distribution.
- A step whose batch has no drafts at all (unconstrained text, requests that opted out, grammars
  forcing nothing) samples as vLLM does without speculative decoding: with a speculative config, vLLM
  sends every batch through its rejection sampler, drafts or not, and that path costs full-vocabulary
  copies of the logits per step (bf16 -> float32 twice, a gather), which at c=64 on the 2-core CPU
  measured 0.89-0.92x the tokens/s of a server without fast-forward. :func:`patch_no_draft_sampling`
  wraps the model runner's ``_sample`` to pass such a batch to the plain sampler (with no drafts, the
  rejection sampler's "bonus" token is the plain sampler's token, from the same logits rows). It is
  applied in the worker process by :class:`NoDraftProposer`'s constructor, so only where fast-forward
  is configured; it checks what it relies on and reports ``not applied: <why>`` in ``/health``'s
  ``fast_forward`` (``on (no-draft sampling: not applied: ...)``) where that is not there.
- Without async scheduling, vLLM's engine asks the worker for its proposer's drafts after every step
  (``take_draft_token_ids``, a round trip through the worker's message queue), then hands them to the
  scheduler. :class:`NoDraftProposer`'s drafts are always empty, so :func:`patch_no_draft_rpc` answers
  that call in the engine process with "no drafts" (the engine then skips the hand-over) and the
  scheduler sets the forced drafts at the end of ``update_from_output`` instead. Measured at c=64
  unconstrained on the 2-core CPU: the round trip took 1.2 % of the engine process's samples. Applied by
  :class:`FastForwardScheduler`'s constructor (the engine process), with the same guard and
  ``not applied`` reporting; ``ANANKE_FF_NO_DRAFT_RPC=0`` keeps the round trip.
- The count comes back through vLLM's per-request spec-decode metrics
  (``per_request_spec_decode_metrics="summary"``): the number of draft tokens accepted. Each step
  produces one token plus the drafts it accepted, so ``decode_steps = tokens - accepted`` and
  ``forced_tokens = accepted`` (:func:`step_counts`). vLLM attaches that count only to the output
  that finishes a request in the engine; for a request with stop strings, which finish in the API
  process, the scheduler sends it with every drafted step's output (:func:`counts_for_stop_strings`).

A request opts out with ``SamplingParams.extra_args[EXTRA_ARG] = False``; the server switches it all
off by not configuring it (``--fast-forward off``): then vLLM runs exactly as without this module.

The scheduler relies on vLLM internals (``Request.structured_output_request.grammar.ll_matcher``,
``Scheduler.update_draft_token_ids``), the sampling shortcut on the model runner's ``_sample``
(:func:`no_draft_sampling_check`); :func:`check` says whether they are there as expected, and
:func:`engine_kwargs` turns fast-forward off, with the reason reported in ``/health``, where they are not.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
from collections.abc import Callable
from typing import Any

from modal_service.engine.release import VLLM_RELEASE

log = logging.getLogger(__name__)

PROPOSER = "modal_service.engine.fast_forward.NoDraftProposer"
SCHEDULER = "modal_service.engine.fast_forward.FastForwardScheduler"
EXTRA_ARG = "ananke_fast_forward"
"""``SamplingParams.extra_args`` key: ``False`` turns fast-forward off for one request."""

MAX_FORCED = 16
"""Drafts per step (vLLM's ``num_speculative_tokens``): the longest forced run one step takes in. A
tool call's forced prefix (``<tool_call>{"name":"get_weather","arguments":{"``) is about this long;
a longer run takes two steps."""

STATUS: dict[str, str] = {}
"""``fast_forward`` -> ``on``, ``on (no-draft sampling: <why not>)``, ``off (--fast-forward off)`` or
``not applied: <why>`` (for ``/health``); ``no_draft_sampling`` -> what :func:`patch_no_draft_sampling`
did or would do (``applied``, ``off (...)``, ``not applied: <why>``)."""

NO_DRAFT_SAMPLING_ENV = "ANANKE_FF_NO_DRAFT_SAMPLING"
"""``0`` keeps vLLM's rejection sampler for batches without drafts (to measure what the shortcut saves)."""
_MARK = "_ananke_no_draft_sampling"
NO_DRAFT_RPC_ENV = "ANANKE_FF_NO_DRAFT_RPC"
"""``0`` keeps the engine's per-step round trip to the worker for the proposer's (empty) drafts."""
_RPC_MARK = "_ananke_no_draft_rpc"


class NoDraftProposer:
    """vLLM custom proposer that proposes nothing: the scheduler sets the drafts (it has the grammars).

    vLLM builds it in the model runner's constructor, in the worker process: there it applies
    :func:`patch_no_draft_sampling` to vLLM's model runner class.
    """

    def __init__(self, vllm_config: Any) -> None:
        self.vllm_config = vllm_config
        status = apply_no_draft_sampling()
        logging.getLogger("vllm.ananke").info("ananke fast-forward no-draft sampling: %s", status)
        if getattr(getattr(vllm_config, "scheduler_config", None), "async_scheduling", False):
            from modal_service.engine import fast_forward_async

            status = fast_forward_async.patch_async_drafts(runner_base())
            logging.getLogger("vllm.ananke").info("ananke fast-forward async drafts: %s", status)
            if not status.startswith("applied"):
                # The engine process checked the same; a runner without it would decode wrong inputs.
                raise RuntimeError(f"fast-forward under async scheduling: {status}")

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        """No draft model."""

    def propose(self, sampled_token_ids: list[list[int]], *args: Any, **kwargs: Any) -> list[list[int]]:
        return [[] for _ in sampled_token_ids]


def constrained_matcher(request: Any, limit: int) -> Any:
    """``request``'s llguidance matcher where fast-forward may draft for it, else None: a positive
    ``limit``, a grammar that is llguidance's and has not ended, and no opt-out."""
    if limit <= 0 or not getattr(request, "use_structured_output", False):
        return None
    params = getattr(request, "sampling_params", None)
    extra = getattr(params, "extra_args", None) or {}
    if extra.get(EXTRA_ARG) is False:
        return None
    structured = getattr(request, "structured_output_request", None)
    grammar = getattr(structured, "grammar", None) if structured is not None else None
    matcher = getattr(grammar, "ll_matcher", None)
    if matcher is None or getattr(grammar, "terminated", False) or matcher.is_stopped():
        return None
    return matcher


def trim_forced(request: Any, tokens: list[int], pending: int = 0) -> list[int]:
    """``tokens`` (forced next, after ``pending`` tokens still to come) cut to what ``request``'s budget
    leaves room for with one token after them, and before any stop token.

    The budget: the scheduler drops tokens past ``max_tokens``, which would make the step count wrong.
    A stop token: a grammar may force one with more after it (``<|im_end|>`` named in a grammar).
    Drafted, the tokens past it would reach vLLM's mask fill after the grammar ended: a rejection
    there leaves llguidance's matcher in its (sticky) error state and vLLM terminates the request. The
    stop token itself comes as a step's own token."""
    params = getattr(request, "sampling_params", None)
    max_tokens = getattr(params, "max_tokens", None)
    if max_tokens is not None:
        tokens = tokens[: max(max_tokens - request.num_output_tokens - pending - 1, 0)]
    stops = getattr(params, "all_stop_token_ids", None)
    if stops:
        for i, token in enumerate(tokens):
            if token in stops:
                return tokens[:i]
    return tokens


def forced_drafts(request: Any, limit: int) -> list[int]:
    """The tokens ``request``'s grammar forces next, at most ``limit``; ``[]`` where there are none, the
    request opted out, or its grammar is not llguidance's. Never more than the request's budget
    leaves after the next token, and never a stop token or what follows it (:func:`trim_forced`)."""
    matcher = constrained_matcher(request, limit)
    if matcher is None:
        return []
    return trim_forced(request, list(matcher.compute_ff_tokens()[:limit]))


def runner_base() -> type:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    return GPUModelRunner


def _off_status(env: str) -> str | None:
    """``off (<env>=0)`` where the environment switches a shortcut off, else None."""
    if os.environ.get(env, "1").strip().lower() in {"0", "false", "no", "off"}:
        return f"off ({env}=0)"
    return None


def release_mismatch() -> str | None:
    """Why the installed vLLM is not the release this module was built for, or None."""
    try:
        import vllm
    except ImportError as exc:
        return f"vLLM internals not importable ({exc})"
    running = str(getattr(vllm, "__version__", ""))
    if running != VLLM_RELEASE:
        return f"built for vLLM {VLLM_RELEASE}, running {running or 'unknown'}"
    return None


def no_draft_sampling_check(runner_cls: type | None = None) -> str | None:
    """Why :func:`patch_no_draft_sampling` cannot apply to the installed vLLM's model runner (or
    ``runner_cls``), or None when it can."""
    if (why := release_mismatch()) is not None:
        return why
    try:
        from vllm.v1.spec_decode.metadata import SpecDecodeMetadata

        cls = runner_cls if runner_cls is not None else runner_base()
    except ImportError as exc:
        return f"vLLM internals not importable ({exc})"
    sample = getattr(cls, "_sample", None)
    if not callable(sample):
        return "vLLM's model runner has no _sample"
    if list(inspect.signature(sample).parameters) != ["self", "logits", "spec_decode_metadata"]:
        return "vLLM's model runner _sample takes other arguments"
    code = getattr(inspect.unwrap(sample), "__code__", None)
    names = set(code.co_names) if code is not None else set()
    if not {"sampler", "rejection_sampler"} <= names:
        return "vLLM's model runner _sample no longer picks between sampler and rejection_sampler"
    post_init = getattr(SpecDecodeMetadata, "__post_init__", None)
    if "max_spec_len" not in getattr(getattr(post_init, "__code__", None), "co_names", ()):
        return "vLLM's SpecDecodeMetadata no longer sets max_spec_len"
    return None


def patch_no_draft_sampling(runner_cls: type) -> str:
    """Make ``runner_cls._sample`` (vLLM's model runner) sample a batch without drafts as vLLM does
    without speculative decoding; returns what happened (``applied``, ``applied (already)``,
    ``not applied: <why>``)."""

    def wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
        def _sample(self: Any, logits: Any, spec_decode_metadata: Any) -> Any:
            return original(self, logits, plain_if_no_drafts(spec_decode_metadata))

        return _sample

    return wrap_method(runner_cls, "_sample", _MARK, lambda: no_draft_sampling_check(runner_cls), wrapper)


def wrap_method(
    cls: type,
    name: str,
    mark: str,
    check_fn: Callable[[], str | None],
    wrapper: Callable[[Callable[..., Any]], Callable[..., Any]],
) -> str:
    """Replace ``cls.<name>`` by ``wrapper(original)`` once, where ``check_fn`` finds nothing against it;
    returns ``applied``, ``applied (already)`` or ``not applied: <why>``."""
    if getattr(cls, mark, False):
        return "applied (already)"
    why = check_fn()
    if why is not None:
        return f"not applied: {why}"
    original: Callable[..., Any] = getattr(cls, name)
    wrapped = wrapper(original)
    wrapped.__wrapped__ = original  # type: ignore[attr-defined]
    setattr(cls, name, wrapped)
    setattr(cls, mark, True)
    return "applied"


def plain_if_no_drafts(spec_decode_metadata: Any) -> Any:
    """``None`` (vLLM's plain sampler) for a batch with no draft tokens, else the metadata as it is.

    With no drafts, vLLM's spec-decode metadata picks one logits row per request, the same rows that
    the path without speculative decoding picks, so the plain sampler sees what the rejection sampler's
    "bonus" sampling would have seen."""
    if spec_decode_metadata is not None and getattr(spec_decode_metadata, "max_spec_len", None) == 0:
        return None
    return spec_decode_metadata


def apply_no_draft_sampling() -> str:
    """Apply :func:`patch_no_draft_sampling` to vLLM's model runner unless switched off; records it."""
    if (off := _off_status(NO_DRAFT_SAMPLING_ENV)) is not None:
        status = off
    else:
        try:
            status = patch_no_draft_sampling(runner_base())
        except ImportError as exc:
            status = f"not applied: vLLM's model runner not importable ({exc})"
    STATUS["no_draft_sampling"] = status
    return status


def _executor_class(vllm_config: Any) -> type:
    from vllm.v1.executor.abstract import Executor

    cls: type = Executor.get_class(vllm_config)
    return cls


def no_draft_rpc_check(executor_cls: type | None = None) -> str | None:
    """Why :func:`patch_no_draft_rpc` cannot apply to the installed vLLM (or to ``executor_cls``), or None
    when it can."""
    if (why := release_mismatch()) is not None:
        return why
    try:
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.engine.core import EngineCore
    except ImportError as exc:
        return f"vLLM internals not importable ({exc})"
    post_step = getattr(getattr(EngineCore, "post_step", None), "__code__", None)
    if post_step is None or not {"take_draft_token_ids", "update_draft_token_ids"} <= set(post_step.co_names):
        return "vLLM's EngineCore.post_step no longer takes the drafts from the executor"
    update = getattr(Scheduler, "update_from_output", None)
    arguments = ["self", "scheduler_output", "model_runner_output"]
    if not callable(update) or list(inspect.signature(update).parameters) != arguments:
        return "vLLM's Scheduler.update_from_output takes other arguments"
    if executor_cls is not None and not callable(getattr(executor_cls, "take_draft_token_ids", None)):
        return f"vLLM's {executor_cls.__name__} has no take_draft_token_ids"
    return None


def _proposes_nothing(vllm_config: Any) -> bool:
    spec = getattr(vllm_config, "speculative_config", None)
    return getattr(spec, "method", None) == "custom_class" and getattr(spec, "model", None) == PROPOSER


def patch_no_draft_rpc(executor_cls: type) -> str:
    """Make ``executor_cls.take_draft_token_ids`` answer "no drafts" without asking the worker where the
    proposer is :class:`NoDraftProposer`; returns what happened (``applied``, ``applied (already)``,
    ``not applied: <why>``)."""

    def wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
        def take_draft_token_ids(self: Any) -> Any:
            if _proposes_nothing(getattr(self, "vllm_config", None)):
                return None
            return original(self)

        return take_draft_token_ids

    return wrap_method(
        executor_cls, "take_draft_token_ids", _RPC_MARK, lambda: no_draft_rpc_check(executor_cls), wrapper
    )


def apply_no_draft_rpc(vllm_config: Any) -> str:
    """Apply :func:`patch_no_draft_rpc` to the engine's executor class unless switched off; records it."""
    if (off := _off_status(NO_DRAFT_RPC_ENV)) is not None:
        status = off
    elif not _proposes_nothing(vllm_config):
        status = "not applied: the speculative proposer is not fast-forward's"
    else:
        try:
            status = patch_no_draft_rpc(_executor_class(vllm_config))
        except (ImportError, ValueError, TypeError) as exc:
            status = f"not applied: vLLM's executor class not resolvable ({exc})"
    STATUS["no_draft_rpc"] = status
    return status


def _scheduler_base() -> type:
    from vllm.v1.core.sched.scheduler import Scheduler

    return Scheduler


def check() -> str | None:
    """Why fast-forward cannot run on the installed vLLM, or None when it can."""
    if (why := release_mismatch()) is not None:
        return why
    try:
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.structured_output.backend_guidance import GuidanceGrammar
    except ImportError as exc:
        return f"vLLM internals not importable ({exc})"
    if not callable(getattr(Scheduler, "update_draft_token_ids", None)):
        return "vLLM's Scheduler has no update_draft_token_ids"
    if "ll_matcher" not in getattr(GuidanceGrammar, "__annotations__", {}):
        return "vLLM's GuidanceGrammar has no ll_matcher"
    try:
        import llguidance
    except ImportError as exc:
        return f"llguidance not importable ({exc})"
    if not callable(getattr(llguidance.LLMatcher, "compute_ff_tokens", None)):
        return "llguidance's LLMatcher has no compute_ff_tokens"
    return None


def engine_kwargs(enabled: bool) -> dict[str, Any]:
    """``AsyncEngineArgs`` keywords that turn fast-forward on (``{}`` when off or not applicable);
    records what happened in :data:`STATUS`."""
    if not enabled:
        STATUS["fast_forward"] = "off (--fast-forward off)"
        return {}
    why = check()
    if why is not None:
        STATUS["fast_forward"] = f"not applied: {why}"
        log.warning("fast-forward not applied: %s", why)
        return {}
    # The worker applies the sampling shortcut and the engine process the round-trip one; the same
    # checks here say whether they will.
    shortcuts = (
        ("no_draft_sampling", "no-draft sampling", NO_DRAFT_SAMPLING_ENV, no_draft_sampling_check),
        ("no_draft_rpc", "no-draft round trip", NO_DRAFT_RPC_ENV, no_draft_rpc_check),
    )
    missing = []
    for key, label, env, check_fn in shortcuts:
        if (state := _off_status(env)) is None:
            reason = check_fn()
            state = "applied" if reason is None else f"not applied: {reason}"
        STATUS[key] = state
        if state != "applied":
            missing.append(f"{label}: {state}")
            log.warning("fast-forward: %s shortcut %s", label, state)
    STATUS["fast_forward"] = f"on ({'; '.join(missing)})" if missing else "on"
    return {
        "speculative_config": {
            "method": "custom_class",
            "model": PROPOSER,
            "num_speculative_tokens": MAX_FORCED,
        },
        "scheduler_cls": SCHEDULER,
        "per_request_spec_decode_metrics": "summary",
        # The drafts are set in update_draft_token_ids, which EngineCore calls only without async
        # scheduling (vLLM turns it off for a custom_class proposer anyway; the CPU platform always).
        "async_scheduling": False,
    }


def step_counts(tokens: int, metrics: Any) -> tuple[int, int]:
    """``(decode_steps, forced_tokens)`` of one engine request that produced ``tokens`` tokens, from
    vLLM's per-request spec-decode metrics (None without fast-forward: one step per token).

    Where a stop string cut the output, the accepted drafts may include tokens past it that the client
    never got; the steps are then at least the verifying steps plus the first (prefill) step, which
    has no drafts."""
    if not tokens:
        return 0, 0
    accepted = verifying = 0
    if metrics is not None:
        histogram = getattr(metrics, "histogram", None) or []
        accepted = sum(j * n for j, n in enumerate(histogram))
        verifying = sum(histogram)
    steps = max(tokens - accepted, min(verifying + 1, tokens), 1)
    return steps, tokens - steps


def counts_for_stop_strings(outputs: Any, drafted: Any, requests: Any) -> None:
    """Send the running spec-decode count with each output of a drafted request that has stop strings.

    vLLM's scheduler attaches a request's count only to the output that finishes it in the engine; a
    stop string finishes it later, in the API process's output processor, which then reports the last
    count it received: none at all, so such a request would report no forced tokens. The API process
    keeps the newest count it gets, so each drafted step's output carries a copy (the output is
    serialized after the next step may have changed the request's own)."""
    try:
        for engine_outputs in outputs.values():
            for out in engine_outputs.outputs:
                if out.finish_reason is not None or out.spec_decode_metrics is not None:
                    continue
                if out.request_id not in drafted:
                    continue
                request = requests.get(out.request_id)
                metrics = getattr(request, "spec_decode_metrics", None)
                if metrics is None or not request.sampling_params.stop:
                    continue
                out.spec_decode_metrics = dataclasses.replace(
                    metrics,
                    histogram=list(metrics.histogram),
                    per_step_accepted=list(metrics.per_step_accepted),
                    per_step_drafted=list(metrics.per_step_drafted),
                )
    except Exception:  # the count is metadata: never fail the step for it
        log.exception("fast-forward: attaching the step count failed")


def __getattr__(name: str) -> Any:
    # The scheduler class is built on first access: importing this module (the API process, the
    # proposer in the model runner) must not import vLLM's scheduler.
    if name == "FastForwardScheduler":
        cls = _build_scheduler()
        globals()[name] = cls
        return cls
    raise AttributeError(name)


def _build_scheduler() -> type:
    base = _scheduler_base()

    class FastForwardScheduler(base):  # type: ignore[valid-type,misc]
        """vLLM's scheduler; after each step, a constrained request's drafts are its forced tokens.

        They are set at the end of ``update_from_output`` where :func:`patch_no_draft_rpc` applies (the
        engine then never calls ``update_draft_token_ids``), else in ``update_draft_token_ids``, after
        vLLM has set the proposer's (empty) drafts."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            status = apply_no_draft_rpc(self.vllm_config)
            self.drafts_after_output = status.startswith("applied")
            logging.getLogger("vllm.ananke").info("ananke fast-forward no-draft round trip: %s", status)

        def update_from_output(self, scheduler_output: Any, model_runner_output: Any) -> Any:
            outputs = super().update_from_output(scheduler_output, model_runner_output)
            if scheduler_output.scheduled_spec_decode_tokens:
                counts_for_stop_strings(outputs, scheduler_output.scheduled_spec_decode_tokens, self.requests)
            if self.drafts_after_output:
                self.set_forced_drafts(scheduler_output.num_scheduled_tokens)
            return outputs

        def update_draft_token_ids(self, draft_token_ids: Any) -> None:
            super().update_draft_token_ids(draft_token_ids)
            self.set_forced_drafts(draft_token_ids.req_ids)

        def set_forced_drafts(self, req_ids: Any) -> None:
            for req_id in req_ids:
                request = self.requests.get(req_id)
                if request is None or request.is_finished() or request.is_prefill_chunk:
                    continue
                try:
                    forced = forced_drafts(request, self.num_spec_tokens)
                except Exception:  # a draft is an optimisation: never fail the step for it
                    log.exception("fast-forward: computing forced tokens failed for %s", req_id)
                    forced = []
                if forced:
                    request.spec_token_ids = forced

    FastForwardScheduler.__module__ = __name__
    FastForwardScheduler.__qualname__ = "FastForwardScheduler"
    return FastForwardScheduler
