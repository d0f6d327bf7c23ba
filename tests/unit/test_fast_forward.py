"""Fast-forward's pieces, offline: the forced drafts, the scheduler hook, the step count, the switches.

The grammars are llguidance's over a byte-level tokenizer (every byte one token), wrapped in vLLM's own
``GuidanceGrammar`` as the engine wraps them; the scheduler hook runs on the real
``FastForwardScheduler`` class (vLLM's ``Scheduler`` subclass) with stand-in requests.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from types import SimpleNamespace
from typing import Any

import llguidance
import pytest

from langchain_ananke.protocol import GenerateRequest
from modal_service.engine import fast_forward
from modal_service.engine.engine import Delta, StepCount
from modal_service.engine.generator import Generator, Plan
from modal_service.http.openai_api import chat_to_request
from modal_service.limits import Deadline, Limits
from tests.unit.byte_tokenizer import BYTE_TOKENIZER

backend_guidance = pytest.importorskip("vllm.v1.structured_output.backend_guidance")

SCHEMA = {
    "type": "object",
    "properties": {"id": {"type": "integer"}, "ok": {"type": "boolean"}},
    "required": ["id", "ok"],
    "additionalProperties": False,
}


def _grammar(prefix: str) -> Any:
    spec = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})
    matcher = llguidance.LLMatcher(BYTE_TOKENIZER, spec, log_level=0)
    assert matcher.consume_tokens(list(prefix.encode()))
    return backend_guidance.GuidanceGrammar(ll_matcher=matcher, ll_tokenizer=BYTE_TOKENIZER, vocab_size=257)


def _request(
    prefix: str | None,
    *,
    max_tokens: int = 100,
    outputs: int = 0,
    extra_args: dict[str, Any] | None = None,
    prefill: bool = False,
) -> Any:
    """A stand-in for vLLM's ``Request``: the attributes the scheduler hook and vLLM's own method read."""
    grammar = _grammar(prefix) if prefix is not None else None
    return SimpleNamespace(
        use_structured_output=grammar is not None,
        structured_output_request=SimpleNamespace(grammar=grammar) if grammar is not None else None,
        sampling_params=SimpleNamespace(max_tokens=max_tokens, extra_args=extra_args),
        num_output_tokens=outputs,
        is_prefill_chunk=prefill,
        is_finished=lambda: False,
        spec_token_ids=[],
    )


def _text(tokens: list[int]) -> str:
    return bytes(tokens).decode()


def test_forced_drafts_are_the_bytes_the_grammar_forces() -> None:
    # after the id's value and its comma only "ok" may follow, up to where the value starts
    assert _text(fast_forward.forced_drafts(_request('{"id":12,'), 16)) == '"ok":'
    # at the start the grammar forces '{"id":' (fixed key order, no whitespace)
    assert _text(fast_forward.forced_drafts(_request(""), 16)) == '{"id":'
    # inside a free value nothing is forced
    assert fast_forward.forced_drafts(_request('{"id":1'), 16) == []


def test_forced_drafts_respect_the_step_limit_and_the_budget() -> None:
    assert _text(fast_forward.forced_drafts(_request(""), 3)) == '{"i'
    # 10 of 12 tokens out: one more is sampled anyway, so at most one draft fits the budget
    assert _text(fast_forward.forced_drafts(_request("", max_tokens=12, outputs=10), 16)) == "{"
    assert fast_forward.forced_drafts(_request("", max_tokens=12, outputs=11), 16) == []
    assert fast_forward.forced_drafts(_request(""), 0) == []


def test_no_drafts_for_an_opted_out_unconstrained_or_finished_request() -> None:
    off = _request("", extra_args={fast_forward.EXTRA_ARG: False})
    assert fast_forward.forced_drafts(off, 16) == []
    assert fast_forward.forced_drafts(_request("", extra_args={fast_forward.EXTRA_ARG: True}), 16)
    assert fast_forward.forced_drafts(_request(None), 16) == []
    done = _request('{"id":1,"ok":true}')
    done.structured_output_request.grammar.terminated = True
    assert fast_forward.forced_drafts(done, 16) == []


def test_forced_drafts_stop_before_a_stop_token() -> None:
    # a grammar that names the end-of-sequence token (256) with text after it: "ab" EOS "cd"
    spec = llguidance.LLMatcher.grammar_from_lark('start: "ab" <[256]> "cd"')
    matcher = llguidance.LLMatcher(BYTE_TOKENIZER, spec, log_level=0)
    assert matcher.consume_tokens(list(b"a"))
    assert matcher.compute_ff_tokens() == [98, 256, 99, 100]  # what the grammar forces
    request = _request("")
    request.structured_output_request.grammar = backend_guidance.GuidanceGrammar(
        ll_matcher=matcher, ll_tokenizer=BYTE_TOKENIZER, vocab_size=257
    )
    request.sampling_params.all_stop_token_ids = {256}
    assert _text(fast_forward.forced_drafts(request, 16)) == "b"
    request.sampling_params.all_stop_token_ids = {256, 98}  # a stop_token_ids of the request's own
    assert fast_forward.forced_drafts(request, 16) == []
    request.sampling_params.all_stop_token_ids = set()
    assert fast_forward.forced_drafts(request, 16) == [98, 256, 99, 100]


class _Manager:
    """vLLM's StructuredOutputManager.validate_tokens, for requests whose grammar is the one given."""

    def validate_tokens(self, request: Any, tokens: list[int]) -> list[int]:
        grammar = request.structured_output_request.grammar if request.use_structured_output else None
        return tokens if grammar is None else list(grammar.validate_tokens(tokens))


def _scheduler(requests: dict[str, Any]) -> Any:
    cls = fast_forward.FastForwardScheduler
    scheduler = cls.__new__(cls)  # the hook reads these three attributes only
    scheduler.requests = requests
    scheduler.num_spec_tokens = 4
    scheduler.structured_output_manager = _Manager()
    return scheduler


def test_scheduler_sets_the_forced_tokens_as_drafts() -> None:
    from vllm.v1.outputs import DraftTokenIds

    requests = {
        "json": _request('{"id":12,'),
        "free": _request(None),
        "off": _request('{"id":12,', extra_args={fast_forward.EXTRA_ARG: False}),
        "prefill": _request("", prefill=True),
    }
    scheduler = _scheduler(requests)
    assert issubclass(type(scheduler), fast_forward._scheduler_base())
    scheduler.update_draft_token_ids(DraftTokenIds(list(requests), [[], [7, 8], [], []]))
    assert _text(requests["json"].spec_token_ids) == '"ok"'  # capped at num_spec_tokens
    assert requests["free"].spec_token_ids == [7, 8]  # another proposer's drafts pass through
    assert requests["off"].spec_token_ids == []
    assert requests["prefill"].spec_token_ids == []


def test_scheduler_sets_the_drafts_after_the_step_where_the_round_trip_is_skipped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    requests = {"json": _request('{"id":12,'), "free": _request(None), "prefill": _request("", prefill=True)}
    scheduler = _scheduler(requests)
    base = fast_forward._scheduler_base()
    seen: list[Any] = []
    monkeypatch.setattr(base, "update_from_output", lambda self, out, runner: seen.append(out) or {"k": 1})
    counted: list[Any] = []
    monkeypatch.setattr(fast_forward, "counts_for_stop_strings", lambda *args: counted.append(args))
    step = SimpleNamespace(
        num_scheduled_tokens={"json": 1, "free": 1, "prefill": 8, "gone": 1}, scheduled_spec_decode_tokens={}
    )
    scheduler.drafts_after_output = False  # the engine will ask the worker: the drafts are set then
    assert scheduler.update_from_output(step, None) == {"k": 1}
    assert requests["json"].spec_token_ids == []
    scheduler.drafts_after_output = True
    assert scheduler.update_from_output(step, None) == {"k": 1}
    assert seen == [step, step]
    assert _text(requests["json"].spec_token_ids) == '"ok"'
    assert requests["free"].spec_token_ids == []
    assert requests["prefill"].spec_token_ids == []
    assert counted == []  # no drafts in the step: nothing to send
    step.scheduled_spec_decode_tokens = {"json": [5]}
    scheduler.update_from_output(step, None)
    assert counted == [({"k": 1}, {"json": [5]}, requests)]


def _executor_class(proposer: str) -> tuple[type, Any]:
    """A copy of vLLM's executor class for this engine's config, whose round trip is recorded."""
    from vllm.v1.executor.multiproc_executor import MultiprocExecutor

    calls: list[str] = []
    config = SimpleNamespace(speculative_config=SimpleNamespace(method="custom_class", model=proposer))

    def take_draft_token_ids(self: Any) -> Any:
        calls.append("rpc")
        return "worker drafts"

    cls = type("Executor", (MultiprocExecutor,), {"take_draft_token_ids": take_draft_token_ids})
    executor = cls.__new__(cls)
    executor.vllm_config = config
    return cls, (executor, calls)


def test_no_draft_rpc_answers_for_the_proposer_that_proposes_nothing() -> None:
    cls, (executor, calls) = _executor_class(fast_forward.PROPOSER)
    assert fast_forward.no_draft_rpc_check(cls) is None
    assert fast_forward.patch_no_draft_rpc(cls) == "applied"
    assert fast_forward.patch_no_draft_rpc(cls) == "applied (already)"
    assert executor.take_draft_token_ids() is None
    assert calls == []
    # another proposer (a real draft model) still gets its drafts from the worker
    executor.vllm_config.speculative_config.model = "some.other.Proposer"
    assert executor.take_draft_token_ids() == "worker drafts"
    assert calls == ["rpc"]
    from vllm.v1.executor.multiproc_executor import MultiprocExecutor

    assert not getattr(MultiprocExecutor, fast_forward._RPC_MARK, False)  # vLLM's class is untouched
    assert fast_forward.patch_no_draft_rpc(type("Bare", (), {})) == (
        "not applied: vLLM's Bare has no take_draft_token_ids"
    )


def test_no_draft_rpc_switch_guard_and_status(monkeypatch: pytest.MonkeyPatch) -> None:
    config = SimpleNamespace(speculative_config=SimpleNamespace(method="ngram", model=None))
    assert fast_forward.apply_no_draft_rpc(config) == (
        "not applied: the speculative proposer is not fast-forward's"
    )
    monkeypatch.setenv(fast_forward.NO_DRAFT_RPC_ENV, "0")
    assert fast_forward.apply_no_draft_rpc(config) == "off (ANANKE_FF_NO_DRAFT_RPC=0)"
    fast_forward.engine_kwargs(True)
    assert fast_forward.STATUS["fast_forward"] == "on (no-draft round trip: off (ANANKE_FF_NO_DRAFT_RPC=0))"
    monkeypatch.delenv(fast_forward.NO_DRAFT_RPC_ENV)
    monkeypatch.setattr(fast_forward, "VLLM_RELEASE", "0.0.1")
    assert fast_forward.no_draft_rpc_check().startswith("built for vLLM 0.0.1")  # type: ignore[union-attr]
    monkeypatch.undo()
    monkeypatch.setattr(fast_forward, "no_draft_rpc_check", lambda executor_cls=None: "changed")
    monkeypatch.setattr(fast_forward, "no_draft_sampling_check", lambda runner_cls=None: "moved")
    fast_forward.engine_kwargs(True)
    assert fast_forward.STATUS["fast_forward"] == (
        "on (no-draft sampling: not applied: moved; no-draft round trip: not applied: changed)"
    )


def test_step_counts_from_the_spec_decode_histogram() -> None:
    # 31 tokens: 8 steps, of which steps accepted 4+5+... drafts: histogram[j] = steps accepting j
    metrics = SimpleNamespace(histogram=[1, 2, 0, 3, 0, 2] + [0] * 11)
    accepted = 2 * 1 + 3 * 3 + 2 * 5
    assert fast_forward.step_counts(31, metrics) == (31 - accepted, accepted)
    assert fast_forward.step_counts(31, None) == (31, 0)
    assert fast_forward.step_counts(0, metrics) == (0, 0)
    # a stop string cut the output inside a verified run (3 tokens delivered, 3 drafts accepted in
    # one verifying step): still the first step plus the verifying one
    assert fast_forward.step_counts(3, SimpleNamespace(histogram=[0, 0, 0, 1])) == (2, 1)
    assert fast_forward.step_counts(1, SimpleNamespace(histogram=[0, 0, 0, 1])) == (1, 0)
    # tokens == steps + forced, always
    for tokens in range(1, 40):
        steps, forced = fast_forward.step_counts(tokens, metrics)
        assert steps + forced == tokens
        assert steps >= 1
        assert forced >= 0


def _engine_output(req_id: str, finish: Any = None) -> Any:
    from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs

    return EngineCoreOutputs(
        outputs=[EngineCoreOutput(request_id=req_id, new_token_ids=[1], finish_reason=finish)]
    )


def test_counts_for_stop_strings_reach_the_api_process() -> None:
    from vllm import SamplingParams
    from vllm.v1.engine import FinishReason
    from vllm.v1.metrics.stats import RequestSpecDecodeMetrics

    def request(stop: list[str] | None) -> Any:
        metrics = RequestSpecDecodeMetrics.new(4)
        metrics.observe(num_draft_tokens=3, num_accepted=3)
        return SimpleNamespace(spec_decode_metrics=metrics, sampling_params=SamplingParams(stop=stop))

    requests = {"stop": request(["dark"]), "plain": request(None), "undrafted": request(["x"])}
    outputs = {0: _engine_output("stop"), 1: _engine_output("plain"), 2: _engine_output("undrafted")}
    outputs[0].outputs.append(_engine_output("gone").outputs[0])  # finished and freed this step
    finishing = _engine_output("done", FinishReason.LENGTH)
    outputs[3] = finishing
    fast_forward.counts_for_stop_strings(outputs, {"stop": [5, 6, 7], "plain": [5], "gone": [5]}, requests)

    sent = outputs[0].outputs[0].spec_decode_metrics
    assert sent is not None
    assert sent.histogram == [0, 0, 0, 1, 0]
    # a copy: the next step may change the request's own before this output is serialized
    requests["stop"].spec_decode_metrics.observe(num_draft_tokens=2, num_accepted=2)
    assert sent.histogram == [0, 0, 0, 1, 0]
    # without stop strings the engine's finishing output carries the count, as vLLM sends it
    assert outputs[1].outputs[0].spec_decode_metrics is None
    assert outputs[2].outputs[0].spec_decode_metrics is None  # no drafts this step: count unchanged
    assert outputs[0].outputs[1].spec_decode_metrics is None
    assert finishing.outputs[0].spec_decode_metrics is None

    # a malformed request never fails the step
    fast_forward.counts_for_stop_strings(outputs, {"plain": [5]}, {"plain": SimpleNamespace()})


def test_engine_kwargs_and_status(monkeypatch: pytest.MonkeyPatch) -> None:
    assert fast_forward.check() is None  # the installed vLLM is the release it is built for
    assert fast_forward.engine_kwargs(False) == {}
    assert fast_forward.STATUS["fast_forward"] == "off (--fast-forward off)"
    kwargs = fast_forward.engine_kwargs(True)
    assert fast_forward.STATUS["fast_forward"] == "on"
    assert fast_forward.STATUS["no_draft_sampling"] == "applied"
    assert fast_forward.STATUS["no_draft_rpc"] == "applied"
    assert kwargs["speculative_config"]["method"] == "custom_class"
    assert kwargs["speculative_config"]["model"] == fast_forward.PROPOSER
    assert kwargs["scheduler_cls"] == fast_forward.SCHEDULER
    assert kwargs["per_request_spec_decode_metrics"] == "summary"
    assert kwargs["async_scheduling"] is False
    monkeypatch.setattr(fast_forward, "VLLM_RELEASE", "0.0.1")
    assert fast_forward.engine_kwargs(True) == {}
    assert fast_forward.STATUS["fast_forward"].startswith("not applied: built for vLLM 0.0.1")


def test_class_paths_resolve_and_the_proposer_proposes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    # building the proposer patches vLLM's model runner class: not in this process
    monkeypatch.setenv(fast_forward.NO_DRAFT_SAMPLING_ENV, "0")

    for path in (fast_forward.PROPOSER, fast_forward.SCHEDULER):
        module, name = path.rsplit(".", 1)
        assert getattr(importlib.import_module(module), name) is not None
    assert fast_forward.NoDraftProposer(None).propose([[1], [2, 3]], None, None) == [[], []]


def _runner_class() -> type:
    """A copy of vLLM's model runner class to patch (the real one stays as it is)."""
    base = fast_forward.runner_base()
    return type("Runner", (base,), {"_sample": base._sample})


def test_no_draft_sampling_sends_a_batch_without_drafts_to_the_plain_sampler() -> None:
    import torch
    from vllm.v1.spec_decode.metadata import SpecDecodeMetadata

    runner = _runner_class()
    original = runner._sample  # type: ignore[attr-defined]
    assert fast_forward.no_draft_sampling_check(runner) is None
    assert fast_forward.patch_no_draft_sampling(runner) == "applied"
    assert fast_forward.patch_no_draft_sampling(runner) == "applied (already)"
    assert runner._sample.__wrapped__ is original  # type: ignore[attr-defined]
    assert fast_forward.runner_base()._sample is original  # vLLM's class is untouched

    # a stand-in for vLLM's _sample, with what the check reads: which sampler gets the batch?
    def _sample(self: Any, logits: Any, spec_decode_metadata: Any) -> Any:
        return self.sampler if spec_decode_metadata is None else self.rejection_sampler

    stand_in = type("StandIn", (), {"_sample": _sample, "sampler": "plain", "rejection_sampler": "rejection"})
    assert fast_forward.patch_no_draft_sampling(stand_in) == "applied"
    runner_ = stand_in()
    dummy = SpecDecodeMetadata.make_dummy
    cpu = torch.device("cpu")
    assert runner_._sample(None, dummy([[], [], []], cpu)) == "plain"
    assert runner_._sample(None, dummy([[], [5, 6], []], cpu)) == "rejection"
    assert runner_._sample(None, None) == "plain"

    def other(self: Any, logits: Any) -> Any:
        return self.sampler

    assert fast_forward.patch_no_draft_sampling(type("Other", (), {"_sample": other})) == (
        "not applied: vLLM's model runner _sample takes other arguments"
    )

    def no_rejection(self: Any, logits: Any, spec_decode_metadata: Any) -> Any:
        return self.sampler

    assert fast_forward.patch_no_draft_sampling(type("Other", (), {"_sample": no_rejection})).startswith(
        "not applied: vLLM's model runner _sample no longer picks"
    )


def test_no_draft_sampling_gives_the_rejection_samplers_tokens() -> None:
    """Greedy and seeded-random: the plain sampler on a batch without drafts picks what vLLM's
    rejection sampler picks for it (its bonus token), from the same logits."""
    import torch
    from vllm.v1.sample.logits_processor import LogitsProcessors
    from vllm.v1.sample.metadata import SamplingMetadata
    from vllm.v1.sample.sampler import Sampler

    n, vocab = 4, 97
    logits = torch.randn(n, vocab, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    meta = SamplingMetadata(
        temperature=None, all_greedy=True, all_random=False, top_p=None, top_k=None, generators={},
        max_num_logprobs=None, no_penalties=True, prompt_token_ids=None,
        frequency_penalties=torch.zeros(n), presence_penalties=torch.zeros(n),
        repetition_penalties=torch.ones(n), output_token_ids=[[] for _ in range(n)],
        allowed_token_ids_mask=None, bad_words_token_ids={}, logitsprocs=LogitsProcessors(),
    )  # fmt: skip
    sampler = Sampler()
    plain = sampler(logits=logits.clone(), sampling_metadata=meta).sampled_token_ids
    # the rejection sampler's bonus sampling with no drafts: the same rows, its own options
    from dataclasses import replace

    bonus = sampler(
        logits=logits.clone()[torch.arange(n)],
        sampling_metadata=replace(meta, max_num_logprobs=-1),
        predict_bonus_token=True,
        logprobs_mode_override="raw_logits",
    ).sampled_token_ids
    assert torch.equal(plain, bonus)
    assert plain.view(-1).tolist() == logits.float().argmax(-1).tolist()


def test_no_draft_sampling_switch_and_status(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(fast_forward.NO_DRAFT_SAMPLING_ENV, "0")
    off = "off (ANANKE_FF_NO_DRAFT_SAMPLING=0)"
    assert fast_forward.apply_no_draft_sampling() == off
    fast_forward.engine_kwargs(True)
    assert fast_forward.STATUS["fast_forward"] == f"on (no-draft sampling: {off})"
    monkeypatch.delenv(fast_forward.NO_DRAFT_SAMPLING_ENV)
    copy = _runner_class()
    monkeypatch.setattr(fast_forward, "runner_base", lambda: copy)
    assert fast_forward.apply_no_draft_sampling() == "applied"
    monkeypatch.setattr(fast_forward, "no_draft_sampling_check", lambda runner_cls=None: "changed")
    fast_forward.engine_kwargs(True)
    assert fast_forward.STATUS["fast_forward"] == "on (no-draft sampling: not applied: changed)"
    assert fast_forward.STATUS["no_draft_sampling"] == "not applied: changed"


def test_request_switch_on_both_apis() -> None:
    assert GenerateRequest(prompt="x").fast_forward is None
    assert GenerateRequest(prompt="x", fast_forward=False).fast_forward is False
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    assert chat_to_request(chat | {"fast_forward": False}).fast_forward is False
    assert chat_to_request(chat).fast_forward is None


def test_cli_default_is_on() -> None:
    from modal_service.cli import build_parser

    assert build_parser().parse_args(["serve"]).fast_forward == "on"
    assert build_parser().parse_args(["serve", "--fast-forward", "off"]).fast_forward == "off"


class _Engine:
    """Just what ``Generator.events`` uses without a constraint; records the stream's switch."""

    model_name = "fake"
    switch: bool | None = None

    def __init__(self, steps: StepCount | None) -> None:
        self.steps = steps

    async def stream(self, *_: Any, fast_forward: bool = True, **__: Any) -> AsyncGenerator[Delta, None]:
        self.switch = fast_forward
        yield Delta(text="ab", token_ids=[1, 2], finish_reason=None)
        yield Delta(text="c", token_ids=[3], finish_reason="stop", steps=self.steps)


def _done(engine: _Engine, req: GenerateRequest) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        gen = Generator(engine, Limits())  # type: ignore[arg-type]
        events = [e async for e in gen.events(req, Plan([5], None, False), Deadline(10))]
        assert events[-1].response is not None
        return events[-1].response.metadata

    return asyncio.run(run())


def test_metadata_carries_the_engines_step_count() -> None:
    engine = _Engine(StepCount(decode_steps=2, forced_tokens=1))
    meta = _done(engine, GenerateRequest(prompt="x"))
    assert (meta["decode_steps"], meta["forced_tokens"]) == (2, 1)
    assert engine.switch is True
    _done(engine, GenerateRequest(prompt="x", fast_forward=False))
    assert engine.switch is False
    assert "decode_steps" not in _done(_Engine(None), GenerateRequest(prompt="x"))
