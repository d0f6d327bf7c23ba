"""Constrained code: a Lark grammar, the original service's regex example, and a choice.

1. A Lark grammar (llguidance's dialect) for a small Rust function signature: the output is always
   ``fn name(arg: Type, ...) -> Type`` with at most four arguments and types from a fixed list
   (``{0,3}`` bounds a repetition, so the grammar itself bounds the length).
2. The original service's regex example, ``Result<.*>`` / ``Option<.*>``, made bounded:
   ``.*`` lets the model run on to ``max_tokens`` (and truncated output is reported as not
   satisfying the constraint), so the inner type is ``[A-Za-z0-9_]{1,20}``. It is sent in the
   original list form, ``regex_patterns``: the output fully matches one of the patterns.
3. A choice: the output is exactly one of a few strings.

``with_structured_output(Grammar/Regex/Choice)`` returns the matched string; a constraint can also be
bound per call (``llm.bind(constraints={...})``) with the original service's constraint dicts.

Runs against ``ANANKE_BASE_URL`` (default http://127.0.0.1:8000); with no service there, it starts
``ananke serve`` for the run. The last line is ``RESULT: {json}`` for machines.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from langchain_core.output_parsers import StrOutputParser

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _local import service

from langchain_ananke import ChatAnanke, Choice, Grammar

SIGNATURE = r"""
start: "fn " NAME "(" params ")" " -> " TYPE
params: (param (", " param){0,3})?
param: NAME ": " TYPE
NAME: /[a-z_][a-z0-9_]{0,15}/
TYPE: "i32" | "i64" | "bool" | "String" | "Vec<i32>"
"""

RETURN_TYPES = ["Result<[A-Za-z0-9_]{1,20}>", "Option<[A-Za-z0-9_]{1,20}>"]

LANGUAGES = ["Rust", "Python", "Go", "TypeScript"]


def main() -> None:
    with service():
        llm = ChatAnanke(temperature=0, max_tokens=48)

        signature = llm.with_structured_output(Grammar(SIGNATURE)).invoke(
            "Write the signature of a Rust function that adds two numbers."
        )
        print(f"Lark grammar -> {signature}")

        # The original service's request shape: {"regex_patterns": [...]}, bound on the model.
        returns = llm.bind(constraints={"regex_patterns": RETURN_TYPES}, require_satisfied=True)
        return_type = (returns | StrOutputParser()).invoke(
            "What should a Rust function that parses a user id return?"
        )
        print(f"regex        -> {return_type}")

        language = llm.with_structured_output(Choice(LANGUAGES)).invoke(
            "Which language has the borrow checker?"
        )
        print(f"choice       -> {language}")

        outputs = {"signature": signature, "return_type": return_type, "language": language}
        print(f"RESULT: {json.dumps(outputs)}")


if __name__ == "__main__":
    main()
