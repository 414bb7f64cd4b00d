"""A short probe of this machine's sustained memory read bandwidth: the denominator of a decode roofline.

Each thread takes the maximum of its share of a buffer much larger than the CPU caches (numpy releases the GIL inside
the reduction), so the figure is what a decode step that streams every weight once can hope for. The same method as
benchmarks/bandwidth.py (docs/BENCHMARKS.md's roofline column).
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np


def read_bandwidth(gib: float = 1.0, threads: int = 2, repeats: int = 5) -> dict[str, Any]:
    """{"bytes", "threads", "samples_gb_per_second", "gb_per_second" (their median), "method"}."""
    data = np.ones(max(int(gib * (1 << 30)) // 4, 1024), dtype=np.float32)
    shares = np.array_split(data, threads)
    rates = []
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(np.max, shares))  # warm-up: page faults
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(np.max, shares))
            rates.append(data.nbytes / (time.perf_counter() - start) / 1e9)
    return {"bytes": int(data.nbytes), "threads": threads, "samples_gb_per_second": rates,
            "gb_per_second": statistics.median(rates),
            "method": "numpy max over a float32 buffer, one share per thread, median of the repeats"}
