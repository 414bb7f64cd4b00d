"""Quality, size and decode speed of every quantization scheme on the embedded SmolLM2-135M (docs/QUANTIZATION.md).

    python benchmarks/quant_table.py [--out /tmp/quant-table] [--rows int4-rtn,int4-gptq] [--json results.json]

Each row is one `edgecpm export` command line (run as a subprocess, exactly as printed in the table);
quality is that export's own quality gate (recorded in its edgecpm.json: perplexity, KL and top-1 of the
bundle's runtime against the fp32 PyTorch reference on the shipped evaluation text); size is the bundle
on disk; decode is `benchmarks/edgecpm_engine.py`'s measurement (100-token prompt, 128 new tokens, median
of 3 runs after a warm-up, 2 threads).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from edgecpm_engine import run_edgecpm  # noqa: E402

COMMON = ["--max-context", "2048"]
ROWS = {
    "fp32": [],
    "int8": ["--quant", "int8"],
    "int4-rtn": ["--quant", "int4", "--method", "rtn"],
    "int4-rtn-asym": ["--quant", "int4", "--method", "rtn", "--asymmetric"],
    "int4-gptq": ["--quant", "int4", "--method", "gptq"],
    "int4-gptq-asym": ["--quant", "int4", "--method", "gptq", "--asymmetric"],
    "int4-rtn-b64": ["--quant", "int4", "--method", "rtn", "--block-size", "64"],
    "int4-gptq-b64": ["--quant", "int4", "--method", "gptq", "--block-size", "64"],
    "int4-rtn-int4-tables": ["--quant", "int4", "--method", "rtn", "--lm-head", "int4", "--embeddings", "int4"],
    "int4-gptq-int4-head": ["--quant", "int4", "--method", "gptq", "--lm-head", "int4"],
    "int4-gptq-int4-tables": ["--quant", "int4", "--method", "gptq", "--lm-head", "int4", "--embeddings", "int4"],
    "int4-rtn-int8-tables": ["--quant", "int4", "--method", "rtn", "--lm-head", "int8", "--embeddings", "int8"],
    "int4-gptq-int8-tables": ["--quant", "int4", "--method", "gptq", "--lm-head", "int8", "--embeddings", "int8"],
    "int4-source": ["--quant", "int4"],
    "ternary": ["--quant", "ternary"],
}


def bundle_bytes(bundle: Path) -> int:
    return sum(f.stat().st_size for f in bundle.iterdir() if f.is_file())


def decode_speed(bundle: Path, threads: int) -> dict:
    from edgecpm.runtimes import load_backend

    backend = load_backend(bundle, threads=threads)
    prompt = (np.arange(100) * 37 + 11) % 1000 + 100
    run_edgecpm(bundle, prompt, 8, backend=backend)
    runs = [run_edgecpm(bundle, prompt, 128, backend=backend) for _ in range(3)]
    return {"decode_tokens_per_second": statistics.median(r["decode_tokens_per_second"] for r in runs),
            "prefill_tokens_per_second": statistics.median(r["prefill_tokens_per_second"] for r in runs)}


def run_row(name: str, out: Path, threads: int) -> dict:
    from edgecpm.bundle import read_manifest
    from edgecpm.resources import default_model_path

    bundle = out / name
    shutil.rmtree(bundle, ignore_errors=True)
    command = ["edgecpm", "export", str(default_model_path()), "-o", str(bundle), *COMMON, *ROWS[name]]
    done = subprocess.run([sys.executable, "-m", "edgecpm", *command[1:]], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{name}: export failed: {done.stderr.strip()[-500:]}")
    quantization = read_manifest(bundle).quantization or {}
    return {"row": name, "command": " ".join(["edgecpm", "export", "$MODEL", "-o", "OUT", *COMMON, *ROWS[name]]),
            "quality": quantization.get("quality"), "tensors": quantization.get("tensors"),
            "bytes": bundle_bytes(bundle), **decode_speed(bundle, threads),
            "warnings": [line for line in done.stderr.splitlines() if "warning" in line.lower()]}


def markdown(results: list[dict]) -> str:
    reference = next((r["quality"]["reference_perplexity"] for r in results if r["quality"]), float("nan"))
    lines = [f"| scheme | `edgecpm export $MODEL -o OUT {' '.join(COMMON)}` + | perplexity (fp32 {reference:.2f}) | Δ ppl "
             "| mean KL | top-1 | bundle MB | decode tok/s |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        q = r["quality"]
        quality = ("| — | — | 0 | 100% " if q is None else
                   f"| {q['perplexity']:.2f} | {q['perplexity_increase']:+.1%} | {q['mean_kl']:.4f} | {q['top1_agreement']:.1%} ")
        lines.append(f"| {r['row']} | `{' '.join(ROWS[r['row']]) or '(none)'}` {quality}| {r['bytes'] / 1e6:.1f} "
                     f"| {r['decode_tokens_per_second']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/quant-table"))
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.rows.split(","):
        results.append(run_row(name, args.out, args.threads))
        print(f"{name}: done", file=sys.stderr, flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(markdown(results))


if __name__ == "__main__":
    main()
