"""Precision of the native kernels' arithmetic against the fp32 reference, on chat prompts (docs/QUANTIZATION.md,
"Activation precision").

    python benchmarks/precision_native.py [--workdir DIR] [--answer-tokens 24] [--attribute] [--speed-rounds 3]
                                          [--json OUT]

Bundles of the embedded SmolLM2 (its Q4_1 GGUF) are exported into DIR where missing: fp32, and int4 with the file's
own blocks at accuracy level 4 and at 0. With its own blocks the int4 bundle's weights are exactly the fp32
reference's (the reference is the file dequantized), so whatever separates their logits is arithmetic. Each chat
prompt (rendered with the bundle's template) plus the fp32 reference's greedy answer to it is fed token by token to
every variant; each variant is compared with the fp32 bundle on onnxruntime at every position: max |Δlogit|, mean
KL(fp32 ‖ variant), top-1 agreement; and its own greedy answer to the demo question is printed. `--attribute` adds
the native kernels with exact activations in one linear role at a time, and in all but one. `--speed-rounds`
times native prefill (128 tokens) and decode (64 steps) with int8 and with exact activations, alternating.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgecpm.api import load
from edgecpm.backend import Backend
from edgecpm.bundle import read_manifest
from edgecpm.quant.quality import backend_logits, log_softmax
from edgecpm.resources import default_model_path
from edgecpm.runtimes import load_backend
from edgecpm.runtimes.native.backend import NativeBackend
from edgecpm.runtimes.native.decoder import EXACT_ALL, EXACT_DEFAULT, LINEAR_ROLES

DEMO = "What is the capital of France?"
PROMPTS = (DEMO, "Write a haiku about the sea.", "How do I reverse a list in Python?", "What is 17 times 23?",
           "Give me three tips for sleeping better.", "Who wrote Pride and Prejudice?",
           "Explain photosynthesis in one sentence.", "Translate 'good morning' into Spanish.",
           "What is the boiling point of water in Fahrenheit?", "Name the planets of the solar system.",
           "Why is the sky blue?", "Summarize the plot of Romeo and Juliet in two sentences.")
BUNDLES = {"fp32": [], "int4": ["--quant", "int4"], "int4-al0": ["--quant", "int4", "--accuracy-level", "0"]}
MAX_CONTEXT = 512
THREADS = 1  # one thread: OpenMP teams stall when a busy neighbour preempts one of their threads


def export_missing(workdir: Path) -> dict[str, Path]:
    paths = {}
    for name, flags in BUNDLES.items():
        paths[name] = workdir / name
        if not (paths[name] / "edgecpm.json").exists():
            subprocess.run([sys.executable, "-m", "edgecpm", "export", str(default_model_path()), "-o", str(paths[name]),
                            "--max-context", str(MAX_CONTEXT), "--overwrite", *flags,
                            *(["--quality-tokens", "16"] if flags else [])], check=True)
    return paths


def greedy(backend: Backend, prompt: list[int], tokens: int, stop: set[int]) -> list[int]:
    backend.reset()
    logits, out = backend.prefill(np.asarray(prompt, dtype=np.int64)), []
    while len(out) < tokens:
        out.append(int(logits.argmax()))
        if out[-1] in stop:
            break
        logits = backend.decode(out[-1])
    return out


def variants(paths: dict[str, Path], attribute: bool) -> dict[str, Callable[[], Backend]]:
    int4 = paths["int4"]

    def native(exact: frozenset[str]) -> Callable[[], Backend]:
        return lambda: NativeBackend(int4, read_manifest(int4), threads=THREADS, exact=exact)

    chosen = {"onnxruntime, accuracy level 4": lambda: load_backend(int4, kernels="onnxruntime", threads=THREADS),
              "onnxruntime, accuracy level 0": lambda: load_backend(paths["int4-al0"], kernels="onnxruntime", threads=THREADS),
              "native, int8 activations": native(frozenset()),
              "native-exact": native(EXACT_ALL)}
    if EXACT_DEFAULT:
        chosen[f"native default (exact: {', '.join(sorted(EXACT_DEFAULT))})"] = native(EXACT_DEFAULT)
    if attribute:
        for role in LINEAR_ROLES:
            chosen[f"native, exact {role} only"] = native(frozenset({role}))
        for role in LINEAR_ROLES:
            chosen[f"native, exact all but {role}"] = native(EXACT_ALL - {role})
    return chosen


def compare(reference: list[np.ndarray], logits: list[np.ndarray]) -> dict[str, float]:
    kls, delta, agree, rows = [], 0.0, 0, 0
    for ref, got in zip(reference, logits):
        ref_lp, lp = log_softmax(ref), log_softmax(got)
        kls.append(np.sum(np.exp(ref_lp) * (ref_lp - lp), axis=-1))
        delta = max(delta, float(np.abs(ref - got).max()))
        agree += int(np.sum(ref.argmax(-1) == got.argmax(-1)))
        rows += len(ref)
    return {"max_abs_logit_delta": delta, "mean_kl": float(np.concatenate(kls).mean()),
            "max_kl": float(np.concatenate(kls).max()), "top1_agreement": agree / rows, "positions": rows}


def speed(int4: Path, rounds: int) -> list[dict]:
    """Native prefill and decode tok/s with int8 and with exact activations, alternating within each round."""
    prompt, steps, results = np.arange(100, 228, dtype=np.int64), 64, []
    for round_number in range(1, rounds + 1):
        for name, kernels in (("native", "native"), ("native-exact", "native-exact")):
            backend = load_backend(int4, kernels=kernels, threads=THREADS)
            start = time.perf_counter()
            token = int(backend.prefill(prompt).argmax())
            prefill = len(prompt) / (time.perf_counter() - start)
            start = time.perf_counter()
            for _ in range(steps):
                token = int(backend.decode(token).argmax())
            decode = steps / (time.perf_counter() - start)
            results.append({"round": round_number, "kernels": name, "prefill_tok_s": prefill, "decode_tok_s": decode})
            print(f"| {round_number} | {name} | {prefill:.1f} | {decode:.1f} |", flush=True)
            del backend
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/edgecpm-precision"))
    parser.add_argument("--answer-tokens", type=int, default=24)
    parser.add_argument("--attribute", action="store_true")
    parser.add_argument("--speed-rounds", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    paths = export_missing(args.workdir)
    engine = load(paths["fp32"], kernels="onnxruntime", threads=THREADS)
    stop = set(engine.manifest.eos_token_ids)
    reference_backend = engine.backend
    sequences = []
    for prompt in PROMPTS:
        ids = engine.prompt_ids(prompt)
        sequences.append(ids + greedy(reference_backend, ids, args.answer_tokens, stop))
    reference = [backend_logits(reference_backend, np.asarray(ids)) for ids in sequences]
    demo_ids = engine.prompt_ids(DEMO)
    tokenizer = engine.tokenizer

    def answer(backend: Backend) -> str:
        return tokenizer.decode(greedy(backend, demo_ids, 16, stop)).strip()

    report = {"reference": {"variant": "fp32 bundle on onnxruntime", "demo_answer": answer(reference_backend)}, "variants": {}}
    del reference_backend, engine
    positions = sum(len(rows) for rows in reference)
    print(f"{len(PROMPTS)} prompts, {positions} positions; fp32 answers: {report['reference']['demo_answer']!r}")
    print("| variant | max abs dlogit | mean KL | max KL | top-1 | demo answer |\n|---|---:|---:|---:|---:|---|")
    for name, make in variants(paths, args.attribute).items():
        backend = make()
        row = compare(reference, [backend_logits(backend, np.asarray(ids)) for ids in sequences])
        row["demo_answer"] = answer(backend)
        report["variants"][name] = row
        print(f"| {name} | {row['max_abs_logit_delta']:.3f} | {row['mean_kl']:.5f} | {row['max_kl']:.4f} | "
              f"{row['top1_agreement']:.1%} | {row['demo_answer'][:60]!r} |", flush=True)
        del backend
    if args.speed_rounds:
        print("| round | kernels | prefill tok/s | decode tok/s |\n|---|---|---:|---:|")
        report["speed"] = speed(paths["int4"], args.speed_rounds)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
