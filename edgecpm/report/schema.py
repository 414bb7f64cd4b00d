"""The schema of report.json (a JSON Schema, draft 2020-12 subset) and a small validator for that subset.

Readers check `schema` and `schema_version`; a field added later bumps the minor meaning only (new optional keys),
a change of meaning bumps `schema_version`. docs/PROFILING.md describes every field.
"""

from __future__ import annotations

from typing import Any

SCHEMA_ID = "edgecpm.profile-report"
SCHEMA_VERSION = 1

NUM = {"type": "number"}
INT = {"type": "integer"}
STR = {"type": "string"}
BOOL = {"type": "boolean"}
NUM_OR_NULL = {"type": ["number", "null"]}
INT_OR_NULL = {"type": ["integer", "null"]}
STR_OR_NULL = {"type": ["string", "null"]}
NUMS = {"type": "array", "items": NUM}


def obj(required: dict[str, Any], optional: dict[str, Any] | None = None, *, extra: bool = True) -> dict[str, Any]:
    return {"type": "object", "required": sorted(required), "properties": {**required, **(optional or {})},
            "additionalProperties": extra}


PROMPT_RUN = obj({
    "prompt_tokens": INT, "prefill_seconds": NUM, "first_sampling_seconds": NUM, "ttft_seconds": NUM,
    "decode_steps": INT, "decode_seconds": NUM, "step_forward_seconds": NUMS, "step_sampling_seconds": NUMS,
    "prefill_energy_joules": NUM_OR_NULL, "decode_energy_joules": NUM_OR_NULL,
    "decode_energy_by_domain": {"type": ["object", "null"]}, "end_position": INT,
})
MEMORY = obj({k: INT_OR_NULL for k in ("rss_before_load_bytes", "rss_after_load_bytes", "rss_end_bytes", "peak_rss_bytes",
                                         "kv_allocated_bytes", "kv_bytes_per_token")})
KERNELS = obj({"prefill": STR, "decode": STR}, {"native_unavailable": STR_OR_NULL})
ENERGY = obj({"available": BOOL, "source": STR_OR_NULL, "reason": STR, "domains": {"type": "array", "items": STR}})
RUN = obj({
    "round": INT, "order_in_round": INT, "process_seconds": NUM, "load_seconds": NUM, "kernels": KERNELS,
    "max_context": INT, "threads": INT_OR_NULL, "prompts": {"type": "array", "items": PROMPT_RUN},
    "skipped": {"type": "array", "items": obj({"prompt_tokens": INT, "reason": STR})}, "memory": MEMORY,
    "weights": obj({"streamed_bytes_per_token": INT_OR_NULL, "source": STR}), "energy": ENERGY,
})
PHASE_NAMES = ("attention", "linear", "lm_head", "norm", "embedding", "other_ops", "runtime", "sampling")
PHASES = {"type": "object", "required": ["source", "reason"], "properties": {
    "source": STR_OR_NULL, "reason": STR_OR_NULL, "prompt_tokens": INT, "steps": INT, "kernels": KERNELS,
    "measured_seconds_per_step": {"type": "object"}, "forward_seconds_per_step": NUM, "sampling_seconds_per_step": NUM,
    "per_step_seconds": obj({name: NUM for name in PHASE_NAMES}), "step_forward_seconds": NUMS,
    "step_sampling_seconds": NUMS, "process_seconds": NUM}}
PROMPT_SUMMARY = obj({
    "prompt_tokens": INT, "runs": INT, "prefill_seconds": NUM, "prefill_tokens_per_second": NUM, "ttft_seconds": NUM,
    "decode_tokens_per_second": NUM, "decode_tokens_per_second_range": NUMS,
    "step_ms": obj({"p50": NUM, "p90": NUM, "p99": NUM, "mean": NUM}), "sampling_ms_mean": NUM,
    "decode_joules_per_token": NUM_OR_NULL, "prefill_joules_per_token": NUM_OR_NULL,
})
ROOFLINE = {"type": ["object", "null"], "required": ["bytes_per_token", "roofline_tokens_per_second", "percent_of_roofline"],
            "properties": {"weight_bytes_per_token": INT, "kv_bytes_read_per_token": INT, "mean_context": NUM,
                           "bytes_per_token": INT, "measured_gb_per_second": NUM, "roofline_tokens_per_second": NUM,
                           "decode_tokens_per_second": NUM, "percent_of_roofline": NUM, "achieved_gb_per_second": NUM,
                           "projection_profile_gb_per_second": NUM, "projection_roofline_tokens_per_second": NUM,
                           "projection_tokens_per_second_at_this_efficiency": NUM}}
SUMMARY = obj({
    "kernels": KERNELS, "load_seconds": NUM, "load_seconds_all": NUMS, "prompts": {"type": "array", "items": PROMPT_SUMMARY},
    "skipped": {"type": "array"}, "decode_tokens_per_second": NUM_OR_NULL, "decode_at_prompt_tokens": INT_OR_NULL,
    "memory": obj({"peak_rss_bytes": NUM_OR_NULL, "kv_allocated_bytes": INT_OR_NULL, "kv_bytes_per_token": INT_OR_NULL,
                   "budget_bytes": INT_OR_NULL, "percent_of_budget": NUM_OR_NULL}),
    "roofline": {"type": "array", "items": ROOFLINE},
    "phases": {"type": ["object", "null"]}, "weights_source": STR,
})
BUNDLE = obj({"label": STR, "path": STR, "manifest": {"type": "object"}, "runs": {"type": "array", "items": RUN, "minItems": 1},
              "phases": PHASES, "summary": SUMMARY})
SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID, "title": "edgecpm profile report",
    **obj({
        "schema": {"const": SCHEMA_ID}, "schema_version": {"const": SCHEMA_VERSION}, "created": STR,
        "command": {"type": "array", "items": STR},
        "settings": obj({"prompt_lengths": {"type": "array", "items": INT}, "new_tokens": INT, "runs": INT,
                         "threads": INT_OR_NULL, "kernels": STR, "sampling": STR, "bandwidth_probe_gib": NUM,
                         "phase_steps": INT, "order": STR}),
        "machine": obj({"system": STR, "machine": STR, "cpu_model": STR_OR_NULL, "logical_cpus": INT_OR_NULL,
                        "physical_cores": INT, "memory_bytes": INT_OR_NULL, "python": STR}),
        "versions": {"type": "object", "required": ["edgecpm", "numpy", "onnxruntime"]},
        "device_profile": obj({"name": STR, "version": STR, "chosen_by": {"enum": ["--device", "detected"]},
                               "memory_bytes": INT, "budget_bytes": INT, "memory_bandwidth_gbps": NUM}),
        "bandwidth_probe": obj({"bytes": INT, "threads": INT, "samples_gb_per_second": NUMS, "gb_per_second": NUM,
                                "method": STR}),
        "energy": ENERGY,
        "bundles": {"type": "array", "items": BUNDLE, "minItems": 1},
        "comparison": {"type": ["object", "null"]},
        "sources": {"type": "object"},
    }),
}

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _is(value: Any, kind: str) -> bool:
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _TYPES[kind])


def validate(value: Any, schema: dict[str, Any] = SCHEMA, where: str = "$") -> list[str]:
    """Problems with `value` against `schema` (type, const, enum, required, properties, additionalProperties, items,
    minItems), each as "path: what"; empty when it conforms."""
    problems: list[str] = []
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if not any(_is(value, kind) for kind in kinds):
            return [f"{where}: expected {' or '.join(kinds)}, got {type(value).__name__}"]
    if "const" in schema and value != schema["const"]:
        problems.append(f"{where}: expected {schema['const']!r}, got {value!r}")
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                problems.append(f"{where}: missing {key!r}")
        properties = schema.get("properties", {})
        for key, item in value.items():
            if key in properties:
                problems += validate(item, properties[key], f"{where}.{key}")
            elif schema.get("additionalProperties") is False:
                problems.append(f"{where}: unexpected {key!r}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            problems.append(f"{where}: fewer than {schema['minItems']} items")
        if "items" in schema:
            for i, item in enumerate(value):
                problems += validate(item, schema["items"], f"{where}[{i}]")
    return problems
