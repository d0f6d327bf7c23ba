"""Steer-to-close: finish a grammar-constrained output that ``max_tokens`` would cut short.

When the engine stops at ``max_tokens`` mid-structure (an unclosed JSON object, say), the output is
useless to the caller. :class:`Closer` looks for a way to finish it *within the same budget*: it
rolls back up to ``window`` of the model's last tokens, then searches llguidance's matcher for a
short completion from that state, trying a fixed order of closing-friendly single-character tokens
(``"``, ``}``, ``]``, ``0``, ...) and taking forced tokens (key names, literals) as they come. The
search is depth-first, bounded by the remaining budget and a node budget, so its cost is bounded.

The completion is grammar-chosen, not model-chosen: values it has to invent are minimal (``""``,
``0``, ``false``). The result is checked like any other output (the caller re-verifies it), and the
response says which tokens were added this way.
"""

from __future__ import annotations

import json
import string
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import llguidance

from modal_service.constraints.matchers import MatcherPool
from modal_service.constraints.schema import FORMAT_SAMPLES

#: Tokens the search tries, best first (each kept only if the vocabulary has it as one token). Two
#: orders, picked per state. Inside free text (a letter such as ``x`` is allowed: no JSON literal
#: starts with it), close the string first, together with what follows it where one token can.
#: Elsewhere, close objects and arrays before opening anything (an optional key, an empty string).
#: Merged tokens close or separate two things in one step, so a completion fits in fewer tokens.
#: Format samples (below) go right after these; then everything else (``CLOSE_ORDER``).
IN_TEXT_FIRST = ('"}}', '"}]', '"}', '"]', '"},', '",', '":"', '":', '"')
STRUCTURE_FIRST = ("}}", "]}", "}]", "}", "]", '""', '":"', '":', '"')
CLOSE_ORDER = (
    *("}}", "]}", "}]", "},", "],", "}", "]", '},"', "0", "1", ",", ":"),
    # Other punctuation ends identifiers and statements in general grammars (``)``, ``;``, ``>``);
    # in JSON it is only allowed inside strings, where a quote has already been tried.
    *(c for c in string.punctuation if c not in '"}],:[{'),
    *"[{tfn23456789",
    *string.ascii_lowercase,
    *string.ascii_uppercase,
    " ",
)

#: Minimal values for string formats, tried (each with its closing quote) before single characters:
#: a string with ``format: email`` cannot close on ``"`` alone, and a character-by-character search
#: would wander. Each is validated by the matcher before it is taken. The one-character samples go
#: last, as one ``a``.
CLOSING_SAMPLES = (*dict.fromkeys(v for v in FORMAT_SAMPLES.values() if len(v) > 1), "a")

#: Tokens that may end an output of a general grammar (statements, brackets, quotes, lines), tried
#: as the last token at every step of the shortest-first search.
GENERAL_ENDERS = (";", ")", "]", "}", '"', "'", ".", "\n", ">", "!", "?", "`", *string.punctuation, " ")

#: Longest run of one repeated token the search will build (closing brackets may nest deeper).
MAX_RUN = 4
MAX_CLOSER_RUN = 32


@dataclass(frozen=True)
class Closing:
    """Keep the first ``keep`` generated tokens, then append ``suffix``."""

    keep: int
    suffix: list[int]
    dropped: int
    nodes: int
    rebuilt: bool = False
    """The whole output was replaced by the constraint's compile-time shortest output."""


class Closer:
    """Finds budget-respecting completions for one tokenizer. Stateless between calls; thread-safe."""

    def __init__(
        self,
        tokenizer: llguidance.LLTokenizer,
        *,
        max_nodes: int = 3000,
        max_seconds: float = 2.0,
        matchers: MatcherPool | None = None,
    ) -> None:
        self._tok = tokenizer
        self._matchers = matchers or MatcherPool(tokenizer)
        # Nodes bound the work, so outcomes do not depend on the machine's load (a time budget of
        # 0.25 s turned 6 CI schemas from 422 into truncations at 2 loaded cores). The time limit
        # is only a safety net against grammars whose masks are slow.
        self.max_nodes = max_nodes
        self.max_seconds = max_seconds
        self._in_text_first = self._single_tokens(IN_TEXT_FIRST)
        self._structure_first = self._single_tokens(STRUCTURE_FIRST)
        self._text_probe = self._single_tokens("x")[0]
        self._others = self._single_tokens(CLOSE_ORDER)
        self._closers = frozenset(self._single_tokens("}]"))
        self._enders = self._single_tokens(GENERAL_ENDERS)
        self._general_order = self._single_tokens((" ", *GENERAL_ENDERS, *CLOSE_ORDER))
        self._word_tokens = frozenset(self._single_tokens(string.ascii_letters + string.digits))
        self._samples = tuple(tokenizer.tokenize_str(json.dumps(v)[1:]) for v in CLOSING_SAMPLES)

    def _single_tokens(self, texts: Iterable[str]) -> tuple[int, ...]:
        """Token ids of the texts the vocabulary has as exactly one token, in order."""
        out: list[int] = []
        for text in texts:
            ids = self._tok.tokenize_str(text)
            if len(ids) == 1 and ids[0] not in out:
                out.append(ids[0])
        return tuple(out)

    def close(
        self, ll_grammar: str, tokens: list[int], *, budget: int, window: int, general: bool = False
    ) -> Closing | None:
        """A completion of ``tokens`` under ``ll_grammar`` with at most ``budget`` tokens in all.

        ``general``: the grammar is not JSON (a Lark grammar, GBNF, a regex). Its completions are
        searched shortest first (:meth:`_deepening`), since the depth-first order tuned for JSON
        follows a repetition (another column, another digit) instead of ending it.

        Drops trailing tokens (up to ``window``) by as many as the last search came up short (or,
        when a level finds nothing, by 1, 2, 4, ...), until a completion fits; the whole window is
        always tried last. None when nothing fits, or when the node or time budget runs out: the
        caller then reports the truncation as it is.
        """
        matcher = self._matchers.fresh(ll_grammar)
        if matcher.is_error() or not matcher.consume_tokens(tokens) or matcher.is_error():
            return None
        deadline = time.perf_counter() + self.max_seconds
        window = min(window, len(tokens))
        # The level with the whole window dropped keeps a reserve of nodes (and its own time).
        reserve = min(self.max_nodes // 2, 4 * budget + 96)
        spent, dropped, miss_step = 0, 0, 1
        while True:
            room = budget - (len(tokens) - dropped)
            last = dropped >= window
            # The search may use more raw tokens than the room: its single characters re-encode
            # into fewer tokens (see _compact), and only the re-encoded length has to fit. Twice
            # the room plus a margin also shows how far short a level is. The nodes allow a search
            # that mostly goes straight; hopeless levels fail fast.
            limit = 2 * room + 32
            allowance = self.max_nodes - spent - (0 if last else reserve)
            level = (8 if general else 2) * limit + 32  # shortest-first search revisits shallow levels
            nodes = [max(0, allowance if last else min(allowance, level))]
            start = nodes[0]
            if last:
                deadline = time.perf_counter() + self.max_seconds / 2
            search = self._deepening if general else self._search
            suffix = search(matcher, limit, nodes, deadline) if start else None
            spent += start - nodes[0]
            if suffix is not None:
                matcher.rollback(len(suffix))
                suffix = self._compact(matcher, suffix)
                if len(suffix) <= room:
                    return Closing(len(tokens) - dropped, suffix, dropped, spent)
            if matcher.is_error() or last:
                return None
            if suffix is not None:  # free what was missing
                step = max(1, len(suffix) - room)
            else:  # nothing within this level's reach: back off faster and faster
                step, miss_step = miss_step, miss_step * 2
            if allowance - (start - nodes[0]) <= 0 or time.perf_counter() > deadline:
                step = window - dropped  # out of nodes or time but the reserve: straight to the last
            step = min(step, window - dropped)
            if not matcher.rollback(step):
                return None
            dropped += step

    def smallest_tokens(
        self,
        matcher: llguidance.LLMatcher,
        *,
        limit: int,
        accept: Callable[[list[int]], bool] | None = None,
        max_nodes: int | None = None,
    ) -> list[int] | None:
        """The shortest output the search finds from the start (at most ``limit`` tokens), as
        :meth:`close` would emit it; None when it finds none in its budget.

        An upper bound on the true minimum, usually equal to it for JSON Schemas (required
        properties only, minimal values). ``matcher`` is fresh (nothing consumed); it is used up.
        ``accept`` vets each complete output; one it refuses is a dead end and the search goes on.
        """
        if matcher.is_error():
            return None
        nodes = [self.max_nodes if max_nodes is None else min(max_nodes, self.max_nodes)]
        found = self._search(matcher, limit, nodes, time.perf_counter() + self.max_seconds, accept)
        if found is None:
            return None
        matcher.rollback(len(found))
        return self._compact(matcher, found)

    def _compact(self, m: llguidance.LLMatcher, suffix: list[int]) -> list[int]:
        """The same text in the tokenizer's own (usually fewer) tokens, if the matcher takes them.

        The search builds text from single characters and forced pieces; the model would write
        ``{"a":""}`` in 3 tokens, not 6. Counting and emitting the encoded form keeps the budget
        check honest and equal to :meth:`smallest_tokens`' length.
        """
        encoded = self._tok.tokenize_str(self._tok.decode_str(suffix))
        if len(encoded) < len(suffix) and m.validate_tokens(encoded) == len(encoded):
            return encoded
        return suffix

    def _deepening(
        self, m: llguidance.LLMatcher, room: int, nodes: list[int], deadline: float
    ) -> list[int] | None:
        """Iterative deepening: :meth:`_search` with depth 1, 2, 3, ... up to ``room``, in general
        mode, so the first completion found is among the shortest. Shallow levels cost few nodes."""
        for depth in range(1, room + 1):
            found = self._search(m, depth, nodes, deadline, general=True)
            if found is not None or nodes[0] <= 0 or time.perf_counter() > deadline:
                return found
        return None

    def _search(
        self,
        m: llguidance.LLMatcher,
        room: int,
        nodes: list[int],
        deadline: float,
        accept: Callable[[list[int]], bool] | None = None,
        *,
        general: bool = False,
    ) -> list[int] | None:
        """Depth-first, iterative (no recursion limit). On success the matcher is left after the
        returned tokens; on failure, where it started. An accepting state that ``accept`` refuses
        is a dead end (it costs a node)."""
        out: list[int] = []
        frames: list[tuple[int, Iterator[list[int]]]] = []  # (tokens this frame consumed, untried options)
        while True:
            expand = True
            if m.is_accepting():
                if accept is None or accept(out):
                    return out
                nodes[0] -= 1
                expand = False
            if expand and len(out) < room and nodes[0] > 0 and not self._runaway(out, general=general):
                nodes[0] -= 1
                if time.perf_counter() > deadline:  # a mask can take milliseconds: check each node
                    nodes[0] = 0
                forced = m.compute_ff_tokens()
                if forced:
                    # Forced bytes have no alternative: take them, or this state cannot close in time.
                    if len(out) + len(forced) <= room:
                        taken = m.try_consume_tokens(forced)
                        if taken == len(forced):
                            frames.append((len(forced), iter(())))
                            out.extend(forced)
                            continue
                        if taken:
                            m.rollback(taken)
                elif general:
                    finish = self._finishing(m, nodes)
                    if finish is not None:
                        out.append(finish)
                        return out
                    frames.append((0, self._general_options(m, out)))
                else:
                    frames.append((0, self._options(m, out)))
            # Backtrack to the deepest frame with an untried option and take it.
            while frames:
                consumed, options = frames.pop()
                if consumed:
                    m.rollback(consumed)
                    del out[-consumed:]
                step = next(options, None)
                while step is not None and nodes[0] > 0:
                    # The mask can allow a token the parser then refuses (seen: '"}' after a
                    # string whose object still lacks keys); try_consume leaves no error state.
                    taken = m.try_consume_tokens(step)
                    if taken == len(step):
                        break
                    if taken:
                        m.rollback(taken)
                    step = next(options, None)
                if step is not None and nodes[0] > 0:
                    frames.append((len(step), options))
                    out.extend(step)
                    break
            else:
                return None

    def _runaway(self, out: list[int], longest: int = 16, *, general: bool = False) -> bool:
        """Whether ``out`` ends with a piece written twice in a row that opens more brackets than it
        closes (``{"a":[{"a":[``): a recursion the search keeps entering, such as an optional
        recursive property. A balanced repeat (``{"id":0},{"id":0},``, items of an array with
        ``minItems``) is progress and is kept. In ``general`` mode every repeated piece is a loop:
        a shortest completion never writes the same piece twice in a row."""
        n = len(out)
        for k in range(2 if general else 3, min(longest, n // 2) + 1):
            if out[n - k :] == out[n - 2 * k : n - k]:
                if general:
                    return True
                piece = self._tok.decode_bytes(out[n - k :])
                opened = piece.count(b"{") + piece.count(b"[") - piece.count(b"}") - piece.count(b"]")
                if opened > 0:
                    return True
        return False

    def _finishing(self, m: llguidance.LLMatcher, nodes: list[int]) -> int | None:
        """A single separator or punctuation token after which the grammar accepts (one step of
        lookahead, one node), left consumed; None (and the matcher as it was) when there is none."""
        mask = m.compute_bitmask()
        nodes[0] -= 1
        for t in self._enders:
            if (mask[t >> 3] >> (t & 7)) & 1 and m.try_consume_tokens([t]) == 1:
                if m.is_accepting():
                    return t  # left consumed, like every step of the search
                m.rollback(1)
        return None

    def _general_options(self, m: llguidance.LLMatcher, out: list[int]) -> Iterator[list[int]]:
        """Next steps for a general grammar: a space first (it ends a word and usually starts the
        next clause), then punctuation, then the first two letters or digits allowed (one may open a
        keyword such as ``true``; more would only continue the word at hand). One token is
        repeated at most :data:`MAX_RUN` times."""
        mask = m.compute_bitmask()
        last, run = (out[-1], 0) if out else (None, 0)
        for t in reversed(out):
            if t != last:
                break
            run += 1
        allowed = [
            t
            for t in self._general_order
            if (mask[t >> 3] >> (t & 7)) & 1 and not (t == last and run >= MAX_RUN)
        ]
        separators = [t for t in allowed if t not in self._word_tokens]
        # Letters and digits mostly stand for a character class, where any member does: two of
        # them keep the search narrow (a keyword's first letter opens it; the rest is forced).
        words = [t for t in allowed if t in self._word_tokens][:2]
        yield from ([t] for t in (*separators, *words))

    def _options(self, m: llguidance.LLMatcher, out: list[int]) -> Iterator[list[int]]:
        """Next steps to try, best first: closing tokens, a format sample, other characters."""
        mask = m.compute_bitmask()

        def allowed(tokens: tuple[int, ...]) -> list[int]:
            return [t for t in tokens if (mask[t >> 3] >> (t & 7)) & 1]

        in_text = (mask[self._text_probe >> 3] >> (self._text_probe & 7)) & 1
        first = allowed(self._in_text_first if in_text else self._structure_first)
        yield from ([t] for t in first)
        for sample in self._samples:
            if (mask[sample[0] >> 3] >> (sample[0] & 7)) & 1 and m.validate_tokens(sample) == len(sample):
                yield sample
        last = out[-1] if out else None
        run = 0
        for t in reversed(out):
            if t != last:
                break
            run += 1
        for t in allowed(self._others):
            if t in first:
                continue
            if t == last and run >= (MAX_CLOSER_RUN if t in self._closers else MAX_RUN):
                continue
            yield [t]
