"""Request ids: one per request, in the ``X-Request-ID`` header, the response metadata and every log line.

Data flow: :class:`~modal_service.http.metrics.Observe` (the outermost middleware) takes the client's
``X-Request-ID`` when it is sane (:func:`request_id_for`: bounded length, safe characters), else makes
one, and sets a :class:`RequestContext` for the request. Everything that runs for the request (the
guard, the route task, planning threads, uvicorn's access log) sees it through :func:`current`:
:class:`RequestIdFilter` writes the id into each log record, the lifecycle puts it in the response
metadata and reports back what the metrics need (engine work under way, a stream's error code), and
the guard marks a client disconnect.
"""

from __future__ import annotations

import contextvars
import copy
import logging
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

HEADER = "X-Request-ID"
#: What a client-sent id may look like: it is echoed in a header and written into log lines, so no
#: spaces, quotes or control characters, and bounded.
_SANE = re.compile(r"[A-Za-z0-9._:+=/-]{1,128}")


@dataclass
class RequestContext:
    """What is known about the request in flight, shared by the middleware, the guard and the lifecycle."""

    id: str
    engine_busy: bool = False
    """Engine work is under way (set by the lifecycle): a disconnect now aborts it."""
    stream_error: str | None = None
    """The code of a stream's ``error`` event (after its 200)."""
    disconnected: bool = False
    """The client went away before the answer was complete (set by the guard)."""


_CURRENT: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar(
    "ananke_request", default=None
)


def request_id_for(headers: Mapping[str, str]) -> str:
    """The client's ``X-Request-ID`` if it is sane, else a new one (32 hex digits)."""
    given = headers.get(HEADER.lower())
    if given is not None and _SANE.fullmatch(given):
        return given
    return uuid.uuid4().hex


def current() -> RequestContext | None:
    """The request this code runs for (None outside a request)."""
    return _CURRENT.get()


def enter(context: RequestContext) -> contextvars.Token[RequestContext | None]:
    return _CURRENT.set(context)


def leave(token: contextvars.Token[RequestContext | None]) -> None:
    _CURRENT.reset(token)


# ------------------------------------------------------------------------------------ logging
#: The service's log line: ``-`` in place of the id outside a request.
LOG_FORMAT = "%(levelname)s %(name)s [%(request_id)s]: %(message)s"


class RequestIdFilter(logging.Filter):
    """Puts the current request's id on every record as ``request_id`` (``-`` outside a request).

    Attached to handlers, so it sees records from every logger they serve.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        context = _CURRENT.get()
        record.request_id = context.id if context is not None else "-"
        return True


def configure_logging(level: int = logging.INFO) -> None:
    """The root handler, with the request id in each line (what ``ananke serve`` uses)."""
    logging.basicConfig(level=level, format=LOG_FORMAT)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RequestIdFilter) for f in handler.filters):
            handler.addFilter(RequestIdFilter())


def uvicorn_log_config() -> dict[str, Any]:
    """uvicorn's logging config, with the request id in its lines (the access log's included)."""
    import uvicorn.config

    config: dict[str, Any] = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["filters"] = {"request_id": {"()": f"{__name__}.RequestIdFilter"}}
    for handler in config["handlers"].values():
        handler["filters"] = ["request_id"]
    config["formatters"]["default"]["fmt"] = "%(levelprefix)s [%(request_id)s] %(message)s"
    config["formatters"]["access"]["fmt"] = (
        '%(levelprefix)s [%(request_id)s] %(client_addr)s - "%(request_line)s" %(status_code)s'
    )
    return config
