"""Prefill/decode throughput of edgecpm's peers on SmolLM2-135M-Instruct (CPU).

    python benchmarks/bench_decode.py --precision fp32 [--runs 3] [--new-tokens 128] [--json out.json]
    python benchmarks/bench_decode.py --precision int4
    python benchmarks/bench_decode.py --precision fp32 --engines llama.cpp-f32,onnxruntime-genai-fp32
    python benchmarks/bench_decode.py --precision int4 --source GGUF --cache DIR   (another model, e.g. the
        0.5B-shaped Llama twin of benchmarks/make_llama_shape_gguf.py)

Prepares the weights on first use (benchmarks/prepare_weights.py, cache dir --cache, default /work/bench_cache),
then runs every engine registered for the precision, one at a time in this process, on the same ~100-token
chat prompt, and prints a Markdown table. Measurement contract: see benchmarks/peers.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # noqa: E402
import prepare_weights  # noqa: E402
from edgecpm_engine import peer_engine  # noqa: E402

from edgecpm.quant import QuantSpec  # noqa: E402

# Signature of an engine: (paths, prompt_ids, new_tokens=..., runs=..., threads=...) -> result dict (see peers.py).
EngineFn = Callable[..., dict]

# ==================================================================================================== ENGINES
# Registry: precision -> {engine name: function}. The *reference* engine (the ratio column's denominator) is
# REFERENCE[precision].
#
# >>> HOOK for edgecpm: write one function with the peers' signature/contract, e.g.
#
#     def run_edgecpm_fp32(paths, prompt, new_tokens=128, runs=3, threads=2) -> dict:
#         # load/export the model from paths["hf"] (or paths["gguf_f32"]) outside the timings, then per run:
#         # prefill(prompt) -> first token, then new_tokens-1 single-token decode steps (greedy, EOS masked);
#         # return peers._repeat("edgecpm-fp32", one_run, len(prompt), new_tokens, runs)
#
#     and register it below:  ENGINES["fp32"]["edgecpm-fp32"] = run_edgecpm_fp32
# ============================================================================================================
def edgecpm_int4(name: str, load_options: dict | None = None, **spec) -> EngineFn:
    """An edgecpm int4 bundle (ort flavour, fp32 activations, block 32 unless given) of the same HF weights."""
    return peer_engine(name, load_options=load_options, flavour="ort", dtype="fp32", quant=QuantSpec(scheme="int4", **spec))


ENGINES: dict[str, dict[str, EngineFn]] = {
    "fp32": {
        "transformers-eager-fp32": peers.run_transformers,
        "onnxruntime-genai-fp32": peers.run_ortgenai_fp32,
        "llama.cpp-f32": peers.run_llama_cpp_f32,
        "edgecpm-fp32-ort": peer_engine("fp32-ort", flavour="ort", dtype="fp32"),
        # the same bundle all on onnxruntime (prepacked weights: faster prefill, a second copy of the weights); the
        # default decodes on edgecpm's kernels, which share the weights with onnxruntime's (unpacked) prefill
        "edgecpm-fp32-ort-onnxruntime": peer_engine("fp32-ort", load_options={"kernels": "onnxruntime"}, flavour="ort",
                                                    dtype="fp32"),
        "edgecpm-fp32-standard": peer_engine("fp32-standard", flavour="standard", dtype="fp32"),
    },
    "int4": {
        "onnxruntime-genai-int4": peers.run_ortgenai_int4,
        "llama.cpp-q4_0": peers.run_llama_cpp_q4_0,
        # decode on edgecpm's native kernels (the default, "auto", for quantized bundles) ...
        "edgecpm-int4-rtn": edgecpm_int4("int4-rtn", method="rtn"),
        # ... and the same bundle decoded by its onnxruntime graph
        "edgecpm-int4-rtn-onnxruntime": edgecpm_int4("int4-rtn", load_options={"kernels": "onnxruntime"}, method="rtn"),
        # the tables at int8 (the default before int6)
        "edgecpm-int4-rtn-int8-tables": edgecpm_int4("int4-rtn-int8-tables", method="rtn", lm_head="int8", embeddings="int8"),
        # onnxruntime-genai's own layout: the embedding table and LM head at int4 too
        "edgecpm-int4-rtn-int4-head": edgecpm_int4("int4-rtn-int4-head", method="rtn", lm_head="int4", embeddings="int4"),
        "edgecpm-int4-gptq": edgecpm_int4("int4-gptq", method="gptq"),
        # GPTQ decoder and a GPTQ-calibrated int4 head stored apart from the int6 embedding table
        "edgecpm-int4-gptq-int4-head": edgecpm_int4("int4-gptq-int4-head", method="gptq", lm_head="int4"),
        "edgecpm-int4-gptq-b64": edgecpm_int4("int4-gptq-b64", method="gptq", block_size=64),
    },
}
REFERENCE = {"fp32": "onnxruntime-genai-fp32", "int4": "onnxruntime-genai-int4"}


def markdown_table(results: list[dict], reference: str) -> str:
    ref = next((r for r in results if r["engine"] == reference and "error" not in r), None)
    lines = [
        f"| engine | prefill tok/s | decode tok/s | decode vs {reference} |",
        "|---|---:|---:|---:|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['engine']} | failed | failed | — |")
            continue
        ratio = f"{r['decode_tokens_per_second'] / ref['decode_tokens_per_second']:.2f}x" if ref else "—"
        lines.append(f"| {r['engine']} | {r['prefill_tokens_per_second']:.1f} | {r['decode_tokens_per_second']:.1f} | {ratio} |")
    return "\n".join(lines)


def cpu_busy(seconds: float = 1.0) -> float:
    """Fraction of all CPUs busy (incl. other tenants' work visible in /proc/stat) over ``seconds``."""
    def snap():
        v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait
    t1, i1 = snap()
    time.sleep(seconds)
    t2, i2 = snap()
    return 1.0 - (i2 - i1) / max(1, t2 - t1)


def wait_until_idle(max_wait: float, threshold: float = 0.10) -> float:
    """Timings on a 2-core box are meaningless while something else runs; wait (bounded) for quiet."""
    if not Path("/proc/stat").exists():
        return float("nan")
    deadline = time.time() + max_wait
    busy = cpu_busy()
    while busy > threshold and time.time() < deadline:
        print(f"# CPU {busy:.0%} busy before the run; waiting", flush=True)
        busy = cpu_busy(2.0)
    if busy > threshold:
        print(f"# warning: CPU still {busy:.0%} busy, numbers will be low/noisy", flush=True)
    return busy


def run_child(a) -> int:
    paths = prepare_weights.paths(a.cache)
    prompt = peers.prompt_ids(paths["hf"])
    r = ENGINES[a.precision][a.child](paths, prompt, new_tokens=a.new_tokens, runs=a.runs, threads=a.threads)
    r["engine"] = a.child
    a.json.write_text(json.dumps(r) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precision", choices=sorted(ENGINES), default="fp32")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per engine (after one warm-up); medians")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engines", default=None, help="comma-separated subset of the registered engines")
    ap.add_argument("--cache", type=Path, default=prepare_weights.DEFAULT_OUT, help="weights cache dir")
    ap.add_argument("--source", type=Path, default=None,
                    help="the GGUF every engine's weights derive from (default: the embedded SmolLM2; see "
                         "benchmarks/make_llama_shape_gguf.py for the 0.5B-shaped one); use its own --cache")
    ap.add_argument("--json", type=Path, default=None, help="write all results (incl. per-run, token ids) here")
    ap.add_argument("--idle-wait", type=float, default=60.0,
                    help="before each engine, wait up to this many seconds for the CPU to be idle (shared VMs)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: run one engine, write --json
    a = ap.parse_args(argv)
    if a.child:
        return run_child(a)

    paths = prepare_weights.prepare(a.cache, a.precision, a.source)
    prompt = peers.prompt_ids(paths["hf"])
    engines = ENGINES[a.precision]
    names = list(engines) if not a.engines else [n.strip() for n in a.engines.split(",")]
    unknown = [n for n in names if n not in engines]
    if unknown:
        ap.error(f"unknown engine(s) for {a.precision}: {unknown}; registered: {list(engines)}")

    print(f"# prompt {len(prompt)} tokens, {a.new_tokens} new tokens, {a.runs} runs (+1 warm-up), "
          f"{a.threads} threads, precision {a.precision}", flush=True)
    results = []
    for name in names:
        t0 = time.time()
        busy = wait_until_idle(a.idle_wait)
        # Each engine runs in its own process: torch's and llama.cpp's OpenMP runtimes in one process slow
        # llama.cpp down badly, and it keeps memory/thread state of one engine from leaking into the next.
        with tempfile.TemporaryDirectory() as td:
            out = Path(td) / "result.json"
            cmd = [sys.executable, __file__, "--child", name, "--precision", a.precision, "--runs", str(a.runs),
                   "--new-tokens", str(a.new_tokens), "--threads", str(a.threads), "--cache", str(a.cache),
                   "--json", str(out)]
            proc = subprocess.run(cmd)
            if proc.returncode == 0 and out.exists():
                r = json.loads(out.read_text())
            else:
                r = {"engine": name, "error": f"child exited with {proc.returncode}"}
        r["cpu_busy_before"] = busy
        if "error" in r:
            print(f"# {name}: FAILED {r['error']}", flush=True)
        else:
            print(f"# {name}: prefill {r['prefill_tokens_per_second']:.1f} tok/s, decode "
                  f"{r['decode_tokens_per_second']:.1f} tok/s ({time.time() - t0:.0f}s; CPU busy before: "
                  f"{busy:.0%})", flush=True)
        results.append(r)

    # Greedy outputs should agree between engines of the same precision (fp32: same weights exactly).
    ok = [r for r in results if "error" not in r]
    for r in ok[1:]:
        same = sum(1 for x, y in zip(r["token_ids"], ok[0]["token_ids"]) if x == y)
        prefix = next((i for i, (x, y) in enumerate(zip(r["token_ids"], ok[0]["token_ids"])) if x != y), len(r["token_ids"]))
        r["agreement_with_" + ok[0]["engine"]] = {"common_prefix": prefix, "same_positions": same}
        print(f"# {r['engine']} vs {ok[0]['engine']}: first {prefix} tokens identical", flush=True)

    print()
    print(markdown_table(results, REFERENCE[a.precision]))
    if a.json:
        meta = {"precision": a.precision, "runs": a.runs, "new_tokens": a.new_tokens, "threads": a.threads,
                "prompt_tokens": len(prompt), "prompt_ids": prompt, "cpu_count": os.cpu_count(),
                "machine": platform.platform(), "processor": platform.processor()}
        a.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
        print(f"\n(wrote {a.json})")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
