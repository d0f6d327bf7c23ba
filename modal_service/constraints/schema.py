"""Pure JSON Schema analysis used by the constraint compiler.

- :func:`finite_instance_error`: does the schema admit any finite instance? A required
  self-reference with no base case (``{"properties": {"a": {"$ref": "#"}}, "required": ["a"]}``) does
  not; the grammar would accept a prefix forever and never close.
- :func:`shape_error`: is any part of a constraint larger than the service compiles quickly
  (:class:`~modal_service.limits.Limits`: ``choice`` entries, ``anyOf``/``oneOf`` branches, ``enum``
  values, schema nodes)? Counted in linear time before llguidance sees the constraint, so an oversized
  one is a 422 in milliseconds instead of a compile of several seconds.
- :func:`apply_length_caps`: a copy of the schema with ``maxLength``/``maxItems``/integer bounds added
  where the schema sets none, so unbounded strings, arrays and numbers cannot eat the whole token
  budget. Caps only narrow the set of instances (never below ``minLength``/``minItems``), so output
  valid under the capped schema is valid under the original, which is what the final check uses.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Iterator
from typing import Any

from modal_service.limits import Limits

# Where subschemas sit: one table for every walker of this package (here and in witness.py). The
# walkers differ on purpose in which of them they enter: caps go only where an instance is built
# (never under ``not``), while size and depth bounds count everything that is not data.
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")
_SUBSCHEMA_SINGLE = ("items", "additionalProperties")
#: Keys whose values are data, not subschemas: never walked.
DATA_KEYS = frozenset({"enum", "const", "default", "examples"})
#: Keys whose values map names to subschemas: the map itself is not a node.
NAME_MAPS = frozenset({*_SUBSCHEMA_MAPS, "dependentSchemas"})
INT_BOUND = 10**15

#: Sample values for string formats: the witness builds instances with them, and the closing search
#: tries them (each with its closing quote) before single characters.
FORMAT_SAMPLES = {
    "email": "a@b.co",
    "idn-email": "a@b.co",
    "date-time": "2000-01-01T00:00:00Z",
    "date": "2000-01-01",
    "time": "00:00:00Z",
    "uri": "http://a.co",
    "iri": "http://a.co",
    "uri-reference": "a",
    "iri-reference": "a",
    "url": "http://a.co",
    "uuid": "00000000-0000-0000-0000-000000000000",
    "ipv4": "0.0.0.0",  # noqa: S104 - a sample value, not a bind address
    "ipv6": "::1",
    "duration": "P1D",
    "hostname": "a",
    "idn-hostname": "a",
    "regex": "a",
    "json-pointer": "",
    "relative-json-pointer": "0",
}


def resolve_ref(root: Any, ref: str) -> Any:
    """A local ``#/...`` JSON pointer; None for anything else (remote refs are not followed)."""
    if not ref.startswith("#"):
        return None
    node = root
    for raw in ref[1:].lstrip("/").split("/") if ref not in ("#", "#/") else []:
        part = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _types(schema: dict[str, Any]) -> set[str]:
    kind = schema.get("type")
    if isinstance(kind, str):
        return {kind}
    if isinstance(kind, list):
        return {k for k in kind if isinstance(k, str)}
    return set()


def _inhabited(schema: Any, root: Any, visiting: frozenset[str]) -> bool:
    """Least-fixpoint check: a ref met again on the same path counts as uninhabited."""
    if isinstance(schema, bool):
        return schema
    if not isinstance(schema, dict):
        return True
    ref = schema.get("$ref")
    if isinstance(ref, str):
        if ref in visiting:
            return False
        target = resolve_ref(root, ref)
        if target is not None and not _inhabited(target, root, visiting | {ref}):
            return False
    if "enum" in schema and isinstance(schema["enum"], list) and not schema["enum"]:
        return False
    if "const" in schema or "enum" in schema:
        return True
    for key in ("anyOf", "oneOf"):
        subs = schema.get(key)
        if isinstance(subs, list) and subs and not any(_inhabited(s, root, visiting) for s in subs):
            return False
    subs = schema.get("allOf")
    if isinstance(subs, list) and not all(_inhabited(s, root, visiting) for s in subs):
        return False
    types = _types(schema)
    if types and not (types & {"object", "array"}):
        return True  # scalars always have an instance (bounds are llguidance's to check)
    only_object = types == {"object"} or (not types and "properties" in schema)
    if only_object:
        props = schema.get("properties") or {}
        for name in schema.get("required") or []:
            if isinstance(props, dict) and name in props and not _inhabited(props[name], root, visiting):
                return False
    if types == {"array"} and (schema.get("minItems") or 0) > 0:
        prefix = schema.get("prefixItems")
        if isinstance(prefix, list) and prefix:
            return all(_inhabited(s, root, visiting) for s in prefix)
        return _inhabited(schema.get("items", True), root, visiting)
    return True


def finite_instance_error(schema: dict[str, Any]) -> str | None:
    """None when the schema admits a finite instance; otherwise why it does not."""
    if _inhabited(schema, schema, frozenset()):
        return None
    return (
        "the schema has no finite instance: a required property or non-empty array refers back to "
        "itself with no base case"
    )


EXACT_NUMBER_BOUND = 2**53
"""Numeric bounds beyond this magnitude are not held exactly by the token mask: llguidance clamps an
integer bound to 64 bits and rounds through a double (measured: ``minimum: 1e300`` generated
9223372036854775807; ``minimum = maximum = 9007199254740993`` generated 9007199254740992)."""
_BOUND_KEYS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")


def inexact_number_bounds(schema: Any) -> str | None:
    """Why the token mask cannot hold the schema's numeric bounds exactly, or None."""
    for node in schema_nodes(schema):
        for key in _BOUND_KEYS:
            value = node.get(key)
            if (
                isinstance(value, int | float)
                and not isinstance(value, bool)
                and abs(value) > EXACT_NUMBER_BOUND
            ):
                return f"{key} {value!r} is beyond the magnitude the token mask holds exactly (2**53)"
    return None


def apply_length_caps(
    schema: dict[str, Any], *, max_length: int, max_items: int
) -> tuple[dict[str, Any], int]:
    """A capped copy of ``schema`` and the number of caps added. The input is never mutated."""
    out = copy.deepcopy(schema)
    count = 0

    def walk(node: Any) -> None:
        nonlocal count
        if not isinstance(node, dict):
            return
        types = _types(node)
        if "string" in types and "maxLength" not in node and not {"enum", "const", "format"} & node.keys():
            node["maxLength"] = max(max_length, int(node.get("minLength") or 0))
            count += 1
        if "array" in types and "maxItems" not in node:
            node["maxItems"] = max(max_items, int(node.get("minItems") or 0))
            count += 1
        if types == {"integer"} and not {"enum", "const"} & node.keys():
            if not {"maximum", "exclusiveMaximum"} & node.keys():
                node["maximum"] = max(INT_BOUND, node.get("minimum", 0))
                count += 1
            if not {"minimum", "exclusiveMinimum"} & node.keys():
                node["minimum"] = min(-INT_BOUND, node.get("maximum", 0))
                count += 1
        for key in _SUBSCHEMA_LISTS:
            for sub in node.get(key) or []:
                walk(sub)
        for key in _SUBSCHEMA_MAPS:
            value = node.get(key)
            if isinstance(value, dict):
                for sub in value.values():
                    walk(sub)
        for key in _SUBSCHEMA_SINGLE:
            walk(node.get(key))

    walk(out)
    return out, count


def exceeds_depth(schema: Any, limit: int) -> bool:
    """Whether nesting plus local ``$ref`` hops go deeper than ``limit`` along any path.

    Cycles (recursive schemas) do not count: they are expanded lazily by the grammar. Long acyclic
    chains do: llguidance (in our process and again in vLLM's engine process) recurses once per
    level and overflowed an 8 MiB thread stack at about 1,000 levels; vLLM itself refuses JSON
    nested deeper than 64.
    """
    memo: dict[str, int] = {}

    def depth(node: Any, path: frozenset[str], level: int) -> int:
        if level > limit:
            return level
        if isinstance(node, list):
            return max((depth(x, path, level) for x in node), default=level)
        if not isinstance(node, dict):
            return level
        best = level
        ref = node.get("$ref")
        if isinstance(ref, str) and ref not in path:
            if ref in memo:
                best = max(best, level + memo[ref])
            else:
                target = resolve_ref(schema, ref)
                if target is not None:
                    found = depth(target, path | {ref}, level + 1)
                    memo[ref] = found - level
                    best = max(best, found)
        for key, value in node.items():
            if key in DATA_KEYS or key in ("$defs", "definitions"):
                continue
            if isinstance(value, dict | list):
                best = max(best, depth(value, path, level + 1))
            if best > limit:
                break
        return best

    return depth(schema, frozenset(), 0) > limit


_LARK_RULE = re.compile(r"^\s*[?!]?[A-Za-z_][A-Za-z0-9_.]*\s*(?:\{[^}]*\})?\s*(?::|::=)", re.MULTILINE)


def count_grammar_rules(grammar: str) -> int:
    """Rule definitions in a Lark or GBNF grammar (a cheap bound before llguidance sees it)."""
    return len(_LARK_RULE.findall(grammar))


def schema_nodes(schema: Any) -> Iterator[dict[str, Any]]:
    """Every (sub)schema object of ``schema``, without recursion: data (``const``, ``enum``, ...) is
    not entered, and a name map (``properties``, ``$defs``, ...) is not a node, its values are."""
    stack: list[Any] = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        yield node
        for key, value in node.items():
            if key in DATA_KEYS:
                continue
            if key in NAME_MAPS and isinstance(value, dict):
                stack.extend(value.values())
            elif isinstance(value, dict | list):
                stack.append(value)


def _schema_shape(schema: Any, limits: Limits) -> tuple[int, tuple[str, dict[str, int]] | None]:
    """One walk over a schema (:func:`schema_nodes`): its node count and the first limit it breaks."""
    nodes = 0
    for node in schema_nodes(schema):
        nodes += 1
        for key in ("anyOf", "oneOf"):
            branches = node.get(key)
            if isinstance(branches, list) and len(branches) > limits.max_branches:
                return nodes, (
                    f"{key} has {len(branches)} branches; the limit is {limits.max_branches}",
                    {"branches": len(branches), "limit": limits.max_branches},
                )
        values = node.get("enum")
        if isinstance(values, list) and len(values) > limits.max_enum:
            return nodes, (
                f"enum has {len(values)} values; the limit is {limits.max_enum}",
                {"enum_values": len(values), "limit": limits.max_enum},
            )
    return nodes, None


def shape_error(
    limits: Limits,
    *,
    choices: int = 0,
    schemas: Iterable[Any] = (),
) -> tuple[str, dict[str, int]] | None:
    """Why a constraint is too large to compile quickly (message, detail), or None.

    ``choices`` is the number of ``choice`` entries or ``regex_patterns``; ``schemas`` are JSON
    Schemas whose nodes count together (one ``json_schema``, or every tool's ``parameters``).
    """
    if choices > limits.max_choices:
        return (
            f"{choices} alternatives (choice entries or regex_patterns); the limit is {limits.max_choices}",
            {"alternatives": choices, "limit": limits.max_choices},
        )
    total = 0
    for schema in schemas:
        nodes, problem = _schema_shape(schema, limits)
        if problem is not None:
            return problem
        total += nodes
    if total > limits.max_schema_nodes:
        return (
            f"the schema has {total} subschemas; the limit is {limits.max_schema_nodes}",
            {"schema_nodes": total, "limit": limits.max_schema_nodes},
        )
    return None
