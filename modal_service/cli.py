"""The ``ananke`` command: ``ananke model pull`` and ``ananke serve``.

``serve`` builds the same :func:`~modal_service.http.app.create_app` the Modal app uses, around a local
:class:`~modal_service.engine.Engine`, and runs it with uvicorn. vLLM spawns worker processes, so
this module is only ever the entry point behind a ``__main__`` guard (the console script is one).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import sys
from types import FrameType
from typing import TYPE_CHECKING, Any

from modal_service.model_prep import ModelPrepError

if TYPE_CHECKING:
    from modal_service.engine.engine import EngineConfig
    from modal_service.limits import Limits

log = logging.getLogger("ananke")


def _serve_config(args: argparse.Namespace) -> tuple[EngineConfig, Limits]:
    from modal_service.engine.engine import EngineConfig
    from modal_service.limits import Limits
    from modal_service.model_prep import resolve_model

    model = resolve_model(args.model)
    config = EngineConfig(
        model=model,
        served_model_name=args.served_model_name,
        max_model_len=args.max_model_len,
        kv_cache_memory_bytes=int(args.kv_cache_gib * (1 << 30)) if args.kv_cache_gib else None,
        enforce_eager=not args.compile,
        dtype=args.dtype,
        fast_forward=args.fast_forward != "off",
        fast_forward_async=args.fast_forward == "async",
    )
    limits = Limits(**{name: getattr(args, name) for name, *_ in Limits.cli_options()})
    return config, limits


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _api_key(args: argparse.Namespace) -> str | None:
    """``--api-key-file`` (kept out of the process list), ``--api-key``, or ``ANANKE_API_KEY``."""
    if args.api_key_file:
        with open(args.api_key_file, encoding="utf-8") as fh:
            key = fh.read().strip()
        if not key:
            raise ModelPrepError(f"{args.api_key_file} is empty")
        return key
    return args.api_key or os.environ.get("ANANKE_API_KEY") or None


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """The warning ``ananke serve`` prints when it listens beyond loopback without a key."""
    if api_key or _is_loopback(host):
        return None
    return (
        f"serving on {host} without an API key: anyone who can reach this address can use the "
        "engine. Set --api-key-file, --api-key or ANANKE_API_KEY, or bind to 127.0.0.1."
    )


def draining_server(config: Any, admission: Any, drain_seconds: float) -> Any:
    """uvicorn's server, with a drain on the first SIGTERM/SIGINT.

    The first signal marks the app draining: new requests get 503 (``shutting_down``, Retry-After)
    and ``/health`` says so, while admitted requests run on, up to ``drain_seconds``. Then uvicorn's
    own graceful shutdown closes the listener and the connections. A second signal skips the drain.
    """
    import uvicorn

    class DrainingServer(uvicorn.Server):
        pending_signal: int | None = None
        announced = False

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            # Runs as a signal handler: set flags only; on_tick (on the event loop) does the rest.
            if self.pending_signal is None and not self.should_exit:
                admission.begin_drain(drain_seconds)
                self.pending_signal = sig
                return
            super().handle_exit(sig, frame)

        async def on_tick(self, counter: int) -> bool:
            if self.pending_signal is not None and not self.should_exit:
                if not self.announced:
                    self.announced = True
                    log.info(
                        "%s: draining %d in-flight request(s) for up to %.0f s; new ones get 503",
                        signal.Signals(self.pending_signal).name,
                        admission.inflight,
                        drain_seconds,
                    )
                if admission.drain_over():
                    log.info("drain over (%d request(s) still in flight); shutting down", admission.inflight)
                    super().handle_exit(self.pending_signal, None)
            return bool(await super().on_tick(counter))

    return DrainingServer(config)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from modal_service.engine.engine import Engine
    from modal_service.http.app import create_app

    config, limits = _serve_config(args)
    api_key = _api_key(args)
    warning = exposure_warning(args.host, api_key)
    if warning:
        log.warning("%s", warning)
    from modal_service.http.request_id import uvicorn_log_config

    app = create_app(
        Engine(config, limits),
        api_key=api_key,
        drain_seconds=args.drain_seconds,
        metrics_public=args.metrics_public,
    )
    uv_config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        log_config=uvicorn_log_config(),  # the request id in every line, the access log's too
        timeout_graceful_shutdown=5,  # after the drain: connections only finish sending
    )
    draining_server(uv_config, app.state.admission, args.drain_seconds).run()
    return 0


def _pull(args: argparse.Namespace) -> int:
    from pathlib import Path

    from modal_service.model_prep import pull, tiny_qwen_dir

    if args.tiny_qwen:
        if args.output:
            raise ModelPrepError("--tiny-qwen writes into $ANANKE_CACHE_DIR/models; --output is for SmolLM2")
        path = tiny_qwen_dir(force=args.force)
    else:
        path = pull(Path(args.output) if args.output else None, force=args.force)
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from modal_service.limits import Limits

    parser = argparse.ArgumentParser(prog="ananke", description="Ananke constrained-generation service")
    sub = parser.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="prepare models")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    pull = model_sub.add_parser("pull", help="fetch and convert SmolLM2-135M-Instruct (idempotent)")
    pull.add_argument("--output", help="target folder (default: $ANANKE_CACHE_DIR/models/...)")
    pull.add_argument("--force", action="store_true", help="rebuild even if the folder verifies")
    pull.add_argument(
        "--tiny-qwen",
        action="store_true",
        help="instead: a tiny random-weight Qwen2 with Qwen2.5's tokenizer and chat template (for tests)",
    )
    pull.set_defaults(func=_pull)

    serve = sub.add_parser("serve", help="run the service locally")
    serve.add_argument("--model", help="model folder or HF id (default: the pulled SmolLM2)")
    serve.add_argument("--served-model-name", default=None)
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="listen address (default loopback only; anything else warns unless a key is set)",
    )
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--api-key",
        default=None,
        help="require this bearer key (visible in the process list: prefer --api-key-file or ANANKE_API_KEY)",
    )
    serve.add_argument("--api-key-file", default=None, help="read the bearer key from this file")
    serve.add_argument(
        "--metrics-public",
        action="store_true",
        help="serve GET /metrics without the API key (for a scraper inside a private network)",
    )
    serve.add_argument("--max-model-len", type=int, default=4096)
    serve.add_argument(
        "--kv-cache-gib",
        type=float,
        default=1.0,
        help="KV cache size in GiB (CPU backend); 0 = engine default",
    )
    serve.add_argument(
        "--dtype",
        default="auto",
        help="model dtype (default auto: vLLM's choice, but float32 on a CPU without bf16 instructions)",
    )
    serve.add_argument("--compile", action="store_true", help="torch.compile the model (slow start)")
    serve.add_argument(
        "--fast-forward",
        choices=("on", "off", "async"),
        default="on",
        help="tokens the grammar forces enter without a decoding step each (default on; a request "
        "may still turn it off with fast_forward: false); async: the same under vLLM's async "
        "scheduling, the drafts one step late",
    )
    for name, flag, kind, default, help_text in Limits.cli_options():
        serve.add_argument(flag, dest=name, type=kind, default=default, help=help_text)
    serve.add_argument(
        "--drain-seconds",
        type=float,
        default=30.0,
        help="on SIGTERM/SIGINT, let in-flight requests finish for up to this long (new ones get 503)",
    )
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(func=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    from modal_service.http.request_id import configure_logging

    args = build_parser().parse_args(argv)
    configure_logging(logging.INFO)
    try:
        return int(args.func(args))
    except ModelPrepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
