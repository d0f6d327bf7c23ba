"""The loop guard's detector (:func:`modal_service.constraints.loops.find_loop`) on token ids.

``decode`` here maps each id to a character: ids below 100 are digits or letters, ``QUOTE`` is ``"``.
"""

from __future__ import annotations

import random

from modal_service.constraints.loops import DEFAULT_SPAN, MAX_PERIOD, find_loop

QUOTE = 999


def decode(ids: list[int]) -> str:
    return "".join('"' if t == QUOTE else chr(48 + t % 60) for t in ids)


def test_an_exact_repetition_is_found_where_it_began() -> None:
    prefix = [50, 51, QUOTE, 52]
    unit = [1, 2, 3, 4, 5]
    tokens = prefix + unit * 20
    loop = find_loop(tokens, decode)
    assert loop is not None
    assert loop.period == 5
    assert loop.start == len(prefix)
    assert loop.cut == len(prefix) + 5  # keeps everything before the loop and one unit
    assert loop.share == 1.0


def test_the_shortest_period_wins() -> None:
    loop = find_loop([7] * 80, decode)
    assert loop is not None
    assert loop.period == 1


def test_a_counter_inside_one_value_is_a_loop() -> None:
    # "_1 2 3", "_1 2 4", ...: one token in four changes, no quote in the stretch
    tokens = [50, QUOTE]
    for i in range(40):
        tokens += [10, 1, 2, i % 10]
    loop = find_loop(tokens, decode)
    assert loop is not None
    assert loop.period == 4
    assert 0.7 <= loop.share < 0.95
    assert loop.start <= 4  # followed back to where it began, not just the examined tail


def test_across_values_only_a_nearly_exact_repetition_counts() -> None:
    # '"ar", "az", "be", ...': a list of distinct codes shares 80 % of its tokens with the previous
    # item, like the counter above, but the stretch crosses strings: legitimate, left alone.
    rng = random.Random(0)
    tokens = [50]
    for _ in range(30):
        tokens += [QUOTE, rng.randrange(60, 99), QUOTE, 11, 12]
    assert find_loop(tokens, decode) is None
    # The same record again and again is a loop even across strings.
    record = [QUOTE, 61, QUOTE, 11, 12]
    loop = find_loop([50] + record * 30, decode)
    assert loop is not None
    assert loop.period == 5


def test_short_or_varied_output_is_left_alone() -> None:
    assert find_loop([1, 2, 3] * 10, decode) is None  # 30 tokens: shorter than the span
    assert find_loop([1, 2] * DEFAULT_SPAN, decode, span=0) is None  # span 0: the guard is off
    rng = random.Random(1)
    varied = [rng.randrange(60) for _ in range(400)]
    assert find_loop(varied, decode) is None


def test_periods_longer_than_the_limit_are_not_loops() -> None:
    rng = random.Random(2)
    unit = [rng.randrange(60) for _ in range(MAX_PERIOD + 3)]
    assert find_loop(unit * 8, decode) is None


def test_the_guard_checks_the_same_positions_however_the_tokens_arrive() -> None:
    """Fast-forward hands the generator several tokens at once; the guard still looks at every
    GUARD_EVERY-th token exactly, so on and off meet the same verdict at the same token."""
    import asyncio
    from typing import Any

    from modal_service.engine.generator import GUARD_EVERY, Generator

    looked: list[list[int]] = []

    class Probe(Generator):
        def __init__(self) -> None:  # no engine: only the checkpoint walk is under test
            pass

        async def _guard(self, req: Any, plan: Any, token_ids: list[int], span: int, sent: int) -> Any:
            looked.append(list(token_ids))
            if len(token_ids) == 3 * GUARD_EVERY:
                return {"fired": True}, ("x", token_ids, {})
            return None, None

    tokens = list(range(5 * GUARD_EVERY + 3))

    def walk(chunks: list[int]) -> tuple[list[list[int]], int]:
        looked.clear()
        probe, checked, seen = Probe(), 0, 0
        for end in chunks:
            seen = end
            upto = probe._guard_upto(None, None, tokens[:seen], checked, 48, 0)  # type: ignore[arg-type]
            checked, guard, _closed = asyncio.run(upto)
            if guard is not None:
                break
        return list(looked), seen

    one_by_one, stopped_one = walk(list(range(1, len(tokens) + 1)))
    chunked, stopped_chunked = walk([5, 13, 30, len(tokens)])  # forced runs of several tokens
    assert one_by_one == chunked
    assert [len(t) for t in chunked] == [GUARD_EVERY, 2 * GUARD_EVERY, 3 * GUARD_EVERY]
    assert (stopped_one, stopped_chunked) == (3 * GUARD_EVERY, 30)  # the verdict at token 24 either way
