"""One request lifecycle for every route: validate -> plan inside the admission slot -> generate ->
verify -> answer.

1. **validate**: the route's typed model parsed the body; :class:`Prechecks` apply the cheap bounds
   (``max_tokens`` cap, constraint shape, prompt characters against the context): 422 in
   milliseconds, before anything is tokenized or compiled.
2. **admit and plan**: :meth:`Lifecycle.admit` takes an admission slot (429 above the bound), then the
   generator renders and tokenizes the prompt and compiles the constraint, in a worker thread. Compile
   work is therefore bounded by admission on every route, streaming or not. The request's
   :class:`~modal_service.limits.Deadline` starts before planning and covers it.
3. **generate and verify**: :class:`~modal_service.engine.generator.Generator` streams from the engine
   and re-checks the output.
4. **answer**: :meth:`Lifecycle.answer` folds the stream into one response (a passed deadline is a
   504, never a 200 with partial output); :meth:`Lifecycle.events` hands a stream its events, ending
   in ``done``, or in one ``error`` event (timeout, engine failure) that each API renders in its own
   frame. :func:`sse` sends either API's frames and always closes the stream, so the engine request is
   aborted when the client goes away.

Along the way the lifecycle reports to :class:`~modal_service.http.metrics.ServiceMetrics` (the plan,
the outputs) and to the request's :class:`~modal_service.http.request_id.RequestContext` (engine work
under way, a stream's error code), and puts the request id in each response's ``metadata``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from fastapi.responses import StreamingResponse

from langchain_ananke.protocol import BatchGenerateResponse, GenerateRequest, GenerateResponse, StreamEvent
from modal_service.constraints.schema import shape_error
from modal_service.engine.engine import Engine
from modal_service.engine.generator import Generator, Plan
from modal_service.errors import ApiError
from modal_service.http import request_id
from modal_service.http.errors import error_detail
from modal_service.http.guard import Admission, Slot
from modal_service.http.metrics import ServiceMetrics
from modal_service.limits import Deadline, Limits

_Answer = TypeVar("_Answer", GenerateResponse, BatchGenerateResponse)


class Prechecks:
    """Cheap bounds, checked before planning (which tokenizes prompts and compiles constraints).

    - ``max_tokens`` against the server's cap.
    - Constraint shape: :func:`~modal_service.constraints.schema.shape_error` (choice entries,
      ``anyOf``/``oneOf`` branches, ``enum`` values, schema nodes), so an oversized constraint is a
      422 in milliseconds instead of a compile of seconds.
    - Prompt characters: a token covers at most as many characters as its longest vocabulary
      entry, so a prompt longer than (context - max_tokens) x that many characters cannot fit.
    """

    def __init__(self, engine: Engine, limits: Limits) -> None:
        self.engine = engine
        self.limits = limits
        self._chars_per_token: int | None = None

    def __call__(self, req: GenerateRequest) -> None:
        """Raise :class:`ApiError` (422) when ``req`` breaks a bound."""
        self.check_max_tokens(req)  # first: the prompt bound below depends on it
        self.check_shape(req)
        self.check_prompt_chars(req)

    def check_max_tokens(self, req: GenerateRequest) -> None:
        if req.max_tokens > self.limits.max_tokens:
            raise ApiError(
                422,
                "invalid_request",
                f"max_tokens {req.max_tokens} exceeds the cap {self.limits.max_tokens}",
                {"field": "max_tokens"},
            )

    def check_shape(self, req: GenerateRequest) -> None:
        c = req.constraints
        choices = len(c.choice or c.regex_patterns or ()) if c is not None else 0
        schemas = [c.json_schema] if c is not None and c.json_schema is not None else []
        schemas += [t.function.parameters for t in req.tools or ()]
        problem = shape_error(self.limits, choices=choices, schemas=schemas)
        if problem is not None:
            raise ApiError(422, "invalid_constraint", problem[0], problem[1])

    def chars_per_token(self) -> int | None:
        """Most characters one token can stand for (computed once); None when unknown.

        A normalizer may shorten the text before tokenizing: NFC composes at most 3 characters into
        1 (Hangul jamo), so the bound triples; with any other normalizer there is no bound.
        """
        if self._chars_per_token is None:
            tokenizer = self.engine.tokenizer
            if tokenizer is None:
                return None
            backend = getattr(tokenizer, "backend_tokenizer", None)
            normalizer = type(getattr(backend, "normalizer", None)).__name__
            factor = {"NoneType": 1, "NFC": 3}.get(normalizer)
            if factor is None:
                self._chars_per_token = 0
            else:
                self._chars_per_token = factor * max(len(t) for t in tokenizer.get_vocab())
        return self._chars_per_token or None

    def check_prompt_chars(self, req: GenerateRequest) -> None:
        per_token = self.chars_per_token()
        if per_token is None:
            return
        if req.messages is not None:
            texts = [sum(len(m.content) for m in req.messages)]
        else:
            texts = [len(p) for p in (req.prompt if isinstance(req.prompt, list) else [req.prompt or ""])]
        context = self.engine.config.max_model_len
        room = max(context - req.max_tokens, 0)
        for i, chars in enumerate(texts):
            if chars > room * per_token:
                raise ApiError(
                    422,
                    "context_length_exceeded",
                    f"prompt {i} has {chars} characters, so at least {-(-chars // per_token)} tokens (a "
                    f"token covers at most {per_token} characters); with max_tokens {req.max_tokens} it "
                    f"exceeds the model's context of {context} tokens",
                    {"characters": chars, "max_tokens": req.max_tokens, "context": context},
                )


@dataclass
class Admitted:
    """A request past validation, holding its admission slot, planned, with its deadline running."""

    req: GenerateRequest
    plans: list[Plan]
    deadline: Deadline
    slot: Slot


class Lifecycle:
    """The stages every route runs a request through (see the module docstring)."""

    def __init__(
        self, generator: Generator, admission: Admission, limits: Limits, metrics: ServiceMetrics
    ) -> None:
        self.generator = generator
        self.admission = admission
        self.limits = limits
        self.metrics = metrics
        self.prechecks = Prechecks(generator.engine, limits)

    async def admit(self, req: GenerateRequest) -> Admitted:
        """Validate, take a slot, then plan within the deadline. The caller releases the slot when
        the request ends; the guard releases it too, whatever happens (releasing is idempotent)."""
        self.prechecks(req)
        deadline = Deadline(req.timeout_s or self.limits.default_timeout_s)
        slot = self.admission.slot().__enter__()
        try:
            plans = await self.generator.aplan(req)  # errors here are plain 4xx, before any stream
            deadline.check()  # planning (tokenize, compile) may have taken it all
        except BaseException:
            slot.release()
            raise
        self.metrics.planned(plans)
        return Admitted(req, plans, deadline, slot)

    async def answer(self, req: GenerateRequest) -> GenerateResponse | BatchGenerateResponse:
        """The non-streaming answer; a deadline that passes is a 504, never a 200 with partial output.
        A prompt list is answered as a batch, where a timeout is per result (``finish_reason``)."""
        admitted = await self.admit(req)
        _engine_busy(True)
        try:
            if isinstance(req.prompt, list):
                batch = await self.generator.batch(req, admitted.plans, admitted.deadline)
                return self._answered(batch)
            resp = self._answered(
                await self.generator.complete_verified(req, admitted.plans[0], admitted.deadline)
            )
        finally:
            admitted.slot.release()
        if resp.finish_reason == "timeout":
            raise admitted.deadline.error(resp.tokens_generated or None)
        return resp

    async def events(self, admitted: Admitted) -> AsyncIterator[StreamEvent]:
        """Token events, then ``done``; or, once the deadline passed or the engine failed, one
        ``error`` event (the tokens sent so far are all there is)."""
        events = self.generator.events(admitted.req, admitted.plans[0], admitted.deadline)
        _engine_busy(True)
        try:
            async for event in events:
                response = event.response
                if event.event == "done" and response is not None:
                    self._answered(response)
                    if response.finish_reason == "timeout":
                        yield _stream_error(error_event(admitted.deadline.error(response.tokens_generated)))
                        return
                yield event
        except Exception as exc:  # after the 200 header, errors travel as an error event
            yield _stream_error(StreamEvent(event="error", error=error_detail(exc)))
        finally:
            await events.aclose()  # aborts the engine request now, not when the generator is collected
            admitted.slot.release()

    def _answered(self, response: _Answer) -> _Answer:
        """Report the outputs to the metrics and put the request id in their metadata; the engine
        work is over."""
        context = request_id.current()
        _engine_busy(False)
        self.metrics.answered(response)
        if context is not None:
            results = response.results if isinstance(response, BatchGenerateResponse) else [response]
            for resp in results:
                resp.metadata["request_id"] = context.id
        return response


def _engine_busy(busy: bool) -> None:
    context = request_id.current()
    if context is not None:
        context.engine_busy = busy


def _stream_error(event: StreamEvent) -> StreamEvent:
    context = request_id.current()
    if context is not None and event.error is not None:
        context.stream_error = event.error.code
    return event


def error_event(error: ApiError) -> StreamEvent:
    """The last event of a stream that failed after its 200 (a passed deadline, say)."""
    return StreamEvent(event="error", error=error_detail(error))


class _EventStream(StreamingResponse):
    """Server-Sent Events that always close their iterator (so the engine request is aborted)."""

    def __init__(self, frames: AsyncIterator[str]) -> None:
        super().__init__(
            frames,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._frames = frames

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                aclose: Callable[[], Any] | None = getattr(self._frames, "aclose", None)
                if aclose is not None:
                    await aclose()


def sse(frames: AsyncIterator[str]) -> StreamingResponse:
    """The streaming response both APIs send their frames in (``data: ...\\n\\n`` each)."""
    return _EventStream(frames)


def frame(payload: str) -> str:
    """One SSE frame."""
    return f"data: {payload}\n\n"
