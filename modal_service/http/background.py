"""The service's app served from a background thread, for hosts that own the main thread.

Modal's GPU memory snapshots need the engine started, warmed and put to sleep inside a lifecycle hook
(``@modal.enter(snap=True)``), before Modal serves anything, and woken in a second hook after the
restore. vLLM's ``AsyncLLM`` belongs to the event loop it was started on, and that must be the loop that
serves requests. So the app runs here under uvicorn on a loop of its own thread, from the first hook
on, and the hooks reach the engine on that loop through :meth:`BackgroundServer.call`. Modal then
forwards traffic to the port (``@modal.web_server``).

Plain Python (no Modal): unit-tested with a stand-in engine (tests/unit/test_background_server.py).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class BackgroundServer:
    """uvicorn serving ``app`` on ``host:port`` from a daemon thread with its own event loop."""

    def __init__(self, app: Any, *, host: str = "0.0.0.0", port: int = 8000, log_level: str = "info") -> None:  # noqa: S104 - the container's port
        import uvicorn

        self.app = app
        self.port = port
        self._server = uvicorn.Server(
            uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on")
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self, timeout_s: float = 60.0) -> None:
        """Start serving; returns once the port accepts connections (the lifespan has begun the
        engine's start in the background). Raises if uvicorn stopped first."""
        if self._thread is not None:
            raise RuntimeError("BackgroundServer.start: already started")

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            await self._server.serve()

        def run() -> None:
            try:
                asyncio.run(main())
            except BaseException as exc:
                self._error = exc

        self._thread = threading.Thread(target=run, name="ananke-http", daemon=True)
        self._thread.start()
        self._poll(
            lambda: bool(self._server.started),
            timeout_s=timeout_s,
            poll_s=0.05,
            stopped="while starting",
            late=f"the server did not listen on port {self.port} within {timeout_s:.0f} s",
        )

    def call(self, make: Callable[[], Coroutine[Any, Any, T]], timeout_s: float | None = None) -> T:
        """Run the coroutine ``make()`` on the server's loop (where the engine lives); its result."""
        if self._loop is None or self._thread is None or not self._thread.is_alive():
            raise RuntimeError(f"the server is not running: {self._error!r}")
        return asyncio.run_coroutine_threadsafe(make(), self._loop).result(timeout_s)

    def wait_for(
        self, ready: Callable[[], bool], *, timeout_s: float, what: str, poll_s: float = 0.5
    ) -> None:
        """Poll ``ready()`` until it holds; TimeoutError naming ``what`` after ``timeout_s``."""
        self._poll(
            ready,
            timeout_s=timeout_s,
            poll_s=poll_s,
            stopped=f"while waiting for {what}",
            late=f"{what}: not within {timeout_s:.0f} s",
        )

    def _poll(
        self, ready: Callable[[], bool], *, timeout_s: float, poll_s: float, stopped: str, late: str
    ) -> None:
        """Poll ``ready()`` until it holds: RuntimeError ``the server stopped <stopped>`` if the server's
        thread ends first, TimeoutError ``late`` after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while not ready():
            if self._thread is None or not self._thread.is_alive():
                raise RuntimeError(f"the server stopped {stopped}: {self._error!r}")
            if time.monotonic() > deadline:
                raise TimeoutError(late)
            time.sleep(poll_s)

    def stop(self, timeout_s: float = 60.0) -> None:
        """Ask uvicorn to exit (the lifespan drains and shuts the engine down) and join the thread."""
        if self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout_s)
