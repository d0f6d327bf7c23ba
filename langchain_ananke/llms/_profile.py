"""``ChatAnanke``'s LangChain model profile: static capabilities, plus token limits from the service.

Data flow: langchain-core calls ``ChatAnanke._resolve_model_profile`` at construction, which returns a
:class:`ServiceProfile` holding :data:`CAPABILITIES` and makes no request. The first lookup that needs
a token limit (``max_input_tokens``, ``max_output_tokens``, or the whole mapping) asks
``GET /v1/models`` once through the model's own sync client (a blocking request, under the model's
``timeout``, also when read from async code), and the answer is kept in the mapping. If the service
cannot be reached, the profile stays as it is and the next lookup asks again, at most once a minute.
LangChain's agent factory reads only ``structured_output``, so choosing ``ProviderStrategy`` never
waits for the service.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from langchain_ananke.errors import AnankeError
from langchain_ananke.protocol import ModelList

if TYPE_CHECKING:
    from _collections_abc import dict_items, dict_keys, dict_values

logger = logging.getLogger(__name__)

#: What every Ananke service does, whatever model it serves: constrained structured output
#: (``ProviderStrategy``), and tool calls with ``tool_choice``, generated under a grammar.
CAPABILITIES: dict[str, Any] = {"structured_output": True, "tool_calling": True, "tool_choice": True}

#: Profile keys that come from the service.
SERVICE_KEYS = frozenset({"max_input_tokens", "max_output_tokens"})

#: Seconds between two attempts to read the limits from a service that could not be reached.
RETRY_AFTER_FAILURE_S = 60.0


def token_limits(models: ModelList) -> dict[str, int]:
    """The profile's token limits from a ``GET /v1/models`` answer (only those the service gives)."""
    if not models.data:
        return {}
    card = models.data[0]
    limits = {"max_input_tokens": card.max_model_len, "max_output_tokens": card.max_output_tokens}
    return {key: value for key, value in limits.items() if value is not None}


class ServiceProfile(dict[str, Any]):
    """A model profile whose token limits are read from the service on first use.

    A ``dict`` (LangChain's ``ModelProfile`` is a ``TypedDict``) that fills itself once. Every read
    of a service key or of the whole mapping fills it first; keys set by the caller are kept. It
    stays inert until :meth:`arm` is called, so the checks langchain-core runs while the model is
    constructed make no request. Copies and pickles are plain dicts of what is known; ``==``
    compares what is known.

    Args:
        fetch: reads the limits from the service (one request); raises :class:`AnankeError` when
            it cannot.
    """

    def __init__(self, fetch: Callable[[], dict[str, int]]) -> None:
        super().__init__(CAPABILITIES)
        self._fetch = fetch
        self._lock = threading.Lock()
        self._filled = False
        self._next_try = float("inf")

    def arm(self) -> None:
        """Allow the first fetch (called once the model is constructed)."""
        self._next_try = 0.0

    def _fill(self) -> None:
        if self._filled or time.monotonic() < self._next_try:
            return
        with self._lock:
            if self._filled or time.monotonic() < self._next_try:
                return
            try:
                limits = self._fetch()
            except AnankeError as exc:
                logger.debug("model profile: token limits unavailable (%s)", exc)
                self._next_try = time.monotonic() + RETRY_AFTER_FAILURE_S
                return
            for key, value in limits.items():
                dict.setdefault(self, key, value)
            self._filled = True

    def _filled_for(self, key: object) -> None:
        if key in SERVICE_KEYS:
            self._fill()

    def __getitem__(self, key: str) -> Any:
        self._filled_for(key)
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        self._filled_for(key)
        return super().get(key, default)

    def __contains__(self, key: object) -> bool:
        self._filled_for(key)
        return super().__contains__(key)

    def __iter__(self) -> Iterator[str]:
        self._fill()
        return super().__iter__()

    def __len__(self) -> int:
        self._fill()
        return super().__len__()

    def keys(self) -> dict_keys[str, Any]:
        self._fill()
        return super().keys()

    def values(self) -> dict_values[str, Any]:
        self._fill()
        return super().values()

    def items(self) -> dict_items[str, Any]:
        self._fill()
        return super().items()

    def copy(self) -> dict[str, Any]:
        self._fill()
        return dict(super().items())

    def __repr__(self) -> str:
        self._fill()
        return super().__repr__()

    def __reduce__(self) -> tuple[type[dict[str, Any]], tuple[dict[str, Any]]]:
        return dict, (dict(super().items()),)
