"""The compile cache: a burst of requests with one new constraint compiles it once (single flight)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from modal_service.constraints.compiler import CompiledConstraint, ConstraintCompiler, ConstraintError
from tests.unit.byte_tokenizer import BYTE_TOKENIZER


@pytest.fixture
def compiler() -> ConstraintCompiler:
    return ConstraintCompiler(BYTE_TOKENIZER, vocab_size=257, eos_token_ids=frozenset({256}))


def _burst(compiler: ConstraintCompiler, key: str, build: Any, n: int = 12) -> list[Any]:
    start = threading.Barrier(n)

    def one(_: int) -> Any:
        start.wait()
        try:
            return compiler._cached(key, build)
        except ConstraintError as exc:
            return exc

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def test_concurrent_requests_for_one_key_build_it_once(compiler: ConstraintCompiler) -> None:
    calls: list[int] = []
    result = CompiledConstraint(kind="regex", structured_outputs=None, ll_grammar=None)

    def build() -> CompiledConstraint:
        calls.append(1)
        time.sleep(0.2)  # long enough that every thread asks while it builds
        return result

    out = _burst(compiler, "k", build)
    assert len(calls) == 1
    assert all(compiled is result for compiled, _hit in out)
    assert sorted(hit for _c, hit in out) == [False] + [True] * 11
    assert compiler._building == {}


def test_a_constraint_error_is_shared_and_cached(compiler: ConstraintCompiler) -> None:
    calls: list[int] = []

    def build() -> CompiledConstraint:
        calls.append(1)
        time.sleep(0.1)
        raise ConstraintError("bad schema")

    out = _burst(compiler, "bad", build)
    assert len(calls) == 1
    assert all(isinstance(e, ConstraintError) and e.message == "bad schema" for e in out)
    with pytest.raises(ConstraintError):
        compiler._cached("bad", build)
    assert len(calls) == 1


def test_an_unexpected_failure_wakes_the_waiters_who_then_build_themselves(
    compiler: ConstraintCompiler,
) -> None:
    calls: list[int] = []
    result = CompiledConstraint(kind="regex", structured_outputs=None, ll_grammar=None)

    def build() -> CompiledConstraint:
        calls.append(1)
        time.sleep(0.1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return result

    def one(_: int) -> Any:
        try:
            return compiler._cached("k", build)[0]
        except RuntimeError as exc:
            return exc

    with ThreadPoolExecutor(4) as pool:
        out = list(pool.map(one, range(4)))
    assert sum(isinstance(o, RuntimeError) for o in out) == 1
    assert sum(o is result for o in out) == 3
    assert compiler._building == {}


def test_distinct_keys_build_in_parallel(compiler: ConstraintCompiler) -> None:
    result = CompiledConstraint(kind="regex", structured_outputs=None, ll_grammar=None)
    inside = threading.Barrier(4, timeout=10)  # broken unless all four builds run at once

    def build() -> CompiledConstraint:
        inside.wait()
        return result

    with ThreadPoolExecutor(4) as pool:
        out = list(pool.map(lambda i: compiler._cached(f"k{i}", build), range(4)))
    assert out == [(result, False)] * 4
