"""Drop-in swap: one extraction pipeline, run with ``ChatOpenAI`` and with ``ChatAnanke``.

The service also speaks the OpenAI API at ``/v1`` (``/v1/chat/completions`` honours
``response_format={"type": "json_schema", ...}`` and ``tools``), so an existing ``ChatOpenAI`` app only
changes ``base_url``. ``ChatAnanke`` talks to ``/generate_api`` instead and adds the service's
independent re-check (``constraint_satisfied``) to every answer. The pipeline below takes either
model and returns the same validated ``Invoice``.

Runs against ``ANANKE_BASE_URL`` (default http://127.0.0.1:8000); with no service there, it starts
``ananke serve`` for the run. The last line is ``RESULT: {json}`` for machines.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx
from langchain_core.language_models import BaseChatModel
from langchain_core.prompts import ChatPromptTemplate
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, ConfigDict, Field

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _local import service

from langchain_ananke import ChatAnanke

TEXT = "Invoice INV-2041 from Acme Tools: 3 hammers, total 59 EUR, due on 2025-07-01."


class Invoice(BaseModel):
    """An invoice mentioned in the text."""

    model_config = ConfigDict(extra="forbid")  # additionalProperties: false, so no invented keys

    number: str = Field(pattern="^INV-[0-9]{4}$", description="Invoice number")
    vendor: str = Field(max_length=30, description="Who sent it")
    total: int = Field(ge=0, le=1_000_000, description="Total amount")
    currency: str = Field(pattern="^[A-Z]{3}$", description="ISO currency code")


def pipeline(llm: BaseChatModel) -> Any:
    """The app's chain; the only thing that changes is which chat model it gets."""
    prompt = ChatPromptTemplate.from_messages(
        [("system", "Extract the invoice from the text as JSON."), ("human", "{text}")]
    )
    return prompt | llm.with_structured_output(Invoice, method="json_schema")


def main() -> None:
    with service() as url:
        api_key = os.environ.get("ANANKE_API_KEY")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        model = httpx.get(f"{url}/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]

        models: dict[str, BaseChatModel] = {
            # The OpenAI client needs some key; the service ignores it unless it was started with one.
            "ChatOpenAI": ChatOpenAI(
                base_url=f"{url}/v1", api_key=api_key or "unused", model=model, temperature=0, max_tokens=96
            ),
            "ChatAnanke": ChatAnanke(temperature=0, max_tokens=96),
        }
        results = {}
        for name, llm in models.items():
            invoice = pipeline(llm).invoke({"text": TEXT})
            if not isinstance(invoice, Invoice):
                raise SystemExit(f"{name}: expected an Invoice, got {invoice!r}")
            print(f"{name:>10}: {invoice!r}")
            results[name] = invoice.model_dump()
        print("RESULT: " + json.dumps(results))


if __name__ == "__main__":
    main()
