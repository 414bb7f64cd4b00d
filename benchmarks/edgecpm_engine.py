"""Decode/prefill throughput of an edgecpm bundle through the onnxruntime Backend (no generation loop).

    python benchmarks/edgecpm_engine.py BUNDLE [--prompt-tokens 100] [--new-tokens 128] [--repeats 3] [--threads N]
                                               [--no-spin] [--no-prepack] [--kernels onnxruntime|native]

`run_edgecpm` is what the peer comparison (benchmarks/bench_decode.py) calls: greedy decoding, timed
separately for the prefill and for the decode steps (argmax included, as any generation loop pays it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np


def run_edgecpm(bundle_dir, prompt_ids, new_tokens: int, *, threads: int | None = None, backend=None, **options) -> dict:
    """One greedy run; `options` go to load_backend (prepack=, spin=). Pass `backend` to reuse a session."""
    from edgecpm.runtimes import load_backend

    backend = backend or load_backend(Path(bundle_dir), threads=threads, **options)
    backend.reset()
    prompt = np.asarray(prompt_ids, dtype=np.int64)
    start = time.perf_counter()
    logits = backend.prefill(prompt)
    prefill_s = time.perf_counter() - start
    tokens = [int(logits.argmax())]
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        tokens.append(int(backend.decode(tokens[-1]).argmax()))
    decode_s = time.perf_counter() - start
    return {
        "prefill_tokens_per_second": len(prompt) / prefill_s,
        "decode_tokens_per_second": (new_tokens - 1) / decode_s if new_tokens > 1 else float("nan"),
        "token_ids": tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--prompt-tokens", type=int, default=100)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-spin", dest="spin", action="store_false", help="no intra-op spinning (shared machine)")
    parser.add_argument("--no-prepack", dest="prepack", action="store_const", const=False, default=None,
                        help="keep weights unpacked (default: the runtime's choice per flavour)")
    parser.add_argument("--kernels", default="onnxruntime", help="who runs decode steps (onnxruntime, native)")
    args = parser.parse_args()
    from edgecpm.runtimes import load_backend

    backend = load_backend(Path(args.bundle), threads=args.threads, spin=args.spin, prepack=args.prepack,
                           kernels=args.kernels)
    prompt = (np.arange(args.prompt_tokens) * 37 + 11) % 1000 + 100  # deterministic ordinary-token prompt
    run_edgecpm(args.bundle, prompt, 8, backend=backend)  # warm-up (first-run allocations, thread pool)
    runs = [run_edgecpm(args.bundle, prompt, args.new_tokens, backend=backend) for _ in range(args.repeats)]
    print(json.dumps({
        "bundle": args.bundle,
        "kernels": args.kernels,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "prefill_tokens_per_second": statistics.median(r["prefill_tokens_per_second"] for r in runs),
        "decode_tokens_per_second": statistics.median(r["decode_tokens_per_second"] for r in runs),
        "runs_decode": [round(r["decode_tokens_per_second"], 2) for r in runs],
    }, indent=2))


if __name__ == "__main__":
    main()


# ---- engines for benchmarks/bench_decode.py (same contract as benchmarks/peers.py) -----------------------


def ensure_bundle(hf_dir: Path, bundle: Path, **export_options) -> Path:
    """Exports the peers' HF weights once (outside every timing); a finished bundle is reused."""
    from edgecpm.bundle import MANIFEST_NAME
    from edgecpm.export import export_checkpoint

    if not (bundle / MANIFEST_NAME).is_file():
        export_checkpoint(hf_dir, bundle, max_context=2048, overwrite=bundle.exists(), **export_options)
    return bundle


def peer_engine(name: str, *, load_options: dict | None = None, **export_options):
    """An engine function for bench_decode's registry: greedy with EOS masked, prefill/decode timed apart."""

    def run(paths: dict, prompt: list[int], new_tokens: int = 128, runs: int = 3, threads: int = 2) -> dict:
        import peers
        from edgecpm.runtimes import load_backend

        bundle = ensure_bundle(Path(paths["hf"]), Path(paths["hf"]).parent / f"edgecpm-{name}", **export_options)
        backend = load_backend(bundle, threads=threads, **(load_options or {}))
        prompt_ids = np.asarray(prompt, dtype=np.int64)

        def one_run() -> dict:
            backend.reset()
            start = time.perf_counter()
            tokens = [peers._argmax_no_eos(backend.prefill(prompt_ids))]
            prefill_s = time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(new_tokens - 1):
                tokens.append(peers._argmax_no_eos(backend.decode(tokens[-1])))
            return {"prefill_seconds": prefill_s, "decode_seconds": time.perf_counter() - start, "token_ids": tokens}

        return peers._repeat(f"edgecpm-{name}", one_run, len(prompt), new_tokens, runs)

    return run
