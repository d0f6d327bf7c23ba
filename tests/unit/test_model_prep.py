"""``resolve_model``: what ``ananke serve --model`` accepts before the engine starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from modal_service.model_prep import ModelPrepError, resolve_model


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
