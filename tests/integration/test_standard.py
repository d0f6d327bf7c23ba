"""LangChain's standard test suites for ``ChatAnanke``.

The unit suite needs no service. The integration suite runs against the real local service (the
``base_url`` session fixture in ``tests/conftest.py``; set ``ANANKE_TEST_BASE_URL`` to reuse a
running one) serving SmolLM2-135M-Instruct on CPU.

Every structural property (valid structured output, well-formed tool calls, forced tool choice,
usage metadata, streaming) is guaranteed by the service's constraints and must pass. An ``xfail``
below marks only a *semantic* assertion that a 135M-parameter model gets wrong; each says why.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from langchain_ananke import ChatAnanke

#: Greedy, seeded decoding with room for the small model to finish an answer or a tool call.
_PARAMS: dict[str, Any] = {"temperature": 0, "max_tokens": 256, "seed": 1234}

#: Seeded sampling for the free-text *fields* of structured output. Greedy decoding makes
#: SmolLM2-135M repeat a phrase inside a JSON string ("the cat was a cat, and the cat was a cat, ...")
#: until ``max_tokens``; the service then (correctly) reports the output unsatisfied and the client
#: raises instead of returning half an object. Sampling with a fixed seed is just as deterministic
#: (the same seed gives the same text on invoke and stream) and lets the model close its strings.
_SAMPLED: dict[str, Any] = {"temperature": 0.8}
#: The standard tests that get ``_SAMPLED`` (the suite forbids overriding the tests themselves, so
#: the ``model`` fixture applies it).
_SAMPLED_TESTS = frozenset({
    "test_structured_output",
    "test_structured_output_async",
    "test_structured_output_pydantic_2_v1",
    "test_structured_output_optional_param",
})


@pytest.fixture(scope="class")
def _ananke_env(base_url: str) -> Iterator[None]:
    """Point ``ChatAnanke``'s ``ANANKE_BASE_URL`` env default at the session's real service."""
    previous = os.environ.get("ANANKE_BASE_URL")
    os.environ["ANANKE_BASE_URL"] = base_url
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("ANANKE_BASE_URL", None)
        else:
            os.environ["ANANKE_BASE_URL"] = previous


class TestChatAnankeUnit(ChatModelUnitTests):
    """The standard unit suite (no service needed)."""

    @property
    def chat_model_class(self) -> type[BaseChatModel]:
        return ChatAnanke

    @property
    def chat_model_params(self) -> dict[str, Any]:
        # temperature, max_tokens, stop, timeout and api_key come from the standard params.
        return {"base_url": "http://127.0.0.1:8000", "seed": 1234}

    @property
    def has_tool_calling(self) -> bool:
        return True

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def has_structured_output(self) -> bool:
        return True

    @property
    def structured_output_kwargs(self) -> dict[str, Any]:
        return {"method": "json_schema"}

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def supports_model_override(self) -> bool:
        # The service serves exactly one model; there is nothing to switch to per call.
        return False

    @property
    def init_from_env_params(self) -> tuple[dict[str, str], dict[str, Any], dict[str, Any]]:
        return (
            {"ANANKE_BASE_URL": "http://ananke.example:8123", "ANANKE_API_KEY": "env-secret"},
            {"temperature": 0},
            {"base_url": "http://ananke.example:8123", "api_key": "env-secret"},
        )


@pytest.mark.integration
@pytest.mark.usefixtures("_ananke_env")
class TestChatAnankeIntegration(ChatModelIntegrationTests):
    """The standard integration suite against the real local service."""

    @property
    def chat_model_class(self) -> type[BaseChatModel]:
        return ChatAnanke

    @property
    def chat_model_params(self) -> dict[str, Any]:
        # base_url comes from ANANKE_BASE_URL, set by the class fixture above.
        return dict(_PARAMS)

    @pytest.fixture
    def model(self, request: pytest.FixtureRequest) -> BaseChatModel:
        """The suite's ``model`` fixture, plus seeded sampling for the tests in ``_SAMPLED_TESTS``."""
        extra: dict[str, Any] = getattr(request, "param", None) or {}
        if request.function.__name__ in _SAMPLED_TESTS:
            extra = {**_SAMPLED, **extra}
        return self.chat_model_class(
            **{**self.standard_chat_model_params, **self.chat_model_params, **extra}
        )

    @property
    def has_tool_calling(self) -> bool:
        return True

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def has_structured_output(self) -> bool:
        return True

    @property
    def structured_output_kwargs(self) -> dict[str, Any]:
        return {"method": "json_schema"}

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def supports_image_inputs(self) -> bool:
        return False

    @property
    def supports_image_urls(self) -> bool:
        return False

    @property
    def supports_pdf_inputs(self) -> bool:
        return False

    @property
    def supports_audio_inputs(self) -> bool:
        return False

    @property
    def supports_video_inputs(self) -> bool:
        return False

    @property
    def supports_image_tool_message(self) -> bool:
        return False

    @property
    def supports_pdf_tool_message(self) -> bool:
        return False

    @property
    def supports_anthropic_inputs(self) -> bool:
        return False

    @property
    def supports_model_override(self) -> bool:
        # The service serves exactly one model; there is nothing to switch to per call.
        return False

    # --- semantic limits of a 135M model (structure is checked and passes; see each reason) ------

    @pytest.mark.xfail(
        reason="json_mode guarantees only *a* JSON object; which keys it has is up to the model, and "
        "SmolLM2-135M does not follow the instruction to use 'setup' and 'punchline' (greedy it nests "
        '{"setup":{"setup":...}}; sampled it returns other keys)'
    )
    def test_json_mode(self, model: BaseChatModel) -> None:
        super().test_json_mode(model)

    @pytest.mark.xfail(
        reason="tool_choice='auto' leaves calling to the model: SmolLM2-135M answers 'What is the "
        "weather in San Francisco?' from its own (invented) knowledge instead of calling get_weather"
    )
    @pytest.mark.parametrize("model", [{}, {"output_version": "v1"}], indirect=True)
    def test_agent_loop(self, model: BaseChatModel) -> None:
        super().test_agent_loop(model)
