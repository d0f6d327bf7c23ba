"""What one GPU bench run measures: the engine settings, their phases, and each request's prompt and
constraint. ``run_gpu_bench`` drives them; the server process (``_serve``) builds the same constraints for
its raw route.
"""

from __future__ import annotations

from typing import Any

from bench.gpu._shared import LIST_SCHEMA
from bench.gpu.step_split import VARIANTS

MAX_TOKENS = 128
TEMPERATURE = 1.0

# Closes by itself: checks that outputs satisfy the schema and are compact.
CLOSING_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 99999},
        "name": {"type": "string", "maxLength": 12},
        "ok": {"type": "boolean"},
    },
    "required": ["id", "name", "ok"],
    "additionalProperties": False,
}

GRAPHS = {
    "compilation_config": {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY", "max_cudagraph_capture_size": 256}
}
# name, arch, enforce_eager, extra engine args, latest end (s after start), step estimates (ms) by c.
# "compile" is what modal_service/app.py ships: enforce_eager=False and vLLM's default compilation
# (torch.compile + piecewise and full CUDA graphs).
ENGINES: list[dict[str, Any]] = [
    {
        "name": "32b-graphs",
        "arch": "qwen2.5-coder-32b",
        "enforce_eager": False,
        "extra": GRAPHS,
        "end_by": 300,
        "start_est": 110,
        "step": {1: 17, 8: 19, 64: 28, 256: 45},
    },
    {
        "name": "32b-compile",
        "arch": "qwen2.5-coder-32b",
        "enforce_eager": False,
        "extra": {},
        "end_by": 480,
        "start_est": 150,
        "step": {1: 17, 8: 19, 64: 28, 256: 45},
    },
    {
        "name": "7b-graphs",
        "arch": "qwen2.5-coder-7b",
        "enforce_eager": False,
        "extra": GRAPHS,
        "end_by": 555,
        "start_est": 50,
        "step": {1: 6, 8: 7, 64: 12, 256: 25},
    },
    {
        "name": "32b-eager",
        "arch": "qwen2.5-coder-32b",
        "enforce_eager": True,
        "extra": {},
        "end_by": 555,
        "start_est": 80,
        "step": {1: 40, 8: 42, 64: 50, 256: 70},
    },
    # The app's setting on vLLM's V1 model runner (0.26 picks the V2 runner for dense models): a cheap
    # single-stream variant (different input preparation and sampler, same model kernels).
    {
        "name": "32b-compile-v1",
        "arch": "qwen2.5-coder-32b",
        "enforce_eager": False,
        "extra": {},
        "env": {"VLLM_USE_V2_MODEL_RUNNER": "0"},
        "diag": False,
        "end_by": 555,
        "start_est": 100,
        "step": {1: 17, 8: 19, 64: 28, 256: 45},
    },
]
# vLLM 0.32 runs (issue 23). "32b-app" is the app's setting, as "32b-compile"; "32b-sleep" adds
# enable_sleep_mode (Modal's GPU-snapshot path) and runs the app's phases; after the priority-1 phases it
# is put to sleep and woken (sleep_cycles), each time followed by single requests.
# "32b-knee": the latency knee (1.5k-token prompts, 200-token outputs) on the app's setting.
STEP_032 = {1: 24, 8: 26, 64: 36, 256: 60}  # H100 estimates, for the time guard only


def _e032(name: str, **kw: Any) -> dict[str, Any]:
    """An engine of the 0.32 runs: the app's setting (32B shape, compiled) plus ``kw``."""
    base = {"arch": "qwen2.5-coder-32b", "enforce_eager": False, "extra": {}, "diag": False}
    return {"name": name, **base, "end_by": 585, "start_est": 200, "step": STEP_032, **kw}


ENGINES += [
    _e032("32b-app"),
    _e032("32b-sleep", sleep_mode=True, sleep_cycles=2),
    # Issue 21 on the GPU: the snapshot setting (sleep mode) with fast-forward on; its phases switch it
    # off per request ("_off" modes), and its unconstrained c=64 compares with 32b-snap's.
    _e032("32b-ff", sleep_mode=True, fast_forward=True),
    # The same under async scheduling, the drafts one step late (--fast-forward async), 32b-ff's phases.
    _e032("32b-ffa", sleep_mode=True, fast_forward=True, fast_forward_async=True),
    # 32b-sleep's engine with the phases issue 23 still lacked after the first 0.32 run: the sleep
    # cycles (first), JSON / unconstrained at c=256, the knee, and c=64 unconstrained for 32b-ff.
    _e032("32b-snap", sleep_mode=True, sleep_cycles=2, sleep_first=True),
    _e032("32b-knee"),
]
DEFAULT_ENGINES = ["32b-graphs", "32b-compile", "7b-graphs"]


def variant_engine(name: str) -> dict[str, Any]:
    """``32b+VARIANT`` (run 5): the app's setting plus one of ``step_split.VARIANTS``' engine keywords,
    with the c=1 phases, to check a setting found there on the service's HTTP path."""
    v = VARIANTS[name.removeprefix("32b+")]
    return {
        "name": name,
        "arch": "qwen2.5-coder-32b",
        "enforce_eager": False,
        "extra": v["kwargs"],
        "diag": False,
        "end_by": 555,
        "start_est": 130,
        "step": {1: 17, 8: 19, 64: 28, 256: 45},
    }


UPSTREAM = {"mode": "vllm"}  # so_probe: vLLM's own mask fill, the service's patch bypassed
SAMPLED = {"mode": "service", "sample": True}  # so_probe: stack samples of both processes


def _p(name: str, kind: str, c: int, n: int, mode: str, prio: int, **kw: Any) -> dict[str, Any]:  # noqa: PLR0917
    return {"name": name, "kind": kind, "c": c, "n": n, "mode": mode, "prio": prio, **kw}


def _matrix(*cs: int) -> list[dict[str, Any]]:
    n = {1: 3, 8: 16, 64: 128, 256: 256}
    return [_p(f"c{c}_{m}", "http", c, n[c], m, 1) for c in cs for m in ("unc", "json")]


# Priority 1 first; priority 2 phases run while the engine's window has time left. Every phase runs
# with the service's own mask fill (modal_service.vllm_patches) unless ``ctl`` says otherwise.
PHASES: dict[str, list[dict[str, Any]]] = {
    "32b-graphs": [
        *_matrix(1, 64),
        _p("c64_json_vllm", "http", 64, 128, "json", 1, ctl=UPSTREAM),
        *_matrix(8, 256),
        _p("raw_c64_unc", "raw", 64, 128, "unc", 1),
        _p("c64_json_closing", "http", 64, 64, "json_closing", 2),
        _p("c64_json_close", "http", 64, 128, "json_close", 2),
        _p("c64_unc_r2", "http", 64, 128, "unc", 2),
        _p("c64_json_r2", "http", 64, 128, "json", 2),
        _p("c64_json_vllm_r2", "http", 64, 128, "json", 2, ctl=UPSTREAM),
        _p("raw_c64_json", "raw", 64, 128, "json", 2),
        _p("c256_json_vllm", "http", 256, 256, "json", 2, ctl=UPSTREAM),
        _p("raw_c1_unc", "raw", 1, 2, "unc", 2),
    ],
    "32b-compile": [
        *_matrix(1),
        # Run 4: A-B-B-A blocks at c=64 (unconstrained / JSON), so the ratio has a spread, then closing
        # on budget on / off / on (every JSON request is cut at max_tokens).
        *[
            _p(f"c64_{m}_{4 * b + i}", "http", 64, 128, m, 1)
            for b in range(3)
            for i, m in enumerate(("unc", "json", "json", "unc"), start=1)
        ],
        _p("c64_json_close_1", "http", 64, 128, "json_close", 1),
        _p("c64_json_off_1", "http", 64, 128, "json", 1),
        _p("c64_json_close_2", "http", 64, 128, "json_close", 1),
        _p("c64_json_close_min1", "http", 64, 128, "json_close_min1", 1, ctl=SAMPLED),
        _p("c64_json_min1", "http", 64, 128, "json_min1", 1),
        _p("c64_json_close_s", "http", 64, 128, "json_close", 1, ctl=SAMPLED),
        # Run 4c: two more A-B-B-A blocks, then gc.freeze() in the server, then two more.
        *[
            _p(f"c64_{m}_{4 * b + i}", "http", 64, 128, m, 1)
            for b in range(3, 5)
            for i, m in enumerate(("unc", "json", "json", "unc"), start=1)
        ],
        *[
            {**_p(f"c64_{m}_f{4 * b + i}", "http", 64, 128, m, 1), "gc_freeze": b == 0 and i == 1}
            for b in range(2)
            for i, m in enumerate(("unc", "json", "json", "unc"), start=1)
        ],
        *_matrix(64, 8, 256),
        _p("c64_json_vllm", "http", 64, 128, "json", 2, ctl=UPSTREAM),
        _p("c256_json_vllm", "http", 256, 256, "json", 2, ctl=UPSTREAM),
        _p("raw_c1_unc", "raw", 1, 2, "unc", 2),
    ],
    "7b-graphs": [
        *_matrix(1, 64),
        _p("c64_json_vllm", "http", 64, 128, "json", 1, ctl=UPSTREAM),
        *_matrix(256),
        *[{**ph, "prio": 2} for ph in _matrix(8)],
        _p("raw_c64_unc", "raw", 64, 128, "unc", 2),
    ],
    "32b-compile-v1": [*_matrix(1), _p("raw_c1_unc", "raw", 1, 2, "unc", 1)],
    "32b-eager": [
        *_matrix(64, 1),
        _p("c64_json_vllm", "http", 64, 128, "json", 1, ctl=UPSTREAM),
    ],
}


KNEE_PROMPT_TOKENS = 1500  # about; Qwen2.5 tokens of prompt_for(i, long=True)
KNEE_MAX_TOKENS = 200
KNEE_N = {1: 3, 8: 16, 16: 32, 24: 48, 32: 64, 48: 96, 64: 128, 96: 96, 128: 128}


def _knee(c: int, prio: int) -> dict[str, Any]:
    return _p(f"knee_c{c}", "http", c, KNEE_N[c], "knee", prio, max_tokens=KNEE_MAX_TOKENS)


# One block of the patch A/B at c=64 (issue 23): unconstrained, JSON with the service's mask fill, JSON
# with vLLM's own fill (the patch bypassed), then the same in reverse order.
def _patch_ab(block: int, prio: int) -> list[dict[str, Any]]:
    a, b = 2 * block - 1, 2 * block
    return [
        _p(f"c64_unc_{a}", "http", 64, 128, "unc", prio),
        _p(f"c64_json_{a}", "http", 64, 128, "json", prio),
        _p(f"c64_json_vllm_{a}", "http", 64, 128, "json", prio, ctl=UPSTREAM),
        _p(f"c64_json_vllm_{b}", "http", 64, 128, "json", prio, ctl=UPSTREAM),
        _p(f"c64_json_{b}", "http", 64, 128, "json", prio),
        _p(f"c64_unc_{b}", "http", 64, 128, "unc", prio),
    ]


PHASES["32b-app"] = [
    *_matrix(1),
    *_patch_ab(1, 1),
    _p("raw_c1_unc", "raw", 1, 3, "unc", 1),
    _p("raw_c64_unc", "raw", 64, 128, "unc", 1),
    *_matrix(256),
    _p("c256_json_vllm", "http", 256, 256, "json", 1, ctl=UPSTREAM),
    _p("raw_c64_json", "raw", 64, 128, "json", 1),
    *_patch_ab(2, 2),
    _p("raw_c256_unc", "raw", 256, 256, "unc", 2),
    *[{**ph, "prio": 2} for ph in _matrix(8)],
]
# The app's phases on the sleep-mode engine: the production setting when GPU snapshots are on.
# Then the latency knee (priority 2, before the second patch block).
PHASES["32b-sleep"] = [
    *(ph for ph in PHASES["32b-app"] if ph["prio"] == 1),
    *(_knee(c, 2) for c in (8, 32, 64, 16, 128, 1)),
    *(ph for ph in PHASES["32b-app"] if ph["prio"] == 2),
]
PHASES["32b-knee"] = [*(_knee(c, 1) for c in (1, 8, 16, 32, 64)), *(_knee(c, 2) for c in (24, 48, 128, 96))]


# Fast-forward (issue 21): a forced tool call (one tool, named tool_choice) and a JSON extraction, at
# temperature 0, fast-forward on and off per request (the "_off" modes), in turns: ABBA blocks.
FF_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather and forecast for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 24},
                "country_code": {"type": "string", "pattern": "^[A-Z]{2}$"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 14},
                "include_hourly": {"type": "boolean"},
            },
            "required": ["city", "country_code", "unit", "days", "include_hourly"],
            "additionalProperties": False,
        },
    },
}
FF_EXTRACTION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "invoice_number": {"type": "string", "maxLength": 16},
        "customer_name": {"type": "string", "maxLength": 32},
        "total_amount": {"type": "number"},
        "currency": {"type": "string", "enum": ["EUR", "USD", "GBP"]},
        "paid": {"type": "boolean"},
        "line_items": {"type": "integer", "minimum": 0, "maximum": 50},
    },
    "required": ["invoice_number", "customer_name", "total_amount", "currency", "paid", "line_items"],
    "additionalProperties": False,
}
FF_MAX_TOKENS = 96


def _ff(block: int, prio: int) -> list[dict[str, Any]]:
    order = ("tool", "tool_off", "tool_off", "tool", "xjson", "xjson_off", "xjson_off", "xjson")
    return [
        _p(f"ff{block}_{i}_{m}", "http", 1, 4, m, prio, max_tokens=FF_MAX_TOKENS, temperature=0.0)
        for i, m in enumerate(order, start=1)
    ]


PHASES["32b-ff"] = PHASES["32b-ffa"] = [
    *_ff(1, 1),
    _p("c64_unc_ff1", "http", 64, 128, "unc", 1),
    _p("c64_unc_ff2", "http", 64, 128, "unc", 1),
    _p("c64_tool", "http", 64, 128, "tool", 1, max_tokens=FF_MAX_TOKENS, temperature=0.0),
    _p("c64_tool_off", "http", 64, 128, "tool_off", 1, max_tokens=FF_MAX_TOKENS, temperature=0.0),
    *_ff(2, 2),
]
# What fast-forward's engine setting costs unconstrained text at c=64 (issue 21), one engine each, all
# with sleep mode (the production setting): the app's setting; fast-forward (without async scheduling);
# fast-forward under async scheduling, the drafts one step late (--fast-forward async); fast-forward
# with vLLM's rejection sampler on every step (the shortcut off); and the app's setting without async
# scheduling.
_AB = {
    "32b-ab-app": {},
    "32b-ab-ff": {"fast_forward": True},
    "32b-ab-ffa": {"fast_forward": True, "fast_forward_async": True},
    "32b-ab-ffrs": {"fast_forward": True, "env": {"ANANKE_FF_NO_DRAFT_SAMPLING": "0"}},
    "32b-ab-sync": {"extra": {"async_scheduling": False}},
}
for _name, _diff in _AB.items():
    ENGINES.append(_e032(_name, sleep_mode=True, start_est=90, **_diff))
    PHASES[_name] = [
        _p("c1_unc", "http", 1, 3, "unc", 1),
        _p("c64_unc_1", "http", 64, 128, "unc", 1),
        _p("c64_unc_2", "http", 64, 128, "unc", 1),
    ]
PHASES["32b-snap"] = [
    _p("c64_unc_a", "http", 64, 128, "unc", 1),
    *_matrix(256),
    *(_knee(c, 1) for c in (1, 8, 16, 32, 64, 128)),
    _p("c64_unc_b", "http", 64, 128, "unc", 1),
    *(_knee(c, 2) for c in (24, 48, 96)),
]


def request_body(i: int, mode: str, max_tokens: int, temperature: float = TEMPERATURE) -> dict[str, Any]:
    """The ``/generate_api`` body of request ``i`` of a phase in ``mode``."""
    base = mode.removesuffix("_off")
    body: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature}
    if mode.endswith("_off"):
        body["fast_forward"] = False
    if base == "tool":
        city = ("Paris", "Lisbon", "Osaka", "Lima")[i % 4]
        body["messages"] = [{"role": "user", "content": f"Request {i}. What's the weather in {city}?"}]
        body["tools"], body["tool_choice"] = [FF_TOOL], "get_weather"
        return body
    if base == "xjson":
        text = f"Invoice INV-{1000 + i} for Ada Lovelace, total 1,{i:03d}.50 EUR, paid, 3 line items."
        body["messages"] = [{"role": "user", "content": f"Extract the invoice fields as JSON.\n\n{text}"}]
        body["constraints"] = {"json_schema": FF_EXTRACTION_SCHEMA}
        return body
    body["prompt"] = prompt_for(i, mode)
    cons = constraints_for(mode)
    if cons is not None:
        body["constraints"] = cons
    return body


def constraints_for(mode: str) -> dict[str, Any] | None:
    if mode in {"unc", "knee"}:
        return None
    if mode == "json_closing":
        return {"json_schema": CLOSING_SCHEMA}
    if mode.startswith("json_new:"):  # a schema no request has used yet, the same for the whole burst
        return {"json_schema": {**CLOSING_SCHEMA, "title": mode.split(":", 1)[1]}}
    schema = LIST_SCHEMA
    if mode.endswith("_min1"):  # closing only has to finish the item it is in and close the list
        schema = {**LIST_SCHEMA, "minItems": 1}
        mode = mode.removesuffix("_min1")
    # Budget-cut output is reported as is, not finished by the closing search (json_close: it is).
    return {"json_schema": schema, "close_on_budget": mode == "json_close"}


def prompt_for(i: int, mode: str = "") -> str:
    if mode == "knee":  # ~1,500 tokens, distinct from its first block on (no prefix-cache hits)
        body = "".join(f"def f{k}(x):\n    return x * {k} + {k % 7}\n\n" for k in range(89))
        return f"Request {i}. Summarise what these functions compute.\n\n{body}"
    return f"Request {i}. List the records of the inventory as a JSON array of objects with id, name, ok.\n"
