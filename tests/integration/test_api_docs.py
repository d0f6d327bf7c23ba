"""``docs/api.md`` agrees with the live service's ``/openapi.json``.

- Endpoints: every path and method in the spec has a ``## `METHOD /path` `` section, and every such
  section is in the spec.
- Fields: a table right after ``<!-- schema: Name -->`` lists exactly the properties of the spec's
  component ``Name``; every component in the spec has such a table. Where the table has a
  ``Default`` column, it says ``required`` for required fields and shows the spec's default.
  ``<!-- protocol: Name -->`` tables are checked the same way against ``langchain_ananke.protocol``
  models that the spec does not include (the SSE frame).
- Status codes: each endpoint's section lists every status code the spec declares for it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from langchain_ananke import protocol

pytestmark = pytest.mark.integration

DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"
METHODS = ("get", "post", "put", "patch", "delete")
ENDPOINT = re.compile(r"^## `(GET|POST|PUT|PATCH|DELETE) (/\S*)`$", re.MULTILINE)
MARKER = re.compile(r"^<!-- (schema|protocol): (\w+) -->$", re.MULTILINE)


@pytest.fixture(scope="module")
def spec(http: httpx.Client) -> dict[str, Any]:
    resp = http.get("/openapi.json")
    assert resp.status_code == 200
    data: dict[str, Any] = resp.json()
    return data


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text()


def sections(doc: str) -> dict[tuple[str, str], str]:
    """``(method, path)`` -> the text of that endpoint's section."""
    found = list(ENDPOINT.finditer(doc))
    out = {}
    for i, match in enumerate(found):
        end = found[i + 1].start() if i + 1 < len(found) else len(doc)
        key = (match[1].lower(), match[2])
        assert key not in out, f"{key} documented twice"
        out[key] = doc[match.end() : end]
    return out


def table_after(doc: str, pos: int) -> list[dict[str, str]]:
    """The Markdown table that starts on the line after ``pos``, as header -> cell dicts."""
    lines = doc[pos:].lstrip("\n").splitlines()
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
    assert len(rows) >= 3, f"no table after offset {pos}"
    header = rows[0]
    return [dict(zip(header, row, strict=True)) for row in rows[2:]]


def field_name(cell: str) -> str:
    match = re.fullmatch(r"`([^`]+)`", cell)
    assert match, f"first column must be a `field` name: {cell!r}"
    return match[1]


def test_every_endpoint_is_documented_and_vice_versa(spec: dict[str, Any], doc: str) -> None:
    in_spec = {(m, path) for path, ops in spec["paths"].items() for m in ops if m in METHODS}
    documented = set(sections(doc))
    assert in_spec - documented == set(), "in /openapi.json but not in docs/api.md"
    assert documented - in_spec == set(), "in docs/api.md but not in /openapi.json"


def test_status_codes_are_documented(spec: dict[str, Any], doc: str) -> None:
    for (method, path), text in sections(doc).items():
        operation = spec["paths"].get(path, {}).get(method)
        if operation is None:
            continue  # reported by test_every_endpoint_is_documented_and_vice_versa
        declared = set(operation.get("responses", {}))
        listed = set(re.findall(r"^\| `(\d{3})` \|", text, re.MULTILINE))
        assert declared <= listed, f"{method.upper()} {path}: undocumented status {declared - listed}"


def _schema(spec: dict[str, Any], source: str, name: str) -> dict[str, Any]:
    if source == "schema":
        components = spec["components"]["schemas"]
        assert name in components, f"docs/api.md documents {name}, which /openapi.json does not have"
        schema: dict[str, Any] = components[name]
        return schema
    model = getattr(protocol, name)
    return dict(model.model_json_schema())


def _default_cell(prop: dict[str, Any]) -> str:
    return f"`{json.dumps(prop['default'])}`"


def test_field_tables_match_the_schemas(spec: dict[str, Any], doc: str) -> None:
    tables = {}
    for match in MARKER.finditer(doc):
        source, name = match[1], match[2]
        schema = _schema(spec, source, name)
        rows = table_after(doc, match.end())
        documented = [field_name(row["Field"]) for row in rows]
        props = schema.get("properties", {})
        assert len(documented) == len(set(documented)), f"{name}: a field is listed twice"
        assert set(documented) == set(props), (
            f"{name}: missing {set(props) - set(documented)}, extra {set(documented) - set(props)}"
        )
        if "Default" in rows[0]:
            required = set(schema.get("required", []))
            for row in rows:
                field = field_name(row["Field"])
                prop = props[field]
                if field in required:
                    assert row["Default"] == "required", f"{name}.{field} is required"
                elif "default" in prop and isinstance(prop["default"], str | bool | int | float):
                    assert row["Default"] == _default_cell(prop), (
                        f"{name}.{field}: the spec's default is {_default_cell(prop)}"
                    )
                elif "default" in prop:
                    documented_default = json.loads(row["Default"].strip("`"))
                    assert documented_default == prop["default"], f"{name}.{field}: default"
                else:
                    assert row["Default"] == "—", f"{name}.{field} has no default in the spec"
        tables[name] = source
    missing = set(spec["components"]["schemas"]) - set(tables)
    assert not missing, f"schemas in /openapi.json with no table in docs/api.md: {missing}"
