"""Markdown tables from one results file: ``python -m bench.report bench/results/bench-<stamp>.json``.

One piece: a function per section of BENCHMARKS.md, in the page's order, over one shared set of cell
helpers; ``bench.run`` writes the same text next to each raw file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

PUBLISHED = (
    "llguidance, published (MaskBench): 8,909 of 11,306 schemas pass; average mask time ~64 µs "
    "per token. Reference only: another benchmark set, another model and machine."
)


def cell(value: Any, digits: int = 1) -> str:
    """A table cell: thousands separators, ``digits`` decimals for floats, a dash for no value."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def ratio(a: float | None, b: float | None, digits: int = 2) -> str:
    """``a / b`` as a cell; a dash where either is missing or zero."""
    if not a or not b:
        return "–"
    return f"{a / b:.{digits}f}"


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _find(phases: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    for p in phases:
        if all(p.get(k) == v for k, v in match.items()):
            return p
    return None


def overhead(result: dict[str, Any]) -> str:
    ph = result.get("overhead", [])
    rows = []
    for c in result["config"]["overhead_concurrency"]:
        u, j = _find(ph, c=c, mode="none"), _find(ph, c=c, mode="json")
        if not u or not j:
            continue
        rows.append(
            [
                str(c),
                f"{u['requests']}/{j['requests']}",
                cell(u["tok_s"]),
                cell(j["tok_s"]),
                f"**{ratio(j['tok_s'], u['tok_s'])}**",
                f"{cell(u['mean_tokens'])} / {cell(j['mean_tokens'])}",
                f"{cell(u['ms_per_token_p50'])} / {cell(j['ms_per_token_p50'])}",
                ratio(u["ms_per_token_p50"], j["ms_per_token_p50"]),
                f"{cell(u['lat_p50_s'], 2)} / {cell(u['lat_p95_s'], 2)}",
                f"{cell(j['lat_p50_s'], 2)} / {cell(j['lat_p95_s'], 2)}",
                f"{u['load_before'][0]}→{u['load_after'][0]} / {j['load_before'][0]}→{j['load_after'][0]}",
            ]
        )
    return _table(
        [
            "c",
            "requests unc/JSON",
            "unconstrained tok/s",
            "JSON tok/s",
            "JSON / unc tok/s",
            "mean tokens unc / JSON",
            "ms/token p50 unc / JSON",
            "per-token ratio (unc ms / JSON ms)",
            "latency p50/p95 unc (s)",
            "latency p50/p95 JSON (s)",
            "load avg (1 min) unc / JSON, before→after",
        ],
        rows,
    )


def ttft(result: dict[str, Any]) -> str:
    rows = []
    peer = [p for p in result.get("peer_raw", []) if p.get("stream")]
    for p in result.get("ttft", []):
        q = _find(peer, c=p["c"], mode=p["mode"])
        rows.append(
            [
                str(p["c"]),
                "JSON" if p["mode"] == "json" else "unconstrained",
                f"{cell(p.get('ttft_p50_ms'), 0)} / {cell(p.get('ttft_p95_ms'), 0)}",
                cell(p.get("server_ttft_p50_ms"), 0),
                cell(p.get("ms_per_step_p50")),
                f"{cell(q.get('ttft_p50_ms'), 0)} / {cell(q.get('ttft_p95_ms'), 0)}" if q else "–",
                cell(q.get("ms_per_step_p50")) if q else "–",
            ]
        )
    return _table(
        [
            "c",
            "mode",
            "ours TTFT p50/p95 (ms, client)",
            "ours TTFT p50 (ms, server)",
            "ours ms/step p50",
            "vLLM server TTFT p50/p95 (ms, client)",
            "vLLM server ms/step p50",
        ],
        rows,
    )


def peer_raw(result: dict[str, Any]) -> str:
    rows = []
    ours = result.get("overhead", [])
    for p in result.get("peer_raw", []):
        if p.get("stream"):
            continue
        o = _find(ours, c=p["c"], mode=p["mode"])
        if not o:
            continue
        rows.append(
            [
                str(p["c"]),
                "JSON" if p["mode"] == "json" else "unconstrained",
                cell(o["tok_s"]),
                cell(p["tok_s"]),
                f"**{ratio(o['tok_s'], p['tok_s'])}**",
                f"{cell(o['mean_tokens'])} / {cell(p['mean_tokens'])}",
                f"{cell(o['lat_p50_s'], 2)} / {cell(p['lat_p50_s'], 2)}",
                ratio(p["lat_p50_s"], o["lat_p50_s"]),
                f"{cell(o['ms_per_token_p50'])} / {cell(p['ms_per_token_p50'])}",
                f"{o['load_before'][0]} / {p['load_before'][0]}",
            ]
        )
    return _table(
        [
            "c",
            "mode",
            "ours tok/s",
            "vLLM server tok/s",
            "ours / vLLM tok/s",
            "mean tokens ours / vLLM",
            "latency p50 ours / vLLM (s)",
            "vLLM p50 / ours p50",
            "ms/token p50 ours / vLLM",
            "load avg ours / vLLM",
        ],
        rows,
    )


def closing_table(result: dict[str, Any]) -> str:
    rows = []
    for p in result.get("closing", []):
        rows.append(
            [
                "on (default)" if p["close"] else "off",
                f"{p['ok']}/{p['requests']}",
                f"**{p['valid']}**",
                str(p["closed"]),
                cell(p["tok_s"]),
                cell(p["mean_tokens"]),
                f"{cell(p['lat_p50_s'], 2)} / {cell(p['lat_p95_s'], 2)}",
                str(p["finish"]),
            ]
        )
    return _table(
        [
            "closing on budget",
            "answered",
            "valid (jsonschema)",
            "closed by the search",
            "tok/s",
            "mean tokens",
            "latency p50/p95 (s)",
            "engine finish",
        ],
        rows,
    )


def structured_table(result: dict[str, Any]) -> str:
    labels = {
        "ours": "(b) ChatAnanke.with_structured_output",
        "peer_json_schema": "(a) vLLM server + ChatOpenAI json_schema",
        "peer_parse_retry": "(c) ChatOpenAI + parse + ≤2 retries",
    }
    rows = []
    for r in result.get("structured", []):
        rows.append(
            [
                labels[r["method"]],
                f"**{r['valid']}/{r['n']}** ({r['validity']:.0%})",
                cell(r["tok_s"]),
                cell(r["valid_per_s"], 3),
                f"{cell(r['lat_p50_s'], 2)} / {cell(r['lat_p95_s'], 2)}",
                cell(r["mean_tokens"]),
                ", ".join(f"{k}: {v}" for k, v in sorted(r["attempts"].items())),
                ", ".join(f"{k}: {v}" for k, v in sorted(r["finish"].items())),
                str(r["load_before"][0]),
            ]
        )
    return _table(
        [
            "method",
            "valid (parses + jsonschema)",
            "output tok/s",
            "valid objects/s",
            "e2e latency p50/p95 (s)",
            "mean output tokens",
            "attempts",
            "finish",
            "load avg",
        ],
        rows,
    )


def conformance_table(result: dict[str, Any]) -> str:
    conf = result.get("conformance", {})
    ours, peer = conf.get("ours"), conf.get("peer")
    if not ours:
        return "(not run)"
    rows = []
    cats = sorted(ours["per_category"])

    def ocell(cat: str | None) -> list[str]:
        c = ours["total"] if cat is None else ours["per_category"].get(cat, {})
        return [
            str(c.get(k, 0))
            for k in ("valid_exact", "valid_approximate", "truncated", "invalid", "rejected", "5xx")
        ]

    def pcell(cat: str | None) -> list[str]:
        if not peer:
            return ["–"] * 5
        c = peer["total"] if cat is None else peer["per_category"].get(cat, {})
        return [str(c.get(k, 0)) for k in ("valid", "truncated", "invalid", "rejected", "5xx")]

    for cat in cats:
        n = sum(ours["per_category"][cat].values())
        rows.append([cat, str(n), *ocell(cat), *pcell(cat)])
    rows.append(
        ["**total**", str(ours["n"]), *[f"**{x}**" for x in ocell(None)], *[f"**{x}**" for x in pcell(None)]]
    )
    return _table(
        [
            "category",
            "schemas",
            "ours exact-valid",
            "ours approximated-then-valid",
            "ours truncated",
            "ours unsatisfied (validation)",
            "ours rejected",
            "ours 5xx",
            "vLLM valid",
            "vLLM truncated",
            "vLLM invalid (validation)",
            "vLLM rejected",
            "vLLM 5xx",
        ],
        rows,
    )


def conformance_summary(result: dict[str, Any]) -> str:
    conf = result.get("conformance", {})
    ours, peer = conf.get("ours"), conf.get("peer")
    if not ours:
        return ""
    rows = [
        [
            "valid share (of all schemas)",
            f"**{ours['valid_share']:.1%}** ({ours['valid']}/{ours['n']})",
            f"**{peer['valid_share']:.1%}** ({peer['valid']}/{peer['n']})" if peer else "–",
        ],
        [
            "accepted (not 4xx)",
            f"{ours['accepted']}/{ours['n']}",
            f"{peer['accepted']}/{peer['n']}" if peer else "–",
        ],
        [
            "valid of accepted",
            f"{ours['valid_of_accepted']:.1%}",
            f"{peer['valid_of_accepted']:.1%}" if peer else "–",
        ],
        [
            "truncated (finish length, not valid)",
            f"**{ours['truncated']}**",
            f"**{peer['truncated']}**" if peer else "–",
        ],
        ["5xx", str(ours["total"].get("5xx", 0)), str(peer["total"].get("5xx", 0)) if peer else "–"],
        ["marked satisfied but fails jsonschema", str(ours["lies"]), "n/a (no flag)"],
        [
            "grammar compile ms p50 / p99 / max (metadata.compile_time_ms)",
            " / ".join(cell(ours[k], 2) for k in ("compile_ms_p50", "compile_ms_p99", "compile_ms_max")),
            "not exposed",
        ],
        [
            "attempts (ours: resampling on a failed full-schema check)",
            ", ".join(f"{k}: {v}" for k, v in sorted(ours["attempts"].items())),
            "1 (no resampling)",
        ],
        ["output tokens p50", cell(ours["tokens_p50"], 0), cell(peer["tokens_p50"], 0) if peer else "–"],
        [
            "wall time (s), concurrency",
            f"{ours['wall_s']}, {ours['concurrency']}",
            f"{peer['wall_s']}, {peer['concurrency']}" if peer else "–",
        ],
    ]
    noclose = conf.get("ours_noclose")
    if noclose:  # closing on budget off, same run: the effect of steering to close
        rows += [
            [
                "ours, closing on budget off: valid share",
                f"{noclose['valid_share']:.1%} ({noclose['valid']}/{noclose['n']})",
                "–",
            ],
            ["ours, closing on budget off: truncated", f"**{noclose['truncated']}**", "–"],
            [
                "ours, closing off: rejected / 5xx / lies",
                " / ".join(
                    str(x)
                    for x in (
                        noclose["total"].get("rejected", 0),
                        noclose["total"].get("5xx", 0),
                        noclose["lies"],
                    )
                ),
                "–",
            ],
        ]
    if "valid_closed_on_budget" in ours:
        rows += [
            ["ours: valid outputs finished by closing on budget", str(ours["valid_closed_on_budget"]), "–"],
            [
                "ours: of those, rebuilt whole (the compile-time shortest output)",
                str(ours.get("valid_rebuilt", "–")),
                "–",
            ],
            [
                "ours: rejected up front as max_tokens_too_small",
                str(ours["rejected_max_tokens_too_small"]),
                "–",
            ],
        ]
    out = _table(["", "ours", "vLLM server (guidance)"], rows)
    for name, res in (("ours", ours), ("vLLM server", peer)):
        if res and res["rejection_messages"]:
            out += f"\n\nRejection messages, {name} (count):\n\n" + "\n".join(
                f"- {v}× `{k}`" for k, v in res["rejection_messages"].items()
            )
    return out


def client_table(result: dict[str, Any]) -> str:
    """One column group per pass: the run measures client overhead at its start and again at its end
    (a sub-millisecond figure on a shared box needs the repeat)."""
    passes = [result[k] for k in ("client", "client_end") if result.get(k)]
    labels = {
        "http_floor": "bare httpx POST + .json() (floor)",
        "ours_invoke": "ChatAnanke.invoke",
        "openai_invoke": "ChatOpenAI.invoke",
        "ours_structured": "ChatAnanke.with_structured_output(M).invoke",
        "openai_structured": "ChatOpenAI.with_structured_output(M, method='json_schema').invoke",
        "ours_request_build": "ours: request build only (no HTTP)",
        "ours_response_parse": "ours: response parse only (no HTTP)",
    }
    names = ["start of run", "end of run"]
    head = ["call"]
    for i, p in enumerate(passes):
        others = p.get("other_cpu_share_during")
        busy = f", other processes {others:.0%} CPU" if others is not None else ""
        head += [
            f"{names[i]}: median µs/call (load {p['load_before'][0]}{busy})",
            "p95 µs",
            "median over the floor (µs)",
        ]
    rows = []
    for key in passes[0]["cases"] if passes else []:
        row = [labels.get(key, key)]
        for p in passes:
            v = p["cases"].get(key, {})
            row += [cell(v.get("median_us")), cell(v.get("p95_us")), f"**{cell(v.get('over_floor_us'))}**"]
        rows.append(row)
    return _table(head, rows)


def scaling_tables(result: dict[str, Any]) -> str:
    sc = result.get("scaling")
    if not sc:
        return "(full run only)"
    rows = []
    for mt in result["config"]["scaling_lengths"]:
        u = _find(sc["length"], max_tokens=mt, mode="none")
        j = _find(sc["length"], max_tokens=mt, mode="json")
        if u and j:
            rows.append(
                [
                    str(mt),
                    f"{cell(u['mean_tokens'])} / {cell(j['mean_tokens'])}",
                    cell(u["tok_s"]),
                    cell(j["tok_s"]),
                    ratio(j["tok_s"], u["tok_s"]),
                    f"{cell(u['ms_per_step_p50'])} / {cell(j['ms_per_step_p50'])}",
                    f"{cell(u.get('ttft_p50_ms'), 0)} / {cell(j.get('ttft_p50_ms'), 0)}",
                ]
            )
    out = _table(
        [
            "max_tokens",
            "tokens unc / JSON",
            "unc tok/s",
            "JSON tok/s",
            "JSON / unc",
            "ms/step unc / JSON",
            "TTFT ms unc / JSON",
        ],
        rows,
    )
    rows = [
        [
            str(p["n_props"]),
            cell(p.get("compile_ms_p50"), 2),
            cell(p.get("compile_ms_max"), 2),
            cell(p.get("ttft_p50_ms"), 0),
            cell(p["ms_per_step_p50"]),
        ]
        for p in sc["schema_size"]
    ]
    out += "\n\n" + _table(
        [
            "properties per object",
            "our compile ms p50 (cold)",
            "compile ms max",
            "TTFT ms p50",
            "ms/step p50",
        ],
        rows,
    )
    return out


def markdown(result: dict[str, Any]) -> str:
    m, cfg = result["machine"], result["config"]
    srv = result.get("servers", {})
    starts = {k: srv.get(k, {}).get("start_s") for k in ("ours", "peer")}
    parts = [
        f"# Bench run {result['stamp']} ({'quick' if cfg['quick'] else 'full'})",
        f"`{result['command']}`; {m['cores']} × {m['cpu']}, {m['mem_gib']} GiB; "
        f"wall {result.get('wall_s')} s; "
        f"load average at start {result['load_start']}, at end {result.get('load_end')}; "
        f"{len(result['other_processes_at_start'])} other engine/test processes at start. "
        f"Engine start: ours {starts['ours']} s, vLLM server {starts['peer']} s.",
        ("Skipped (over the run's --budget-min): " + "; ".join(result["skipped"]))
        if result.get("skipped")
        else "",
        "## 1. Constraint overhead (our service, non-streaming, same prompt)",
        overhead(result),
        "### Time to first token (streaming)",
        ttft(result),
        "## 2. Ours vs vLLM's OpenAI server, same raw workload",
        peer_raw(result),
        "### Closing on budget (ours, JSON record list cut by max_tokens)",
        closing_table(result),
        "### Structured output through LangChain",
        structured_table(result),
        f"## 3. Conformance (JSONSchemaBench dev, max_tokens {cfg['conformance_max_tokens']})",
        conformance_table(result),
        conformance_summary(result),
        PUBLISHED,
        "## 4. Client overhead",
        client_table(result),
        "## 5. Scaling",
        scaling_tables(result),
    ]
    return "\n\n".join(parts) + "\n"


if __name__ == "__main__":
    print(markdown(json.loads(Path(sys.argv[1]).read_text())))
