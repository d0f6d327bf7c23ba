"""The ``ananke`` command: ``ananke model pull`` and ``ananke serve``.

``serve`` builds the same :func:`~modal_service.server.create_app` the Modal app uses, around a local
:class:`~modal_service.engine.Engine`, and runs it with uvicorn. vLLM spawns worker processes, so
this module is only ever the entry point behind a ``__main__`` guard (the console script is one).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from modal_service.model_prep import ModelPrepError


def _serve_config(args: argparse.Namespace) -> tuple[object, object]:
    from modal_service.engine import EngineConfig
    from modal_service.generation import Limits
    from modal_service.model_prep import resolve_model

    model = resolve_model(args.model)
    config = EngineConfig(
        model=model,
        served_model_name=args.served_model_name,
        max_model_len=args.max_model_len,
        kv_cache_memory_bytes=int(args.kv_cache_gib * (1 << 30)) if args.kv_cache_gib else None,
        enforce_eager=not args.compile,
    )
    limits = Limits(
        max_tokens=args.max_tokens_cap,
        max_inflight=args.max_inflight,
        max_batch_prompts=args.max_batch_prompts,
    )
    return config, limits


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from modal_service.engine import Engine
    from modal_service.server import create_app

    config, limits = _serve_config(args)
    api_key = args.api_key or os.environ.get("ANANKE_API_KEY") or None
    app = create_app(Engine(config), api_key=api_key, limits=limits)  # type: ignore[arg-type]
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=30)
    return 0


def _pull(args: argparse.Namespace) -> int:
    from pathlib import Path

    from modal_service.model_prep import pull

    path = pull(Path(args.output) if args.output else None, force=args.force)
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ananke", description="Ananke constrained-generation service")
    sub = parser.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="prepare models")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    pull = model_sub.add_parser("pull", help="fetch and convert SmolLM2-135M-Instruct (idempotent)")
    pull.add_argument("--output", help="target folder (default: $ANANKE_CACHE_DIR/models/...)")
    pull.add_argument("--force", action="store_true", help="rebuild even if the folder verifies")
    pull.set_defaults(func=_pull)

    serve = sub.add_parser("serve", help="run the service locally")
    serve.add_argument("--model", help="model folder or HF id (default: the pulled SmolLM2)")
    serve.add_argument("--served-model-name", default=None)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None, help="require this bearer key (or ANANKE_API_KEY)")
    serve.add_argument("--max-model-len", type=int, default=4096)
    serve.add_argument(
        "--kv-cache-gib",
        type=float,
        default=1.0,
        help="KV cache size in GiB (CPU backend); 0 = engine default",
    )
    serve.add_argument("--compile", action="store_true", help="torch.compile the model (slow start)")
    serve.add_argument("--max-tokens-cap", type=int, default=2048)
    serve.add_argument("--max-inflight", type=int, default=256)
    serve.add_argument("--max-batch-prompts", type=int, default=64)
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(func=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except ModelPrepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
