"""Where a single-stream decode step of the 32B shape goes, and which engine settings move it (run 5).

One device call. For each engine variant (``VARIANTS``: the app's setting, then changes to it), a
child process builds vLLM's offline ``LLM`` (EngineCore in its own process, as in the service) with
dummy weights and the real Qwen2.5 tokenizer, and at c=1:

- times 128-token requests, unconstrained (``ignore_eos``) and under a JSON list schema that cannot
  close within the budget, at temperature 1 and 0. ms per step from vLLM's own per-request
  timestamps (EngineCore's first and last token, ``(last - first) / (n - 1)``), checked against the
  wall-time difference between 128- and 16-token requests;
- runs a few dozen steps under vLLM's torch profiler (CUPTI, the kernels inside the CUDA graphs
  included) and splits them: per step the GPU busy time against the step interval, the idle gaps and
  the kernels on either side of them, time by kernel category and by kernel name.

Each child writes ``<variant>.json``; the driver merges them into ``results.json`` after each, so a
call that is cut short still returns what it measured. ``--fake`` checks the driver and the trace
analysis locally, with a made-up trace and no vLLM.

Device call (after the payload parts; see bench/gpu/README.md)::

    . .gpu/last/env.sh && cd .gpu/tree && python3 -m bench.gpu.step_split --out $OUT
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.gpu._shared import (
    GRAPH_CODE,
    HBM_TBPS,
    LIST_SCHEMA,
    ROOT,
    T_START,
    log,
    model_dir,
    weight_bytes,
)
from bench.gpu._trace import fake_trace, load_trace, split_trace

ARCH = "qwen2.5-coder-32b"
LONG, SHORT, REPS = 128, 16, 3
PROFILE_TOKENS = 40
PROMPT = "Write the records of the inventory as a JSON list."
MODES = {  # name: (constrained, temperature)
    "unc_t1": (False, 1.0),
    "json_t1": (True, 1.0),
    "unc_greedy": (False, 0.0),
    "json_greedy": (True, 0.0),
}

# The app's engine (modal_service/app.py through modal_service/engine.py): enforce_eager=False, vLLM's
# default compilation (-O2: torch.compile, FULL_AND_PIECEWISE CUDA graphs), async scheduling (0.26's
# default), guidance backend. Variants change one thing each; all keep the model's arithmetic (bf16
# weights, same math), so real outputs stay correct.
VLLM_C_NORM = {"rms_norm": ["vllm_c"], "fused_add_rms_norm": ["vllm_c"]}
VARIANTS: dict[str, dict[str, Any]] = {
    "app": {"kwargs": {}, "modes": list(MODES), "profile": ["unc_t1", "json_t1"], "est_s": 170},
    # vLLM's CUDA kernels for RMSNorm (+residual), SiLU-and-mul and rotary instead of Inductor's
    # generated Triton kernels (under torch.compile 0.26 lowers these to Inductor by default).
    "vllm-c-ops": {
        "kwargs": {
            "ir_op_priority": VLLM_C_NORM,
            "compilation_config": {"custom_ops": ["+silu_and_mul", "+rotary_embedding"]},
        },
        "modes": ["unc_t1", "json_t1"],
        "profile": ["unc_t1"],
        "est_s": 110,
    },
    # Triton unified attention instead of FlashAttention 3 for the decode.
    "triton-attn": {
        "kwargs": {"attention_config": {"backend": "TRITON_ATTN"}},
        "modes": ["unc_t1", "json_t1"],
        "profile": ["unc_t1"],
        "est_s": 110,
    },
    # Async scheduling off: how much of the CPU's per-step work the app's setting hides.
    "sync": {
        "kwargs": {"async_scheduling": False},
        "modes": ["unc_t1", "json_t1"],
        "profile": ["unc_t1"],
        "est_s": 80,
    },
    # FlashAttention 3 without split-KV in the decode graphs (one kernel per layer, no combine).
    "fa-nosplit": {
        "kwargs": {"attention_config": {"flash_attn_max_num_splits_for_cuda_graph": 1}},
        "modes": ["unc_t1", "json_t1"],
        "profile": ["unc_t1"],
        "est_s": 110,
    },
    # Graphs captured only up to 8 sequences (smaller buffers; the service's would be 256).
    "seqs8": {"kwargs": {"max_num_seqs": 8}, "modes": ["unc_t1", "json_t1"], "profile": [], "est_s": 80},
}
DEFAULT_VARIANTS = ["app", "vllm-c-ops", "fa-nosplit", "triton-attn", "sync"]


# The GEMV floor of run 4 (run_gpu_bench.GEMV_CODE) on the same machine as the engines, closer to what
# the engine runs: random weights (as vLLM's dummy loader), the qkv GEMV with its bias, and the kernel
# that cuBLAS picks for each shape (CUPTI, one graph replay per shape).
FLOOR_CODE = (
    r"""
import json, time, torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
H, KV, I, V, L = 5120, 1024, 27648, 152064, 64
dt = torch.bfloat16
def rnd(*shape):
    return torch.empty(shape, dtype=dt, device="cuda").normal_(0, 0.02)
shapes = {"qkv": (H + 2 * KV, H), "o": (H, H), "gate_up": (2 * I, H), "down": (H, I)}
W = {k: [rnd(*s) for _ in range(L)] for k, s in shapes.items()}
W["lm_head"] = [rnd(V, H)]
B = [rnd(H + 2 * KV) for _ in range(L)]
x = {k: rnd(1, w[0].shape[1]) for k, w in W.items()}
"""
    + GRAPH_CODE
    + r"""
def kernels(g):
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        g.replay(); torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if us:
            rows.append({"name": e.key[:120], "count": e.count, "us_each": round(us / e.count, 2)})
    return sorted(rows, key=lambda r: -r["us_each"] * r["count"])[:4]
def run(kinds, bias):
    def fn():
        for k in kinds:
            for l, w in enumerate(W[k]):
                F.linear(x[k], w, B[l] if (bias and k == "qkv") else None)
    g, ms = graph(fn)
    nbytes = sum(w.numel() * 2 for k in kinds for w in W[k])
    return {"ms": round(ms, 3), "gb": round(nbytes / 1e9, 3), "tbps": round(nbytes / ms / 1e9, 3),
            "kernels": kernels(g)}
out = {k: run([k], False) for k in W}
out["qkv_bias"] = run(["qkv"], True)
out["all"] = run(list(W), False)
out["all_qkv_bias"] = run(list(W), True)
print(json.dumps(out))
"""
)


def floor() -> dict[str, Any]:
    """The cuBLAS GEMV floor of one step on this machine (``FLOOR_CODE``, ~30 s, 61 GiB)."""
    t = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-c", FLOOR_CODE], check=False, capture_output=True, text=True, timeout=240
    )
    if r.returncode:
        return {"error": r.stderr[-2000:], "wall_s": round(time.perf_counter() - t, 1)}
    return {**json.loads(r.stdout.strip().splitlines()[-1]), "wall_s": round(time.perf_counter() - t, 1)}


def step_ms_to_pct(ms: float) -> float:
    """Per cent of the 4.8 TB/s roofline: all bf16 weights read once per step."""
    return 100 * weight_bytes(ARCH)["bytes_total"] / (HBM_TBPS * 1e12) / (ms / 1000)


# ------------------------------------------------------------------------------ child: one engine
def engine_kwargs(model: str, variant: dict[str, Any], profile_dir: str) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "model": model,
        "max_model_len": 4096,
        "gpu_memory_utilization": 0.9,
        "enforce_eager": False,
        "max_num_seqs": 256,
        "load_format": "dummy",
        "disable_log_stats": False,
        "structured_outputs_config": {"backend": "guidance", "disable_any_whitespace": True},
        "profiler_config": {
            "profiler": "torch",
            "torch_profiler_dir": profile_dir,
            "torch_profiler_with_stack": False,
            "torch_profiler_dump_cuda_time_total": False,
            "ignore_frontend": True,
        },
    }
    kw.update(variant["kwargs"])
    return kw


def _params(mode: str, n: int) -> Any:
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    constrained, temperature = MODES[mode]
    return SamplingParams(
        max_tokens=n,
        temperature=temperature,
        top_p=1.0,
        ignore_eos=not constrained,
        structured_outputs=StructuredOutputsParams(json=LIST_SCHEMA) if constrained else None,
    )


def _one(llm: Any, mode: str, n: int) -> dict[str, Any]:
    t = time.perf_counter()
    out = llm.generate([PROMPT], _params(mode, n), use_tqdm=False)[0]
    wall = time.perf_counter() - t
    c = out.outputs[0]
    m = out.metrics
    tpot = None
    if m is not None and getattr(m, "last_token_ts", None) and len(c.token_ids) > 1:
        tpot = (m.last_token_ts - m.first_token_ts) / (len(c.token_ids) - 1) * 1000
    return {
        "n": len(c.token_ids),
        "wall_s": round(wall, 4),
        "engine_tpot_ms": tpot and round(tpot, 3),
        "finish": c.finish_reason,
        "text": c.text,
    }


def measure(llm: Any, mode: str) -> dict[str, Any]:
    reps: list[dict[str, Any]] = []
    eng: list[float] = []
    wd: list[float] = []
    text = ""
    for _ in range(REPS):
        s, lg = _one(llm, mode, SHORT), _one(llm, mode, LONG)
        diff = (lg["wall_s"] - s["wall_s"]) / (lg["n"] - s["n"]) * 1000 if lg["n"] > s["n"] else None
        reps.append(
            {
                "short": {k: v for k, v in s.items() if k != "text"},
                "long": {k: v for k, v in lg.items() if k != "text"},
                "wall_diff_ms": diff and round(diff, 3),
            }
        )
        if lg["engine_tpot_ms"]:
            eng.append(float(lg["engine_tpot_ms"]))
        if diff:
            wd.append(diff)
        text = str(lg["text"])
    ms = statistics.median(eng) if eng else (statistics.median(wd) if wd else None)
    res: dict[str, Any] = {
        "reps": reps,
        "ms_step_engine_p50": eng and round(statistics.median(eng), 3),
        "ms_step_wall_diff_p50": wd and round(statistics.median(wd), 3),
        "ms_step": ms and round(ms, 3),
        "sample": text[:160],
    }
    if ms:
        res |= {"tok_s": round(1000 / ms, 2), "roofline_pct": round(step_ms_to_pct(ms), 2)}
    if MODES[mode][0]:
        try:
            json.loads(text)
            res["json_valid"] = True
        except ValueError:
            res["json_valid"] = False  # cut at max_tokens: expected for this schema
        res["json_prefix_ok"] = text.startswith("[{")
    return res


def profile(llm: Any, mode: str, pdir: Path, out_dir: Path, name: str) -> dict[str, Any]:
    before = set(pdir.glob("**/*.json*"))
    llm.start_profile()
    r = _one(llm, mode, PROFILE_TOKENS)
    llm.stop_profile()
    new: list[Path] = []
    for _ in range(40):  # the worker writes the trace as it stops; give the file a moment
        new = sorted(set(pdir.glob("**/*.json*")) - before, key=lambda p: p.stat().st_mtime)
        if new:
            break
        time.sleep(0.5)
    if not new:
        return {"error": "no trace file written", "tokens": r["n"]}
    trace = new[-1]
    t = time.perf_counter()
    split = split_trace(load_trace(trace), r["n"])
    split |= {
        "tokens": r["n"],
        "engine_tpot_ms_under_profiler": r["engine_tpot_ms"],
        "trace_mib": round(trace.stat().st_size / 2**20, 1),
        "parse_s": round(time.perf_counter() - t, 1),
    }
    if name == "app" and trace.stat().st_size < 15 * 2**20:  # one trace comes back, for a look in Perfetto
        shutil.copy(trace, out_dir / f"trace-{name}-{mode}{''.join(trace.suffixes[-2:])}")
    return split


def child(name: str, out_dir: Path) -> None:
    variant = VARIANTS[name]
    res: dict[str, Any] = {"variant": name, "kwargs": variant["kwargs"], "modes": {}, "profile": {}}
    path = out_dir / f"{name}.json"

    def save() -> None:
        path.write_text(json.dumps(res, indent=1, default=str))

    model = model_dir(ARCH)
    pdir = Path(tempfile.mkdtemp(prefix=f"prof-{name}-"))
    from vllm import LLM

    t = time.perf_counter()
    llm = LLM(**engine_kwargs(model, variant, pdir.as_posix()))
    res["start_s"] = round(time.perf_counter() - t, 1)
    log(f"{name}: engine up in {res['start_s']} s")
    for mode in ("unc_t1", "json_t1"):  # first constrained request builds the guidance backend
        _one(llm, mode, SHORT)
    save()
    for mode in variant["modes"]:
        res["modes"][mode] = m = measure(llm, mode)
        log(
            f"{name} {mode}: {m.get('ms_step')} ms/step (engine {m['ms_step_engine_p50']}, wall diff "
            f"{m['ms_step_wall_diff_p50']}), {m.get('tok_s')} tok/s, {m.get('roofline_pct')} %"
        )
        save()
    for mode in variant["profile"]:
        try:
            res["profile"][mode] = p = profile(llm, mode, pdir, out_dir, name)
        except Exception as exc:  # the measurements above stand without it
            res["profile"][mode] = p = {"error": f"{type(exc).__name__}: {exc}"}
        log(
            f"{name} profile {mode}: "
            + json.dumps({k: v for k, v in p.items() if k not in ("top_kernels", "idle_gaps_us_per_step")})
        )
        save()
    res["done"] = True
    save()
    with contextlib.suppress(Exception):
        shutil.rmtree(pdir)


# ------------------------------------------------------------------------------ driver
def main(argv: list[str] | None = None) -> int:  # noqa: PLR0915
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-gpu-out"))
    ap.add_argument("--variants", nargs="*", default=DEFAULT_VARIANTS, help="from: " + ", ".join(VARIANTS))
    ap.add_argument(
        "--deadline-s", type=float, default=580.0, help="start no variant that cannot end by then"
    )
    ap.add_argument("--modes", nargs="*", choices=list(MODES), help="these modes for every variant")
    ap.add_argument("--floor", action="store_true", help="first the cuBLAS GEMV floor on this machine")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--fake", action="store_true", help="check the driver and the trace analysis, no vLLM")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.child:
        if args.modes:
            VARIANTS[args.child]["modes"] = args.modes
        child(args.child, out)
        return 0
    roofline_ms = weight_bytes(ARCH)["bytes_total"] / (HBM_TBPS * 1e12) * 1000
    results: dict[str, Any] = {
        "started_unix": T_START,
        "arch": ARCH,
        "long": LONG,
        "short": SHORT,
        "reps": REPS,
        "roofline_ms": round(roofline_ms, 3),
        "target_ms": round(roofline_ms / 0.8, 3),
        "variants": {},
        "skipped": [],
    }
    commit = ROOT / "COMMIT"
    if commit.exists():
        results["commit"] = commit.read_text().strip()
    res_path = out / "results.json"

    def save() -> None:
        results["total_wall_s"] = round(time.time() - T_START, 1)
        res_path.write_text(json.dumps(results, indent=1, default=str))

    if args.fake:
        fake_mode = {"ms_step": 18.0, "roofline_pct": step_ms_to_pct(18.0)}
        results["variants"]["fake"] = {
            "profile": {"unc_t1": split_trace(fake_trace(40), 40)},
            "modes": {"unc_t1": fake_mode},
        }
        save()
        log(json.dumps(results["variants"]["fake"]["profile"]["unc_t1"], indent=1)[:3000])
        return 0
    with contextlib.suppress(Exception):
        query = "--query-gpu=name,clocks.max.sm,clocks.max.mem,power.limit"
        smi = subprocess.run(
            ["nvidia-smi", query, "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        results["nvidia_smi"] = smi.stdout.strip()
    if args.floor:
        results["floor"] = fl = floor()
        log("floor: " + json.dumps({k: v.get("ms") if isinstance(v, dict) else v for k, v in fl.items()}))
        save()
    for name in args.variants:
        est = VARIANTS[name]["est_s"]
        left = args.deadline_s - (time.time() - T_START)
        if left < est:
            results["skipped"].append(f"{name}: {left:.0f} s left, needs ~{est} s")
            log(f"skip {name} ({left:.0f} s left)")
            save()
            continue
        log(f"variant {name}: {json.dumps(VARIANTS[name]['kwargs'])}")
        t_var = time.time()
        logf = out / "engines.log"
        with open(logf, "a", encoding="utf-8") as lf:
            lf.write(f"\n===== {name}\n")
            lf.flush()
            cmd = [
                sys.executable,
                "-m",
                "bench.gpu.step_split",
                "--child",
                name,
                "--out",
                str(out),
                *(["--modes", *args.modes] if args.modes else []),
            ]
            proc = subprocess.Popen(
                cmd, cwd=ROOT, stdout=lf, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                proc.wait(timeout=max(10.0, left - 5))
            except subprocess.TimeoutExpired:
                log(f"{name}: out of time, stopping it")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 15)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=15)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 9)
        vpath = out / f"{name}.json"
        v = json.loads(vpath.read_text()) if vpath.exists() else {}
        v["rc"] = proc.returncode
        v["wall_s"] = round(time.time() - t_var, 1)
        results["variants"][name] = v
        with contextlib.suppress(OSError):
            vpath.unlink()
        save()
        log(
            f"{name}: rc {proc.returncode}, "
            + ", ".join(f"{m} {r.get('ms_step')} ms" for m, r in v.get("modes", {}).items())
        )
    save()
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
