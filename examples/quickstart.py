"""Quickstart: a LangChain chain that returns a validated Pydantic object.

prompt | ChatAnanke.with_structured_output(Person): the service generates under the JSON Schema of
``Person`` (llguidance masks every token that would break it), re-checks the output with
``jsonschema``, and the client validates it into a ``Person``.

Runs against ``ANANKE_BASE_URL`` (default http://127.0.0.1:8000); with no service there, it starts
``ananke serve`` for the run and stops it afterwards.
"""

from __future__ import annotations

import sys
from pathlib import Path

from langchain_core.prompts import ChatPromptTemplate
from pydantic import BaseModel, Field

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _local import service

from langchain_ananke import ChatAnanke


class Person(BaseModel):
    """A person mentioned in the text."""

    name: str = Field(description="The person's name")
    age: int = Field(ge=0, le=150, description="Age in years")
    city: str = Field(description="Where they live")


def main() -> None:
    with service():
        prompt = ChatPromptTemplate.from_messages(
            [("system", "Extract the person from the text."), ("human", "{text}")]
        )
        chain = prompt | ChatAnanke(temperature=0, max_tokens=128).with_structured_output(Person)
        person = chain.invoke({"text": "Maria Lopez is 34 and lives in Lisbon."})
        if not isinstance(person, Person):
            raise SystemExit(f"expected a Person, got {person!r}")
        print(repr(person))


if __name__ == "__main__":
    main()
