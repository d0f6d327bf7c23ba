"""Shared by the examples: use the service at ``ANANKE_BASE_URL``, or start a local one for the run."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from urllib.parse import urlparse

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"


def _healthy(url: str) -> bool:
    try:
        return bool(httpx.get(f"{url}/health", timeout=3).json().get("status") == "ok")
    except (httpx.HTTPError, ValueError):
        return False


def _answers(url: str) -> bool:
    try:
        httpx.get(f"{url}/health", timeout=3)
    except httpx.HTTPError:
        return False
    return True


@contextlib.contextmanager
def service(timeout: float = 600) -> Iterator[str]:
    """Yield a healthy service URL; a service this started is stopped afterwards."""
    url = os.environ.get("ANANKE_BASE_URL", DEFAULT_URL).rstrip("/")
    proc = None
    if not _answers(url):
        port = urlparse(url).port or 8000
        print(
            f"No service at {url}; starting `ananke serve --port {port}` (about a minute)...", file=sys.stderr
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "modal_service.cli", "serve", "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + timeout
        while not _healthy(url):
            if proc is not None and proc.poll() is not None:
                raise SystemExit(f"ananke serve exited with {proc.returncode}; run it by hand to see why")
            if time.monotonic() > deadline:
                raise SystemExit(f"service at {url} not ready after {timeout:.0f} s")
            time.sleep(2)
        os.environ["ANANKE_BASE_URL"] = url
        yield url
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
