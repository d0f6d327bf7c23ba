"""A small instance of a JSON Schema, built from the schema's keywords: the constraint compiler's witness.

:func:`minimal_instance` writes the instance a person would write to show that a schema can be
satisfied: required properties only, the shortest ``enum`` value, ``0`` moved into the numeric bounds,
strings of ``minLength`` (a sample value for a ``format``, a short match for a ``pattern``), ``minItems``
items. It follows ``$ref``, merges ``allOf`` and adds what ``dependentRequired``/``dependencies`` ask for.
Where a choice has to be made (``anyOf``, ``oneOf``, ``enum``, a type list) it takes the first option
whose instance the schema node accepts, checked with ``jsonschema``; the finished instance is checked
against the whole schema with the validator the service's final check uses
(:func:`~modal_service.constraints.verify.json_validator`).

The compiler keeps an instance only if, in addition, the grammar the engine enforces accepts its
tokens. It serves two purposes:

- a length: the shortest output the service can promise, for the ``max_tokens`` check up front. The
  token-level search in :mod:`modal_service.constraints.closing` walks the grammar one choice at a time
  and can get lost in a large schema's optional properties; this builder knows which properties are required;
- a proof of satisfiability for schemas the service only *approximates* (llguidance enforces a superset
  of them): one valid instance shows the exact check can pass.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from typing import Any

from modal_service.constraints.schema import FORMAT_SAMPLES, resolve_ref
from modal_service.constraints.verify import json_validator

#: Bounds on the work: values built in all, and nesting (``$ref`` hops included).
MAX_VALUES = 20_000
MAX_DEPTH = 64


class NoInstance(Exception):
    """This builder found no instance for a schema node."""


_TYPE_ORDER = ("null", "boolean", "integer", "number", "string", "array", "object")


def minimal_instance(
    schema: Any, *, string_for_pattern: Callable[[str, int, int | None], str | None] | None = None
) -> tuple[bool, Any]:
    """``(True, instance)``, the instance validated against the whole schema with
    :func:`json_validator`; or ``(False, None)`` when the builder found none (the schema may still
    have one). ``string_for_pattern(pattern, min_length, max_length)`` may supply a string matching a
    ``pattern`` that the builder's own short candidates do not match."""
    builder = _Builder(schema, string_for_pattern)
    try:
        value = builder.build(schema, 0, frozenset())
    except (NoInstance, RecursionError):
        return False, None
    return (True, value) if builder.accepts(schema, value) else (False, None)


class _Builder:
    def __init__(self, root: Any, string_for_pattern: Callable[[str, int, int | None], str | None] | None):
        self.root = root
        self.values = 0
        self.string_for_pattern = string_for_pattern
        self._validator = json_validator(root if isinstance(root, dict) else {})

    def accepts(self, node: Any, value: Any) -> bool:
        try:
            return bool(self._validator.evolve(schema=node).is_valid(value))
        except Exception:  # an unresolvable $ref or a malformed keyword: not a witness
            return False

    def build(self, node: Any, depth: int, refs: frozenset[str]) -> Any:
        self.values += 1
        if self.values > MAX_VALUES or depth > MAX_DEPTH:
            raise NoInstance
        if node is True or node == {}:
            return 0
        if not isinstance(node, dict):
            raise NoInstance
        node, refs = self._flatten(node, refs)
        if "const" in node:
            return node["const"]
        if "enum" in node:
            options = node["enum"] if isinstance(node["enum"], list) else []
            for value in sorted(options, key=lambda v: len(repr(v))):
                if self.accepts(node, value):
                    return value
            raise NoInstance
        for key in ("anyOf", "oneOf"):
            branches = node.get(key)
            if isinstance(branches, list) and branches:
                base = {k: v for k, v in node.items() if k != key}
                for branch in branches:
                    try:
                        value = self.build(_merge(base, branch), depth + 1, refs)
                    except NoInstance:
                        continue
                    if self.accepts(node, value):
                        return value
                raise NoInstance
        # Checked only where there is a choice to make: a value built for the one possible type is
        # checked by the nearest enclosing choice, or by minimal_instance's final check of the whole
        # (checking every node re-validated each subtree once per ancestor).
        kinds = list(self._types(node))
        for kind in kinds:
            try:
                value = self._of_type(kind, node, depth, refs)
            except NoInstance:
                continue
            if len(kinds) == 1 or self.accepts(node, value):
                return value
        raise NoInstance

    def _flatten(self, node: dict[str, Any], refs: frozenset[str]) -> tuple[dict[str, Any], frozenset[str]]:
        """Inline ``$ref`` and ``allOf`` into one node (a ref met again on this path: no instance)."""
        for _ in range(MAX_DEPTH):
            ref = node.get("$ref")
            subs = node.get("allOf")
            if isinstance(ref, str):
                if ref in refs:
                    raise NoInstance
                target = resolve_ref(self.root, ref)
                if target is None:
                    raise NoInstance
                refs = refs | {ref}
                rest = {k: v for k, v in node.items() if k != "$ref"}
                node = _merge(rest, target) if rest else (target if isinstance(target, dict) else {})
                if target is False:
                    raise NoInstance
                continue
            if isinstance(subs, list):
                merged = {k: v for k, v in node.items() if k != "allOf"}
                for sub in subs:
                    if sub is False:
                        raise NoInstance
                    merged = _merge(merged, sub)
                node = merged
                continue
            return node, refs
        raise NoInstance

    @staticmethod
    def _types(node: dict[str, Any]) -> Iterator[str]:
        kind = node.get("type")
        if isinstance(kind, str):
            yield kind
            return
        if isinstance(kind, list):
            yield from sorted((k for k in kind if isinstance(k, str)), key=_rank)
            return
        if any(k in node for k in ("properties", "required", "additionalProperties", "minProperties")):
            yield "object"
        elif any(k in node for k in ("items", "prefixItems", "minItems", "contains")):
            yield "array"
        elif any(k in node for k in ("minLength", "maxLength", "pattern", "format")):
            yield "string"
        elif any(k in node for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")):
            yield "number"
        else:
            yield from _TYPE_ORDER

    def _of_type(self, kind: str, node: dict[str, Any], depth: int, refs: frozenset[str]) -> Any:
        if kind == "null":
            return None
        if kind == "boolean":
            return False
        if kind in ("integer", "number"):
            return _number(node, integer=kind == "integer")
        if kind == "string":
            return self._string(node)
        if kind == "array":
            return self._array(node, depth, refs)
        if kind == "object":
            return self._object(node, depth, refs)
        raise NoInstance

    def _string(self, node: dict[str, Any]) -> str:
        low = int(node.get("minLength") or 0)
        high = node.get("maxLength")
        high = int(high) if isinstance(high, int | float) else None
        fmt = node.get("format")
        candidates = []
        if isinstance(fmt, str) and fmt in FORMAT_SAMPLES:
            candidates.append(FORMAT_SAMPLES[fmt])
        candidates += ["a" * low, "0" * max(low, 1), "a" * max(low, 1)]
        # The schema's own sample values fit patterns that no short string does.
        examples = node.get("examples")
        for sample in [node.get("default"), *(examples if isinstance(examples, list) else [])]:
            if isinstance(sample, str):
                candidates.append(sample)
        pattern = node.get("pattern")
        for text in candidates:
            if len(text) >= low and (high is None or len(text) <= high) and _search(pattern, text):
                return text
        if isinstance(pattern, str) and self.string_for_pattern is not None:
            found = self.string_for_pattern(pattern, low, high)
            if found is not None:
                return found
        raise NoInstance

    def _array(self, node: dict[str, Any], depth: int, refs: frozenset[str]) -> list[Any]:
        count = int(node.get("minItems") or 0)
        contains = node.get("contains")
        if contains is not None and count == 0:
            count = 1
        prefix = node.get("prefixItems")
        items = node.get("items")
        if isinstance(items, list):  # draft 4-7 tuple form
            prefix, items = items, node.get("additionalItems", True)
        out: list[Any] = []
        for i in range(count):
            if self.values > MAX_VALUES:
                raise NoInstance
            sub = prefix[i] if isinstance(prefix, list) and i < len(prefix) else items
            if sub is None:
                sub = True
            if i == 0 and contains is not None and (sub is True or sub == {}):
                sub = contains
            out.append(self.build(sub, depth + 1, refs))
        if node.get("uniqueItems") and len(out) > 1:
            out = _distinct(out)
        return out

    def _object(self, node: dict[str, Any], depth: int, refs: frozenset[str]) -> dict[str, Any]:
        raw = node.get("properties")
        props: dict[str, Any] = raw if isinstance(raw, dict) else {}
        required = [k for k in node.get("required") or [] if isinstance(k, str)]
        wanted = set(required)
        # dependentRequired / dependencies (array form) pull in more keys; follow them to a fixpoint.
        deps: dict[str, Any] = {}
        for key in ("dependencies", "dependentRequired"):
            if isinstance(node.get(key), dict):
                deps |= node[key]
        changed = True
        while changed:
            changed = False
            for name in list(wanted):
                more = deps.get(name)
                if isinstance(more, list):
                    for extra in more:
                        if isinstance(extra, str) and extra not in wanted:
                            wanted.add(extra)
                            changed = True
        low = int(node.get("minProperties") or 0)
        for name in props:  # optional properties, in order, only to reach minProperties
            if len(wanted) >= low:
                break
            wanted.add(name)
        out: dict[str, Any] = {}
        # Keys in the order of ``properties`` (the order the grammar writes them), then the rest.
        rest = sorted(wanted - set(props) - set(required))
        for name in [*(p for p in props if p in wanted), *(r for r in required if r not in props), *rest]:
            if name in out:
                continue
            sub = props.get(name) if name in props else _additional(node, name)
            out[name] = self.build(sub, depth + 1, refs)
        return out


def _rank(kind: str) -> int:
    return _TYPE_ORDER.index(kind) if kind in _TYPE_ORDER else len(_TYPE_ORDER)


def _merge(a: Any, b: Any) -> Any:
    """Both schemas' keywords in one node (a conjunction; the final check decides)."""
    if a is True or a == {}:
        return b
    if b is True or b == {}:
        return a
    if not isinstance(a, dict) or not isinstance(b, dict):
        raise NoInstance
    out = dict(a)
    for key, value in b.items():
        if key not in out:
            out[key] = value
        elif key == "required" and isinstance(value, list) and isinstance(out[key], list):
            out[key] = [*out[key], *(v for v in value if v not in out[key])]
        elif key == "properties" and isinstance(value, dict) and isinstance(out[key], dict):
            props = dict(out[key])
            for name, sub in value.items():
                props[name] = {"allOf": [props[name], sub]} if name in props else sub
            out[key] = props
        elif key in ("minimum", "exclusiveMinimum", "minLength", "minItems", "minProperties"):
            out[key] = max(out[key], value) if _both_numbers(out[key], value) else out[key]
        elif key in ("maximum", "exclusiveMaximum", "maxLength", "maxItems", "maxProperties"):
            out[key] = min(out[key], value) if _both_numbers(out[key], value) else out[key]
        elif key == "type" and out[key] != value:
            left = {out[key]} if isinstance(out[key], str) else set(out[key] or [])
            right = {value} if isinstance(value, str) else set(value or [])
            if "number" in left and "integer" in right:
                left.add("integer")
            if "number" in right and "integer" in left:
                right.add("integer")
            both = sorted(left & right, key=_rank)
            if not both:
                raise NoInstance
            out[key] = both
        elif key in ("anyOf", "oneOf", "allOf"):
            out["allOf"] = [*(out.get("allOf") or []), {key: value}]
    return out


def _both_numbers(a: Any, b: Any) -> bool:
    return all(isinstance(x, int | float) and not isinstance(x, bool) for x in (a, b))


def _additional(node: dict[str, Any], name: str) -> Any:
    for pattern, sub in (node.get("patternProperties") or {}).items():
        if _search(pattern, name):
            return sub
    extra = node.get("additionalProperties", True)
    return extra if extra is not False else False


def _number(node: dict[str, Any], *, integer: bool) -> int | float:
    """The value closest to 0 within the bounds (and a multiple of ``multipleOf`` where one is set)."""
    low, high = node.get("minimum"), node.get("maximum")
    xlow, xhigh = node.get("exclusiveMinimum"), node.get("exclusiveMaximum")
    if xlow is True:  # draft 4: a flag on minimum/maximum
        xlow, low = low, None
    if xhigh is True:
        xhigh, high = high, None
    step = node.get("multipleOf")
    step = step if isinstance(step, int | float) and not isinstance(step, bool) and step > 0 else None
    unit: float = 1 if integer else (step or 1)
    if integer and step and float(step).is_integer():
        unit = step
    candidates: list[float] = [0]
    for bound, above in ((low, True), (xlow, True), (high, False), (xhigh, False)):
        if isinstance(bound, int | float) and not isinstance(bound, bool):
            q = bound / unit
            candidates += (
                [math.ceil(q) * unit, (math.floor(q) + 1) * unit]
                if above
                else [
                    math.floor(q) * unit,
                    (math.ceil(q) - 1) * unit,
                ]
            )
            if not integer and step is None:
                candidates.append(bound)
    for value in sorted(candidates, key=abs):
        if isinstance(low, int | float) and value < low:
            continue
        if isinstance(xlow, int | float) and not isinstance(xlow, bool) and value <= xlow:
            continue
        if isinstance(high, int | float) and value > high:
            continue
        if isinstance(xhigh, int | float) and not isinstance(xhigh, bool) and value >= xhigh:
            continue
        if integer or float(value).is_integer():
            return int(value)
        return value
    raise NoInstance


def _search(pattern: Any, text: str) -> bool:
    """ECMA-262 ``pattern`` semantics, approximated with Python's ``re`` (search, not full match)."""
    if not isinstance(pattern, str):
        return True
    try:
        return re.search(pattern, text) is not None
    except re.error:
        return False


def _distinct(values: list[Any]) -> list[Any]:
    """Make equal items differ where they are numbers or strings (for ``uniqueItems``)."""
    out: list[Any] = []
    for i, value in enumerate(values):
        new = value
        if new in out:
            if isinstance(value, bool) or not isinstance(value, int | str):
                raise NoInstance
            new = value + i if isinstance(value, int) else value + str(i)
        out.append(new)
    return out
