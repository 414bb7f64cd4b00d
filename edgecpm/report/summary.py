"""Derived figures of a raw report (runner.profile_bundles): medians over runs, per-token percentiles, the roofline,
energy per token, the phase shares and, for several bundles, ratios taken within each round. Pure functions of the
raw samples kept beside them in report.json, so every figure can be recomputed from the file."""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np

from edgecpm.report.phases import PHASES

PERCENTILES = (50, 90, 99)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else float("nan")


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(statistics.median(present)) if present else None


def step_seconds(prompt: dict) -> list[float]:
    """Each decode step's time: the forward pass and the sampling of its token."""
    return [f + s for f, s in zip(prompt["step_forward_seconds"], prompt["step_sampling_seconds"])]


def decode_rate(prompt: dict) -> float:
    """Decode tok/s of one run at one prompt length: steps over the wall time of the whole decode loop."""
    return prompt["decode_steps"] / prompt["decode_seconds"]


def by_length(runs: list[dict]) -> dict[int, list[dict]]:
    lengths: dict[int, list[dict]] = {}
    for run in runs:
        for prompt in run["prompts"]:
            lengths.setdefault(prompt["prompt_tokens"], []).append(prompt)
    return dict(sorted(lengths.items()))


def prompt_summary(length: int, prompts: list[dict]) -> dict[str, Any]:
    steps = [s for p in prompts for s in step_seconds(p)]
    energy = [p["decode_energy_joules"] / p["decode_steps"] for p in prompts if p.get("decode_energy_joules") is not None]
    prefill_energy = [p["prefill_energy_joules"] / length for p in prompts if p.get("prefill_energy_joules") is not None]
    return {
        "prompt_tokens": length, "runs": len(prompts),
        "prefill_seconds": _median([p["prefill_seconds"] for p in prompts]),
        "prefill_tokens_per_second": _median([length / p["prefill_seconds"] for p in prompts]),
        "ttft_seconds": _median([p["ttft_seconds"] for p in prompts]),
        "decode_tokens_per_second": _median([decode_rate(p) for p in prompts]),
        "decode_tokens_per_second_range": [min(decode_rate(p) for p in prompts), max(decode_rate(p) for p in prompts)],
        "step_ms": {f"p{q}": 1000 * percentile(steps, q) for q in PERCENTILES} | {"mean": 1000 * float(np.mean(steps))},
        "sampling_ms_mean": 1000 * float(np.mean([s for p in prompts for s in p["step_sampling_seconds"]])),
        "decode_joules_per_token": _median(energy), "prefill_joules_per_token": _median(prefill_energy),
    }


def roofline(decode_tps: float | None, weight_bytes: int | None, kv_bytes_per_token: int | None, context: float,
             measured_gbps: float, profile_gbps: float | None) -> dict[str, Any] | None:
    """Bytes one decode step streams (every weight once, plus the K and V rows of `context` cached positions) over a
    bandwidth: the fastest decode memory allows. `projection_*` uses the device profile's bandwidth: a projection
    (an upper bound on that device), not a measurement."""
    if not weight_bytes or not decode_tps:
        return None
    kv_read = int((kv_bytes_per_token or 0) * context)
    streamed = weight_bytes + kv_read
    bound = measured_gbps * 1e9 / streamed
    out = {"weight_bytes_per_token": weight_bytes, "kv_bytes_read_per_token": kv_read, "mean_context": context,
           "bytes_per_token": streamed, "measured_gb_per_second": measured_gbps, "roofline_tokens_per_second": bound,
           "decode_tokens_per_second": decode_tps, "percent_of_roofline": 100 * decode_tps / bound,
           "achieved_gb_per_second": decode_tps * streamed / 1e9}
    if profile_gbps:
        out["projection_profile_gb_per_second"] = profile_gbps
        out["projection_roofline_tokens_per_second"] = profile_gbps * 1e9 / streamed
        out["projection_tokens_per_second_at_this_efficiency"] = profile_gbps * 1e9 / streamed * decode_tps / bound
    return out


def phase_summary(phases: dict) -> dict[str, Any] | None:
    if not phases or not phases.get("source"):
        return None
    per_step = phases["per_step_seconds"]
    step = sum(per_step.values())
    return {"source": phases["source"], "step_ms": 1000 * step,
            "ms": {phase: 1000 * per_step.get(phase, 0.0) for phase in PHASES},
            "share": {phase: per_step.get(phase, 0.0) / step if step else 0.0 for phase in PHASES},
            "measured_ms": 1000 * sum(phases["measured_seconds_per_step"].values()),
            "forward_ms": 1000 * phases["forward_seconds_per_step"]}


def bundle_summary(entry: dict, report: dict) -> dict[str, Any]:
    runs = entry["runs"]
    lengths = by_length(runs)
    prompts = [prompt_summary(length, items) for length, items in lengths.items()]
    memory = [run["memory"] for run in runs]
    first = prompts[0] if prompts else None
    weights = runs[0]["weights"]["streamed_bytes_per_token"]
    kv_per_token = runs[0]["memory"]["kv_bytes_per_token"]
    profile = report["device_profile"]
    bandwidth = report["bandwidth_probe"]["gb_per_second"]
    new_tokens = report["settings"]["new_tokens"]
    rooflines = [roofline(p["decode_tokens_per_second"], weights, kv_per_token, p["prompt_tokens"] + new_tokens / 2,
                          bandwidth, profile.get("memory_bandwidth_gbps")) for p in prompts]
    plan = (entry["manifest"].get("device") or {}).get("memory_plan")
    peak = _median([m["peak_rss_bytes"] for m in memory])
    return {
        "kernels": runs[0]["kernels"], "load_seconds": _median([run["load_seconds"] for run in runs]),
        "load_seconds_all": [run["load_seconds"] for run in runs],
        "prompts": prompts, "skipped": runs[0]["skipped"],
        "decode_tokens_per_second": first["decode_tokens_per_second"] if first else None,
        "decode_at_prompt_tokens": first["prompt_tokens"] if first else None,
        "memory": {"peak_rss_bytes": peak, "peak_rss_bytes_max": max((m["peak_rss_bytes"] or 0) for m in memory) or None,
                   "rss_before_load_bytes": _median([m["rss_before_load_bytes"] for m in memory]),
                   "kv_allocated_bytes": memory[0]["kv_allocated_bytes"], "kv_bytes_per_token": kv_per_token,
                   "kv_bytes_at_longest_run": (kv_per_token * max(p["end_position"] for r in runs for p in r["prompts"])
                                               if kv_per_token and prompts else None),
                   "budget_bytes": profile.get("budget_bytes"), "budget_profile": profile.get("name"),
                   "percent_of_budget": 100 * peak / profile["budget_bytes"] if peak and profile.get("budget_bytes") else None,
                   "planned_bytes_for_profile": plan.get("total_bytes") if isinstance(plan, dict) else None},
        "roofline": rooflines, "phases": phase_summary(entry.get("phases") or {}),
        "weights_source": runs[0]["weights"]["source"],
    }


def comparison(report: dict) -> dict[str, Any] | None:
    """Each bundle against the first, per round (the runs of one round are adjacent in time), then the median."""
    entries = report["bundles"]
    if len(entries) < 2:
        return None
    base = entries[0]
    rows = []
    for entry in entries[1:]:
        metrics: dict[str, Any] = {}
        for length in sorted({p["prompt_tokens"] for r in base["runs"] for p in r["prompts"]}):
            for name, value in (("decode", decode_rate), ("prefill", lambda p: p["prompt_tokens"] / p["prefill_seconds"])):
                ratios = []
                for mine, theirs in zip(entry["runs"], base["runs"]):
                    a = next((p for p in mine["prompts"] if p["prompt_tokens"] == length), None)
                    b = next((p for p in theirs["prompts"] if p["prompt_tokens"] == length), None)
                    if a and b:
                        ratios.append(value(a) / value(b))
                if ratios:
                    metrics[f"{name}_tokens_per_second@{length}"] = {"median": statistics.median(ratios),
                                                                     "per_round": ratios}
        peaks = [(m["memory"]["peak_rss_bytes"], b["memory"]["peak_rss_bytes"]) for m, b in zip(entry["runs"], base["runs"])]
        ratios = [a / b for a, b in peaks if a and b]
        if ratios:
            metrics["peak_rss_bytes"] = {"median": statistics.median(ratios), "per_round": ratios}
        rows.append({"bundle": entry["label"], "baseline": base["label"], "ratios": metrics})
    return {"baseline": base["label"], "method": "ratio to the baseline within each round, median over rounds",
            "bundles": rows}


def summarize(report: dict) -> dict:
    """Adds `summary` to every bundle and `comparison` to the report (in place), and returns the report."""
    for entry in report["bundles"]:
        entry["summary"] = bundle_summary(entry, report)
    report["comparison"] = comparison(report)
    report["sources"] = SOURCES
    return report


SOURCES = {
    "load_seconds": "wall time of edgecpm.load() plus starting its backend, in a fresh process per run (time.perf_counter)",
    "prefill_seconds": "wall time of backend.prefill(prompt) (time.perf_counter), after a warm-up prompt in the same process",
    "ttft_seconds": "prefill plus sampling the first token",
    "decode_tokens_per_second": "decode steps / wall time of the whole decode loop (each step: backend.decode + greedy "
                                "sampling); median over runs",
    "step_ms": "per-step forward + sampling times of every run at that prompt length, percentiles (numpy, linear)",
    "peak_rss_bytes": "VmHWM of the measuring process (/proc/self/status) after the run: weights however held, KV "
                      "buffers, the Python runtime (rss_before_load_bytes is what was resident before loading)",
    "kv_allocated_bytes": "the runtime's KV buffers, allocated once at the bundle's max context",
    "phases": "a separate run: the native kernels' opt-in phase timers (kernels.c, -DEC_PHASE_TIMERS) where they decode, "
              "else onnxruntime's profiler by op type; runtime = the step's wall time beyond the timed phases; sampling "
              "timed in Python",
    "energy": "RAPL energy_uj (x86) or INA3221 rails (Jetson) around the decode loop, where readable; else not available",
    "bandwidth_probe": "measured: numpy reading a buffer larger than the caches, one share per thread (edgecpm.report.bandwidth)",
    "roofline": "bytes per decode token (weights as streamed + K/V rows at the mean context) over the measured bandwidth; "
                "the profile's bandwidth gives a projection (an upper bound, not a measurement)",
}
