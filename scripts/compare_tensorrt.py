"""Greedy tokens from a bundle's TensorRT engine against onnxruntime (CPU) on the same bundle.

    python scripts/compare_tensorrt.py BUNDLE [--new-tokens 32] [--tie 1e-2] [--prompt TEXT ...]

Each backend generates greedily on its own. The token sequences must agree up to the first step where the
reference's two best logits are within --tie (an fp16 near-tie, where either choice is right); a difference before
that fails (exit 1). Prints one line per prompt, and the largest logit difference over the steps both agree on.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

PROMPTS = ("What is the capital of France?", "Pick up the red cup and put it on the table.",
           "Write one sentence about robots.")


def greedy(backend, prompt_ids: list[int], steps: int) -> tuple[list[int], list[np.ndarray]]:
    backend.reset()
    logits = [backend.prefill(np.asarray(prompt_ids, np.int64))]
    tokens = []
    for _ in range(steps):
        tokens.append(int(np.argmax(logits[-1])))
        if len(tokens) == steps or backend.position + 1 > backend.max_context:
            break
        logits.append(backend.decode(tokens[-1]))
    return tokens, logits


def first_near_tie(logits: list[np.ndarray], tie: float) -> int | None:
    for step, row in enumerate(logits):
        top = np.partition(row, -2)[-2:]
        if abs(float(top[1] - top[0])) <= tie:
            return step
    return None


def compare(bundle: Path, prompts: list[str], steps: int, tie: float) -> bool:
    from edgecpm.runtimes import load_backend

    from edgecpm.api import load
    from edgecpm.bundle import read_manifest

    manifest = read_manifest(bundle)
    engine = load(bundle, kernels="onnxruntime")
    raw = not manifest.tokenizer.get("chat_template_file")
    reference, candidate = (load_backend(bundle, manifest, kernels=kernels)
                                      for kernels in ("onnxruntime", "tensorrt"))
    ok = True
    for prompt in prompts:
        ids = engine.prompt_ids(prompt, raw=raw)
        ref_tokens, ref_logits = greedy(reference, ids, steps)
        got_tokens, got_logits = greedy(candidate, ids, steps)
        differ = next((i for i, (a, b) in enumerate(zip(ref_tokens, got_tokens)) if a != b), None)
        tie_at = first_near_tie(ref_logits, tie)
        agree = len(ref_tokens) if differ is None else differ
        diff = max(float(np.abs(r - g).max()) for r, g in zip(ref_logits[:agree + 1], got_logits[:agree + 1]))
        passed = differ is None or (tie_at is not None and differ >= tie_at)
        ok &= passed
        where = "all agree" if differ is None else f"first difference at step {differ}"
        tie_note = "" if tie_at is None else f", first near-tie at step {tie_at}"
        print(f"{'ok  ' if passed else 'FAIL'} {bundle.name}: {prompt[:40]!r}: {len(ref_tokens)} tokens, {where}{tie_note}, "
              f"max |logit diff| {diff:.4f}")
    candidate.close()
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--tie", type=float, default=1e-2)
    parser.add_argument("--prompt", action="append", help="a prompt (repeatable; default: three built-in ones)")
    args = parser.parse_args(argv)
    return 0 if compare(args.bundle, args.prompt or list(PROMPTS), args.new_tokens, args.tie) else 1


if __name__ == "__main__":
    sys.exit(main())
