"""The pool of fresh llguidance matchers (:mod:`modal_service.constraints.matchers`), with the real model's
tokenizer: a copy it hands out behaves as a newly built matcher, whatever was done to earlier copies."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from modal_service.model_prep import default_model_dir

llguidance = pytest.importorskip("llguidance")
transformers = pytest.importorskip("transformers")

GRAMMAR = 'start: "yes" | "no" | "maybe later"'


@pytest.fixture(scope="module")
def tok() -> Any:
    path = default_model_dir()
    if not (path / "tokenizer.json").exists():
        pytest.skip(f"model not pulled to {path} (make setup)")
    import llguidance.hf

    return llguidance.hf.from_tokenizer(transformers.AutoTokenizer.from_pretrained(str(path)))


def _grammar(lark: str) -> str:
    return llguidance.LLMatcher.grammar_from_lark(lark)


def _verdict(m: Any, tok: Any, text: str) -> tuple[bool, bool]:
    ok = m.consume_tokens(tok.tokenize_str(text))
    return ok, ok and m.is_accepting()


@pytest.mark.parametrize("text", ["yes", "no", "maybe later", "maybe", "nope", "yesno"])
def test_a_copy_answers_as_a_new_matcher(tok: Any, text: str) -> None:
    from modal_service.constraints.matchers import MatcherPool

    pool, grammar = MatcherPool(tok), _grammar(GRAMMAR)
    _verdict(pool.fresh(grammar), tok, "maybe")  # an earlier copy, advanced and left mid-way
    _verdict(pool.fresh(grammar), tok, "nope")  # one left in error
    expected = _verdict(llguidance.LLMatcher(tok, grammar), tok, text)
    assert _verdict(pool.fresh(grammar), tok, text) == expected


def test_copies_are_independent_across_threads(tok: Any) -> None:
    from modal_service.constraints.matchers import MatcherPool

    pool, grammar = MatcherPool(tok), _grammar(GRAMMAR)
    texts = ["yes", "no", "maybe later", "maybe", "nope"] * 40
    expected = {t: _verdict(llguidance.LLMatcher(tok, grammar), tok, t) for t in set(texts)}
    wrong: list[str] = []

    def work(part: list[str]) -> None:
        for t in part:
            if _verdict(pool.fresh(grammar), tok, t) != expected[t]:
                wrong.append(t)

    threads = [threading.Thread(target=work, args=(texts[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


def test_a_grammar_in_error_reads_as_built_and_is_not_kept(tok: Any) -> None:
    from modal_service.constraints.matchers import MatcherPool

    pool, bad = MatcherPool(tok), _grammar("start: undefined_rule")
    built = llguidance.LLMatcher(tok, bad)
    assert built.is_error()
    for _ in range(2):
        m = pool.fresh(bad)
        assert m.is_error()
        assert m.get_error() == built.get_error()
    assert bad not in pool._unused


def test_the_pool_keeps_the_most_recent_grammars(tok: Any) -> None:
    from modal_service.constraints.matchers import MatcherPool

    pool = MatcherPool(tok, size=2)
    grammars = [_grammar(f'start: "{w}"') for w in ("a", "b", "c")]
    for g in grammars:
        pool.fresh(g)
    pool.fresh(grammars[1])  # used again: the most recent
    pool.fresh(_grammar('start: "d"'))
    assert list(pool._unused) == [grammars[1], _grammar('start: "d"')]
