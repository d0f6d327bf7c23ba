"""Batch extraction: structured records from a list of texts, with ``batch`` and ``abatch``.

One chain, ``prompt | ChatAnanke.with_structured_output(Order, include_raw=True)``, runs over every
text. ``batch`` sends the requests concurrently (a thread pool) and ``abatch`` does the same on
asyncio; the service runs them together in one vLLM batch. ``include_raw=True`` keeps the raw
message next to the parsed ``Order`` so the output-token counts give a measured tokens/s.

Every string field has a ``max_length``, the integer has bounds and ``extra="forbid"`` rules out
invented keys, so the schema itself bounds the output length: the small ``max_tokens`` below always
suffices and nothing is truncated.

Runs against ``ANANKE_BASE_URL`` (default http://127.0.0.1:8000); with no service there, it starts
``ananke serve`` for the run. The last line is ``RESULT: {json}`` for machines.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from langchain_core.prompts import ChatPromptTemplate
from pydantic import BaseModel, ConfigDict, Field

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _local import service

from langchain_ananke import ChatAnanke

TEXTS = [
    "Hi, this is Ana Silva. Please send 3 boxes of green tea to our Porto office.",
    "Order from Ben Okafor: 12 blue notebooks, delivery next week.",
    "Chen Wei would like 1 standing desk for the Berlin team.",
    "Please ship 40 coffee mugs to Dana Levi at the Haifa warehouse.",
    "Eva Novak needs 5 laptop stands before Friday.",
    "Farid Haddad ordered 2 office chairs.",
]


class Order(BaseModel):
    """One order mentioned in a message."""

    model_config = ConfigDict(extra="forbid")  # additionalProperties: false, so no invented keys

    customer: str = Field(max_length=24, description="Who placed the order")
    item: str = Field(max_length=24, description="What was ordered")
    quantity: int = Field(ge=1, le=1000, description="How many")


def build_chain() -> Any:
    prompt = ChatPromptTemplate.from_messages(
        [("system", "Extract the order from the message as JSON."), ("human", "{text}")]
    )
    llm = ChatAnanke(temperature=0, max_tokens=96)
    return prompt | llm.with_structured_output(Order, include_raw=True)


def report(label: str, outputs: list[dict[str, Any]], seconds: float) -> list[Order]:
    """Print each record and the measured throughput; return the parsed records."""
    records: list[Order] = []
    tokens = 0
    for text, out in zip(TEXTS, outputs, strict=True):
        if out["parsing_error"] is not None:  # e.g. ConstraintNotSatisfiedError if truncated
            raise SystemExit(f"{label}: {text!r} failed: {out['parsing_error']}")
        records.append(out["parsed"])
        tokens += out["raw"].usage_metadata["output_tokens"]
        print(f"  {out['parsed']!r}")
    print(
        f"{label}: {len(records)} records in {seconds:.2f} s = {len(records) / seconds:.2f} records/s, "
        f"{tokens} output tokens = {tokens / seconds:.1f} tokens/s"
    )
    return records


def main() -> None:
    with service():
        chain = build_chain()
        inputs = [{"text": t} for t in TEXTS]

        started = time.perf_counter()
        outputs = chain.batch(inputs, config={"max_concurrency": len(inputs)})
        records = report("batch", outputs, time.perf_counter() - started)

        started = time.perf_counter()
        outputs = asyncio.run(chain.abatch(inputs))
        async_records = report("abatch", outputs, time.perf_counter() - started)

        both = {"batch": records, "abatch": async_records}
        print(f"RESULT: {json.dumps({k: [r.model_dump() for r in v] for k, v in both.items()})}")


if __name__ == "__main__":
    main()
