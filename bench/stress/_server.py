"""Start and stop one ``ananke serve`` subprocess on loopback, with its own settings.

Shared by the reliability tests (``tests/reliability``) and the stress scripts. The server runs in its
own process group, so stopping it also stops vLLM's engine and worker processes, even after the main
process was killed with SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """``python -m modal_service.cli serve --port P <args>``, logging to ``log``."""

    def __init__(self, args: list[str], log: Path, api_key: str | None = None) -> None:
        self.args = args
        self.log = log
        self.api_key = api_key
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self._key_file: Path | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def start(self) -> None:
        cmd = [sys.executable, "-m", "modal_service.cli", "serve", "--port", str(self.port), *self.args]
        if self.api_key:
            self._key_file = self.log.with_suffix(".key")
            self._key_file.write_text(self.api_key)
            self._key_file.chmod(0o600)
            cmd += ["--api-key-file", str(self._key_file)]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def health(self, timeout: float = 5.0) -> tuple[int, dict[str, object]]:
        response = httpx.get(f"{self.url}/health", timeout=timeout)
        return response.status_code, response.json()

    def wait_for(self, status: str, timeout: float = 900.0) -> dict[str, object]:
        """Poll /health until it reports ``status`` (``ok`` or ``error``)."""
        deadline = time.monotonic() + timeout
        body: dict[str, object] = {}
        while time.monotonic() < deadline:
            if not self.alive:
                raise RuntimeError(f"ananke serve exited with {self.returncode}:\n{self.tail()}")
            try:
                _, body = self.health()
                if body.get("status") == status:
                    return body
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(1)
        raise RuntimeError(f"{self.url} not {status} after {timeout} s (last: {body})\n{self.tail()}")

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

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
