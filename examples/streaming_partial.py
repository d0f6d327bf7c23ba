"""Streaming structured output: print the object as it grows, token by token.

``with_structured_output(schema).stream(...)`` yields partial objects while the JSON is generated
(the service streams tokens over Server-Sent Events; the parser closes the open JSON at every step),
then the final, checked object. Because generation is grammar-constrained, every prefix is a prefix
of valid JSON, so every partial parses.

A JSON Schema dict gives partial *dicts*; a Pydantic class would yield only once its required fields
are all present. So this streams dicts and validates the last one into ``Recipe``.

Runs against ``ANANKE_BASE_URL`` (default http://127.0.0.1:8000); with no service there, it starts
``ananke serve`` for the run. The last line is ``RESULT: {json}`` for machines.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _local import service

from langchain_ananke import ChatAnanke


class Recipe(BaseModel):
    """A short recipe."""

    model_config = ConfigDict(extra="forbid")

    title: str = Field(max_length=30)
    minutes: int = Field(ge=1, le=240)
    ingredients: list[Annotated[str, Field(max_length=20)]] = Field(min_length=1, max_length=3)


def main() -> None:
    with service():
        llm = ChatAnanke(temperature=0, max_tokens=96)
        structured = llm.with_structured_output(Recipe.model_json_schema())
        partials = []
        for partial in structured.stream("Give me a quick pancake recipe as JSON."):
            partials.append(partial)
            print(f"partial: {json.dumps(partial)}")
        recipe = Recipe.model_validate(partials[-1])  # the last item is the final, checked object
        print(f"final: {recipe!r} after {len(partials)} partial objects")
        print("RESULT: " + json.dumps({"partials": partials, "final": recipe.model_dump()}))


if __name__ == "__main__":
    main()
