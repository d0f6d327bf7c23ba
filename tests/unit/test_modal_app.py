"""modal_service/app.py without Modal: the settings tables, the env overrides, the Modal wiring
(against a recording fake ``modal`` module) and the smoke test (against a mock transport).

Nothing here needs Modal installed, a network or a GPU.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import json
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from modal_service import app as modal_app
from modal_service.app import (
    DEFAULT_GPU,
    DEFAULT_MAX_MODEL_LEN,
    DEFAULT_MODEL,
    DEFAULT_MODEL_REVISION,
    MINUTES,
    DeployConfig,
    GpuSpec,
    ModeSettings,
    SmokeTestError,
    concurrency_for,
    container_env,
    engine_kwargs,
    load_config,
    parse_gpu,
    run_smoke_test,
    settings_for_mode,
)

APP_PATH = Path(modal_app.__file__)
ENV_VARS = (
    "MODAL_MODE",
    "ANANKE_GPU",
    "ANANKE_MODEL",
    "ANANKE_MODEL_REVISION",
    "ANANKE_MAX_MODEL_LEN",
    "ANANKE_PROXY_AUTH",
    "ANANKE_MIN_CONTAINERS",
    "ANANKE_BUFFER_CONTAINERS",
)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No deploy variable from the calling shell leaks into a test."""
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _load_fresh(name: str = "ananke_modal_app_under_test") -> types.ModuleType:
    """Execute app.py as a new module (reads the environment and ``import modal`` again)."""
    spec = importlib.util.spec_from_file_location(name, APP_PATH)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(name, None)
    return module


# ------------------------------------------------------------------------------------------- modes
@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("dev", ModeSettings("dev", scaledown_window=2 * MINUTES, min_containers=0, buffer_containers=0)),
        ("demo", ModeSettings("demo", scaledown_window=10 * MINUTES, min_containers=0, buffer_containers=0)),
        ("prod", ModeSettings("prod", scaledown_window=5 * MINUTES, min_containers=1, buffer_containers=0)),
        (" PROD ", ModeSettings("prod", scaledown_window=5 * MINUTES, min_containers=1, buffer_containers=0)),
        ("Demo", ModeSettings("demo", scaledown_window=10 * MINUTES, min_containers=0, buffer_containers=0)),
    ],
)
def test_settings_for_mode(mode: str, expected: ModeSettings) -> None:
    assert settings_for_mode(mode, {}) == expected


def test_mode_scaledown_values_in_seconds() -> None:
    assert [settings_for_mode(m, {}).scaledown_window for m in ("dev", "prod", "demo")] == [120, 300, 600]


@pytest.mark.parametrize("mode", ["staging", "production", "", "dev2", "de v"])
def test_unknown_mode_raises_naming_the_valid_modes(mode: str) -> None:
    with pytest.raises(ValueError, match="MODAL_MODE") as info:
        settings_for_mode(mode, {})
    assert "dev, demo, prod" in str(info.value)


@pytest.mark.parametrize(
    ("env", "min_containers", "buffer_containers"),
    [
        ({}, 1, 0),
        ({"ANANKE_MIN_CONTAINERS": "0"}, 0, 0),
        ({"ANANKE_MIN_CONTAINERS": "3", "ANANKE_BUFFER_CONTAINERS": "2"}, 3, 2),
        ({"ANANKE_BUFFER_CONTAINERS": " 1 "}, 1, 1),
        ({"ANANKE_MIN_CONTAINERS": ""}, 1, 0),  # empty counts as unset
    ],
)
def test_prod_container_counts_from_env(
    env: dict[str, str], min_containers: int, buffer_containers: int
) -> None:
    settings = settings_for_mode("prod", env)
    assert settings.min_containers == min_containers
    assert settings.buffer_containers == buffer_containers
    assert settings.scaledown_window == 5 * MINUTES


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ANANKE_MIN_CONTAINERS": "-1"}, "ANANKE_MIN_CONTAINERS=-1 is below 0"),
        ({"ANANKE_MIN_CONTAINERS": "two"}, "ANANKE_MIN_CONTAINERS='two' is not an integer"),
        ({"ANANKE_BUFFER_CONTAINERS": "1.5"}, "ANANKE_BUFFER_CONTAINERS='1.5' is not an integer"),
    ],
)
def test_prod_container_counts_reject_bad_values(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        settings_for_mode("prod", env)


@pytest.mark.parametrize("mode", ["dev", "demo"])
@pytest.mark.parametrize("var", ["ANANKE_MIN_CONTAINERS", "ANANKE_BUFFER_CONTAINERS"])
def test_container_counts_outside_prod_are_an_error(mode: str, var: str) -> None:
    with pytest.raises(ValueError, match=f"{var} only apply to MODAL_MODE=prod"):
        settings_for_mode(mode, {var: "1"})


def test_settings_for_mode_reads_os_environ_by_default(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("ANANKE_MIN_CONTAINERS", "2")
    assert settings_for_mode("prod").min_containers == 2


# -------------------------------------------------------------------------------------------- GPUs
@pytest.mark.parametrize(
    ("spec", "kind", "count", "modal_gpu"),
    [
        ("A100-80GB", "A100-80GB", 1, "A100-80GB"),
        ("H100:2", "H100", 2, "H100:2"),
        ("H100:1", "H100", 1, "H100"),
        ("H100!:4", "H100!", 4, "H100!:4"),
        (" H200:8 ", "H200", 8, "H200:8"),
        ("l40s", "l40s", 1, "l40s"),
        ("A100-40GB:2", "A100-40GB", 2, "A100-40GB:2"),
    ],
)
def test_parse_gpu(spec: str, kind: str, count: int, modal_gpu: str) -> None:
    gpu = parse_gpu(spec)
    assert gpu == GpuSpec(kind, count)
    assert gpu.modal_gpu == modal_gpu
    assert gpu.tensor_parallel_size == count


@pytest.mark.parametrize("spec", ["", ":2", "H100:", "H100:x", "H100:2:2", "A100 80GB", "-H100", "H100:-2"])
def test_parse_gpu_rejects_malformed_specs(spec: str) -> None:
    with pytest.raises(ValueError, match="is not a GPU spec"):
        parse_gpu(spec)


@pytest.mark.parametrize("spec", ["H100:0", "H100:3", "H100:6", "H100:16"])
def test_parse_gpu_rejects_counts_that_cannot_shard_the_model(spec: str) -> None:
    with pytest.raises(ValueError, match="use 1, 2, 4, 8"):
        parse_gpu(spec)


# ------------------------------------------------------------------------------------------ config
def test_load_config_defaults() -> None:
    config = load_config({})
    assert config == DeployConfig(
        mode=settings_for_mode("dev", {}),
        gpu=GpuSpec(DEFAULT_GPU, 1),
        model=DEFAULT_MODEL,
        revision=DEFAULT_MODEL_REVISION,
        max_model_len=DEFAULT_MAX_MODEL_LEN,
        proxy_auth=False,
    )
    assert (config.model, config.gpu.modal_gpu) == ("Qwen/Qwen2.5-Coder-32B-Instruct", "A100-80GB")


@pytest.mark.parametrize(
    ("env", "field", "expected"),
    [
        ({"MODAL_MODE": "demo"}, "mode", settings_for_mode("demo", {})),
        ({"MODAL_MODE": ""}, "mode", settings_for_mode("dev", {})),
        ({"ANANKE_GPU": "H100:2"}, "gpu", GpuSpec("H100", 2)),
        ({"ANANKE_MODEL": "Qwen/Qwen2.5-Coder-7B-Instruct"}, "revision", "main"),
        ({"ANANKE_MODEL": "org/m", "ANANKE_MODEL_REVISION": "abc123"}, "revision", "abc123"),
        ({"ANANKE_MODEL_REVISION": "abc123"}, "revision", "abc123"),
        ({"ANANKE_MODEL": DEFAULT_MODEL}, "revision", DEFAULT_MODEL_REVISION),
        ({"ANANKE_MAX_MODEL_LEN": "16384"}, "max_model_len", 16384),
        ({"ANANKE_PROXY_AUTH": "1"}, "proxy_auth", True),
        ({"ANANKE_PROXY_AUTH": "True"}, "proxy_auth", True),
        ({"ANANKE_PROXY_AUTH": "yes"}, "proxy_auth", True),
        ({"ANANKE_PROXY_AUTH": "on"}, "proxy_auth", True),
        ({"ANANKE_PROXY_AUTH": "0"}, "proxy_auth", False),
        ({"ANANKE_PROXY_AUTH": "false"}, "proxy_auth", False),
        ({"ANANKE_PROXY_AUTH": ""}, "proxy_auth", False),
    ],
)
def test_load_config_env_overrides(env: dict[str, str], field: str, expected: Any) -> None:
    assert getattr(load_config(env), field) == expected


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MODAL_MODE": "staging"}, "MODAL_MODE='staging' is not a mode"),
        ({"ANANKE_GPU": "H100:3"}, "ANANKE_GPU='H100:3'"),
        ({"ANANKE_PROXY_AUTH": "maybe"}, "ANANKE_PROXY_AUTH='maybe' is not a boolean"),
        ({"ANANKE_MAX_MODEL_LEN": "0"}, "ANANKE_MAX_MODEL_LEN=0 is below 1"),
        ({"ANANKE_MIN_CONTAINERS": "1"}, "only apply to MODAL_MODE=prod"),
    ],
)
def test_load_config_rejects_bad_values(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_config(env)


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"MODAL_MODE": "prod"},
        {"MODAL_MODE": "prod", "ANANKE_MIN_CONTAINERS": "0", "ANANKE_BUFFER_CONTAINERS": "2"},
        {"MODAL_MODE": "demo", "ANANKE_GPU": "H100:2", "ANANKE_PROXY_AUTH": "1"},
        {"ANANKE_MODEL": "org/other", "ANANKE_MAX_MODEL_LEN": "2048"},
    ],
)
def test_container_env_round_trips(env: dict[str, str]) -> None:
    """Inside the container only the baked variables exist; they must give the same config."""
    config = load_config(env)
    assert load_config(container_env(config)) == config


def test_engine_kwargs_follow_the_gpu_and_model() -> None:
    kwargs = engine_kwargs(load_config({"ANANKE_GPU": "H100:4", "ANANKE_MAX_MODEL_LEN": "16384"}))
    assert kwargs["model"] == kwargs["served_model_name"] == DEFAULT_MODEL
    assert kwargs["tensor_parallel_size"] == 4
    assert kwargs["max_model_len"] == 16384
    assert kwargs["max_num_seqs"] == concurrency_for(load_config({"ANANKE_GPU": "H100:4"})).max_inputs
    assert kwargs["enforce_eager"] is False
    assert kwargs["extra"] == {
        "revision": DEFAULT_MODEL_REVISION,
        "tokenizer_revision": DEFAULT_MODEL_REVISION,
    }


def test_engine_kwargs_are_engine_config_fields() -> None:
    pytest.importorskip("vllm")  # modal_service.engine imports vLLM through constraints.py
    from modal_service.engine.engine import EngineConfig

    config = EngineConfig(**engine_kwargs(load_config({})))
    assert config.name == DEFAULT_MODEL
    assert config.tensor_parallel_size == 1


# ------------------------------------------------------------------------------- import-time checks
def test_module_imports_without_modal(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setitem(sys.modules, "modal", None)  # `import modal` raises ImportError
    module = _load_fresh()
    assert module.modal is None
    assert not hasattr(module, "app")
    assert dataclasses.asdict(module.CONFIG) == dataclasses.asdict(load_config({}))


def test_unknown_mode_fails_at_import(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setitem(sys.modules, "modal", None)
    clean_env.setenv("MODAL_MODE", "staging")
    with pytest.raises(ValueError, match="use one of: dev, demo, prod"):
        _load_fresh()


def test_mode_is_read_at_import(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setitem(sys.modules, "modal", None)
    clean_env.setenv("MODAL_MODE", "demo")
    assert _load_fresh().CONFIG.mode.scaledown_window == 10 * MINUTES


# ------------------------------------------------------------------------------------ Modal wiring
class _Recorder:
    """A stand-in for the ``modal`` module that records what app.py asks of it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any, Any]] = []
        self.classes: dict[str, Any] = {}
        self.entrypoints: dict[str, Callable[..., Any]] = {}
        self.commits = 0

    def module(self) -> types.ModuleType:
        rec = self
        fake = types.ModuleType("modal")

        class Image:
            @staticmethod
            def from_registry(tag: str, **kwargs: Any) -> Image:
                rec.calls.append(("from_registry", (tag,), kwargs))
                return Image()

            def entrypoint(self, args: list[str]) -> Image:
                rec.calls.append(("entrypoint", (args,), {}))
                return self

            def uv_pip_install(self, *packages: str, **kwargs: Any) -> Image:
                rec.calls.append(("uv_pip_install", packages, kwargs))
                return self

            def env(self, values: dict[str, str]) -> Image:
                rec.calls.append(("env", (values,), {}))
                return self

            def add_local_python_source(self, *modules: str, **kwargs: Any) -> Image:
                rec.calls.append(("add_local_python_source", modules, kwargs))
                return self

        class Volume:
            def __init__(self, name: str) -> None:
                self.name = name

            @staticmethod
            def from_name(name: str, **kwargs: Any) -> Volume:
                rec.calls.append(("Volume.from_name", (name,), kwargs))
                return Volume(name)

            def commit(self) -> None:
                rec.commits += 1

        class Secret:
            @staticmethod
            def from_name(name: str, **kwargs: Any) -> tuple[str, dict[str, Any]]:
                rec.calls.append(("Secret.from_name", (name,), kwargs))
                return (name, kwargs)

        class App:
            def __init__(self, name: str, **kwargs: Any) -> None:
                rec.calls.append(("App", (name,), kwargs))

            def cls(self, **kwargs: Any) -> Callable[[type], type]:
                def decorate(cls: type) -> type:
                    rec.calls.append(("cls", (cls.__name__,), kwargs))
                    rec.classes[cls.__name__] = cls
                    return cls

                return decorate

            def local_entrypoint(self) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
                def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
                    rec.entrypoints[fn.__name__] = fn
                    return fn

                return decorate

        def decorator(name: str) -> Callable[..., Callable[[Any], Any]]:
            def factory(*args: Any, **kwargs: Any) -> Callable[[Any], Any]:
                def decorate(target: Any) -> Any:
                    rec.calls.append((name, (getattr(target, "__name__", target), *args), kwargs))
                    return target

                return decorate

            return factory

        fake.Image, fake.Volume, fake.Secret, fake.App = Image, Volume, Secret, App  # type: ignore[attr-defined]
        fake.concurrent = decorator("concurrent")  # type: ignore[attr-defined]
        fake.enter = decorator("enter")  # type: ignore[attr-defined]
        fake.web_server = decorator("web_server")  # type: ignore[attr-defined]
        fake.exit = decorator("exit")  # type: ignore[attr-defined]
        return fake

    def all(self, name: str) -> list[tuple[Any, Any]]:
        return [(args, kwargs) for call, args, kwargs in self.calls if call == name]

    def one(self, name: str) -> tuple[Any, Any]:
        found = [(args, kwargs) for call, args, kwargs in self.calls if call == name]
        assert len(found) == 1, (name, found)
        return found[0]


def _scaling(options: dict[str, Any]) -> tuple[int, int, int]:
    return options["scaledown_window"], options["min_containers"], options["buffer_containers"]


@pytest.fixture
def recorded(clean_env: pytest.MonkeyPatch) -> Callable[..., tuple[_Recorder, types.ModuleType]]:
    def load(**env: str) -> tuple[_Recorder, types.ModuleType]:
        for name, value in env.items():
            clean_env.setenv(name, value)
        rec = _Recorder()
        clean_env.setitem(sys.modules, "modal", rec.module())
        return rec, _load_fresh()

    return load


def test_modal_wiring_defaults(recorded: Callable[..., tuple[_Recorder, types.ModuleType]]) -> None:
    rec, module = recorded()
    tag, base = rec.one("from_registry")
    assert tag[0].startswith("nvidia/cuda:")
    assert "-devel-" in tag[0]
    assert base == {"add_python": "3.12"}
    packages, _ = rec.one("uv_pip_install")
    assert "vllm==0.32.0" in packages
    assert "llguidance==1.7.6" in packages
    assert all("==" in p for p in packages), "every package is pinned exactly"
    (baked,), _ = rec.one("env")
    assert module.load_config(baked) == module.CONFIG
    assert rec.one("add_local_python_source")[0] == ("langchain_ananke", "modal_service")
    volumes = {args[0]: kwargs for call, args, kwargs in rec.calls if call == "Volume.from_name"}
    assert volumes == {
        "huggingface-cache": {"create_if_missing": True},
        "vllm-cache": {"create_if_missing": True},
    }

    (cls_name,), options = rec.one("cls")
    assert cls_name == "Server"
    assert options["gpu"] == "A100-80GB"
    assert set(options["volumes"]) == {"/root/.cache/huggingface", "/root/.cache/vllm"}
    assert options["secrets"] == [("ananke-api-key", {"required_keys": ["ANANKE_API_KEY"]})]
    assert _scaling(options) == (120, 0, 0)
    assert options["timeout"] >= 30 * MINUTES
    _, concurrency = rec.one("concurrent")
    assert concurrency == {"max_inputs": 34, "target_inputs": 17}  # A100-80GB: its KV cache, not a constant
    # GPU snapshots on by default: start + warm + sleep before the snapshot, wake after the restore
    assert options["enable_memory_snapshot"] is True
    assert options["experimental_options"] == {"enable_gpu_snapshot": True}
    assert rec.all("enter") == [(("start",), {"snap": True}), (("wake",), {"snap": False})]
    assert rec.one("web_server") == (
        ("web", module.PORT),
        {"startup_timeout": module.TIMEOUT, "requires_proxy_auth": False},
    )
    assert rec.one("exit")[0] == ("stop",)
    assert "smoke" in rec.entrypoints


def test_modal_wiring_prod_h100(recorded: Callable[..., tuple[_Recorder, types.ModuleType]]) -> None:
    rec, _ = recorded(
        MODAL_MODE="prod", ANANKE_GPU="H100:2", ANANKE_PROXY_AUTH="true", ANANKE_BUFFER_CONTAINERS="1"
    )
    _, options = rec.one("cls")
    assert options["gpu"] == "H100:2"
    assert _scaling(options) == (300, 1, 1)
    assert rec.one("web_server")[1]["requires_proxy_auth"] is True
    (baked,), _ = rec.one("env")
    assert baked["ANANKE_GPU"] == "H100:2"
    assert baked["MODAL_MODE"] == "prod"


class _Engine:
    """What the hooks reach of the engine: sleep and wake, counted."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def sleep(self) -> float:
        self.calls.append("sleep")
        return 1.5

    async def wake(self) -> float:
        self.calls.append("wake")
        return 2.5


class _Started:
    """What start_server returns: the background server, here with ``call`` running on a fresh loop."""

    def __init__(self) -> None:
        self.app = types.SimpleNamespace(state=types.SimpleNamespace(engine=_Engine()))
        self.stopped = False

    def call(self, make: Callable[[], Any]) -> Any:
        return asyncio.run(make())

    def stop(self) -> None:
        self.stopped = True


@pytest.mark.parametrize("snapshots", ["1", "0"])
def test_hooks_start_warm_sleep_then_wake(
    recorded: Callable[..., tuple[_Recorder, types.ModuleType]],
    monkeypatch: pytest.MonkeyPatch,
    snapshots: str,
) -> None:
    monkeypatch.setenv("ANANKE_API_KEY", "test-key")
    rec, module = recorded(ANANKE_GPU="H100:2", ANANKE_SNAPSHOT=snapshots)
    started: list[tuple[Any, ...]] = []

    def fake_start(config: Any, api_key: str, **kwargs: Any) -> _Started:
        started.append((config, api_key, kwargs))
        return _Started()

    monkeypatch.setattr(module, "start_server", fake_start)
    server = rec.classes["Server"]()
    server.start()  # @modal.enter(snap=True)
    ((config, api_key, kwargs),) = started
    assert (config, api_key) == (module.CONFIG, "test-key")
    kwargs["commit_weights"]()
    assert rec.commits == 1  # the weights' volume
    engine = server.server.app.state.engine
    server.wake()  # @modal.enter(snap=False), after the restore
    assert engine.calls == (["sleep", "wake"] if snapshots == "1" else [])
    options = rec.one("cls")[1]
    assert ("enable_memory_snapshot" in options) is (snapshots == "1")
    assert module.engine_kwargs(module.CONFIG)["sleep_mode"] is (snapshots == "1")
    assert module.engine_kwargs(module.CONFIG)["fast_forward"] is False  # off unless ANANKE_FAST_FORWARD
    server.stop()
    assert server.server.stopped


def test_fast_forward_is_a_deploy_switch() -> None:
    on = load_config({"ANANKE_FAST_FORWARD": "1"})
    assert engine_kwargs(on)["fast_forward"] is True
    assert load_config(container_env(on)) == on
    with pytest.raises(ValueError, match="ANANKE_FAST_FORWARD"):
        load_config({"ANANKE_FAST_FORWARD": "sometimes"})


# -------------------------------------------------------------------------------------- smoke test
class _Script:
    """Answers /health from a list of steps, then /generate_api with one body."""

    def __init__(self, health: list[Any], generate: tuple[int, dict[str, Any]]) -> None:
        self.health, self.generate = list(health), generate
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.path == "/health":
            step = self.health.pop(0) if len(self.health) > 1 else self.health[0]
            if isinstance(step, Exception):
                raise step
            status, body = step
            return httpx.Response(status, json=body)
        status, body = self.generate
        return httpx.Response(status, json=body)


def _good_body(**overrides: Any) -> dict[str, Any]:
    body = {
        "generated_text": json.dumps({"name": "vLLM", "language": "Python", "stars": 1}),
        "tokens_generated": 20,
        "generation_time_ms": 123.0,
        "metadata": {},
        "constraint_satisfied": True,
        "finish_reason": "stop",
    }
    return {**body, **overrides}


def _run(script: _Script, *, timeout_s: float = 100.0) -> tuple[dict[str, Any], list[float]]:
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    client = httpx.Client(transport=httpx.MockTransport(script))
    result = run_smoke_test(
        "https://ws--ananke-server-web.modal.run/",
        "k",
        extra_headers={"Modal-Key": "mk"},
        timeout_s=timeout_s,
        poll_s=5.0,
        client=client,
        sleep=sleep,
        clock=lambda: now[0],
        log=lambda _msg: None,
    )
    return result, slept


LOADING = (503, {"status": "loading", "model": DEFAULT_MODEL})
OK = (200, {"status": "ok", "model": DEFAULT_MODEL})


def test_smoke_test_waits_out_a_cold_start() -> None:
    script = _Script(
        [httpx.ConnectError("reset"), (502, {}), LOADING, (504, {}), LOADING, OK], (200, _good_body())
    )
    body, slept = _run(script)
    assert body["constraint_satisfied"] is True
    assert slept == [5.0] * 5
    generate = script.requests[-1]
    assert generate.url.path == "/generate_api"
    assert generate.headers["authorization"] == "Bearer k"
    assert generate.headers["modal-key"] == "mk"
    payload = json.loads(generate.content)
    assert payload["constraints"] == {"json_schema": modal_app.SMOKE_SCHEMA}


@pytest.mark.parametrize(
    ("health", "generate", "message"),
    [
        ([OK], (200, _good_body(constraint_satisfied=False)), "constraint not satisfied"),
        ([OK], (200, _good_body(constraint_satisfied=None)), "constraint not satisfied"),
        ([OK], (200, _good_body(generated_text='{"name": "x"}')), "schema's keys"),
        ([OK], (401, {"error": {"code": "unauthorized", "message": "no"}}), "answered 401"),
        (
            [(503, {"status": "error", "detail": "CUDA out of memory"})],
            (200, _good_body()),
            "failed to start",
        ),
        ([(404, {})], (200, _good_body()), "/health answered 404"),
        ([LOADING], (200, _good_body()), "not healthy before the deadline"),
    ],
)
def test_smoke_test_failures(health: list[Any], generate: tuple[int, dict[str, Any]], message: str) -> None:
    with pytest.raises(SmokeTestError, match=message):
        _run(_Script(health, generate), timeout_s=30.0)


# ------------------------------------------------------------------------- concurrency from the KV cache
def test_the_default_card_takes_the_requests_its_kv_cache_holds() -> None:
    c = concurrency_for(load_config({}))  # A100-80GB, the default model
    assert c.kv_tokens == 29_616
    assert c.target_inputs == 29_616 // 1_700 == 17  # 1.5k-token prompt + 200 out each
    assert c.max_inputs == 34
    assert "per request" in c.basis


def test_tensor_parallel_cards_add_the_weights_they_free() -> None:
    one, two = (
        concurrency_for(load_config({"ANANKE_GPU": "H100"})),
        concurrency_for(load_config({"ANANKE_GPU": "H100:2"})),
    )
    assert two.kv_tokens == 2 * (29_616 + 250_020) - 250_020
    assert two.target_inputs > 8 * one.target_inputs
    assert two.max_inputs == 256  # the batch ceiling


def test_unknown_cards_and_models_fall_back_and_the_variable_overrides() -> None:
    other = concurrency_for(load_config({"ANANKE_MODEL": "org/other-7b"}))
    assert (other.kv_tokens, other.target_inputs, other.max_inputs) == (None, 16, 32)
    assert "no KV figure" in other.basis
    assert concurrency_for(load_config({"ANANKE_GPU": "L4"})).target_inputs == 16
    env = {"ANANKE_TARGET_INPUTS": "50"}
    config = load_config(env)
    assert (concurrency_for(config).target_inputs, concurrency_for(config).max_inputs) == (50, 100)
    assert load_config(container_env(config)) == config  # baked into the container too


# ---------------------------------------------------------------------------------------- warm-up
def _warm_answers(
    tool_calls: list[Any] | None = None, status: int = 200
) -> Callable[[httpx.Request], httpx.Response]:
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/generate_api":
            return httpx.Response(status, json=_good_body())
        body = json.loads(request.content)
        calls = tool_calls if "tools" in body else None
        return httpx.Response(200, json={"choices": [{"message": {"content": "x", "tool_calls": calls}}]})

    return answer


def test_warm_up_runs_each_path_once_with_the_key() -> None:
    seen: list[httpx.Request] = []
    answer = _warm_answers(
        [{"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]
    )

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answer(request)

    timings = modal_app.warm_up(
        "http://127.0.0.1:8000/", "k", client=httpx.Client(transport=httpx.MockTransport(record))
    )
    assert set(timings) == {"json_schema", "tool_call", "text"}
    assert [r.url.path for r in seen] == ["/generate_api", "/v1/chat/completions", "/v1/chat/completions"]
    assert all(r.headers["authorization"] == "Bearer k" for r in seen)
    bodies = [json.loads(r.content) for r in seen]
    assert bodies[0]["constraints"] == {"json_schema": modal_app.SMOKE_SCHEMA}
    assert bodies[1]["tool_choice"] == "required"


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (_warm_answers(None), "tool_call: no tool call"),
        (_warm_answers([], status=503), "json_schema: .* answered 503"),
    ],
)
def test_warm_up_fails_the_start_on_a_bad_answer(answer: Any, message: str) -> None:
    with pytest.raises(SmokeTestError, match=message):
        modal_app.warm_up("http://x", "k", client=httpx.Client(transport=httpx.MockTransport(answer)))
