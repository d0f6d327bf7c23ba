"""Every example in ``examples/`` runs against the real local service, and its output checks out.

Each example runs as a subprocess with ``ANANKE_BASE_URL`` pointing at the session's service (so it
never starts its own). Examples print a last ``RESULT: {json}`` line; where that holds a structure,
it is validated here with the example's own Pydantic models and constraints.
"""

from __future__ import annotations

import importlib
import itertools
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
RUN_TIMEOUT = 600


def run(command: list[str], base_url: str) -> str:
    """Run an example; fail with its output unless it exits 0. Returns stdout."""
    env = os.environ | {"ANANKE_BASE_URL": base_url, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False
    )
    assert proc.returncode == 0, f"{command} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def run_example(name: str, base_url: str) -> str:
    return run([sys.executable, str(EXAMPLES / name)], base_url)


def result(stdout: str) -> Any:
    """The JSON on the last ``RESULT:`` line."""
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT: ")]
    assert lines, f"no RESULT line in:\n{stdout}"
    return json.loads(lines[-1][len("RESULT: ") :])


@pytest.fixture(scope="module")
def examples_on_path() -> Iterator[None]:
    """Make the example modules importable, for their models and constants."""
    sys.path.insert(0, str(EXAMPLES))
    yield
    sys.path.remove(str(EXAMPLES))


def example(name: str) -> ModuleType:
    return importlib.import_module(name)


@pytest.mark.usefixtures("examples_on_path")
def test_quickstart(base_url: str) -> None:
    out = run_example("quickstart.py", base_url)
    match = re.search(r"Person\(name='(?P<name>[^']*)', age=(?P<age>-?[0-9]+), city='(?P<city>[^']*)'\)", out)
    assert match, out
    person = example("quickstart").Person.model_validate(match.groupdict())
    assert person.name


@pytest.mark.usefixtures("examples_on_path")
def test_extraction_batch(base_url: str) -> None:
    out = run_example("extraction_batch.py", base_url)
    mod = example("extraction_batch")
    data = result(out)
    for key in ("batch", "abatch"):
        assert len(data[key]) == len(mod.TEXTS)
        for record in data[key]:
            mod.Order.model_validate(record)
        throughput = re.search(
            rf"^{key}: (\d+) records in [0-9.]+ s = ([0-9.]+) records/s, (\d+) output tokens = ([0-9.]+) "
            r"tokens/s$",
            out,
            re.MULTILINE,
        )
        assert throughput, out
        assert int(throughput[1]) == len(mod.TEXTS)
        assert float(throughput[2]) > 0
        assert int(throughput[3]) > 0
        assert float(throughput[4]) > 0


@pytest.mark.usefixtures("examples_on_path")
def test_agent_tools(base_url: str) -> None:
    out = run_example("agent_tools.py", base_url)
    mod = example("agent_tools")
    data = result(out)
    assert len(data["tool_calls"]) == mod.TOOL_ROUNDS  # one forced call per round, then the answer
    for call in data["tool_calls"]:
        assert call["name"] in {"multiply", "add"}
        args = mod.Operands.model_validate(call["args"])  # parsed and schema-valid
        expected = args.a * args.b if call["name"] == "multiply" else args.a + args.b
        assert call["result"] == str(expected)  # the tool really ran on those arguments
    assert re.fullmatch(mod.ANSWER, data["answer"]), data["answer"]


@pytest.mark.usefixtures("examples_on_path")
def test_code_generation(base_url: str) -> None:
    out = run_example("code_generation.py", base_url)
    mod = example("code_generation")
    data = result(out)
    name, kind = r"[a-z_][a-z0-9_]{0,15}", r"(?:i32|i64|bool|String|Vec<i32>)"
    param = rf"{name}: {kind}"
    signature = rf"fn {name}\((?:{param}(?:, {param}){{0,3}})?\) -> {kind}"
    assert re.fullmatch(signature, data["signature"]), data["signature"]
    assert any(re.fullmatch(p, data["return_type"]) for p in mod.RETURN_TYPES), data["return_type"]
    assert data["language"] in mod.LANGUAGES


@pytest.mark.usefixtures("examples_on_path")
def test_drop_in_swap(base_url: str) -> None:
    out = run_example("drop_in_swap.py", base_url)
    mod = example("drop_in_swap")
    data = result(out)
    assert set(data) == {"ChatOpenAI", "ChatAnanke"}
    for invoice in data.values():
        mod.Invoice.model_validate(invoice)


@pytest.mark.usefixtures("examples_on_path")
def test_streaming_partial(base_url: str) -> None:
    out = run_example("streaming_partial.py", base_url)
    mod = example("streaming_partial")
    data = result(out)
    partials = data["partials"]
    assert len(partials) >= 3, partials  # it really streamed
    for before, after in itertools.pairwise(partials):
        assert isinstance(after, dict)
        assert set(before) <= set(after), (before, after)  # the object only grows
    final = mod.Recipe.model_validate(data["final"])
    assert final.model_dump() == partials[-1]


def _sections(out: str) -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    current = None
    for line in out.splitlines():
        if line.startswith("## "):
            current = line[3:]
            sections[current] = []
        elif current is not None and line.strip():
            sections[current].append(line)
    return sections


PERSON_SCHEMA = {  # the schema http_api.sh sends
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


def test_http_api_sh(base_url: str) -> None:
    out = run(["bash", str(EXAMPLES / "http_api.sh")], base_url)
    sections = _sections(out)
    assert json.loads(sections["GET /health"][0])["status"] == "ok"

    body = json.loads(sections["POST /generate_api json_schema"][0])
    assert body["constraint_satisfied"] is True, body
    jsonschema.validate(json.loads(body["generated_text"]), PERSON_SCHEMA)

    body = json.loads(sections["POST /generate_api regex"][0])
    assert re.fullmatch("[0-9]{3}-[0-9]{3}-[0-9]{4}", body["generated_text"]), body
    assert body["constraint_satisfied"] is True

    frames = [json.loads(line[len("data: ") :]) for line in sections["POST /generate_api stream"]]
    assert frames[-1]["event"] == "done"
    final = frames[-1]["response"]
    assert "".join(f["text"] for f in frames if f["event"] == "token") == final["generated_text"]
    assert final["generated_text"] in ("yes", "no")
    assert final["constraint_satisfied"] is True
