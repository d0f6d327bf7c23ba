"""One service with tight limits for the reliability tests, started once for this folder.

Settings: ``--max-inflight 4`` (so a burst sees 429s), an API key (read from a file), a 256-token
cap, 4 prompts per batch and a 1024-token context, a 20 s drain. The shutdown tests
(``test_shutdown.py``, run last) take it down; a test that needs it after that starts it again.

``ANANKE_RELIABILITY_BASE_URL`` + ``ANANKE_RELIABILITY_API_KEY`` reuse a service started by hand
with the same settings (the destructive tests are then skipped).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench._server import ROOT as ROOT_DIR
from bench._server import ServerProcess

__all__ = ["NEVER_ENDS", "ROOT_DIR", "Service", "chat", "wait_until"]

API_KEY = "rel-test-key-Zx81"
MAX_INFLIGHT = 4
MAX_TOKENS_CAP = 256
MAX_BATCH = 4
MAX_MODEL_LEN = 1024
DRAIN_SECONDS = 20
#: A regex no answer within the cap can finish: more words than the cap has tokens, one space between
#: them (SmolLM2 has no token that spans two words, so each word costs a token; ``[a-z ]{2000}`` could
#: be finished early by its 16- to 64-space tokens, and once was, ending a "long" stream in seconds).
NEVER_ENDS = {"regex": f"[a-z]+( [a-z]+){{{MAX_TOKENS_CAP}}}"}
SERVER_ARGS = [
    "--max-inflight",
    str(MAX_INFLIGHT),
    "--max-tokens-cap",
    str(MAX_TOKENS_CAP),
    "--max-batch-prompts",
    str(MAX_BATCH),
    "--max-model-len",
    str(MAX_MODEL_LEN),
    "--drain-seconds",
    str(DRAIN_SECONDS),
]


class Service:
    """The shared service: its URL, key, log and (when we started it) its process."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.external = os.environ.get("ANANKE_RELIABILITY_BASE_URL")
        self.api_key = os.environ.get("ANANKE_RELIABILITY_API_KEY", API_KEY) if self.external else API_KEY
        self.process: ServerProcess | None = None
        self._starts = 0

    @property
    def url(self) -> str:
        if self.external:
            return self.external
        assert self.process is not None
        return self.process.url

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def ensure(self) -> Service:
        if self.external:
            return self
        if self.process is None or not self.process.alive:
            if self.process is not None:
                self.process.stop()
            self._starts += 1
            self.process = ServerProcess(SERVER_ARGS, self.log_dir / f"serve-{self._starts}.log", API_KEY)
            self.process.start()
            self.process.wait_for("ok")
        return self

    def take(self) -> ServerProcess:
        """Hand the process to a destructive test; the next ``ensure`` starts a fresh one."""
        if self.external:
            pytest.skip("needs a service this test session started (it stops it)")
        self.ensure()
        assert self.process is not None
        return self.process

    def client(self, **kwargs: Any) -> httpx.Client:
        kwargs.setdefault("timeout", 120)
        return httpx.Client(base_url=self.url, headers=self.headers, **kwargs)

    def health(self) -> dict[str, Any]:
        body: dict[str, Any] = httpx.get(f"{self.url}/health", timeout=10).json()
        return body

    def log_text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.log_dir.glob("serve-*.log")))

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


@pytest.fixture(scope="package")
def _service_handle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    service = Service(tmp_path_factory.mktemp("reliability"))
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture
def service(_service_handle: Service) -> Service:
    """The running shared service (started, or restarted, on demand)."""
    return _service_handle.ensure()


@pytest.fixture
def service_handle(_service_handle: Service) -> Service:
    """The handle itself, for tests that take the process down."""
    return _service_handle


def wait_until(predicate: Any, timeout: float, interval: float = 0.05) -> float:
    """Seconds until ``predicate()`` held; raises AssertionError after ``timeout``."""
    import time

    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


def chat(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
