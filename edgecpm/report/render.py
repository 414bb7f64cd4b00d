"""report.json, report.md and a self-contained report.html (inline SVG, inline CSS, no scripts) from a summarized
report. The tables are built once (`tables`) and written into both the Markdown and the HTML."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from edgecpm.report import svg
from edgecpm.report.phases import DESCRIPTIONS, PHASES
from edgecpm.report.schema import SCHEMA

MB = 1e6


def _num(value: float | None, digits: int = 1, scale: float = 1.0, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value / scale:,.{digits}f}{suffix}"


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def tables(report: dict) -> list[dict[str, Any]]:
    """[{"id", "title", "note", "header", "rows"}] — every number the report compares, as text."""
    bundles = report["bundles"]
    profile = report["device_profile"]
    out = []
    rows = []
    for b in bundles:
        s = b["summary"]
        first = s["prompts"][0] if s["prompts"] else None
        roof = s["roofline"][0] if s["roofline"] else None
        rows.append([b["label"], f"{s['kernels']['prefill']} / {s['kernels']['decode']}", _num(s["load_seconds"], 2),
                     _num(s["decode_tokens_per_second"]),
                     *([_num(first["step_ms"][k], 2) for k in ("p50", "p90", "p99")] if first else ["—"] * 3),
                     _num(s["memory"]["peak_rss_bytes"], 0, MB), _num(roof and roof["percent_of_roofline"], 0, suffix="%"),
                     _num(first and first["decode_joules_per_token"], 3) if report["energy"]["available"] else "n/a"])
    decode_at = bundles[0]["summary"]["decode_at_prompt_tokens"]
    out.append({"id": "overview", "title": "Overview",
                "note": f"decode after a {decode_at}-token prompt, {report['settings']['new_tokens']} steps, median of "
                        f"{report['settings']['runs']} runs; per-token times are decode steps (forward + sampling)",
                "header": ["bundle", "kernels (prefill / decode)", "load s", "decode tok/s", "p50 ms", "p90 ms", "p99 ms",
                           "peak RSS MB", "% of roofline", "J / token"], "rows": rows})
    rows = []
    for b in bundles:
        for p in b["summary"]["prompts"]:
            rows.append([b["label"], str(p["prompt_tokens"]), _num(p["prefill_seconds"] * 1000, 1),
                         _num(p["prefill_tokens_per_second"], 0), _num(p["ttft_seconds"] * 1000, 1),
                         _num(p["decode_tokens_per_second"]),
                         f"{p['decode_tokens_per_second_range'][0]:.1f}–{p['decode_tokens_per_second_range'][1]:.1f}",
                         *[_num(p["step_ms"][k], 2) for k in ("p50", "p90", "p99")]])
    skipped = sorted({f"skipped: {skip['reason']}" for b in bundles for skip in b["summary"]["skipped"]})
    out.append({"id": "speed", "title": "Speed per prompt length",
                "note": "; ".join(["medians over runs; the decode range is the slowest and fastest run", *skipped]),
                "header": ["bundle", "prompt tokens", "prefill ms", "prefill tok/s", "TTFT ms", "decode tok/s",
                           "decode range", "p50 ms", "p90 ms", "p99 ms"], "rows": rows})
    rows = []
    for b in bundles:
        for p in b["summary"]["prompts"]:
            rows.append([b["label"], str(p["prompt_tokens"]), str(p["runs"] * report["settings"]["new_tokens"]),
                         *[_num(p["step_ms"][k], 2) for k in ("mean", "p50", "p90", "p99")], _num(p["sampling_ms_mean"], 3)])
    out.append({"id": "steps", "title": "Per-token decode time",
                "note": "every decode step of every run at that prompt length (forward + greedy sampling)",
                "header": ["bundle", "prompt tokens", "steps", "mean ms", "p50 ms", "p90 ms", "p99 ms", "sampling ms"],
                "rows": rows})
    rows = []
    for b in bundles:
        m = b["summary"]["memory"]
        rows.append([b["label"], _num(m["peak_rss_bytes"], 1, MB), _num(m["rss_before_load_bytes"], 1, MB),
                     _num(m["kv_allocated_bytes"], 1, MB), _num(m["kv_bytes_per_token"], 0, 1),
                     _num(m["kv_bytes_at_longest_run"], 2, MB), _num(m["budget_bytes"], 0, MB),
                     _num(m["percent_of_budget"], 1, suffix="%")])
    out.append({"id": "memory", "title": f"Memory (budget: {profile['name']})",
                "note": "peak RSS is the measuring process's VmHWM (weights, KV buffers at max context, the Python runtime)",
                "header": ["bundle", "peak RSS MB", "before load MB", "KV allocated MB", "KV bytes / token",
                           "KV in use at longest run MB", "budget MB", "% of budget"], "rows": rows})
    rows = []
    for b in bundles:
        for r in b["summary"]["roofline"]:
            if r is None:
                continue
            rows.append([b["label"], f"{r['mean_context']:.0f}", _num(r["bytes_per_token"], 2, MB),
                         _num(r["weight_bytes_per_token"], 2, MB), _num(r["kv_bytes_read_per_token"], 2, MB),
                         _num(r["decode_tokens_per_second"]), _num(r["roofline_tokens_per_second"]),
                         _num(r["percent_of_roofline"], 0, suffix="%"),
                         _num(r.get("projection_roofline_tokens_per_second"))])
    out.append({"id": "roofline", "title": "Memory roofline",
                "note": f"measured read bandwidth {report['bandwidth_probe']['gb_per_second']:.1f} GB/s "
                        f"({report['bandwidth_probe']['threads']} threads); last column: projection for "
                        f"{profile['name']} at {profile['memory_bandwidth_gbps']} GB/s (its profile's bandwidth: an upper "
                        "bound, not a measurement)",
                "header": ["bundle", "mean context", "MB / token", "weights MB", "KV read MB", "decode tok/s",
                           "roofline tok/s", "% of roofline", f"projection tok/s ({profile['name']})"], "rows": rows})
    rows = []
    for b in bundles:
        p = b["summary"]["phases"]
        if p is None:
            rows.append([b["label"], "not measured: " + str((b.get("phases") or {}).get("reason")), *[""] * len(PHASES)])
            continue
        rows.append([b["label"], _num(p["step_ms"], 3),
                     *[f"{p['ms'][k]:.3f} ({100 * p['share'][k]:.0f}%)" for k in PHASES]])
    out.append({"id": "phases", "title": "Where a decode step goes (ms per step, share)",
                "note": "; ".join(f"{b['label']}: {b['phases']['source']}" for b in bundles if (b.get("phases") or {}).get("source")),
                "header": ["bundle", "step ms", *PHASES], "rows": rows})
    if report.get("comparison"):
        comparison = report["comparison"]
        metrics = sorted({k for row in comparison["bundles"] for k in row["ratios"]}, key=lambda k: (k.split("@")[0], int(k.split("@")[1]) if "@" in k else 0))
        rows = [[row["bundle"], *[_ratio(row["ratios"].get(k, {}).get("median")) for k in metrics]]
                for row in comparison["bundles"]]
        out.append({"id": "comparison", "title": f"Compared with {comparison['baseline']}",
                    "note": comparison["method"], "header": ["bundle", *[k.replace("_tokens_per_second@", " tok/s @ ")
                                                                           .replace("peak_rss_bytes", "peak RSS")
                                                                           for k in metrics]], "rows": rows})
    return out


def plots(report: dict) -> list[dict[str, str]]:
    bundles = report["bundles"]
    profile = report["device_profile"]
    out = []
    for kind, key in (("prefill", "prefill_tokens_per_second"), ("decode", "decode_tokens_per_second")):
        series = [{"label": b["label"], "points": [(p["prompt_tokens"], p[key]) for p in b["summary"]["prompts"]]}
                  for b in bundles]
        out.append({"id": f"{kind}-speed", "svg": svg.line_chart(series, title=f"{kind.capitalize()} speed vs prompt length",
                                                                 x_label="prompt tokens (log scale)", y_label="tokens / s",
                                                                 log_x=True)})
    first_length = bundles[0]["summary"]["decode_at_prompt_tokens"]
    series = []
    for b in bundles:
        steps = [1000 * (f + s) for r in b["runs"] for p in r["prompts"] if p["prompt_tokens"] == first_length
                 for f, s in zip(p["step_forward_seconds"], p["step_sampling_seconds"])]
        series.append({"label": b["label"], "values": steps})
    out.append({"id": "step-histogram", "svg": svg.histogram(series, title=f"Per-token decode time ({first_length}-token prompt)",
                                                              x_label="ms per token (forward + sampling)")})
    labels = [b["label"] for b in bundles]
    memory = [b["summary"]["memory"] for b in bundles]
    out.append({"id": "memory", "svg": svg.bar_chart(
        labels, [{"label": "peak resident memory (VmHWM)", "values": [m["peak_rss_bytes"] and m["peak_rss_bytes"] / MB for m in memory]},
                 {"label": "KV buffers (max context)", "values": [m["kv_allocated_bytes"] and m["kv_allocated_bytes"] / MB for m in memory]}],
        title=f"Memory against the {profile['name']} budget", x_label="MB",
        references=[{"value": profile["budget_bytes"] / MB, "label": f"budget {profile['budget_bytes'] / MB:,.0f} MB"}])})
    roofs = [b["summary"]["roofline"][0] if b["summary"]["roofline"] else None for b in bundles]
    out.append({"id": "roofline", "svg": svg.bar_chart(
        labels, [{"label": "measured decode tok/s", "values": [r and r["decode_tokens_per_second"] for r in roofs]},
                 {"label": f"roofline at the measured {report['bandwidth_probe']['gb_per_second']:.1f} GB/s",
                  "values": [r and r["roofline_tokens_per_second"] for r in roofs]},
                 {"label": f"projection: {profile['name']} roofline at {profile['memory_bandwidth_gbps']} GB/s",
                  "values": [r and r.get("projection_roofline_tokens_per_second") for r in roofs], "hatched": True}],
        title=f"Decode against the memory roofline ({first_length}-token prompt)", x_label="tokens / s")})
    rows = [(b["label"], b["summary"]["phases"]["ms"]) for b in bundles if b["summary"]["phases"]]
    out.append({"id": "phases", "svg": svg.stacked_bars(rows, list(PHASES), title="Decode step by phase",
                                                         x_label="ms per decode step")})
    return out


def markdown(report: dict) -> str:
    machine, versions = report["machine"], report["versions"]
    header = (f"{report['created']} · {machine['cpu_model']} · {machine['physical_cores']} cores · "
              f"{_num(machine['memory_bytes'], 1, 1e9)} GB · {machine['system']} {machine['machine']} · "
              f"edgecpm {versions['edgecpm']}, onnxruntime {versions['onnxruntime']}, numpy {versions['numpy']}")
    device = (f"Device profile: **{report['device_profile']['name']}** ({report['device_profile']['chosen_by']}). "
              f"Energy: {energy_line(report)}.")
    lines = ["# edgecpm profile", "", header, "", device, ""]
    for table in tables(report):
        lines += [f"## {table['title']}", "", f"_{table['note']}_" if table["note"] else "", "",
                  "| " + " | ".join(table["header"]) + " |", "|" + "---|" * len(table["header"])]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in table["rows"]]
        lines.append("")
    lines += ["## Phases", ""] + [f"- **{k}**: {v}" for k, v in DESCRIPTIONS.items()] + ["", "## Where the numbers come from", ""]
    lines += [f"- **{k}**: {v}" for k, v in report["sources"].items()]
    lines += ["", "Raw samples: report.json (schema " + f"`{report['schema']}` v{report['schema_version']}, docs/PROFILING.md)."]
    return "\n".join(lines) + "\n"


def energy_line(report: dict) -> str:
    energy = report["energy"]
    return (f"{energy['source']}: {energy['reason']}" if energy["available"]
            else f"not available on this machine ({energy['reason']})")


def html(report: dict) -> str:
    from jinja2 import Environment, PackageLoader, select_autoescape

    env = Environment(loader=PackageLoader("edgecpm.report", "templates"), autoescape=select_autoescape(["html", "j2"]))
    return env.get_template("report.html.j2").render(
        report=report, tables=tables(report), plots={p["id"]: p["svg"] for p in plots(report)},
        energy=energy_line(report), descriptions=DESCRIPTIONS, mb=MB, num=_num)


def write_report(report: dict, directory: str | Path) -> dict[str, Path]:
    """Writes report.json, report.schema.json, report.md and report.html into `directory`; returns their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {name: directory / name for name in ("report.json", "report.schema.json", "report.md", "report.html")}
    paths["report.json"].write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    paths["report.schema.json"].write_text(json.dumps(SCHEMA, indent=1) + "\n")
    paths["report.md"].write_text(markdown(report), encoding="utf-8")
    paths["report.html"].write_text(html(report), encoding="utf-8")
    return paths


def main(argv: list[str] | None = None) -> None:
    """`python -m edgecpm.report.render REPORT_DIR`: rewrites report.md and report.html from its report.json."""
    import sys

    directory = Path((argv or sys.argv[1:])[0])
    write_report(json.loads((directory / "report.json").read_text()), directory)


if __name__ == "__main__":
    main()
