"""Planning threads and the engine's tokenizer: concurrent requests must not make vLLM copy it.

vLLM (0.26-0.32) wraps its tokenizer in a pool of deep copies and deep-copies the whole tokenizer
for a thread that finds the pool empty (~2 s for Qwen2.5's vocabulary, under the GIL). Planning
runs in worker threads, so without turns a burst of requests grew the pool and blocked the event
loop: the first 256-request burst on the H200 waited 25 s (bench/gpu run 4).
"""

from __future__ import annotations

import asyncio
import copy
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from langchain_ananke.protocol import GenerateRequest
from modal_service.engine.engine import Engine, EngineConfig
from modal_service.engine.generator import Generator
from modal_service.limits import Limits
from modal_service.model_prep import default_model_dir


class _ConcurrencyTokenizer:
    """Records how many threads are inside the tokenizer at once."""

    def __init__(self) -> None:
        self.inside = 0
        self.most_inside = 0
        self._lock = threading.Lock()

    def _enter(self) -> None:
        with self._lock:
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
        time.sleep(0.002)  # a real encode releases the GIL too; overlap is likely without turns
        with self._lock:
            self.inside -= 1

    def encode(self, text: str, **_: Any) -> list[int]:
        self._enter()
        return [0] * len(text.split())

    def apply_chat_template(self, messages: list[dict[str, Any]], **_: Any) -> str:
        self._enter()
        return " ".join(str(m["content"]) for m in messages)


def _generator(tokenizer: Any) -> Generator:
    engine = Engine(EngineConfig(model="/nowhere", max_model_len=4096))
    engine.tokenizer, engine.state, engine.compiler = tokenizer, "ok", object()  # type: ignore[assignment]
    return Generator(engine, Limits())


async def _burst(generator: Generator, requests: list[GenerateRequest], workers: int = 16) -> None:
    executor = ThreadPoolExecutor(max_workers=workers)  # as on a 12-core host: min(32, cpus + 4)
    asyncio.get_running_loop().set_default_executor(executor)
    try:
        await asyncio.gather(*(generator.aplan(r) for r in requests))
    finally:
        executor.shutdown(wait=False)


@pytest.mark.parametrize(
    "fields",
    [
        {"prompt": "List the records."},
        {"prompt": ["one prompt", "another prompt", "a third"]},
        {"messages": [{"role": "user", "content": "List the records."}]},
    ],
)
async def test_planning_threads_take_turns_at_the_tokenizer(fields: dict[str, Any]) -> None:
    tokenizer = _ConcurrencyTokenizer()
    generator = _generator(tokenizer)
    await _burst(generator, [GenerateRequest.model_validate(fields) for _ in range(48)])
    assert tokenizer.most_inside == 1


async def test_burst_makes_no_copies_of_vllms_tokenizer_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real pool (vLLM's ``maybe_make_thread_pool``, as its renderer sets it up: 2 copies) around
    the real SmolLM2 tokenizer; each use holds its copy a little longer, as a long prompt would."""
    vllm_hf = pytest.importorskip("vllm.tokenizers.hf")
    from transformers import AutoTokenizer

    model = default_model_dir()
    if not (model / "tokenizer.json").exists():
        pytest.skip(f"no tokenizer at {model} (ananke prepare-model)")
    tokenizer = AutoTokenizer.from_pretrained(model)
    slow_encode = type(tokenizer).encode

    def encode(self: Any, *args: Any, **kwargs: Any) -> Any:
        time.sleep(0.002)
        return slow_encode(self, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "encode", encode)
    vllm_hf.maybe_make_thread_pool(tokenizer, 2)
    copies = []

    def counting_deepcopy(value: Any, *args: Any) -> Any:
        copies.append(type(value).__name__)
        return copy.deepcopy(value, *args)

    shim = type("_Copy", (), {"deepcopy": staticmethod(counting_deepcopy), "copy": staticmethod(copy.copy)})
    monkeypatch.setattr(vllm_hf, "copy", shim)
    generator = _generator(tokenizer)
    await _burst(generator, [GenerateRequest(prompt=f"Request {i}. List the records.") for i in range(64)])
    assert copies == []
