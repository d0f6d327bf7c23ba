"""Shutdown and crashes (these take the shared service down; this module runs last).

SIGTERM: the server drains. Admitted requests run to completion, new ones get 503
(``shutting_down``, Retry-After) and /health says so. SIGKILL mid-stream: the client raises
:class:`AnankeStreamError`; it never hands back a half-parsed answer.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

import httpx
import pytest

from langchain_ananke import ChatAnanke
from langchain_ananke._http import AnankeClient, RetryPolicy
from langchain_ananke.errors import AnankeConnectionError, AnankeStreamError
from langchain_ananke.protocol import GenerateRequest
from tests.reliability.conftest import DRAIN_SECONDS, MAX_TOKENS_CAP, NEVER_ENDS, Service, chat, wait_until


class _Consumer(threading.Thread):
    """Consumes a stream in the background; records the chunks and how it ended."""

    def __init__(self, iterate: Any) -> None:
        super().__init__(daemon=True)
        self.iterate = iterate
        self.chunks: list[Any] = []
        self.error: BaseException | None = None
        self.first = threading.Event()

    def run(self) -> None:
        try:
            for chunk in self.iterate():
                self.chunks.append(chunk)
                self.first.set()
        except BaseException as exc:
            self.error = exc
        finally:
            self.first.set()


@pytest.mark.integration
def test_sigterm_drains_then_sigkill_breaks_the_stream_cleanly(service_handle: Service) -> None:
    server = service_handle.take()
    url, key = server.url, server.api_key
    retry = RetryPolicy(max_retries=0)

    # A: a long LangChain stream (ChatAnanke), cut later by SIGKILL.
    llm = ChatAnanke(base_url=url, api_key=key, max_tokens=MAX_TOKENS_CAP, temperature=0.8, max_retries=0)
    a = _Consumer(lambda: llm.stream("Write a long story about the sea.", constraints=NEVER_ENDS))
    # B: a short raw-client stream, admitted before SIGTERM: it must finish.
    client = AnankeClient(url, api_key=key, retry=retry)
    b = _Consumer(
        lambda: client.stream(GenerateRequest(prompt=chat("Count to five."), max_tokens=24, temperature=0.0))
    )
    a.start()
    assert a.first.wait(120)
    b.start()
    assert b.first.wait(120)
    assert a.error is None
    assert b.error is None

    server.signal(signal.SIGTERM)
    signalled = time.monotonic()
    wait_until(lambda: httpx.get(f"{url}/health", timeout=5).status_code == 503, 5)
    health = httpx.get(f"{url}/health", timeout=5).json()
    assert health["draining"] is True
    assert health["status"] == "error"
    assert "shutting down" in health["detail"]
    # New work is refused with a retryable 503, not queued and not dropped silently.
    refused = httpx.post(
        f"{url}/generate_api",
        json={"prompt": "x", "max_tokens": 1},
        headers={"Authorization": f"Bearer {key}"},
        timeout=10,
    )
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "shutting_down"
    assert refused.headers["retry-after"]

    b.join(timeout=DRAIN_SECONDS)
    assert not b.is_alive()
    assert b.error is None, b.error
    assert b.chunks[-1].event == "done"
    assert b.chunks[-1].response.finish_reason in ("stop", "length")
    drained_b = time.monotonic() - signalled

    # A is still streaming inside the drain window: now the process dies without warning.
    assert a.is_alive(), "the long stream ended before the kill; make it longer"
    assert server.alive
    server.signal(signal.SIGKILL)
    a.join(timeout=30)
    assert not a.is_alive()
    assert isinstance(a.error, AnankeStreamError), repr(a.error)
    assert a.chunks, "tokens streamed before the kill"
    # Chunks are text deltas only; the final (done) chunk with the verdict never came.
    assert all(c.response_metadata.get("finish_reason") is None for c in a.chunks)
    print(f"B finished {drained_b:.1f} s into the drain; A got {len(a.chunks)} chunks, then {a.error!r}")

    # The service is gone: a request that cannot reach it is retried, then a typed error.
    with pytest.raises(AnankeConnectionError):
        AnankeClient(url, api_key=key, retry=RetryPolicy(max_retries=1, initial_delay=0.01)).generate(
            GenerateRequest(prompt="x", max_tokens=1)
        )
    server.stop()


@pytest.mark.stress
def test_drain_is_bounded(service_handle: Service) -> None:
    """A stream longer than the drain window is cut when the window closes; the process exits."""
    server = service_handle.take()
    client = AnankeClient(server.url, api_key=server.api_key, retry=RetryPolicy(max_retries=0))
    long = _Consumer(
        lambda: client.stream(
            GenerateRequest(
                prompt=chat("Write a long story."), max_tokens=MAX_TOKENS_CAP, constraints=NEVER_ENDS
            )
        )
    )
    long.start()
    assert long.first.wait(120)
    server.signal(signal.SIGTERM)
    started = time.monotonic()
    assert server.proc is not None
    server.proc.wait(timeout=DRAIN_SECONDS + 30)
    took = time.monotonic() - started
    long.join(timeout=30)
    print(f"exited {took:.1f} s after SIGTERM; the stream ended with {long.error!r}")
    assert took < DRAIN_SECONDS + 15
    if long.error is None:  # it finished inside the window after all
        assert long.chunks[-1].event == "done"
    else:
        assert isinstance(long.error, AnankeStreamError)
    server.stop()
