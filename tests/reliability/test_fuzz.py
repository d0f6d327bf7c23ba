"""Fuzzing: schemathesis against the service's own /openapi.json, and hypothesis(-jsonschema) random
JSON Schemas and random request bodies. The bar: zero 5xx, zero crashes, and every 200 honest.

Case counts are printed (``-s``); CI runs a small bounded number, ``stress`` runs hundreds.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from typing import Any

import jsonschema
import pytest

from langchain_ananke.protocol import ErrorBody, GenerateRequest
from tests.reliability.conftest import MAX_TOKENS_CAP, Service, chat

schemathesis = pytest.importorskip("schemathesis", reason="pip install schemathesis")
hypothesis = pytest.importorskip("hypothesis")
hypothesis_jsonschema = pytest.importorskip(
    "hypothesis_jsonschema", reason="pip install hypothesis-jsonschema"
)

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402

CI_SCHEMATHESIS_EXAMPLES = 10  # per operation and generation mode (5 operations x 2 modes)
CI_RANDOM_SCHEMAS = 15
CI_RANDOM_BODIES = 15
STRESS_FACTOR = int(os.environ.get("ANANKE_FUZZ_STRESS_FACTOR", "25"))  # stress runs: x this many


def _fuzz_settings(examples: int) -> Any:
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,  # the same cases every run: a failure reproduces
        database=None,
        suppress_health_check=list(HealthCheck),
    )


def _report(label: str, counts: Counter[str], started: float) -> None:
    print(f"{label}: {sum(counts.values())} cases in {time.monotonic() - started:.0f} s: {dict(counts)}")


def _check_honest(data: dict[str, Any], schema: dict[str, Any] | None, body: Any = None) -> None:
    """A satisfied verdict is checked here, independently, where this side can: against ``schema``,
    or the request's own ``json_schema`` or ``choice``. An output that ``max_tokens`` cut exactly at
    the end of a complete instance is satisfied too (finish ``length``); for the other kinds (a regex
    in Rust syntax, a grammar) such a cut is only accepted where the answer says the whole budget
    was used."""
    if data.get("constraint_satisfied") is not True:
        return
    constraints = body.get("constraints") if isinstance(body, dict) else None
    constraints = constraints if isinstance(constraints, dict) else {}
    own = constraints.get("json_schema")
    if schema is None and isinstance(own, dict) and not body.get("tools"):
        schema = own
    if schema is not None:
        jsonschema.validate(json.loads(data["generated_text"]), schema)
    elif isinstance(constraints.get("choice"), list):
        assert data["generated_text"] in constraints["choice"], data
    elif data.get("finish_reason") == "length":
        assert data["tokens_generated"] == body.get("max_tokens", DEFAULT_MAX_TOKENS), data


# -------------------------------------------------------------------------------- schemathesis
#: The stress run: this many cases per operation and generation mode; at least STRESS_MIN_CASES in all
#: (issue 19: "at least 1,000 cases over every operation finds no 5xx").
STRESS_SCHEMATHESIS_EXAMPLES = int(os.environ.get("ANANKE_SCHEMATHESIS_STRESS_EXAMPLES", "180"))
STRESS_MIN_CASES = 1000
STRESS_BUDGET_S = float(os.environ.get("ANANKE_SCHEMATHESIS_BUDGET_S", "900"))
#: Valid output caps above this are lowered to it, so a generating case stays cheap on the CPU engine.
CHEAP_MAX_TOKENS = 16
#: What /generate_api generates without a max_tokens (the protocol's default).
DEFAULT_MAX_TOKENS = GenerateRequest.model_fields["max_tokens"].default
#: Valid ``timeout_s`` values below this are raised to it (see :func:`_cheapen`).
MIN_FUZZ_TIMEOUT_S = 60.0


def _cheapen(body: Any) -> None:
    """Lower a *valid* ``max_tokens``/``max_completion_tokens`` (1..cap) to CHEAP_MAX_TOKENS and raise a
    valid short ``timeout_s``; invalid ones (what a negative case is about) stay as generated."""
    if not isinstance(body, dict):
        return
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if type(value) is int and CHEAP_MAX_TOKENS < value <= MAX_TOKENS_CAP:
            body[key] = CHEAP_MAX_TOKENS
    # A valid deadline shorter than a loaded CPU engine needs would end in the documented 504
    # ``timeout`` (the client's own deadline passing, tested in test_faults), which this run would
    # count as a server fault: valid ones are raised to MIN_FUZZ_TIMEOUT_S; invalid ones stay.
    timeout = body.get("timeout_s")
    if type(timeout) in (int, float) and 0.01 <= timeout < MIN_FUZZ_TIMEOUT_S:
        body["timeout_s"] = MIN_FUZZ_TIMEOUT_S


class _Tally:
    def __init__(self) -> None:
        self.statuses: Counter[str] = Counter()
        self.cases: Counter[str] = Counter()
        self.server_errors: list[str] = []
        self.bad_error_bodies: list[str] = []
        self.undocumented: Counter[str] = Counter()
        self.skipped_over_budget = 0


def _make_case_runner(
    service: Service,
    operation: Any,
    mode: Any,
    examples: int,
    *,
    tally: _Tally,
    cheap: bool,
    budget_s: float | None,
    started: float,
) -> Any:
    label = f"{operation.method.upper()} {operation.path}"
    documented = {str(code) for code in operation.definition.raw.get("responses", {})}

    @_fuzz_settings(examples)
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        if budget_s is not None and time.monotonic() - started > budget_s:
            tally.skipped_over_budget += 1
            return
        if cheap:
            _cheapen(case.body)
        response = case.call(headers=service.headers, timeout=180)
        status = response.status_code
        tally.cases[label] += 1
        tally.statuses[f"{label} {status}"] += 1
        if str(status) not in documented and status != 200:
            tally.undocumented[f"{label} {status}"] += 1
        if status >= 500:
            tally.server_errors.append(
                f"{case.method} {case.path} query={case.query!r} body={case.body!r:.400}"
                f" -> {status} {response.text[:300]}"
            )
        elif status >= 400:
            try:
                ErrorBody.model_validate(response.json())
            except Exception as exc:  # any failure is a wrong error body
                tally.bad_error_bodies.append(
                    f"{case.method} {case.path} {case.body!r:.200} -> {status} "
                    f"{response.text[:200]} ({type(exc).__name__})"
                )
        elif case.path == "/generate_api" and "results" not in response.text[:20]:
            content_type = response.headers.get("content-type") or [""]  # a list here
            if "application/json" in str(content_type):
                _check_honest(response.json(), None, case.body)

    return run


def _run_schemathesis(
    service: Service, examples: int, *, cheap: bool = False, budget_s: float | None = None
) -> _Tally:
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{service.url}/openapi.json", headers=service.headers)
    tally = _Tally()
    started = time.monotonic()
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            run = _make_case_runner(
                service,
                operation,
                mode,
                examples,
                tally=tally,
                cheap=cheap,
                budget_s=budget_s,
                started=started,
            )
            try:
                run()
            except Unsatisfiable:  # e.g. no way to make a parameterless GET invalid
                tally.statuses[f"{operation.method.upper()} {operation.path} (no {mode.value} cases)"] += 0
    return tally


def _report_schemathesis(tally: _Tally, started: float) -> None:
    _report("schemathesis", tally.statuses, started)
    print(f"schemathesis cases per operation: {dict(tally.cases)}")
    print(f"schemathesis undocumented statuses: {dict(tally.undocumented)}")
    print(f"schemathesis skipped over the time budget: {tally.skipped_over_budget}")
    for line in tally.server_errors[:20]:
        print(f"schemathesis 5xx: {line}")


@pytest.mark.integration
def test_schemathesis_openapi_no_5xx(service: Service) -> None:
    started = time.monotonic()
    tally = _run_schemathesis(service, CI_SCHEMATHESIS_EXAMPLES)
    _report_schemathesis(tally, started)
    assert tally.server_errors == [], tally.server_errors[:5]
    assert tally.bad_error_bodies == [], tally.bad_error_bodies[:5]


@pytest.mark.stress
def test_schemathesis_openapi_no_5xx_stress(service: Service) -> None:
    """Every operation of /openapi.json, positive and negative, >= 1,000 cases: no 5xx, and every 4xx in
    the documented ErrorBody shape. Valid output caps are lowered to CHEAP_MAX_TOKENS; the run stops
    calling after ANANKE_SCHEMATHESIS_BUDGET_S (then the case count below fails honestly)."""
    started = time.monotonic()
    tally = _run_schemathesis(service, STRESS_SCHEMATHESIS_EXAMPLES, cheap=True, budget_s=STRESS_BUDGET_S)
    _report_schemathesis(tally, started)
    with service.client() as http:
        spec = http.get("/openapi.json").json()
    operations = {f"{method.upper()} {path}" for path, item in spec["paths"].items() for method in item}
    assert set(tally.cases) == operations, (set(tally.cases), operations)
    assert tally.server_errors == [], tally.server_errors[:5]
    assert tally.bad_error_bodies == [], tally.bad_error_bodies[:5]
    assert sum(tally.cases.values()) >= STRESS_MIN_CASES, dict(tally.cases)


# ------------------------------------------------------------------ random JSON Schemas (hypothesis)
def _leaf() -> dict[str, Any]:
    return {
        "anyOf": [
            {
                "type": "object",
                "properties": {
                    "type": {"const": "string"},
                    "minLength": {"type": "integer", "minimum": 0, "maximum": 4},
                    "maxLength": {"type": "integer", "minimum": 0, "maximum": 12},
                    "pattern": {"enum": ["^[a-z]+$", "^[0-9]{3}$", "^(a|b)*$", "^\\w+@\\w+$", "(x+)+y"]},
                    "format": {"enum": ["date", "email", "uuid", "date-time", "ipv4"]},
                },
                "required": ["type"],
                "additionalProperties": False,
            },
            {
                "type": "object",
                "properties": {
                    "type": {"enum": ["integer", "number"]},
                    "minimum": {"type": "integer", "minimum": -50, "maximum": 50},
                    "maximum": {"type": "integer", "minimum": -50, "maximum": 50},
                    "exclusiveMaximum": {"type": "integer", "minimum": -50, "maximum": 50},
                    "multipleOf": {"enum": [1, 2, 5, 0.5]},
                },
                "required": ["type"],
                "additionalProperties": False,
            },
            {
                "type": "object",
                "properties": {"type": {"enum": ["boolean", "null"]}},
                "required": ["type"],
                "additionalProperties": False,
            },
            {
                "type": "object",
                "properties": {
                    "enum": {
                        "type": "array",
                        "minItems": 1,
                        "maxItems": 4,
                        "items": {"type": ["string", "integer", "null"]},
                    }
                },
                "required": ["enum"],
                "additionalProperties": False,
            },
            {
                "type": "object",
                "properties": {"const": {"type": ["string", "integer", "boolean"]}},
                "required": ["const"],
                "additionalProperties": False,
            },
            # Invalid on purpose: must be a 422, never a 500.
            {
                "type": "object",
                "properties": {"type": {"enum": ["strin", "integer ", 7]}},
                "required": ["type"],
                "additionalProperties": False,
            },
        ]
    }


def _level(inner: dict[str, Any]) -> dict[str, Any]:
    return {
        "anyOf": [
            inner,
            {
                "type": "object",
                "properties": {
                    "type": {"const": "object"},
                    "properties": {
                        "type": "object",
                        "maxProperties": 4,
                        "propertyNames": {"pattern": "^[a-z]{1,6}$"},
                        "additionalProperties": inner,
                    },
                    "required": {
                        "type": "array",
                        "maxItems": 4,
                        "items": {"type": "string", "pattern": "^[a-z]{1,6}$"},
                    },
                    "additionalProperties": {"type": "boolean"},
                },
                "required": ["type"],
                "additionalProperties": False,
            },
            {
                "type": "object",
                "properties": {
                    "type": {"const": "array"},
                    "items": inner,
                    "minItems": {"type": "integer", "minimum": 0, "maximum": 3},
                    "maxItems": {"type": "integer", "minimum": 0, "maximum": 5},
                    "uniqueItems": {"type": "boolean"},
                },
                "required": ["type"],
                "additionalProperties": False,
            },
            {
                "type": "object",
                "properties": {"anyOf": {"type": "array", "minItems": 1, "maxItems": 3, "items": inner}},
                "required": ["anyOf"],
                "additionalProperties": False,
            },
            {
                "type": "object",
                "properties": {"oneOf": {"type": "array", "minItems": 1, "maxItems": 3, "items": inner}},
                "required": ["oneOf"],
                "additionalProperties": False,
            },
            {
                "type": "object",
                "properties": {"allOf": {"type": "array", "minItems": 1, "maxItems": 2, "items": inner}},
                "required": ["allOf"],
                "additionalProperties": False,
            },
        ]
    }


#: JSON Schemas, up to three levels deep, as instances of this meta-schema.
META_SCHEMA = _level(_level(_leaf()))


def _run_random_schemas(service: Service, examples: int) -> Counter[str]:
    outcomes: Counter[str] = Counter()
    with service.client(timeout=180) as http:

        @_fuzz_settings(examples)
        @given(schema=hypothesis_jsonschema.from_schema(META_SCHEMA), seed=st.integers(0, 2**16))
        def run(schema: dict[str, Any], seed: int) -> None:
            body = {
                "prompt": chat("Reply with JSON."),
                "constraints": {"json_schema": schema},
                "max_tokens": 48,
                "seed": seed,
            }
            response = http.post("/generate_api", json=body)
            assert response.status_code < 500, (schema, response.text[:500])
            if response.status_code == 200:
                data = response.json()
                _check_honest(data, schema)
                outcomes[f"200 satisfied={data['constraint_satisfied']} {data['finish_reason']}"] += 1
            else:
                assert response.status_code == 422, response.text[:300]
                outcomes[f"{response.status_code} {response.json()['error']['code']}"] += 1

        run()
    return outcomes


@pytest.mark.integration
def test_random_schemas_give_4xx_or_honest_output(service: Service) -> None:
    started = time.monotonic()
    outcomes = _run_random_schemas(service, CI_RANDOM_SCHEMAS)
    _report("random schemas", outcomes, started)


@pytest.mark.stress
def test_random_schemas_give_4xx_or_honest_output_stress(service: Service) -> None:
    started = time.monotonic()
    outcomes = _run_random_schemas(service, CI_RANDOM_SCHEMAS * STRESS_FACTOR)
    _report("random schemas", outcomes, started)


# -------------------------------------------------- random request bodies (the service's own schema)
def _request_schema(service: Service) -> dict[str, Any]:
    with service.client() as http:
        spec = http.get("/openapi.json").json()
    components = spec["components"]["schemas"]
    # Inline the component references so hypothesis-jsonschema sees one self-contained schema.
    text = json.dumps(components["GenerateRequest"])
    for _ in range(4):
        for name, sub in components.items():
            text = text.replace(json.dumps({"$ref": f"#/components/schemas/{name}"}), json.dumps(sub))
    schema: dict[str, Any] = json.loads(text)
    schema["properties"]["max_tokens"] = {"type": "integer", "minimum": 1, "maximum": 64}
    schema["properties"].pop("stream", None)
    return schema


def _run_random_bodies(service: Service, examples: int) -> Counter[str]:
    schema = _request_schema(service)
    outcomes: Counter[str] = Counter()
    with service.client(timeout=180) as http:

        @_fuzz_settings(examples)
        @given(body=hypothesis_jsonschema.from_schema(schema))
        def run(body: dict[str, Any]) -> None:
            response = http.post("/generate_api", json=body)
            assert response.status_code < 500, (body, response.text[:500])
            outcomes[str(response.status_code)] += 1
            if response.status_code == 200 and "results" not in response.json():
                _check_honest(response.json(), None, body)

        run()
    return outcomes


@pytest.mark.integration
def test_random_request_bodies_never_5xx(service: Service) -> None:
    started = time.monotonic()
    outcomes = _run_random_bodies(service, CI_RANDOM_BODIES)
    _report("random bodies", outcomes, started)


@pytest.mark.stress
def test_random_request_bodies_never_5xx_stress(service: Service) -> None:
    started = time.monotonic()
    outcomes = _run_random_bodies(service, CI_RANDOM_BODIES * STRESS_FACTOR)
    _report("random bodies", outcomes, started)
