"""Where a decode step's time goes: the native kernels' phase timers, or onnxruntime's profiler by op type.

Both give seconds per step for the phases PHASES; `runtime` is what the step's wall time (timed in Python around
`backend.decode`) holds beyond them (the ctypes or session call, thread fork/join, the logits copy; for onnxruntime
its own scheduling between kernels), and `sampling` is timed in Python. So the phases of a step sum to the step.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PHASES = ("attention", "linear", "lm_head", "norm", "embedding", "other_ops", "runtime", "sampling")
DESCRIPTIONS = {
    "attention": "scores, softmax and weighted values over the KV cache; RoPE and the KV write",
    "linear": "the layers' projections (QKV, O, gate/up, down), their input quantization and the gated activation",
    "lm_head": "the output projection to the vocabulary",
    "norm": "RMSNorm and the residual adds",
    "embedding": "the token's embedding row",
    "other_ops": "graph ops of no other phase (activations, reshapes, casts); onnxruntime only",
    "runtime": "step wall time outside the timed phases: the call into the kernels or session, thread fork/join, "
               "the logits copy",
    "sampling": "choosing the next token from the logits (Python, greedy)",
}

# onnxruntime op types -> phase (MatMul-like ops whose inputs all have rank >= 3 are attention's, see op_phase)
ORT_OPS = {
    "GroupQueryAttention": "attention", "MultiHeadAttention": "attention", "Attention": "attention", "Softmax": "attention",
    "RotaryEmbedding": "attention", "SparseAttention": "attention",
    "MatMulNBits": "linear", "MatMul": "linear", "Gemm": "linear", "FusedMatMul": "linear", "DequantizeLinear": "linear",
    "MatMulInteger": "linear", "DynamicQuantizeMatMul": "linear", "DynamicQuantizeLinear": "linear",
    "MatMulIntegerToFloat": "linear", "QuickGelu": "linear",
    "SimplifiedLayerNormalization": "norm", "SkipSimplifiedLayerNormalization": "norm", "LayerNormalization": "norm",
    "SkipLayerNormalization": "norm", "RMSNormalization": "norm",
    "Gather": "embedding", "GatherBlockQuantized": "embedding",
}


def op_phase(op: str, input_shapes: list[list[int]]) -> str:
    """The phase of one onnxruntime node, from its op type (and for MatMuls whether a weight is among its inputs:
    a weight is 2-D, the standard flavour's attention products multiply 4-D activations)."""
    phase = ORT_OPS.get(op, "other_ops")
    if op in ("MatMul", "FusedMatMul") and input_shapes and all(len(shape) >= 3 for shape in input_shapes):
        return "attention"
    return phase


def _shapes(event: dict) -> list[list[int]]:
    shapes = []
    for item in event.get("args", {}).get("input_type_shape", []) or []:
        for value in item.values():
            shapes.append(list(value))
    return shapes


def onnxruntime_phases(events: list[dict], decode_runs: int) -> dict[str, Any]:
    """Per decode step: seconds by phase summed over the last `decode_runs` session runs' node kernels, the session
    run's own duration, and the ops behind each phase (op type -> nodes per step)."""
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"), key=lambda e: e["ts"])
    decode = runs[-decode_runs:]
    if not decode:
        return {"per_step_seconds": {}, "session_run_seconds": 0.0, "ops": {}}
    begin = decode[0]["ts"]
    seconds, nodes = Counter(), Counter()
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time") and event["ts"] >= begin:
            op = event.get("args", {}).get("op_name", "?")
            phase = op_phase(op, _shapes(event))
            seconds[phase] += event["dur"] / 1e6
            nodes[(phase, op)] += 1
    steps = len(decode)
    ops: dict[str, dict[str, float]] = {}
    for (phase, op), count in nodes.items():
        ops.setdefault(phase, {})[op] = count / steps
    return {"per_step_seconds": {phase: total / steps for phase, total in seconds.items()},
            "session_run_seconds": sum(r["dur"] for r in decode) / 1e6 / steps, "ops": ops}


@contextmanager
def onnxruntime_profiling() -> Iterator[Path]:
    """While open, onnxruntime sessions made by edgecpm's backend write profiles under the yielded directory (use it
    in a process of its own: it swaps the backend module's session_options, as benchmarks/profile_ops.py does)."""
    import edgecpm.runtimes.onnxruntime.backend as backend_module

    directory = Path(tempfile.mkdtemp(prefix="edgecpm-ort-profile-"))
    plain = backend_module.session_options

    def profiled(*args, **kwargs):
        options = plain(*args, **kwargs)
        options.enable_profiling, options.profile_file_prefix = True, str(directory / "ort")
        return options

    backend_module.session_options = profiled
    try:
        yield directory
    finally:
        backend_module.session_options = plain


def read_profile(path: str | Path) -> list[dict]:
    return json.loads(Path(path).read_text())


def native_breakdown(native: dict[str, float], steps: int) -> dict[str, float]:
    """The native kernels' phase totals (runtimes/native/decoder.PHASES) as seconds per step in PHASES' names."""
    return {name: seconds / steps for name, seconds in native.items()}


def complete(per_step: dict[str, float], forward_seconds: float, sampling_seconds: float) -> dict[str, float]:
    """Every phase of PHASES per step: the measured ones, `runtime` = the forward wall time beyond them (never
    below 0; a negative remainder within timer noise is dropped and visible as the phases' sum exceeding it), and
    `sampling`."""
    out = {phase: float(per_step.get(phase, 0.0)) for phase in PHASES}
    out["runtime"] = max(forward_seconds - sum(v for k, v in out.items() if k not in ("runtime", "sampling")), 0.0)
    out["sampling"] = sampling_seconds
    return out
