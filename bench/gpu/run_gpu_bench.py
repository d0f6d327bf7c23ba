"""GPU benchmark of the service's own code path on one H200 (issue 9). One device call runs all of it.

For each engine setting (32B shape with CUDA graphs, 32B eager, 7B with CUDA graphs) it starts a server
process that builds ``modal_service.engine.engine.Engine`` + ``modal_service.http.app.create_app`` and
serves it with uvicorn on loopback, then drives ``POST /generate_api`` over HTTP from this process.
Weights are vLLM's ``load_format="dummy"`` (random, real shapes); the tokenizer is the real Qwen2.5 one.

Measured per phase (concurrency c, closed loop): aggregate output tok/s, client p50/p95 latency, TTFT
(server metadata), ms per decode step (TPOT), finish reasons, the constraint re-check, whitespace outside
JSON strings, grammar compile time; and, from ``so_probe`` inside EngineCore, the CPU time of the token
masks per step. Bench-only routes added to the same app run the same requests straight on vLLM's
``AsyncLLM`` (no HTTP, no wrapper) for the wrapper-overhead ratio.

Every phase also carries the server's own timeline (``/_bench/trace``: when requests
arrived, were planned and on how many threads, reached the engine, got a first token; how late the
event loop ran) and, for the warm-up rounds, stack samples of the API process and EngineCore
(``so_probe``'s sampler). ``--first-bursts`` meets each new concurrency level on the raw route first,
then on ours; ``--gemv`` times cuBLAS bf16 GEMVs over a 32B step's weights before the engines start.

Device call (after the payload parts; see bench/gpu/README.md)::

    . .gpu/last/env.sh && python3 -m bench.gpu.run_gpu_bench --out $OUT

Locally, ``--fake`` runs the whole HTTP/driver path against a fake engine (no vLLM engine is started).

Where the pieces live: ``_plan`` (engine settings, phases, requests), ``_serve`` (the server process),
``_client`` (a phase's requests and summary), ``_analysis`` (the server side's records), ``_shared``
(shapes, workload, device helpers, shared with ``step_split``). This module runs them in order.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.gpu._analysis import parse_server_log, probe_records, probe_summary, trace_summary
from bench.gpu._client import http_phase, raw_phase, summarize
from bench.gpu._plan import (
    CLOSING_SCHEMA,
    DEFAULT_ENGINES,
    ENGINES,
    FF_MAX_TOKENS,
    MAX_TOKENS,
    PHASES,
    TEMPERATURE,
    variant_engine,
)
from bench.gpu._shared import GRAPH_CODE, LIST_SCHEMA, ROOT, T_START, log, model_dir, weight_bytes

# bf16 GEMVs (M=1, torch F.linear = cuBLAS, what vLLM's unquantized linear layers run) over every
# weight matrix one 32B decode step reads, distinct buffers (61 GiB, far beyond L2), in one CUDA graph:
# the step time of the weight reads alone with these kernels, to set against the engine's step.
GEMV_CODE = (
    r"""
import json, time, torch
import torch.nn.functional as F
H, KV, I, V, L = 5120, 1024, 27648, 152064, 64
dt = torch.bfloat16
shapes = {"qkv": (H + 2 * KV, H), "o": (H, H), "gate_up": (2 * I, H), "down": (H, I)}
W = {k: [torch.empty(s, dtype=dt, device="cuda").fill_(0.01) for _ in range(L)] for k, s in shapes.items()}
W["lm_head"] = [torch.empty((V, H), dtype=dt, device="cuda").fill_(0.01)]
x = {k: torch.randn(1, w[0].shape[1], dtype=dt, device="cuda") for k, w in W.items()}
"""
    + GRAPH_CODE
    + r"""
def graph_ms(fn):
    return graph(fn)[1]
def timed(kinds):
    def run():
        for k in kinds:
            for w in W[k]:
                F.linear(x[k], w)
    ms = graph_ms(run)
    nbytes = sum(w.numel() * 2 for k in kinds for w in W[k])
    return {"ms": round(ms, 3), "gb": round(nbytes / 1e9, 3), "tbps": round(nbytes / ms / 1e9, 3),
            "gemvs": sum(len(W[k]) for k in kinds)}
out = {k: timed([k]) for k in W}
out["all"] = timed(list(W))
# The small kernels of a batch-1 layer (norms, rotary, KV write, attention, activation) move almost no
# data; inside a CUDA graph each still costs its launch and ramp. 7 per layer, between the 4 GEMVs.
h = torch.randn(1, H, dtype=dt, device="cuda")
def tiny(n):
    for _ in range(n):
        h.mul_(1.0)
out["tiny_kernel_us"] = round(graph_ms(lambda: tiny(1000)) / 1000 * 1000, 3)
def layers():
    for l in range(L):
        F.linear(x["qkv"], W["qkv"][l]); tiny(3)
        F.linear(x["o"], W["o"][l]); tiny(1)
        F.linear(x["gate_up"], W["gate_up"][l]); tiny(1)
        F.linear(x["down"], W["down"][l]); tiny(2)
    F.linear(x["lm_head"], W["lm_head"][0])
out["layers_with_7_tiny_ms"] = round(graph_ms(layers), 3)
print(json.dumps(out))
"""
)


def host_facts() -> dict[str, Any]:
    """Facts of this host that bear on the first-burst stall: CPUs as Python sees them (the default
    executor has min(32, cpu_count + 4) threads), the listen backlog cap, THP, and what creating 32
    threads costs with the default stack and with the service's 256 MiB compile stack."""
    import threading

    out: dict[str, Any] = {"cpu_count": os.cpu_count()}
    with contextlib.suppress(Exception):
        out["affinity_cpus"] = len(os.sched_getaffinity(0))
    for key, path in {
        "somaxconn": "/proc/sys/net/core/somaxconn",
        "thp": "/sys/kernel/mm/transparent_hugepage/enabled",
        "overcommit": "/proc/sys/vm/overcommit_memory",
    }.items():
        with contextlib.suppress(Exception):
            out[key] = Path(path).read_text().strip()
    for label, size in (("threads32_default_ms", 0), ("threads32_256mib_ms", 256 << 20)):
        old = threading.stack_size(size)
        t = time.perf_counter()
        ths = [threading.Thread(target=time.sleep, args=(0.001,)) for _ in range(32)]
        for th in ths:
            th.start()
        for th in ths:
            th.join()
        out[label] = round((time.perf_counter() - t) * 1000, 2)
        threading.stack_size(old)
    return out


def gpu_mib() -> int | None:
    """GPU memory in use, as nvidia-smi reports it (MiB)."""
    with contextlib.suppress(Exception):
        used = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            check=False,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        return int(used.split()[0])
    return None


class Bench:
    def __init__(  # noqa: PLR0917
        self,
        out_dir: Path,
        deadline: float,
        fake: bool,
        only: list[str] | None,
        first_bursts: bool,
        windows: list[float] | None,
        gemv: bool = False,
    ) -> None:
        self.gemv = gemv
        self._last_cpu_s: float | None = None
        self.first_bursts = first_bursts
        self.windows = windows or []
        self.out = out_dir
        self.deadline = deadline
        self.fake = fake
        self.only = only
        self.results: dict[str, Any] = {
            "started_unix": T_START,
            "max_tokens": MAX_TOKENS,
            "temperature": TEMPERATURE,
            "list_schema": LIST_SCHEMA,
            "closing_schema": CLOSING_SCHEMA,
            "engines": {},
            "skipped": [],
        }

    def elapsed(self) -> float:
        return time.time() - T_START

    def save(self) -> None:
        tmp = self.out / "results.json.tmp"
        tmp.write_text(json.dumps(self.results, indent=1, default=str), encoding="utf-8")
        tmp.replace(self.out / "results.json")

    def device_info(self) -> None:
        self.results["host"] = host_facts()
        log(f"host {self.results['host']}")
        if self.fake:
            return
        with contextlib.suppress(Exception):
            self.results["nvidia_smi"] = subprocess.run(
                [
                    "nvidia-smi",
                    "--query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit",
                    "--format=csv",
                ],
                check=False,
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout
        code = (
            "import torch,time\n"
            "x=torch.empty(4<<30,dtype=torch.uint8,device='cuda');y=torch.empty_like(x)\n"
            "for _ in range(3): y.copy_(x)\n"
            "torch.cuda.synchronize();t=time.perf_counter()\n"
            "for _ in range(20): y.copy_(x)\n"
            "torch.cuda.synchronize();dt=time.perf_counter()-t\n"
            "print(2*20*x.numel()/dt/1e12, torch.cuda.get_device_name(), torch.__version__,"
            " torch.version.cuda)\n"
        )
        res = None
        try:
            res = subprocess.run(
                [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=90
            )
            bw, *rest = res.stdout.split()
            self.results["copy_bandwidth_tbps"] = round(float(bw), 3)
            self.results["device"] = " ".join(rest[:-2])
            self.results["torch_device"] = {"torch": rest[-2], "cuda": rest[-1]}
            log(f"device copy bandwidth {float(bw):.2f} TB/s on {self.results['device']}")
        except Exception as exc:
            self.results["copy_bandwidth_error"] = f"{exc}"
        if self.gemv:
            res = None
            try:
                res = subprocess.run(
                    [sys.executable, "-c", GEMV_CODE],
                    check=False,
                    capture_output=True,
                    text=True,
                    timeout=120,
                )
                self.results["gemv"] = json.loads(res.stdout.strip().splitlines()[-1])
                log(f"gemv {self.results['gemv']}")
            except Exception as exc:
                self.results["gemv_error"] = f"{type(exc).__name__}: {exc} {res.stderr[-500:] if res else ''}"

    def warmups(self, eng: dict[str, Any]) -> list[tuple[str, str, str, int, int, int]]:
        """(name, kind, mode, c, n, max_tokens) of the warm-up rounds, all measured and traced.

        With ``--first-bursts`` (the first-burst stall: run 2 and 3 saw the first burst at a new
        concurrency level take 5-26 s longer), the engine's own route meets each new level first
        (``raw_first_*``, no HTTP, no wrapper), then our HTTP route at the same level, then again:
        a stall on the raw route is vLLM's, one only on ours is ours. Then 256 concurrent requests
        with one new schema, twice (compile of a schema many requests share at once)."""
        rounds = [("cold_first_json", "http", "json", 1, 1, MAX_TOKENS)]
        if not self.first_bursts or not eng.get("diag", True):
            return [
                *rounds,
                ("warmup_unc", "http", "unc", 8, 8, 32),
                ("warmup_json", "http", "json", 8, 8, MAX_TOKENS),
            ]
        tag = f"{eng['name']}-{int(time.time())}"
        for c in (8, 256):
            rounds += [
                (f"raw_first_c{c}_unc", "raw", "unc", c, c, 32),
                (f"first_c{c}_unc", "http", "unc", c, c, 32),
                (f"second_c{c}_unc", "http", "unc", c, c, 32),
            ]
        rounds += [
            ("first_c256_json_new", "http", f"json_new:{tag}", 256, 256, 64),
            ("second_c256_json_new", "http", f"json_new:{tag}", 256, 256, 64),
            ("warm_c64_unc", "http", "unc", 64, 64, 32),
            ("warm_c64_json", "http", "json", 64, 64, MAX_TOKENS),
        ]
        return rounds

    def est(self, eng: dict[str, Any], ph: dict[str, Any]) -> float:
        c = ph["c"]
        if ph["mode"] == "knee":  # long prompts: the KV cache holds ~20 such requests on an 80 GB card
            decode_s = math.ceil(ph["n"] / c) * ph.get("max_tokens", MAX_TOKENS) * 0.03
            return max(decode_s, ph["n"] * 0.5) * 1.2 + 5
        step = eng["step"][c] + (0.45 * c if c <= 128 else 0.06 * c) * (ph["mode"] != "unc")
        return math.ceil(ph["n"] / c) * MAX_TOKENS * step / 1000 * 1.2 + 2

    def run_engine(self, eng: dict[str, Any]) -> None:
        name = eng["name"]
        end_by = min(eng["end_by"], self.deadline)
        if self.elapsed() + eng["start_est"] + 20 > end_by:
            self.results["skipped"].append(f"engine {name}: not enough time ({self.elapsed():.0f}s)")
            log(f"skip engine {name}")
            return
        model = model_dir(eng["arch"])
        port = 18000 + len(self.results["engines"])
        probe_dir = Path(tempfile.mkdtemp(prefix=f"probe-{name}-"))
        self._last_cpu_s = None
        plugin_dir = probe_dir / "plugin"
        dist = plugin_dir / "ananke_bench_probe-0.1.dist-info"
        dist.mkdir(parents=True)
        (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ananke-bench-probe\nVersion: 0.1\n")
        (dist / "entry_points.txt").write_text(
            "[vllm.general_plugins]\nananke_bench_probe = bench.gpu.so_probe:register\n"
        )
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT), str(plugin_dir), *filter(None, [env.get("PYTHONPATH")])]
        )
        env["ANANKE_BENCH_PROBE_DIR"] = str(probe_dir)
        env.update(eng.get("env", {}))
        spec = {
            "model": model,
            "enforce_eager": eng["enforce_eager"],
            "extra": eng["extra"],
            "sleep_mode": eng.get("sleep_mode", False),
            "fast_forward": eng.get("fast_forward", False),
            "fast_forward_async": eng.get("fast_forward_async", False),
            "port": port,
            "fake": self.fake,
        }
        log_path = self.out / f"server-{name.replace('+', '_')}.log"  # "+" does not come back from $OUT
        res: dict[str, Any] = {
            "arch": eng["arch"],
            "enforce_eager": eng["enforce_eager"],
            "extra": eng["extra"],
            "env": eng.get("env", {}),
            "fast_forward": [eng.get("fast_forward", False), eng.get("fast_forward_async", False)],
            "weights": weight_bytes(eng["arch"]),
            "phases": {},
        }
        self.results["engines"][name] = res
        t_launch = time.time()
        with open(log_path, "w", encoding="utf-8") as logf:
            proc = subprocess.Popen(
                [sys.executable, "-m", "bench.gpu._serve", json.dumps(spec)],
                cwd=ROOT,
                env=env,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                self._drive(eng, res, proc, port, t_launch, end_by, probe_dir)
            finally:
                self._stop(proc, res)
                res["server_log"] = parse_server_log(log_path)
                self.save()

    def _wait_ready(self, proc: subprocess.Popen[bytes], port: int, limit: float) -> dict[str, Any]:
        import urllib.request

        while time.time() < limit:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            with (
                contextlib.suppress(Exception),
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r,
            ):
                if r.status == 200:
                    break
            info: dict[str, Any] = {}
            with (
                contextlib.suppress(Exception),
                urllib.request.urlopen(f"http://127.0.0.1:{port}/_bench/info", timeout=2) as r,
            ):
                info = json.loads(r.read())
            if info.get("state") == "ok":  # ready even if /health itself fails
                break
            if info.get("state") == "error":
                raise RuntimeError(f"engine failed: {info.get('error')}")
            time.sleep(0.5)
        else:
            raise TimeoutError("engine did not become ready in time")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/_bench/info", timeout=5) as r:
            return dict(json.loads(r.read()))

    def _drive(  # noqa: PLR0917
        self,
        eng: dict[str, Any],
        res: dict[str, Any],
        proc: subprocess.Popen[bytes],
        port: int,
        t_launch: float,
        end_by: float,
        probe_dir: Path,
    ) -> None:
        name = eng["name"]
        try:
            info = self._wait_ready(proc, port, T_START + end_by - 15)
        except Exception as exc:
            res["start_error"] = f"{type(exc).__name__}: {exc}"
            log(f"engine {name} failed to start: {exc}")
            return
        res["info"] = info
        res["ready_wall_s"] = round(time.time() - t_launch, 2)
        log(f"engine {name} ready: engine {info.get('engine_start_s')}s, process {res['ready_wall_s']}s")
        self.save()
        if eng.get("sleep_first"):
            # Modal's snapshot path as modal_service.app runs it: Engine.start (done), warm_up, sleep; then
            # after the restore, wake and the first user requests
            self._prod_warm_up(res, port)
            self._sleep_cycles(res, port, int(eng["sleep_cycles"]), probe_dir)
        # warm-up; the very first constrained request initialises the llguidance backend in EngineCore
        for wname, kind, mode, c, n, max_tokens in self.warmups(eng):
            self._phase(
                res,
                {
                    "name": wname,
                    "kind": kind,
                    "c": c,
                    "n": n,
                    "mode": mode,
                    "max_tokens": max_tokens,
                    "ctl": {"mode": "service", "sample": True},
                },
                port,
                60,
                probe_dir,
            )
        log(
            f"{name} warm-up done; first JSON request {res['phases']['cold_first_json'].get('lat_p50_ms')} ms"
        )
        phases = PHASES.get(name) or PHASES["32b-compile-v1"]  # a 32b+VARIANT engine: c=1 only
        for prio in (1, 2):
            for ph in phases:
                if ph["prio"] != prio or (self.only and ph["name"] not in self.only):
                    continue
                est = self.est(eng, ph)
                if self.elapsed() + est + 12 > end_by:
                    self.results["skipped"].append(f"{name}/{ph['name']} (est {est:.0f}s)")
                    continue
                self._phase(res, ph, port, est, probe_dir)
            # after the priority-1 phases (a failed sleep loses less), with time left for them
            if prio == 1 and eng.get("sleep_cycles") and not eng.get("sleep_first"):
                if self.elapsed() + 70 > end_by:
                    self.results["skipped"].append(f"{name}/sleep cycles")
                else:
                    self._sleep_cycles(res, port, int(eng["sleep_cycles"]), probe_dir)
        time.sleep(0.6)  # let the probe flush its last records
        recs = probe_records(probe_dir)
        for summary in res["phases"].values():
            win = summary.pop("_window", None)
            if win:
                summary["probe"] = probe_summary(
                    probe_dir, win[0], win[1], summary["c"], info.get("pid"), recs
                )

    def _prod_warm_up(self, res: dict[str, Any], port: int) -> None:
        """``modal_service.app.warm_up``, what ``@modal.enter(snap=True)`` runs before the sleep."""
        try:
            from modal_service.app import warm_up

            t = time.perf_counter()
            res["prod_warm_up"] = {"requests_s": warm_up(f"http://127.0.0.1:{port}", "none")}
            res["prod_warm_up"]["total_s"] = round(time.perf_counter() - t, 3)
        except Exception as exc:
            res["prod_warm_up"] = {"error": f"{type(exc).__name__}: {exc}"}
        log(f"  production warm-up: {res['prod_warm_up']}")
        self.save()

    def _sleep_cycles(self, res: dict[str, Any], port: int, cycles: int, probe_dir: Path) -> None:
        """Sleep mode as Modal's GPU-snapshot path uses it: the engine is up and warmed (``Engine.start``
        ran its constrained warm-up request), then it sleeps (level 1) and wakes; then the first
        requests after the wake, one at a time: unconstrained and JSON (the list schema) in turn,
        JSON first on the second cycle."""
        import urllib.request

        def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}{path}",
                data=json.dumps(body).encode(),
                headers={"content-type": "application/json"},
            )
            t = time.perf_counter()
            with urllib.request.urlopen(req, timeout=300) as r:  # noqa: S310 - loopback
                out = dict(json.loads(r.read()))
            out["call_s"] = round(time.perf_counter() - t, 3)
            return out

        out: list[dict[str, Any]] = []
        res["sleep"] = out
        for k in range(1, cycles + 1):
            cyc: dict[str, Any] = {"gpu_mib_before": gpu_mib()}
            try:
                cyc["sleep"] = post("/_bench/sleep", {"level": 1})
                cyc["gpu_mib_asleep"] = gpu_mib()
                cyc["wake"] = post("/_bench/wake", {})
                cyc["gpu_mib_awake"] = gpu_mib()
            except Exception as exc:
                cyc["error"] = f"{type(exc).__name__}: {exc}"
                out.append(cyc)
                log(f"  sleep cycle {k} failed: {cyc['error']}")
                self.save()
                return
            out.append(cyc)
            log(f"  sleep cycle {k}: {cyc}")
            order = ("unc", "json", "tool") if k % 2 else ("tool", "json", "unc")
            for i, mode in enumerate(order, start=1):
                self._phase(
                    res,
                    {
                        "name": f"wake{k}_{i}_{mode}",
                        "kind": "http",
                        "c": 1,
                        "n": 1,
                        "mode": mode,
                        "max_tokens": MAX_TOKENS if mode != "tool" else FF_MAX_TOKENS,
                        "temperature": TEMPERATURE if mode != "tool" else 0.0,
                    },
                    port,
                    30,
                    probe_dir,
                )
            self.save()

    def _phase(self, res: dict[str, Any], ph: dict[str, Any], port: int, est: float, probe_dir: Path) -> None:
        ctl = ph.get("ctl", {"mode": "service"})
        if ph.get("gc_freeze"):
            import urllib.request

            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_bench/gc_freeze", timeout=60) as r:
                self.results["gc_freeze"] = json.loads(r.read())
                log(f"  gc.freeze(): {self.results['gc_freeze']}")
        (probe_dir / "ctl.json").write_text(json.dumps(ctl))
        time.sleep(0.05)
        t0 = time.time()
        try:
            max_tokens = ph.get("max_tokens", MAX_TOKENS)
            if ph["kind"] == "raw":
                recs, wall = asyncio.run(
                    raw_phase(
                        port,
                        ph["c"],
                        ph["n"],
                        ph["mode"],
                        ph.get("output_kind", "final"),
                        max(60, 4 * est),
                        max_tokens,
                    )
                )
            else:
                recs, wall = asyncio.run(
                    http_phase(
                        port,
                        ph["c"],
                        ph["n"],
                        ph["mode"],
                        max(60, 4 * est),
                        max_tokens=max_tokens,
                        temperature=ph.get("temperature", TEMPERATURE),
                    )
                )
            summary = summarize(recs, wall, ph["c"])
            if ph["n"] == 1 and recs:  # a single request (after a wake): its own latency and TTFT
                summary["first"] = {
                    k: recs[0].get(k)
                    for k in (
                        "latency_ms",
                        "ttft_ms",
                        "gen_ms",
                        "tokens",
                        "compile_ms",
                        "cache_hit",
                        "finish",
                    )
                }
        except Exception as exc:
            summary = {"c": ph["c"], "error": f"{type(exc).__name__}: {exc}"}
        with contextlib.suppress(Exception):
            import urllib.request

            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_bench/trace", timeout=10) as r:
                summary["server"] = trace_summary(json.loads(r.read()), t0)
            cpu = summary["server"]["process_cpu_s"]
            if cpu is not None and self._last_cpu_s is not None:  # the API process's CPU seconds in the phase
                summary["server"]["phase_cpu_s"] = round(cpu - self._last_cpu_s, 2)
            self._last_cpu_s = cpu
        summary.update(
            kind=ph["kind"],
            mode=ph["mode"],
            ctl=ctl,
            est_s=round(est, 1),
            t0_unix=t0,
            _window=(t0, time.time()),
        )
        if ph.get("output_kind"):
            summary["output_kind"] = ph["output_kind"]
        res["phases"][ph["name"]] = summary
        (probe_dir / "ctl.json").write_text(json.dumps({"mode": "service"}))
        srv = summary.get("server") or {}
        log(
            f"  {ph['name']:<22} c={ph['c']:<3} {summary.get('agg_tok_s')} tok/s  "
            f"wall {summary.get('wall_s')} s  "
            f"lat p50/max {summary.get('lat_p50_ms') and round(summary['lat_p50_ms'])}/"
            f"{summary.get('lat_max_ms') and round(summary['lat_max_ms'])} ms  "
            f"finish {summary.get('finish')}  "
            f"plan start {srv.get('plan_start_s')} engine call {srv.get('engine_call_s')} "
            f"first tok {srv.get('first_token_s')} loop late max {srv.get('loop_late_ms_max')}  "
            f"{summary.get('error', '')}"
        )
        self.save()

    def _stop(self, proc: subprocess.Popen[bytes], res: dict[str, Any]) -> None:
        t0 = time.time()
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=25)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # the EngineCore child, if it outlived the server
        res["shutdown_s"] = round(time.time() - t0, 1)
        if not self.fake:  # wait until the GPU memory is back before the next engine
            for _ in range(40):
                used = gpu_mib()
                if used is not None and used < 4000:
                    break
                time.sleep(0.5)

    def run(self, engines: list[str] | None) -> None:
        self.device_info()
        self.save()
        by_name = {e["name"]: e for e in ENGINES}
        for i, name in enumerate(engines or DEFAULT_ENGINES):
            eng = by_name[name] if name in by_name else variant_engine(name)
            if i < len(self.windows):
                eng = {**eng, "end_by": self.windows[i]}
            try:
                self.run_engine(eng)
            except Exception as exc:
                log(f"engine {eng['name']} failed: {type(exc).__name__}: {exc}")
                failure = f"{type(exc).__name__}: {exc}"
                self.results["engines"].setdefault(eng["name"], {})["failure"] = failure
        self.results["total_wall_s"] = round(self.elapsed(), 1)
        self.save()
        log(f"done in {self.elapsed():.0f}s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-gpu-out"))
    ap.add_argument("--deadline-s", type=float, default=548.0, help="stop starting work after this")
    ap.add_argument(
        "--engines",
        nargs="*",
        default=DEFAULT_ENGINES,
        help="in this order, from: "
        + ", ".join(e["name"] for e in ENGINES)
        + ", or 32b+VARIANT (a step_split variant)",
    )
    ap.add_argument("--only", nargs="*", help="only these phase names (plus warm-up)")
    ap.add_argument("--fake", action="store_true", help="fake engine, for checking the driver locally")
    ap.add_argument(
        "--first-bursts",
        action="store_true",
        help="before the phases: two short unconstrained rounds at c=64 and at c=256",
    )
    ap.add_argument(
        "--gemv",
        action="store_true",
        help="before the engines: cuBLAS bf16 GEMVs over a 32B step's weights in a CUDA graph",
    )
    ap.add_argument(
        "--windows",
        nargs="*",
        type=float,
        help="latest end (s after start) of each engine in --engines, replacing end_by",
    )
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bench = Bench(out, args.deadline_s, args.fake, args.only, args.first_bursts, args.windows, args.gemv)
    bench.run(args.engines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
