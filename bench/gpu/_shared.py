"""What the GPU bench's driver (``run_gpu_bench``), its step split (``step_split``) and the plots share:
paths, the model shapes and their weight bytes, the roofline's bandwidth, the constrained workload, the
CUDA-graph timing helper that runs on the device, and the log line.

Standard library only (and :mod:`bench.workloads`): everything here also runs on the device.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

from bench.workloads import RECORD

ROOT = Path(__file__).resolve().parents[2]
T_START = time.time()
HBM_TBPS = 4.8  # H200 datasheet HBM3e bandwidth

# Practically never closes within 128 tokens, so constrained and unconstrained requests generate the
# same number of tokens: its shortest output is 122 Qwen2.5 tokens (12 items of ~10), and sampled items
# are longer (multi-digit ids, non-empty names). The service answers 422 to a schema whose shortest
# output exceeds max_tokens, hence not more items.
LIST_SCHEMA: dict[str, Any] = {"type": "array", "minItems": 12, "items": RECORD}

ARCH = {  # the published configs of Qwen2.5-Coder-32B and -7B (the dummy models have these shapes)
    "qwen2.5-coder-32b": {"hidden": 5120, "layers": 64, "heads": 40, "kv_heads": 8, "inter": 27648},
    "qwen2.5-coder-7b": {"hidden": 3584, "layers": 28, "heads": 28, "kv_heads": 4, "inter": 18944},
}
VOCAB = 152064


def model_dir(arch: str) -> str:
    """The dummy model of ``arch`` in the payload (``$GPU_PL``, else ``.gpu/models``)."""
    return (Path(os.environ.get("GPU_PL", ROOT / ".gpu/models")) / f"{arch}-dummy").as_posix()


def weight_bytes(arch: str) -> dict[str, float]:
    """bf16 parameter bytes: all weights, and those one decode step reads (one embedding row)."""
    a = ARCH[arch]
    h, kv = a["hidden"], a["hidden"] // a["heads"] * a["kv_heads"]
    per_layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * a["inter"] + 2 * h
    total = 2 * VOCAB * h + a["layers"] * per_layer + h
    read = total - VOCAB * h + h
    return {"params": total, "bytes_total": 2 * total, "bytes_read_per_step": 2 * read}


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (0-100); None for no values."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def log(msg: str) -> None:
    print(f"[{time.time() - T_START:7.1f}s] {msg}", flush=True)


# Device-side helper shared by the GEMV floors here and in step_split.py: fn captured in one CUDA graph
# (warmed on a side stream first); returns the graph and ms per replay.
GRAPH_CODE = r"""
def graph(fn):
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(3): g.replay()
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(20): g.replay()
    torch.cuda.synchronize()
    return g, (time.perf_counter() - t) / 20 * 1000
"""
