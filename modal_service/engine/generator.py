"""Request execution: one protocol request -> engine calls -> verified protocol responses.

Data flow for one prompt: :meth:`Generator.plan` renders the prompt (chat template, tools), tokenizes
it once and compiles the constraint (cached) -> :meth:`Generator.events` streams
:class:`~modal_service.engine.engine.Delta` from the engine under the request's
:class:`~modal_service.limits.Deadline` -> yields ``token`` events -> closes a structure cut by
``max_tokens`` -> re-checks the whole output (:meth:`ConstraintCompiler.verify`) -> yields one ``done``
event with the folded :class:`GenerateResponse`. Non-streaming answers fold that same stream
(:meth:`Generator.complete`), and a prompt list runs its prompts concurrently so the engine batches
them.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from langchain_ananke.protocol import (
    BatchGenerateResponse,
    FinishReason,
    GenerateRequest,
    GenerateResponse,
    StreamEvent,
    TokenLogprob,
    Usage,
)
from modal_service.constraints.compiled import CompiledConstraint, ConstraintError, ToolTurn
from modal_service.constraints.loops import find_loop
from modal_service.constraints.verify import Verdict
from modal_service.engine.engine import Delta, Engine, StepCount
from modal_service.errors import ApiError
from modal_service.limits import Deadline, Limits

#: Stack for threads created from here on. llguidance compiles recursively: a 1,000-deep ``$ref``
#: chain or a 3,000-rule Lark chain overflowed the default 8 MiB thread stack and killed the process;
#: 256 MiB compiles both (virtual memory, only touched pages cost RAM).
COMPILE_THREAD_STACK = 256 * 1024 * 1024


def configure_compile_threads() -> None:
    """Give threads created after this call (the compile workers) a deep stack. Idempotent."""
    if threading.stack_size() < COMPILE_THREAD_STACK:
        threading.stack_size(COMPILE_THREAD_STACK)


#: Tokens held back near the end of the budget while streaming, so that closing may roll them back
#: (non-streaming output is not sent until the end, so closing may roll back all of it).
CLOSE_WINDOW = 32
#: The loop guard looks for a repetition every this many tokens.
GUARD_EVERY = 8


@dataclass
class Plan:
    """One prompt, ready for the engine: its token ids and the compiled constraint."""

    prompt_token_ids: list[int]
    constraint: CompiledConstraint | None
    cache_hit: bool

    @property
    def closable(self) -> bool:
        """Whether the closing search can finish this plan's output (a constraint with a grammar)."""
        return self.constraint is not None and self.constraint.ll_grammar is not None


class Generator:
    """Runs protocol requests on an :class:`Engine`."""

    def __init__(self, engine: Engine, limits: Limits) -> None:
        self.engine = engine
        self.limits = limits
        configure_compile_threads()  # before the first to_thread spawns the worker threads
        # Planning threads take turns at the tokenizer. vLLM (0.26-0.32) makes its tokenizer
        # thread-safe with a pool of deep copies (2 by default, enough for its own users) and
        # deep-copies the whole tokenizer for a caller that finds the pool empty: ~2 s of Python
        # under the GIL for Qwen2.5's vocabulary: twenty planning threads at once kept a 256-request
        # burst on an H200 waiting 25 s with the event loop blocked.
        self._tokenizer_turn = threading.Lock()

    # ------------------------------------------------------------------------- planning
    def _constraint(self, req: GenerateRequest) -> tuple[CompiledConstraint | None, bool]:
        compiler = self.engine.ready()
        if req.constraints is None and not req.tools:
            return None, False
        turn = ToolTurn(tuple(req.tools), req.tool_choice, req.parallel_tool_calls) if req.tools else None
        try:
            return compiler.compile(req.constraints, req.max_tokens, tools=turn)
        except ConstraintError as exc:
            raise ApiError(422, "invalid_constraint", exc.message, exc.detail) from exc

    def plan(self, req: GenerateRequest) -> list[Plan]:
        """Render and tokenize the prompts and compile the constraint (once for all prompts). The
        request passed :class:`~modal_service.http.lifecycle.Prechecks` first (the ``max_tokens`` cap)."""
        if req.messages is not None:
            answer = req.constraints.json_schema if req.constraints is not None and req.tools else None
            with self._tokenizer_turn:
                prompts = [self.engine.apply_chat_template(req.messages, req.tools, req.tool_choice, answer)]
        elif isinstance(req.prompt, list):
            prompts = req.prompt
        else:
            prompts = [req.prompt or ""]
        if len(prompts) > self.limits.max_batch_prompts:
            raise ApiError(
                422,
                "invalid_request",
                f"{len(prompts)} prompts in one batch; the limit is {self.limits.max_batch_prompts}",
            )
        context = self.engine.config.max_model_len
        with self._tokenizer_turn:
            ids = [self.engine.tokenize(p, rendered=req.messages is not None) for p in prompts]
        for i, n in enumerate(len(p) for p in ids):
            if n == 0:  # vLLM refuses it ("decoder prompt cannot be empty"), after a stream's 200
                raise ApiError(422, "invalid_request", f"prompt {i} is empty (0 tokens)")
            if n + req.max_tokens > context:
                raise ApiError(
                    422,
                    "context_length_exceeded",
                    f"prompt {i} has {n} tokens; with max_tokens {req.max_tokens} it exceeds the "
                    f"model's context of {context} tokens",
                )
        constraint, hit = self._constraint(req)
        shortest = constraint.min_tokens if constraint is not None else None
        if constraint is not None and shortest is not None and shortest > req.max_tokens:
            raise ApiError(
                422,
                "max_tokens_too_small",
                f"max_tokens {req.max_tokens} cannot hold this {constraint.kind}: the shortest output "
                f"the server could construct takes {shortest} tokens",
                {"max_tokens": req.max_tokens, "shortest_output_tokens": shortest},
            )
        return [Plan(p, constraint, hit) for p in ids]

    async def aplan(self, req: GenerateRequest) -> list[Plan]:
        """:meth:`plan` in a worker thread: compiling a large grammar never blocks other requests."""
        return await asyncio.to_thread(self.plan, req)

    # ------------------------------------------------------------------------ execution
    async def events(
        self, req: GenerateRequest, plan: Plan, deadline: Deadline, *, final_only: bool = False
    ) -> AsyncGenerator[StreamEvent, None]:
        """Token events, then one ``done`` event with the verified, folded response (its
        ``finish_reason`` is ``timeout`` when ``deadline`` passed). ``final_only``: the ``done`` event
        only.

        With a closable constraint, token events for the last ``window`` tokens of the budget are
        held back until the request ends: if ``max_tokens`` cuts the output short, those tokens may
        be rolled back and the structure finished (:meth:`_close`) before anything is sent.
        """
        started = time.perf_counter()
        text_parts: list[str] = []
        token_ids: list[int] = []
        logprobs: list[TokenLogprob] = []
        finish: str | None = None
        first_token_ms: float | None = None
        window = self._close_window(req, plan)
        guard_span, checked, sent_tokens, sent_chars = self._guard_span(req, plan), 0, 0, 0
        guard: dict[str, Any] | None = None  # metadata.loop_guard, once the detector has spoken
        closing: dict[str, int | bool] | None = None
        # The guard watches the output as it grows: per-step deltas, also when not streaming.
        stream = self._stream(req, plan, final_only=final_only and not guard_span)
        steps: StepCount | None = None
        try:
            async with asyncio.timeout(deadline.left()):
                async for delta in stream:
                    if delta.token_ids and first_token_ms is None and not final_only:
                        first_token_ms = (time.perf_counter() - started) * 1000
                    text_parts.append(delta.text)
                    token_ids.extend(delta.token_ids)
                    logprobs.extend(delta.logprobs or ())
                    finish = delta.finish_reason or finish
                    steps = delta.steps or steps
                    if guard_span and guard is None:
                        checked, guard, closed = await self._guard_upto(
                            req, plan, token_ids, checked, guard_span, sent_tokens
                        )
                        if closed is not None:
                            text_parts, token_ids, closing = [closed[0]], closed[1], closed[2]
                            finish = "loop_guard"
                            break  # the finally below aborts the engine request
                    held = window and len(token_ids) > req.max_tokens - window
                    if (delta.text or delta.token_ids) and not held and not final_only:
                        yield StreamEvent(
                            event="token",
                            text=delta.text,
                            token_ids=delta.token_ids,
                            logprobs=list(delta.logprobs or ()) if req.logprobs is not None else None,
                        )
                        sent_tokens, sent_chars = len(token_ids), sent_chars + len(delta.text)
        except TimeoutError:
            finish = "timeout"
        finally:
            await stream.aclose()  # aborts the engine request if it is still running
        text = "".join(text_parts)
        # Not streamed yet, so free to roll back: when streaming, the held-back tail; otherwise
        # everything (a structure that needs it all is rebuilt from its start).
        if (
            window
            and finish == "length"
            and (closed := await self._close(req, plan, token_ids, window=len(token_ids) - sent_tokens))
        ):
            text, token_ids, closing = closed
        if closing is not None:  # the structure was finished by the closing search
            logprobs = self._closed_logprobs(logprobs, token_ids, int(closing["added_tokens"]))
        if len(token_ids) > sent_tokens and not final_only:
            yield StreamEvent(
                event="token",
                text=text[sent_chars:],
                token_ids=token_ids[sent_tokens:],
                logprobs=logprobs[sent_tokens:] if req.logprobs is not None else None,
            )
        response = self._fold(
            req,
            plan,
            text=text,
            token_ids=token_ids,
            finish="stop" if closing is not None else finish or "abort",
            started=started,
            first_token_ms=first_token_ms,
        )
        response.logprobs = logprobs if req.logprobs is not None else None
        self._note_run(response.metadata, finish, closing, guard, steps)
        yield StreamEvent(event="done", response=response)

    def _stream(self, req: GenerateRequest, plan: Plan, *, final_only: bool) -> AsyncGenerator[Delta, None]:
        """The engine's deltas for ``plan`` (final_only: one at the end)."""
        return self.engine.stream(
            plan.prompt_token_ids,
            request_id=uuid.uuid4().hex,
            max_tokens=req.max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            seed=req.seed,
            stop=req.stop,
            constraint=plan.constraint,
            final_only=final_only,
            logprobs=req.logprobs,
            fast_forward=fast_forward_for(req),
        )

    def _closed_logprobs(
        self, logprobs: list[TokenLogprob], token_ids: list[int], added: int
    ) -> list[TokenLogprob]:
        """The kept tokens' logprobs, then the closing search's ``added`` tokens (no logprob: the
        grammar, not the model, chose them)."""
        tail = token_ids[len(token_ids) - added :]
        kept = logprobs[: len(token_ids) - added]
        return kept + [TokenLogprob(token=self.engine.decode([t]), token_id=t, logprob=None) for t in tail]

    @staticmethod
    def _note_run(
        metadata: dict[str, Any],
        finish: str | None,
        closing: dict[str, int | bool] | None,
        guard: dict[str, Any] | None,
        steps: StepCount | None,
    ) -> None:
        """How the output came about: ``decode_steps``/``forced_tokens`` (absent when the request was
        cut short, by its deadline or the loop guard, before the engine finished it), and
        ``closed_on_budget`` (``max_tokens`` cut the output, the closing search finished it) or
        ``loop_guard`` (the guard stopped the engine at a repetition; closing finished the structure)."""
        if steps is not None:
            metadata |= {"decode_steps": steps.decode_steps, "forced_tokens": steps.forced_tokens}
        if guard is not None:
            metadata["loop_guard"] = guard
        if closing is None:
            return
        metadata["request_finish_reason"] = finish
        if finish == "length":
            metadata["closed_on_budget"] = closing
        elif guard is not None:
            guard |= {k: closing[k] for k in ("dropped_tokens", "added_tokens", "search_nodes")}

    def _guard_span(self, req: GenerateRequest, plan: Plan) -> int:
        """The loop guard's span for this request (0: off): constrained output that the closing search
        can finish, with room for a loop worth cutting (``max_tokens`` at least twice the span), the
        server's ``--loop-guard-span`` and the request's ``constraints.loop_guard``."""
        span = self.limits.loop_guard_span
        if not plan.closable or (req.constraints and not req.constraints.loop_guard):
            return 0
        return span if req.max_tokens >= 2 * span else 0

    async def _guard_upto(  # noqa: PLR0917
        self,
        req: GenerateRequest,
        plan: Plan,
        token_ids: list[int],
        checked: int,
        span: int,
        sent_tokens: int,
    ) -> tuple[int, dict[str, Any] | None, tuple[str, list[int], dict[str, int | bool]] | None]:
        """:meth:`_guard` at every ``GUARD_EVERY``-th token past ``checked``, up to the output's length:
        exactly there, however the tokens arrive (one a step, or several when fast-forward adds forced
        ones), so the same tokens meet the same verdict. ``(tokens checked, metadata.loop_guard, the
        closed output)``."""
        guard: dict[str, Any] | None = None
        closed = None
        while guard is None and checked + GUARD_EVERY <= len(token_ids):
            checked += GUARD_EVERY
            guard, closed = await self._guard(req, plan, token_ids[:checked], span, sent_tokens)
        return checked, guard, closed

    async def _guard(
        self, req: GenerateRequest, plan: Plan, token_ids: list[int], span: int, sent_tokens: int
    ) -> tuple[dict[str, Any] | None, tuple[str, list[int], dict[str, int | bool]] | None]:
        """Look for a runaway repetition at the end of ``token_ids`` (:func:`find_loop`). If there is
        one, finish the structure from the end of its first unit (or from what was already streamed,
        which cannot be taken back): ``(metadata.loop_guard, the closed output)``. ``(None, None)``
        while there is no loop; a loop the closing search cannot finish is reported and left to run."""
        loop = find_loop(token_ids, self.engine.decode, span=span)
        if loop is None:
            return None, None
        info: dict[str, Any] = {
            "fired": False,
            "detected_at_token": len(token_ids),
            "loop_start_token": loop.start,
            "period_tokens": loop.period,
            "match_share": loop.share,
        }
        cut = max(loop.cut, sent_tokens)
        closed = await self._close(req, plan, token_ids[:cut], window=min(cut - sent_tokens, CLOSE_WINDOW))
        if closed is None:
            info["reason"] = "the closing search found no way to finish the structure; generation went on"
            return info, None
        info["fired"] = True
        closed[2]["dropped_tokens"] = len(token_ids) - (cut - int(closed[2]["dropped_tokens"]))
        return info, closed

    def _close_window(self, req: GenerateRequest, plan: Plan) -> int:
        """How many trailing tokens are held back while streaming, so that closing may roll them
        back (0: no closing). Non-streaming output is held back whole anyway."""
        if not plan.closable or (req.constraints and not req.constraints.close_on_budget):
            return 0
        return min(CLOSE_WINDOW, req.max_tokens // 2)

    async def _close(
        self, req: GenerateRequest, plan: Plan, token_ids: list[int], *, window: int
    ) -> tuple[str, list[int], dict[str, int | bool]] | None:
        """Roll back up to ``window`` tokens and finish the structure within ``max_tokens``."""
        assert plan.constraint is not None  # noqa: S101 - _close_window checked
        assert self.engine.compiler is not None  # noqa: S101 - plan() checked readiness
        closing = await asyncio.to_thread(
            self.engine.compiler.close, plan.constraint, token_ids, budget=req.max_tokens, window=window
        )
        if closing is None:
            return None
        kept = token_ids[: closing.keep] + closing.suffix
        info = {
            "dropped_tokens": len(token_ids) - closing.keep,
            "added_tokens": len(closing.suffix),
            "search_nodes": closing.nodes,
            "rebuilt": closing.rebuilt,
        }
        return self.engine.decode(kept), kept, info

    def _fold(
        self,
        req: GenerateRequest,
        plan: Plan,
        *,
        text: str,
        token_ids: list[int],
        finish: str,
        started: float,
        first_token_ms: float | None,
    ) -> GenerateResponse:
        elapsed_ms = (time.perf_counter() - started) * 1000
        n_out = len(token_ids)
        verdict: Verdict | None = None
        if plan.constraint is not None:
            assert self.engine.compiler is not None  # noqa: S101 - plan() checked readiness
            verdict = self.engine.compiler.verify(plan.constraint, text, token_ids, finish)
        tool_calls = verdict.tool_calls if verdict is not None else None
        metadata: dict[str, Any] = {
            "model": self.engine.model_name,
            "tokens_per_sec": round(n_out / (elapsed_ms / 1000), 2) if elapsed_ms > 0 else 0.0,
            "time_to_first_token_ms": round(first_token_ms, 2) if first_token_ms else None,
            "request_finish_reason": finish,
        }
        if plan.constraint is not None:
            c = plan.constraint
            metadata |= {
                "constraint_type": c.kind,
                "constraint_mode": "approximate" if c.approximate else "exact",
                "compile_time_ms": c.compile_ms,
                "cache_hit": plan.cache_hit,
                "attempts": 1,
            }
            if c.approximate:
                metadata["approximation"] = c.approximation
            if c.caps_applied:
                metadata["length_caps_applied"] = c.caps_applied
            if verdict is not None and verdict.branch is not None:
                metadata["branch"] = verdict.branch
        reason: FinishReason = "tool_calls" if tool_calls else _finish_reason(finish)
        return GenerateResponse(
            generated_text=text,
            tokens_generated=n_out,
            generation_time_ms=round(elapsed_ms, 2),
            metadata=metadata,
            constraint_satisfied=None if verdict is None else verdict.satisfied,
            constraint_error=None if verdict is None else verdict.error,
            constraint_error_code=None if verdict is None else verdict.code,
            finish_reason=reason,
            usage=Usage(
                prompt_tokens=len(plan.prompt_token_ids),
                completion_tokens=n_out,
                total_tokens=len(plan.prompt_token_ids) + n_out,
            ),
            tool_calls=tool_calls,
        )

    async def complete(self, req: GenerateRequest, plan: Plan, deadline: Deadline) -> GenerateResponse:
        """The stream folded up: the ``done`` event's response."""
        final: GenerateResponse | None = None
        async for event in self.events(req, plan, deadline, final_only=True):
            if event.event == "done":
                final = event.response
        assert final is not None  # noqa: S101 - events() always ends with done
        return final

    async def complete_verified(
        self, req: GenerateRequest, plan: Plan, deadline: Deadline
    ) -> GenerateResponse:
        """:meth:`complete`, resampling JSON that fails the full-schema check (not truncation).

        Approximated schemas (and formats the grammar does not enforce) can yield output the final
        check rejects; the remaining attempts run concurrently with new seeds, so the engine batches
        them. The first satisfying answer wins; otherwise the last one is returned, honestly marked.
        """
        first = await self.complete(req, plan, deadline)
        constraint = plan.constraint
        attempts = req.constraints.max_attempts if req.constraints else 1
        if (
            constraint is None
            or constraint.json_schema is None
            or first.constraint_satisfied is not False
            or first.finish_reason != "stop"
            or attempts <= 1
        ):
            return first
        base = req.seed if req.seed is not None else int.from_bytes(uuid.uuid4().bytes[:4], "big")
        retries = [req.model_copy(update={"seed": base + i}) for i in range(1, attempts)]
        others = await asyncio.gather(*(self.complete(r, plan, deadline) for r in retries))
        chosen = next((r for r in others if r.constraint_satisfied), others[-1])
        extra_tokens = sum(r.tokens_generated for r in (first, *others)) - chosen.tokens_generated
        chosen.metadata |= {
            "attempts": attempts,
            "first_attempt_error": first.constraint_error,
            "tokens_in_discarded_attempts": extra_tokens,
        }
        return chosen

    async def batch(
        self, req: GenerateRequest, plans: list[Plan], deadline: Deadline
    ) -> BatchGenerateResponse:
        """A prompt list, run concurrently (one batch in the engine); a timeout is per result."""
        started = time.perf_counter()
        results = await asyncio.gather(*(self.complete_verified(req, p, deadline) for p in plans))
        usage = Usage(
            prompt_tokens=sum(r.usage.prompt_tokens for r in results),
            completion_tokens=sum(r.usage.completion_tokens for r in results),
        )
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
        return BatchGenerateResponse(
            results=list(results),
            generation_time_ms=round((time.perf_counter() - started) * 1000, 2),
            usage=usage,
        )


def fast_forward_for(req: GenerateRequest) -> bool:
    """Whether ``req`` may fast-forward (where the server has it on): as the request says, and by default
    unless it samples with a ``seed``. vLLM's verification of drafts does not keep a seeded sample
    reproducible (measured on the tiny Qwen2 at temperature 0.9: the same seeded request twice gave two
    outputs with fast-forward, one without), and a seed is a promise of reproducibility."""
    if req.fast_forward is not None:
        return req.fast_forward
    return req.seed is None or req.temperature == 0


def _finish_reason(engine_reason: str) -> FinishReason:
    if engine_reason in ("stop", "length", "timeout"):
        return engine_reason  # type: ignore[return-value]
    return "abort"
