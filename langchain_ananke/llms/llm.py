"""``AnankeLLM``: a LangChain ``BaseLLM`` over the Ananke service."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any, ClassVar

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseLLM, LangSmithParams
from langchain_core.outputs import Generation, GenerationChunk, LLMResult

from langchain_ananke.errors import check_satisfied
from langchain_ananke.llms._common import AnankeParams, ananke_ls_params, response_metadata
from langchain_ananke.protocol import BatchGenerateResponse, GenerateResponse, StreamEvent


class AnankeLLM(AnankeParams, BaseLLM):
    """Text completion with guaranteed-valid constrained output.

    Setup:
        ``pip install langchain-ananke``, then run a service: ``ananke serve`` locally, or a Modal
        deployment. Point ``ANANKE_BASE_URL`` (and ``ANANKE_API_KEY``) at it.

    Instantiate:
        .. code-block:: python

            from langchain_ananke import AnankeLLM
            llm = AnankeLLM(max_tokens=64, temperature=0)

    Invoke:
        .. code-block:: python

            llm.invoke("Phone: ", constraints={"regex": "[0-9]{3}-[0-9]{4}"})  # '555-0199'

    Stream:
        .. code-block:: python

            for chunk in llm.stream("Once upon a time"):
                print(chunk, end="")

    Batch:
        ``llm.batch([...])`` sends one batched request; the engine decodes the prompts together.

    Structured output:
        .. code-block:: python

            llm.with_structured_output(Person).invoke("<|im_start|>user\\n...")
    """

    #: Its output is a string, so the service's verdict never reaches the parser: the model itself
    #: raises on unsatisfied output in ``with_structured_output``.
    _structured_bind: ClassVar[dict[str, Any]] = {"require_satisfied": True}

    @property
    def _llm_type(self) -> str:
        return "ananke"

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        return ananke_ls_params(super()._get_ls_params(stop=stop, **kwargs))

    @staticmethod
    def _results(resp: GenerateResponse | BatchGenerateResponse) -> list[GenerateResponse]:
        return resp.results if isinstance(resp, BatchGenerateResponse) else [resp]

    def _generation_info(self, resp: GenerateResponse, require: bool) -> dict[str, Any]:
        info = response_metadata(resp, self.model)
        if require:
            check_satisfied(info, resp.generated_text)
        return info

    def _to_result(self, responses: list[GenerateResponse], require: bool) -> LLMResult:
        generations = [
            [Generation(text=r.generated_text, generation_info=self._generation_info(r, require))]
            for r in responses
        ]
        usage = {
            "prompt_tokens": sum(r.usage.prompt_tokens for r in responses),
            "completion_tokens": sum(r.usage.completion_tokens for r in responses),
        }
        return LLMResult(generations=generations, llm_output={"token_usage": usage, "model_name": self.model})

    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        """All prompts go out as one batched request."""
        prompt = prompts[0] if len(prompts) == 1 else prompts
        request, require = self._request(prompt=prompt, stop=stop, **kwargs)
        return self._to_result(self._results(self.client.generate(request)), require)

    async def _agenerate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        prompt = prompts[0] if len(prompts) == 1 else prompts
        request, require = self._request(prompt=prompt, stop=stop, **kwargs)
        return self._to_result(self._results(await self.async_client.generate(request)), require)

    def _chunk(self, event: StreamEvent, require: bool) -> GenerationChunk | None:
        if event.event == "token":
            return GenerationChunk(text=event.text)
        if event.response is not None:
            return GenerationChunk(text="", generation_info=self._generation_info(event.response, require))
        return None

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        request, require = self._request(prompt=prompt, stop=stop, stream=True, **kwargs)
        for event in self.client.stream(request):
            chunk = self._chunk(event, require)
            if chunk is not None:
                if run_manager and chunk.text:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk

    async def _astream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[GenerationChunk]:
        request, require = self._request(prompt=prompt, stop=stop, stream=True, **kwargs)
        async for event in self.async_client.stream(request):
            chunk = self._chunk(event, require)
            if chunk is not None:
                if run_manager and chunk.text:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
