"""Fast-forward at c=64, the unconstrained block only: where a server with fast-forward on spends time.

A focused companion to :mod:`bench.fast_forward`, whose c=64 phase this repeats (same request bodies,
same ``_block``), against two servers that are already up (``--on URL --off URL``: ``ananke serve
--fast-forward on`` and ``off``, otherwise the same flags). Blocks go A-B-B-A (``on, off, off, on``,
repeated). For each block it also records the CPU seconds that each process of the serving server
used (the API process, vLLM's EngineCore, its worker), read from ``/proc`` before and after (vLLM's
processes busy-wait on each other, so these are close to the wall time: a hint, not a cost). Blocks
are ``--pause`` seconds apart: an idle vLLM worker keeps spinning for 1 s after its last step
(``SpinCondition``), and both servers' workers are pinned to core 0. ``--py-spy DIR`` records a
``py-spy`` profile (``--format raw``, collapsed stacks) of EngineCore and the worker during the first
block of each arm.

    python -m bench.ff_c64 --on http://127.0.0.1:18401 --off http://127.0.0.1:18402 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.common import RESULTS, load_avg, machine_info, write_json
from bench.fast_forward import _block


def _server_pid(url: str) -> int:
    port = int(url.rsplit(":", 1)[1].split("/", maxsplit=1)[0])
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
            return int(conn.pid)
    raise SystemExit(f"no process listens on {url}")


def _processes(url: str) -> dict[str, psutil.Process]:
    """``api``, ``engine_core`` and ``worker`` (by vLLM's process titles) of the server at ``url``."""
    api = psutil.Process(_server_pid(url))
    out = {"api": api}
    for child in api.children(recursive=True):
        try:
            title = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if "EngineCore" in title:
            out["engine_core"] = child
        elif "Worker" in title or "VllmWorker" in title:
            out["worker"] = child
    if "engine_core" not in out or "worker" not in out:  # titles differ: fall back to the tree's order
        children = api.children(recursive=True)
        for name, proc in zip(("engine_core", "worker"), children, strict=False):
            out.setdefault(name, proc)
    return out


def _cpu(procs: dict[str, psutil.Process]) -> dict[str, float]:
    out = {}
    for name, proc in procs.items():
        try:
            t = proc.cpu_times()
            out[name] = t.user + t.system
        except psutil.Error:
            out[name] = float("nan")
    return out


def _spy(
    procs: dict[str, psutil.Process], outdir: Path, tag: str, seconds: int
) -> list[subprocess.Popen[bytes]]:
    spy = Path(sys.executable).with_name("py-spy")
    running = []
    for name in ("engine_core", "worker"):
        if name not in procs:
            continue
        path = outdir / f"{tag}-{name}.txt"
        cmd = [str(spy), "record", "--pid", str(procs[name].pid), "--format", "raw", "--rate", "200",
               "--duration", str(seconds), "--nonblocking", "--output", str(path)]  # fmt: skip
        running.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
    return running


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ff_c64", description=__doc__.split("\n\n")[0])
    parser.add_argument("--on", required=True, help="URL of the --fast-forward on server")
    parser.add_argument("--off", required=True, help="URL of the --fast-forward off server")
    parser.add_argument("--workload", default="unconstrained", help="bench.fast_forward workload")
    parser.add_argument("--rounds", type=int, default=2, help="A-B-B-A rounds (4 blocks each)")
    parser.add_argument("--block", type=int, default=128, help="requests per block")
    parser.add_argument("--c", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=64, help="requests per server before the blocks")
    parser.add_argument(
        "--pause",
        type=float,
        default=2.0,
        help="seconds between blocks: vLLM's idle worker spins for 1 s after its last step, on core 0, "
        "where both servers' workers are pinned",
    )
    parser.add_argument("--py-spy", type=Path, help="record py-spy profiles here (first block per arm)")
    parser.add_argument("--spy-seconds", type=int, default=8)
    parser.add_argument("--label", default="", help="free text stored with the result")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    urls = {"on": args.on.rstrip("/"), "off": args.off.rstrip("/")}
    procs = {arm: _processes(url) for arm, url in urls.items()}
    health = {arm: httpx.get(f"{url}/health", timeout=10).json() for arm, url in urls.items()}
    result: dict[str, Any] = {
        "stamp": stamp,
        "command": " ".join(["python -m bench.ff_c64", *sys.argv[1:]]),
        "label": args.label,
        "machine": machine_info(),
        "load_start": load_avg(),
        "fast_forward": {arm: h.get("fast_forward") for arm, h in health.items()},
        "blocks": [],
    }
    for arm in ("on", "off"):
        asyncio.run(_block(urls[arm], args.workload, args.warmup, args.c, {}))
    spied: set[str] = set()
    for b in range(4 * args.rounds):
        arm = ("on", "off", "off", "on")[b % 4]
        time.sleep(args.pause)
        spies = []
        if args.py_spy and arm not in spied:
            args.py_spy.mkdir(parents=True, exist_ok=True)
            spies = _spy(procs[arm], args.py_spy, f"{stamp}-{arm}", args.spy_seconds)
            spied.add(arm)
            time.sleep(0.5)
        before = _cpu(procs[arm])
        block = asyncio.run(_block(urls[arm], args.workload, args.block, args.c, {}))
        after = _cpu(procs[arm])
        for spy in spies:
            spy.wait()
        block.pop("texts", None)
        block |= {
            "arm": arm,
            "block": b,
            "load": load_avg(),
            "cpu_s": {k: round(after[k] - before[k], 2) for k in before},
            "profiled": bool(spies),
        }
        result["blocks"].append(block)
        print(f"[{time.strftime('%H:%M:%S')}] {arm}: {block['tok_s']} tok/s {block['wall_s']} s "
              f"cpu {block['cpu_s']} steps {block['decode_steps']}", flush=True)  # fmt: skip
    _summarize(result)
    out = args.out / f"ff_c64-{stamp}.json"
    write_json(out, result)
    print(out)
    return 0


def _summarize(result: dict[str, Any]) -> None:
    sums: dict[str, dict[str, float]] = {}
    for block in result["blocks"]:
        if block["profiled"]:
            continue  # py-spy's sampling costs CPU: keep those blocks out of the ratio
        s = sums.setdefault(block["arm"], {"tokens": 0, "wall_s": 0.0})
        s["tokens"] += block["tokens"]
        s["wall_s"] += block["wall_s"]
    if "on" in sums and "off" in sums:
        rate = {arm: s["tokens"] / s["wall_s"] for arm, s in sums.items()}
        result["tok_s"] = {arm: round(r, 2) for arm, r in rate.items()}
        result["ratio_on_off"] = round(rate["on"] / rate["off"], 3)
        print(f"on/off tok/s: {result['ratio_on_off']} ({result['tok_s']})")


if __name__ == "__main__":
    sys.exit(main())
