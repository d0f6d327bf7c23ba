"""Schema analysis: finite instances and length caps (pure, offline)."""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import pytest

from modal_service.constraints.schema import (
    INT_BOUND,
    apply_length_caps,
    count_grammar_rules,
    exceeds_depth,
    finite_instance_error,
    shape_error,
)
from modal_service.limits import Limits

SELF = {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}


@pytest.mark.parametrize(
    ("schema", "finite"),
    [
        ({"type": "string"}, True),
        (SELF, False),
        ({"type": "object", "properties": {"a": {"$ref": "#"}}}, True),  # optional: {} is an instance
        (
            {
                "$defs": {
                    "n": {
                        "type": "object",
                        "properties": {"next": {"$ref": "#/$defs/n"}},
                        "required": ["next"],
                    }
                },
                "$ref": "#/$defs/n",
            },
            False,
        ),
        (
            {
                "$defs": {
                    "n": {
                        "type": "object",
                        "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/n"}}},
                        "required": ["kids"],
                    }
                },
                "$ref": "#/$defs/n",
            },
            True,
        ),
        (
            {
                "$defs": {
                    "n": {
                        "type": "object",
                        "properties": {
                            "kids": {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/n"}}
                        },
                        "required": ["kids"],
                    }
                },
                "$ref": "#/$defs/n",
            },
            False,
        ),
        (
            {
                "type": "object",
                "properties": {"a": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}},
                "required": ["a"],
            },
            True,
        ),
        ({"enum": []}, False),
        (False, False),
        ({"type": "object", "properties": {"a": False}, "required": ["a"]}, False),
        ({"$ref": "http://example.com/remote.json"}, True),
    ],
)
def test_finite_instance(schema: Any, finite: bool) -> None:
    if isinstance(schema, bool):
        assert (finite_instance_error({"allOf": [schema]}) is None) is finite
    else:
        assert (finite_instance_error(schema) is None) is finite


@pytest.mark.parametrize(
    ("schema", "path", "expected"),
    [
        ({"type": "string"}, ("maxLength",), 64),
        ({"type": "string", "minLength": 100}, ("maxLength",), 100),
        ({"type": "string", "maxLength": 5}, ("maxLength",), 5),
        ({"type": ["string", "null"]}, ("maxLength",), 64),
        ({"type": "array"}, ("maxItems",), 8),
        ({"type": "array", "minItems": 20}, ("maxItems",), 20),
        ({"type": "integer"}, ("maximum",), INT_BOUND),
        ({"type": "integer"}, ("minimum",), -INT_BOUND),
        ({"type": "integer", "minimum": 10**16}, ("maximum",), 10**16),
        ({"type": "object", "properties": {"s": {"type": "string"}}}, ("properties", "s", "maxLength"), 64),
        ({"type": "array", "items": {"type": "string"}}, ("items", "maxLength"), 64),
        ({"$defs": {"x": {"type": "string"}}}, ("$defs", "x", "maxLength"), 64),
        ({"anyOf": [{"type": "string"}]}, ("anyOf", 0, "maxLength"), 64),
    ],
)
def test_length_caps(schema: dict[str, Any], path: tuple[Any, ...], expected: int) -> None:
    original = copy.deepcopy(schema)
    capped, count = apply_length_caps(schema, max_length=64, max_items=8)
    node: Any = capped
    for key in path:
        node = node[key]
    assert node == expected
    assert schema == original  # never mutated
    assert count >= (0 if expected in (5,) else 1)


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "string", "enum": ["a" * 100]},
        {"type": "string", "format": "date-time"},
        {"not": {"type": "string"}},
        {"type": "integer", "const": 10**20},
    ],
)
def test_caps_leave_these_alone(schema: dict[str, Any]) -> None:
    capped, count = apply_length_caps(schema, max_length=8, max_items=2)
    assert capped == schema
    assert count == 0


def test_caps_only_narrow() -> None:
    schema = {"type": "object", "properties": {"s": {"type": "string"}, "n": {"type": "array"}}}
    capped, _ = apply_length_caps(schema, max_length=4, max_items=1)
    instance = {"s": "abc", "n": [1]}
    jsonschema.validate(instance, capped)
    jsonschema.validate(instance, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"s": "abcdef"}, capped)


def _chain(n: int) -> dict[str, Any]:
    defs: dict[str, Any] = {
        f"d{i}": {"type": "object", "properties": {"x": {"$ref": f"#/$defs/d{i + 1}"}}} for i in range(n)
    }
    defs[f"d{n}"] = {"type": "integer"}
    return {"$ref": "#/$defs/d0", "$defs": defs}


def _nested(n: int) -> dict[str, Any]:
    node: dict[str, Any] = {"type": "integer"}
    for _ in range(n):
        node = {"type": "object", "properties": {"x": node}}
    return node


@pytest.mark.parametrize(
    ("schema", "too_deep"),
    [
        (_chain(10), False),
        (_chain(1000), True),
        (_nested(10), False),
        (_nested(45), True),
        (
            {
                "$defs": {
                    "n": {
                        "type": "object",
                        "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/n"}}},
                    }
                },
                "$ref": "#/$defs/n",
            },
            False,
        ),
    ],
)
def test_exceeds_depth(schema: dict[str, Any], too_deep: bool) -> None:
    assert exceeds_depth(schema, 64) is too_deep


@pytest.mark.parametrize(
    ("grammar", "rules"),
    [
        ('start: "a" b\nb: "b"', 2),
        ("root ::= x\nx ::= [a-z]+", 2),
        ("start: r0\n" + "\n".join(f'r{i}: "{i}" r{i + 1} | "{i}"' for i in range(30)), 31),
        ('start: "x"\n%import common.WS\nNAME: /[a-z]+/', 2),
    ],
)
def test_count_grammar_rules(grammar: str, rules: int) -> None:
    assert count_grammar_rules(grammar) == rules


SMALL = Limits(max_choices=3, max_branches=2, max_enum=3, max_schema_nodes=5)


def _object(n: int) -> dict[str, Any]:
    return {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(n)}}


@pytest.mark.parametrize(
    ("choices", "schemas", "breaks"),
    [
        (3, [], None),
        (4, [], "alternatives"),
        (0, [{"anyOf": [{"type": "string"}, {"type": "null"}]}], None),
        (0, [{"oneOf": [{"const": 1}, {"const": 2}, {"const": 3}]}], "oneOf has 3 branches"),
        (0, [{"properties": {"a": {"items": {"anyOf": [{}, {}, {}]}}}}], "anyOf has 3 branches"),
        (0, [{"enum": [1, 2, 3]}], None),
        (0, [{"$defs": {"e": {"enum": ["a", "b", "c", "d"]}}}], "enum has 4 values"),
        (0, [_object(4)], None),  # 5 nodes: the object and its 4 properties
        (0, [_object(5)], "6 subschemas"),
        (0, [_object(2), _object(2)], "6 subschemas"),  # tool schemas count together
        # enum/const/default values are data, not subschemas
        (0, [{"const": {"a": {}, "b": {}}, "default": [{}, {}, {}], "examples": [{"x": {}}] * 9}], None),
        (0, [{"properties": {"anyOf": {"type": "string"}}}], None),  # a property named anyOf
    ],
)
def test_shape_error(choices: int, schemas: list[Any], breaks: str | None) -> None:
    problem = shape_error(SMALL, choices=choices, schemas=schemas)
    if breaks is None:
        assert problem is None
    else:
        assert problem is not None
        assert breaks in problem[0]
        assert "limit" in problem[0]
        assert problem[1]["limit"] in (3, 2, 5)


def test_shape_error_walks_deep_schemas_without_recursion() -> None:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(5_000):
        schema = {"items": schema}
    problem = shape_error(Limits(max_schema_nodes=10_000), schemas=[schema])
    assert problem is None
