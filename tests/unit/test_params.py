"""Constructor parameters: ChatOpenAI's aliases work, unknown parameters are not silently lost."""

from __future__ import annotations

import warnings

import pytest

from langchain_ananke import AnankeLLM, ChatAnanke


@pytest.mark.parametrize("cls", [ChatAnanke, AnankeLLM])
def test_max_completion_tokens_is_max_tokens(cls: type) -> None:
    assert cls(base_url="http://127.0.0.1:1", max_completion_tokens=10).max_tokens == 10
    # An explicit max_tokens wins over the alias.
    assert cls(base_url="http://127.0.0.1:1", max_tokens=7, max_completion_tokens=10).max_tokens == 7


@pytest.mark.parametrize("cls", [ChatAnanke, AnankeLLM])
def test_unknown_parameters_warn_by_name(cls: type) -> None:
    with pytest.warns(UserWarning, match=r"ignores unknown parameters: organization, temprature"):
        model = cls(base_url="http://127.0.0.1:1", temprature=0.1, organization="x")
    assert model.temperature is None
    assert "temprature" not in model._default_params


def test_known_parameters_do_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ChatAnanke(
            base_url="http://127.0.0.1:1",
            model_name="m",
            temperature=0,
            max_tokens=5,
            timeout=3,
            max_retries=0,
            stop=["x"],
            seed=1,
            model_kwargs={"timeout_s": 2},
            default_headers={"a": "b"},
            callbacks=None,
            tags=["t"],
            metadata={"k": 1},
            disable_streaming=False,
        )
