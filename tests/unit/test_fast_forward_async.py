"""Fast-forward under async scheduling, offline: the drafts one step late, their check before the mask,
the worker's two wraps and the config's checks.

The grammars are llguidance's over a byte-level tokenizer (every byte one token), wrapped in vLLM's
``GuidanceGrammar``, as in ``test_fast_forward.py``; the wraps run on copies of vLLM's classes. That the
whole path decodes what decoding without drafts gives is the float32 test of
``tests/integration/test_fast_forward.py`` (server ``async``).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from modal_service.engine import fast_forward, fast_forward_async
from tests.unit.test_fast_forward import _request, _text

pytest.importorskip("vllm.v1.structured_output.backend_guidance")


def _in_flight(request: Any, drafts: str | None) -> Any:
    """``request`` with a step in flight that carries ``drafts`` (None: no step in flight)."""
    request.num_output_placeholders = 0 if drafts is None else 1 + len(drafts)
    return request


def _state(request: Any) -> tuple[int, list[int]]:
    matcher = request.structured_output_request.grammar.ll_matcher
    return matcher.validate_tokens(list(b'{"id":1,"ok":true}')), matcher.compute_ff_tokens()


def test_without_a_step_in_flight_the_drafts_are_the_forced_run() -> None:
    request = _in_flight(_request(""), None)
    assert _text(fast_forward_async.lagged_drafts(request, [], 16)) == '{"id":'


def test_the_in_flight_step_takes_the_first_forced_token_and_the_next_step_the_rest() -> None:
    # Nothing drafted in flight, the grammar forces '{"id":' now: the step in flight samples '{', the
    # next one drafts the rest.
    request = _in_flight(_request(""), "")
    before = _state(request)
    assert _text(fast_forward_async.lagged_drafts(request, [], 16)) == '"id":'
    assert _state(request) == before  # the grammar is left as it was


def test_the_in_flight_drafts_count_when_they_are_valid() -> None:
    # In flight: drafts '"ok":' after '{"id":12,'; the step then samples a free token (true/false):
    # nothing is forced after the drafts, so the next step has none.
    request = _in_flight(_request('{"id":12,'), '"ok":')
    assert fast_forward_async.lagged_drafts(request, list(b'"ok":'), 16) == []
    # In flight: drafts '{"id"' (part of the run): the step samples ':', the next drafts nothing more.
    request = _in_flight(_request(""), '{"id"')
    assert fast_forward_async.lagged_drafts(request, list(b'{"id"'), 16) == []
    # In flight: drafts '{"' of a longer forced run: the step's own token is 'i', the next drafts 'd":'.
    request = _in_flight(_request(""), '{"')
    assert _text(fast_forward_async.lagged_drafts(request, list(b'{"'), 16)) == 'd":'


def test_invalid_in_flight_drafts_count_up_to_the_first_invalid_one() -> None:
    # The step in flight drafted '{"x' (a wrong prediction): '{"' is valid, so the prediction goes on
    # from there.
    request = _in_flight(_request(""), '{"x')
    before = _state(request)
    assert _text(fast_forward_async.lagged_drafts(request, list(b'{"x'), 16)) == 'd":'
    assert _state(request) == before


def test_vllms_padding_in_flight_is_not_a_token() -> None:
    # vLLM pads some steps with -1 drafts (a uniform batch shape): the padding and what follows count
    # for nothing.
    request = _in_flight(_request(""), '{"')
    before = _state(request)
    assert _text(fast_forward_async.lagged_drafts(request, [*b'{"', -1, -1], 16)) == 'd":'
    assert _text(fast_forward_async.lagged_drafts(request, [-1] * 16, 16)) == '"id":'
    assert _state(request) == before


def test_the_budget_counts_the_tokens_in_flight() -> None:
    # max_tokens 8, none out yet; in flight: '{"' and the step's own 'i'. Room after that: 8 - 3 - 1
    # (the next step's own token) = 4 drafts of 'd":'.
    request = _in_flight(_request("", max_tokens=8), '{"')
    assert _text(fast_forward_async.lagged_drafts(request, list(b'{"'), 16)) == 'd":'
    request = _in_flight(_request("", max_tokens=5), '{"')
    assert _text(fast_forward_async.lagged_drafts(request, list(b'{"'), 16)) == "d"
    request = _in_flight(_request("", max_tokens=4), '{"')
    assert fast_forward_async.lagged_drafts(request, list(b'{"'), 16) == []


def test_no_drafts_for_opted_out_unconstrained_or_stop_forced_requests() -> None:
    off = _in_flight(_request("", extra_args={fast_forward.EXTRA_ARG: False}), "")
    assert fast_forward_async.lagged_drafts(off, [], 16) == []
    assert fast_forward_async.lagged_drafts(_in_flight(_request(None), ""), [], 16) == []
    # The step in flight's own token would be a stop token: the request ends there.
    request = _in_flight(_request(""), "")
    request.sampling_params.all_stop_token_ids = {ord("{")}
    assert fast_forward_async.lagged_drafts(request, [], 16) == []


def test_draft_checks_pad_from_the_first_invalid_draft() -> None:
    request = _request('{"id":12,')
    manager = SimpleNamespace(
        validate_tokens=lambda req, tokens: tokens[
            : req.structured_output_request.grammar.ll_matcher.validate_tokens(tokens)
        ]
    )
    scheduled = {"a": list(b'"ok":'), "b": list(b'"no":'), "c": [], "gone": list(b"x")}
    invalid = fast_forward_async.draft_checks(
        manager, {"a": request, "b": _request('{"id":12,'), "c": request}, scheduled
    )
    assert invalid == {"b": 4}
    assert scheduled["a"] == list(b'"ok":')
    assert scheduled["b"] == [ord('"'), -1, -1, -1, -1]
    assert scheduled["gone"] == list(b"x")  # a finished request's drafts are left alone


def test_the_scheduler_drafts_one_step_late(monkeypatch: pytest.MonkeyPatch) -> None:
    """The scheduler's three hooks over a stand-in request, vLLM's own parts of them stubbed."""
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler

    monkeypatch.setattr(AsyncScheduler, "_update_after_schedule", lambda self, output: None)
    monkeypatch.setattr(AsyncScheduler, "update_from_output", lambda self, output, runner_output: {})
    monkeypatch.setattr(AsyncScheduler, "get_grammar_bitmask", lambda self, output: "mask")
    cls = fast_forward_async.AsyncFastForwardScheduler
    scheduler = cls.__new__(cls)
    request = _request("")
    request.request_id = "r"
    request.spec_token_ids = [-1] * 4  # AsyncScheduler's placeholders
    scheduler.requests = {"r": request}
    scheduler.running = [request]
    scheduler.num_spec_tokens = 16
    scheduler.structured_output_manager = SimpleNamespace(
        validate_tokens=lambda req, tokens: req.structured_output_request.grammar.validate_tokens(tokens)
    )

    def output(drafts: dict[str, list[int]]) -> Any:
        return SimpleNamespace(num_scheduled_tokens={"r": 1}, scheduled_spec_decode_tokens=drafts)

    # Step 1 (the prompt) is scheduled: no placeholders left for the worker's proposer.
    scheduler._update_after_schedule(output({}))
    assert request.spec_token_ids == []
    # Step 0's output is in (nothing for r), step 1 in flight: it samples '{', step 2 drafts the rest.
    request.num_output_placeholders = 1
    scheduler.update_from_output(output({}), None)
    assert _text(request.spec_token_ids) == '"id":'
    step2 = output({"r": list(request.spec_token_ids)})
    scheduler._update_after_schedule(step2)
    # Step 1's output: '{'. Step 2 in flight with its drafts: after them the integer is free, no drafts.
    request.structured_output_request.grammar.accept_tokens("r", [ord("{")])
    request.num_output_placeholders = 1 + 5
    scheduler.update_from_output(output({}), None)
    assert request.spec_token_ids == []
    # A wrong prediction: the grammar stands where step 2's drafts do not fit (here: where step 1 had
    # not advanced it), so they fail the check before step 2's mask.
    wrong = _request("")
    scheduler.requests["r"] = wrong
    assert scheduler.get_grammar_bitmask(step2) == "mask"
    assert step2.scheduled_spec_decode_tokens["r"] == [-1] * 5
    assert step2.num_invalid_spec_tokens == {"r": 5}


class _Batch(SimpleNamespace):
    pass


def _runner_class() -> type:
    """A copy of vLLM's model runner class, to wrap without touching vLLM's."""
    base = fast_forward.runner_base()
    return type("RunnerCopy", (base,), {"__module__": base.__module__})


def test_the_worker_wraps_check_what_they_rely_on() -> None:
    assert fast_forward_async.runner_check() is None
    cls = _runner_class()
    assert fast_forward_async.patch_async_drafts(cls) == "applied"
    assert fast_forward_async.patch_async_drafts(cls) == "applied (already)"

    class Changed(cls):  # type: ignore[misc,valid-type]
        def _bookkeeping_sync(self, scheduler_output: Any, sampler_output: Any) -> None:  # type: ignore[override]
            pass

    assert (
        fast_forward_async.runner_check(Changed)
        == "vLLM's model runner _bookkeeping_sync takes other arguments"
    )


def _stub_runner(seen: list[Any]) -> type:
    """A copy of vLLM's model runner whose two wrapped methods are stubs of the same signatures."""

    def _prepare_input_ids(
        self: Any, scheduler_output: Any, num_reqs: int, total_num_scheduled_tokens: int, cu_num_tokens: Any
    ) -> None:
        seen.append((self._draft_token_ids, self.input_batch.prev_sampled_token_ids))

    def _bookkeeping_sync(  # noqa: PLR0917 (vLLM's signature)
        self: Any,
        scheduler_output: Any,
        sampler_output: Any,
        logits: Any,
        hidden_states: Any,
        num_scheduled_tokens: int,
    ) -> None:
        seen.append(self.input_batch.prev_sampled_token_ids)

    cls = _runner_class()
    cls._prepare_input_ids = _prepare_input_ids  # type: ignore[attr-defined]
    cls._bookkeeping_sync = _bookkeeping_sync  # type: ignore[attr-defined]
    assert fast_forward_async.patch_async_drafts(cls) == "applied"
    return cls


def test_the_worker_gets_each_requests_last_valid_token_and_count() -> None:
    seen: list[Any] = []
    cls = _stub_runner(seen)
    runner = object.__new__(cls)
    runner.use_async_scheduling = True
    runner.use_async_spec_decode = True
    runner.valid_sampled_token_count_cpu = torch.zeros(4, dtype=torch.int32)
    runner.input_batch = _Batch(prev_sampled_token_ids=None, vocab_size=100)
    # Three requests: two drafts accepted and the bonus; one rejected at the first; no drafts at all.
    sampled = torch.tensor([[5, 6, 7], [8, -1, -1], [9, -1, -1]], dtype=torch.int32)
    runner._bookkeeping_sync(None, SimpleNamespace(sampled_token_ids=sampled), None, None, 3)
    assert seen[0].flatten().tolist() == [7, 8, 9]
    assert runner.valid_sampled_token_count_cpu[:3].tolist() == [3, 1, 1]
    assert runner.valid_sampled_token_count_gpu.tolist() == [3, 1, 1]


def test_the_scheduled_drafts_reach_the_input_ids() -> None:
    seen: list[Any] = []
    runner = object.__new__(_stub_runner(seen))
    runner._draft_token_ids = torch.zeros(3, 16, dtype=torch.int32)  # vLLM's zeros near max_model_len
    runner._draft_token_req_ids = ["a"]
    runner.device = torch.device("cpu")
    runner.input_ids = SimpleNamespace(gpu=torch.zeros(8, dtype=torch.int32))
    runner.input_batch = _Batch(req_ids=["a", "b", "c"], prev_sampled_token_ids=None)
    # a: 1 token, b: 1 + 3 drafts, c: 1 + 2 drafts (cumulative ends 1, 5, 8)
    # c's second draft is vLLM's -1 padding: it stays -1, which vLLM's rejection sampler rejects.
    output = SimpleNamespace(scheduled_spec_decode_tokens={"b": [11, 12, 13], "c": [21, -1]})
    runner._prepare_input_ids(output, 3, 8, [1, 5, 8])
    assert runner.input_ids.gpu.tolist() == [0, 0, 11, 12, 13, 0, 21, -1]
    assert (runner._draft_token_ids, runner._draft_token_req_ids) == (None, None)
    assert seen == [(None, None)]  # vLLM's method ran first, with no proposer drafts to take


def test_the_config_keeps_async_scheduling_only_for_this_scheduler() -> None:
    assert fast_forward_async.config_check() is None
    calls: list[bool] = []

    class Config:
        def __post_init__(self) -> None:  # vLLM's checks, as the CPU platform runs them
            calls.append(self.scheduler_config.async_scheduling)
            self.scheduler_config.async_scheduling = False

    assert fast_forward_async.patch_config_checks(Config) == "applied"
    ours, other = Config(), Config()
    ours.scheduler_config = SimpleNamespace(
        async_scheduling=True, scheduler_cls=fast_forward_async.ASYNC_SCHEDULER
    )
    other.scheduler_config = SimpleNamespace(async_scheduling=True, scheduler_cls=None)
    ours.__post_init__()
    other.__post_init__()
    assert calls == [False, True]  # vLLM's checks see ours with it off, the other as it is
    assert (ours.scheduler_config.async_scheduling, other.scheduler_config.async_scheduling) == (True, False)

    class Changed:
        def __post_init__(self) -> None:
            pass

    assert fast_forward_async.patch_config_checks(Changed).startswith("not applied: ")


def test_choose_says_why_not() -> None:
    assert fast_forward_async.choose(False) is False
    assert fast_forward.STATUS["async_scheduling"] == "off"
    assert fast_forward_async.choose(True) is True
    assert fast_forward.STATUS["async_scheduling"] == "on"


def test_the_health_label_says_what_runs() -> None:
    fast_forward_async.choose(True)
    assert fast_forward_async.label("on", True) == "on (async scheduling)"
    assert (
        fast_forward_async.label("on (no-draft sampling: x)", True)
        == "on (async scheduling; no-draft sampling: x)"
    )
    assert fast_forward_async.label("on", False) == "on"
    assert fast_forward_async.label("off (--fast-forward off)", True) == "off (--fast-forward off)"
    fast_forward.STATUS["async_scheduling"] = "not applied: changed"
    assert fast_forward_async.label("on", True) == "on (async scheduling: not applied: changed)"


def test_configs_that_vllms_async_checks_would_refuse_keep_it_off() -> None:
    def config(pipeline: int, data: int) -> Any:
        return SimpleNamespace(
            parallel_config=SimpleNamespace(pipeline_parallel_size=pipeline, data_parallel_size=data),
            scheduler_config=SimpleNamespace(async_scheduling=False, scheduler_cls=None),
        )

    piped = config(2, 1)
    assert fast_forward_async.finish_config(piped) is False
    assert fast_forward.STATUS["async_scheduling"].startswith("not applied: pipeline parallelism")
    assert piped.scheduler_config.async_scheduling is False
    assert fast_forward_async.config_refusal(config(1, 2)) == "data parallelism (not checked with it)"
