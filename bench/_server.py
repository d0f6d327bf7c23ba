"""Start and stop servers on loopback: ``ananke serve`` (ours) and vLLM's own OpenAI server (the peer).

Used by the CPU bench (``bench.run``, ``bench.dtype_probe``), the stress burst and the reliability tests
(``tests/reliability``). Each server runs as ``python -m <module> --port P <args>`` on 127.0.0.1 with a
free port of its own, in its own process group, so stopping it also stops vLLM's engine and worker
processes, even after the main process was killed with SIGKILL. It logs to a file. Nothing here talks
to any address but 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx
import psutil

from bench.common import ROOT, SERVED_NAME

HOST = "127.0.0.1"
OURS = ("modal_service.cli", "serve")
PEER = ("bench.peer_server",)
"""vLLM's OpenAI server with our engine settings (see :mod:`bench.peer_server`)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """``python -m modal_service.cli serve --port P <args>`` (or another ``module``), logging to ``log``."""

    def __init__(
        self,
        args: Sequence[str],
        log: Path,
        api_key: str | None = None,
        *,
        module: Sequence[str] = OURS,
        name: str = "ours",
    ) -> None:
        self.args = list(args)
        self.log = log
        self.api_key = api_key
        self.module = list(module)
        self.name = name
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start_s = 0.0
        """Seconds from launch until :meth:`wait_ready` saw it ready."""
        self._started = 0.0
        self._key_file: Path | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def start(self) -> None:
        cmd = [sys.executable, "-m", *self.module, "--port", str(self.port), *self.args]
        if self.api_key:
            self._key_file = self.log.with_suffix(".key")
            self._key_file.write_text(self.api_key)
            self._key_file.chmod(0o600)
            cmd += ["--api-key-file", str(self._key_file)]
        self._started = time.perf_counter()
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def health(self, timeout: float = 5.0) -> tuple[int, dict[str, object]]:
        response = httpx.get(f"{self.url}/health", timeout=timeout)
        return response.status_code, response.json()

    def wait_ready(self, path: str, ok: Callable[[httpx.Response], bool], timeout: float) -> httpx.Response:
        """Poll ``GET path`` once a second until ``ok`` accepts the answer; raise if the server exits or
        ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if not self.alive:
                raise RuntimeError(f"{self.name} exited with {self.returncode}:\n{self.tail()}")
            with contextlib.suppress(httpx.HTTPError, ValueError):
                response = httpx.get(self.url + path, timeout=5)
                last = f"{response.status_code} {response.text[:200]}"
                if ok(response):
                    self.start_s = time.perf_counter() - self._started
                    return response
            time.sleep(1.0)
        raise RuntimeError(
            f"{self.name} at {self.url} not ready after {timeout:.0f} s (last: {last})\n{self.tail()}"
        )

    def wait_for(self, status: str, timeout: float = 900.0) -> dict[str, object]:
        """Poll /health until it reports ``status`` (``ok`` or ``error``)."""
        response = self.wait_ready("/health", lambda r: r.json().get("status") == status, timeout)
        return dict(response.json())

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def rss_bytes(self) -> dict[str, int]:
        """Resident memory of the server process and of its whole tree (vLLM engine + workers)."""
        assert self.proc is not None
        main = psutil.Process(self.proc.pid)
        tree = [main, *main.children(recursive=True)]
        total = 0
        for proc in tree:
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
        return {"main": main.memory_info().rss, "tree": total, "processes": len(tree)}

    def engine_pids(self) -> list[int]:
        assert self.proc is not None
        return [
            p.pid
            for p in psutil.Process(self.proc.pid).children(recursive=True)
            if "EngineCore" in " ".join(p.cmdline()) or "EngineCore" in p.name()
        ]

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM the group, then SIGKILL whatever is left of it."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        if self.alive:
            try:
                os.killpg(pgid, signal.SIGTERM)
                self.proc.wait(timeout=timeout)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)
        if self._key_file is not None:
            self._key_file.unlink(missing_ok=True)


def _started(server: ServerProcess, path: str, ok: Callable[[httpx.Response], bool], timeout: float) -> None:
    server.start()
    try:
        server.wait_ready(path, ok, timeout)
    except BaseException:
        server.stop()
        raise


#: ``ananke serve`` as users run it (``--max-model-len 4096 --kv-cache-gib 1.0``), for a bench.
OURS_ARGS = (
    "--host", HOST,
    "--max-model-len", "4096",
    "--kv-cache-gib", "1.0",
    "--max-tokens-cap", "4096",
    "--max-inflight", "1024",
    "--drain-seconds", "1",
    "--log-level", "warning",
)  # fmt: skip


def start_ours(logdir: Path, timeout: float = 600) -> ServerProcess:
    """``ananke serve`` with :data:`OURS_ARGS`, ready."""
    server = ServerProcess(list(OURS_ARGS), logdir / "ours.log")
    _started(server, "/health", lambda r: r.status_code == 200 and r.json().get("status") == "ok", timeout)
    return server


def start_peer(
    model: str, logdir: Path, timeout: float = 600, *, extra: Sequence[str] = (), name: str = "peer"
) -> ServerProcess:
    """vLLM's own OpenAI server with our engine settings (``extra``: more vLLM flags), ready."""
    args = ["--model", model, "--served-model-name", SERVED_NAME, *extra]
    server = ServerProcess(args, logdir / f"{name}.log", module=PEER, name=name)
    _started(server, "/v1/models", lambda r: r.status_code == 200, timeout)
    return server
