"""Sustained memory read bandwidth of this machine, for the roofline column of docs/BENCHMARKS.md.

    python benchmarks/bandwidth.py [--gib 1] [--threads 2] [--repeats 5]

Each thread takes the maximum of its share of a buffer much larger than the CPU caches (numpy releases the GIL inside
the reduction), so the figure is what a decode step that streams every weight once can hope for.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def read_bandwidth(gib: float, threads: int, repeats: int) -> float:
    data = np.ones(int(gib * (1 << 30)) // 4, dtype=np.float32)
    shares = np.array_split(data, threads)
    rates = []
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(np.max, shares))  # warm-up: page faults
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(np.max, shares))
            rates.append(data.nbytes / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rate = read_bandwidth(args.gib, args.threads, args.repeats)
    print(json.dumps({"threads": args.threads, "read_gb_per_second": round(rate / 1e9, 2)}))


if __name__ == "__main__":
    main()
