"""Quality of InfLLM v2 sparse attention on the real model: needle depths and long-text perplexity, sparse vs dense.

    python benchmarks/long_context_quality.py BUNDLE [--haystack 6000] [--depths 0.1,0.3,0.5,0.7,0.9]
                                                      [--sparse dense_len=1024 --sparse dense_len=1024,topk=16,window_size=512]

BUNDLE: SmolLM2-135M-Instruct exported with an 8K context, e.g.
`edgecpm export $(python -c 'from edgecpm.resources import default_model_path; print(default_model_path())') -o b --quant int4 --max-context 8192`.
Each --sparse is one sparse_config (fields over InfLLM v2's defaults) compared with dense attention on the native
kernels. Perplexity runs edgecpm/data's shipped texts (edgecpm.sparse.haystack.long_evaluation_text) token by token,
so every position has its logits; it is reported over all positions and over those at or past dense_len, where the
sparse model attends sparsely.
"""

from __future__ import annotations

import argparse
import math

import numpy as np

NEEDLE, ANSWER, QUESTION = "The secret password is 7291.", "7291", "What is the secret password?"


def parse_fields(text: str) -> dict[str, int]:
    return {key: int(value) for key, value in (pair.split("=") for pair in text.split(","))}


def token_log_probs(backend, ids: np.ndarray) -> np.ndarray:
    """log p(ids[t + 1] | ids[:t + 1]) for every t, decoding one token at a time."""
    backend.reset()
    out = np.empty(len(ids) - 1)
    for t in range(len(ids) - 1):
        logits = backend.decode(int(ids[t])).astype(np.float64)
        top = logits.max()
        out[t] = logits[ids[t + 1]] - top - math.log(np.exp(logits - top).sum())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--haystack", type=int, default=6000)
    parser.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    parser.add_argument("--sparse", action="append", default=None)
    parser.add_argument("--skip-perplexity", action="store_true")
    args = parser.parse_args()

    import edgecpm
    from edgecpm.sparse.haystack import haystack_with_needle, long_evaluation_text

    configs = {text: parse_fields(text) for text in (args.sparse or ["dense_len=1024"])}
    engines = {"dense": edgecpm.load(args.bundle, attention="dense")}
    engines.update({name: edgecpm.load(args.bundle, attention="sparse", sparse_config=fields) for name, fields in configs.items()})
    tokenizer = engines["dense"].tokenizer
    print(f"| depth | prompt tokens | {' | '.join(engines)} |")
    print(f"|---:|---:|{'---|' * len(engines)}")
    for depth in (float(x) for x in args.depths.split(",")):
        prompt = haystack_with_needle(tokenizer, args.haystack, NEEDLE, depth) + "\n\n" + QUESTION
        answers, length = [], 0
        for engine in engines.values():
            result = list(engine.stream(prompt, max_new_tokens=16))[-1].result
            length = len(result.prompt_token_ids)
            answers.append(("found: " if ANSWER in result.text else "missed: ") + result.text.strip().replace("|", "/"))
        print(f"| {depth} | {length} | {' | '.join(answers)} |", flush=True)
    if args.skip_perplexity:
        return
    ids = np.asarray(tokenizer.encode(long_evaluation_text()), dtype=np.int64)
    ids = ids[: engines["dense"].manifest.max_context]
    print(f"\nperplexity over {len(ids)} tokens of edgecpm/data's texts")
    print("| attention | all positions | positions >= dense_len (dense there) |")
    print("|---|---:|---:|")
    dense = token_log_probs(engines["dense"].backend, ids)
    print(f"| dense | {math.exp(-dense.mean()):.3f} | |", flush=True)
    for name, fields in configs.items():
        engine = engines[name]
        sparse = token_log_probs(engine.backend, ids)
        start = fields.get("dense_len", 8192) - 1  # the first position whose step has dense_len tokens
        print(f"| sparse {name} | {math.exp(-sparse.mean()):.3f} | {math.exp(-sparse[start:].mean()):.3f} "
              f"({math.exp(-dense[start:].mean()):.3f}) |", flush=True)


if __name__ == "__main__":
    main()
