"""Closing on budget for general grammars on the real local service: a Lark grammar, GBNF, a regex
and ``regex_patterns`` cut by ``max_tokens`` come back complete and matching, streamed or not."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from tests.conftest import chat_prompt, stream_generate

pytestmark = pytest.mark.integration

SQL_LARK = 'start: "SELECT " col (", " col)* " FROM " tbl ";"\ncol: /[a-z_]+/\ntbl: /[a-z_]+/'
SQL_GBNF = 'root ::= "SELECT " col (", " col)* " FROM " col ";"\ncol ::= [a-z_]+'
SQL_RE = r"SELECT [a-z_]+(, [a-z_]+)* FROM [a-z_]+;"
CASES = [
    ({"grammar": SQL_LARK}, SQL_RE, "Write one SQL query that selects twenty columns of a customers table."),
    ({"grammar": SQL_GBNF}, SQL_RE, "Write one SQL query that selects twenty columns of a customers table."),
    ({"regex": "[0-9]+(-[0-9]+)*;"}, r"[0-9]+(-[0-9]+)*;", "Write a very long number."),
    (
        {"regex_patterns": ["[0-9]+(-[0-9]+)*;", "[a-z]{2}"]},
        r"[0-9]+(-[0-9]+)*;|[a-z]{2}",
        "Write a very long number.",
    ),
]


def _check(data: dict[str, Any], pattern: str) -> bool:
    assert data["constraint_satisfied"] is True, data
    assert data["finish_reason"] == "stop", data
    assert re.fullmatch(pattern, data["generated_text"]), data["generated_text"]
    return "closed_on_budget" in data["metadata"]


@pytest.mark.parametrize(
    ("constraints", "pattern", "prompt"), CASES, ids=["lark", "gbnf", "regex", "regex_patterns"]
)
def test_general_grammar_cut_by_max_tokens_is_closed(
    http: httpx.Client, constraints: dict[str, Any], pattern: str, prompt: str
) -> None:
    closed = 0
    for max_tokens in (8, 12, 16):
        body = {
            "prompt": chat_prompt(prompt),
            "max_tokens": max_tokens,
            "temperature": 0,
            "constraints": constraints,
        }
        data = http.post("/generate_api", json=body).json()
        closed += _check(data, pattern)
        assert data["tokens_generated"] <= max_tokens
    assert closed > 0  # the budget did cut the model short, and closing finished it


@pytest.mark.parametrize(
    ("constraints", "pattern", "prompt"), CASES, ids=["lark", "gbnf", "regex", "regex_patterns"]
)
def test_general_grammar_cut_by_max_tokens_is_closed_when_streamed(
    http: httpx.Client, constraints: dict[str, Any], pattern: str, prompt: str
) -> None:
    body = {"prompt": chat_prompt(prompt), "max_tokens": 10, "temperature": 0, "constraints": constraints}
    text, done = stream_generate(http, body)
    assert done is not None
    _check(done, pattern)
    assert text == done["generated_text"]  # what was streamed is the closed output
