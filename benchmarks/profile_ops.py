"""Where a decode step's time goes, per onnxruntime op type, for one bundle.

    python benchmarks/profile_ops.py BUNDLE [--prompt-tokens 100] [--new-tokens 128] [--threads 2]

Runs the bundle's own runtime (`load_backend`) with onnxruntime's profiler on, then sums the kernel times of
the decode steps by op type. The profiler itself costs time, so read shares, not absolute tok/s.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

import numpy as np


def profile(bundle: Path, prompt_tokens: int, new_tokens: int, threads: int) -> dict:
    import edgecpm.runtimes.onnxruntime.backend as backend_module
    from edgecpm.runtimes import load_backend

    prefix = str(Path(tempfile.mkdtemp()) / "ort")
    plain_options = backend_module.session_options

    def profiled_options(*args, **kwargs):
        options = plain_options(*args, **kwargs)
        options.enable_profiling, options.profile_file_prefix = True, prefix
        return options

    backend_module.session_options = profiled_options
    try:
        backend = load_backend(bundle, threads=threads, kernels="onnxruntime")  # profiles the graph's ops
    finally:
        backend_module.session_options = plain_options
    backend.prefill((np.arange(prompt_tokens) * 37 + 11) % 1000 + 100)
    token = 200
    for _ in range(new_tokens):
        token = int(backend.decode(token).argmax())
    events = json.loads(Path(backend.session.end_profiling()).read_text())

    runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    decode_start = runs[1]["ts"]  # runs[0] is the prefill
    per_op, nodes = collections.Counter(), collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= decode_start:
            per_op[event["args"]["op_name"]] += event["dur"]
            nodes[event["args"]["op_name"]] += 1
    steps = len(runs) - 1
    return {"steps": steps, "run_ms": sum(r["dur"] for r in runs[1:]) / steps / 1000,
            "ops": {op: {"ms": us / steps / 1000, "nodes": nodes[op] // steps} for op, us in per_op.most_common()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--prompt-tokens", type=int, default=100)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    result = profile(args.bundle, args.prompt_tokens, args.new_tokens, args.threads)
    kernels = sum(op["ms"] for op in result["ops"].values())
    print(f"{args.bundle}: {result['run_ms']:.2f} ms per decode step (session run), {kernels:.2f} ms in kernels")
    print("| op | ms / step | nodes / step | share of kernel time |")
    print("|---|---:|---:|---:|")
    for name, op in result["ops"].items():
        print(f"| {name} | {op['ms']:.3f} | {op['nodes']} | {op['ms'] / kernels:.1%} |")


if __name__ == "__main__":
    main()
