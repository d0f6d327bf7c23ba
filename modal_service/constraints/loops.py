"""The loop guard's detector: a runaway repetition at the end of an output.

At temperature 0 a small model can loop inside a value the grammar allows: an identifier filled with
``a_l_123_124_125_...``, a number of endless zeros, a list that repeats one record. The grammar cannot
object (each token is legal), so the output runs to its length cap. :func:`find_loop` spots such a
stretch while it is being written: over the last ``span`` tokens, nearly every token equals the token
``period`` places before it. The generator then stops the engine and finishes the structure from the
start of the repetition with the closing search (:mod:`modal_service.constraints.closing`); the
response's ``metadata.loop_guard`` says so.

Two bars, because legitimate JSON repeats itself too (a list of language codes, properties that all
read ``{"type": "string"}``):

- inside one value (the stretch has no ``"``: one string or one number), 70 % of the tokens must
  match, so a counter that changes one token in four still counts;
- across values and keys, 95 %: the same unit, nearly exactly, over and over.

The test is on token ids (plus one decode of a candidate stretch) and costs ``MAX_PERIOD * span``
comparisons; callers run it every few tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

#: Longest repeated unit, in tokens.
MAX_PERIOD = 16
#: Share of the examined tokens that must equal the token one period before: inside one value, and
#: across values.
IN_VALUE_SHARE = 0.7
ACROSS_SHARE = 0.95
#: Default length of the examined tail (tokens): shorter repetitions are left alone.
DEFAULT_SPAN = 48


@dataclass(frozen=True)
class Loop:
    """A repetition ending the output: ``tokens[start:start + period]`` is its first unit; the rest
    of the output repeats it."""

    start: int
    period: int
    share: float
    """Share of the examined tail's tokens equal to the token one period before."""

    @property
    def cut(self) -> int:
        """Tokens to keep: everything before the repetition, and its first unit."""
        return self.start + self.period


def find_loop(
    tokens: list[int], decode: Callable[[list[int]], str], *, span: int = DEFAULT_SPAN
) -> Loop | None:
    """The repetition that ends ``tokens`` and covers at least its last ``span`` tokens, or None.

    The shortest period that clears its bar is taken (a unit repeated twice also matches at twice its
    period). The repetition is then followed back as far as it clears that bar, so ``start`` is where it
    began, not where the examined tail begins.
    """
    n = len(tokens)
    if span <= 0 or n < span + 1:
        return None
    tail = n - span
    for period in range(1, min(MAX_PERIOD, tail) + 1):
        matches = sum(tokens[i] == tokens[i - period] for i in range(tail, n))
        share = matches / span
        if share < IN_VALUE_SHARE:
            continue
        bar = ACROSS_SHARE
        if share < ACROSS_SHARE:
            if '"' in decode(tokens[tail - period :]):
                continue
            bar = IN_VALUE_SHARE
        # Walk back while the whole stretch clears the bar; a stretch starts with a match.
        start, total, hits = tail, span, matches
        for i in range(tail - 1, period - 1, -1):
            total += 1
            hits += tokens[i] == tokens[i - period]
            if hits < bar * total:
                break
            if tokens[i] == tokens[i - period]:
                start = i
        return Loop(start=start - period, period=period, share=round(share, 3))
    return None
