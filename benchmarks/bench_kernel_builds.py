"""Prefill and decode tok/s of one bundle on the native kernels built with different compiler flags, alternating.

    python benchmarks/bench_kernel_builds.py BUNDLE [--builds "=;-mno-avxvnni -mno-avx512vnni"] [--rounds 3]
                                                [--decode-tokens 64]

`--builds`: `;`-separated flag sets added to the kernels' own (an empty set is the default build); each round
runs every build once, in a fresh backend: a 128-token prompt through the kernels' prefill, then greedy
decode steps (under `perf record`, `--builds = --rounds 1 --decode-tokens 400` profiles decode). Same-round ratios are what to read (the machine is shared).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from edgecpm.runtimes.native import decoder, load_library
from edgecpm.runtimes import load_backend


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle")
    parser.add_argument("--builds", default="=;-mno-avxvnni -mno-avx512vnni")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--decode-tokens", type=int, default=64)
    args = parser.parse_args()
    builds = {flags.strip("=") or "(default)": load_library(tuple(flags.strip("=").split())) for flags in args.builds.split(";")}
    prompt = np.arange(100, 228, dtype=np.int64)
    print("| round | build | prefill tok/s | decode tok/s |\n|---|---|---:|---:|")
    for round_number in range(1, args.rounds + 1):
        for name, library in builds.items():
            decoder.load_library = lambda library=library: library
            backend = load_backend(args.bundle, kernels="native", threads=args.threads)
            start = time.perf_counter()
            token = int(backend.prefill(prompt).argmax())
            prefill = len(prompt) / (time.perf_counter() - start)
            start = time.perf_counter()
            for _ in range(args.decode_tokens):
                token = int(backend.decode(token).argmax())
            decode = args.decode_tokens / (time.perf_counter() - start)
            print(f"| {round_number} | {name} | {prefill:.1f} | {decode:.1f} |", flush=True)
            del backend


if __name__ == "__main__":
    main()
