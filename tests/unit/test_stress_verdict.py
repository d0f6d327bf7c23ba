"""The load test's verdict on one answer (``bench.stress.load.check_answer``): honest or not."""

from __future__ import annotations

from typing import Any

import pytest

from bench.stress.load import check_answer

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def _answer(text: str, finish: str, satisfied: bool | None) -> dict[str, Any]:
    return {
        "generated_text": text,
        "finish_reason": finish,
        "tokens_generated": 3,
        "constraint_satisfied": satisfied,
    }


@pytest.mark.parametrize(
    ("constraints", "answer", "honest"),
    [
        ({"json_schema": SCHEMA}, _answer('{"a": 1}', "stop", True), True),
        ({"json_schema": SCHEMA}, _answer('{"a": 1}', "length", True), True),  # cut on a complete instance
        ({"json_schema": SCHEMA}, _answer('{"a": 1', "length", True), False),  # the claim fails the check
        ({"json_schema": SCHEMA}, _answer('{"a": 1', "length", False), True),
        ({"json_schema": SCHEMA}, _answer('{"a": 1', "length", None), False),
        ({"regex": "[0-9]+"}, _answer("12", "length", True), True),
        ({"grammar": 'start: "x"+'}, _answer("xx", "length", True), False),  # nothing here checks it
        ({"grammar": 'start: "x"+'}, _answer("xx", "length", False), True),
        ({"choice": ["yes", "no"]}, _answer("maybe", "stop", True), False),
    ],
)
def test_check_answer(constraints: dict[str, Any], answer: dict[str, Any], honest: bool) -> None:
    body = {"prompt": "p", "constraints": constraints}
    assert (check_answer(body, answer) is None) is honest
