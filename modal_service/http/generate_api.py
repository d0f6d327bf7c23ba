"""``POST /generate_api``: the service's own API, every constraint kind, JSON or Server-Sent Events.

The body is a :class:`~langchain_ananke.protocol.GenerateRequest`; the answer a
:class:`~langchain_ananke.protocol.GenerateResponse` (a :class:`BatchGenerateResponse` for a prompt
list), or with ``stream=true`` ``data: <StreamEvent JSON>`` frames whose last is ``done`` or ``error``.
The request runs the one lifecycle (:class:`~modal_service.http.lifecycle.Lifecycle`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends

from langchain_ananke.protocol import BatchGenerateResponse, GenerateRequest, GenerateResponse
from modal_service.http.errors import ERROR_RESPONSES
from modal_service.http.lifecycle import Lifecycle, frame, sse


def generate_router(lifecycle: Lifecycle, require_key: Callable[..., Any]) -> APIRouter:
    """The ``/generate_api`` route."""
    router = APIRouter(dependencies=[Depends(require_key)])

    @router.post(
        "/generate_api",
        response_model=GenerateResponse | BatchGenerateResponse,
        responses={**ERROR_RESPONSES, 200: {"description": "JSON, or text/event-stream when stream=true"}},
    )
    async def generate_api(req: GenerateRequest) -> Any:
        """Generate under at most one constraint (or a tool turn); ``stream=true`` answers with SSE."""
        if not req.stream:
            return await lifecycle.answer(req)
        admitted = await lifecycle.admit(req)

        async def frames() -> AsyncIterator[str]:
            async for event in lifecycle.events(admitted):
                yield frame(event.model_dump_json(exclude_none=True))

        return sse(frames())

    return router
