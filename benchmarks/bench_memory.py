"""Resident memory and speed of a bundle per `--kernels` choice, each in a fresh process.

    python benchmarks/bench_memory.py BUNDLE [BUNDLE ...] [--kernels onnxruntime,auto] [--prompt-tokens 100]
                                      [--new-tokens 64] [--threads 2]

Per (bundle, kernels): load, one warm-up prefill, best-of-3 prefill, then greedy decode steps; prints resident
set size after the run (VmRSS) and its peak (VmHWM) from /proc/self/status, which count the process's weights
however they are held (onnxruntime's prepacked copy, the native kernels' interleaved copy, mapped file pages).
The KV buffers at the bundle's max context are part of both.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time
import numpy as np
from pathlib import Path
from edgecpm.runtimes import load_backend

bundle, kernels, prompt_tokens, new_tokens, threads = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
backend = load_backend(Path(bundle), threads=threads, kernels=kernels)
prompt = np.asarray((np.arange(prompt_tokens) * 37 + 11) % 1000 + 100, dtype=np.int64)
backend.prefill(prompt)
best = float("inf")
for _ in range(3):
    backend.reset()
    start = time.perf_counter()
    logits = backend.prefill(prompt)
    best = min(best, time.perf_counter() - start)
token, start = int(logits.argmax()), time.perf_counter()
for _ in range(new_tokens):
    token = int(backend.decode(token).argmax())
decode = new_tokens / (time.perf_counter() - start)
status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
mb = lambda key: int(status[key].split()[0]) / 1024
print(json.dumps({"bundle": bundle, "kernels": kernels, "ran": backend.kernels, "prefill_tokens_per_second": prompt_tokens / best,
                  "decode_tokens_per_second": decode, "rss_mb": mb("VmRSS"), "peak_rss_mb": mb("VmHWM")}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="+")
    parser.add_argument("--kernels", default="onnxruntime,auto")
    parser.add_argument("--prompt-tokens", type=int, default=100)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print("| bundle | kernels (prefill / decode) | resident MB | peak MB | prefill tok/s | decode tok/s |")
    print("|---|---|---:|---:|---:|---:|")
    for bundle in args.bundles:
        for kernels in args.kernels.split(","):
            out = subprocess.run([sys.executable, "-c", CHILD, bundle, kernels, str(args.prompt_tokens),
                                  str(args.new_tokens), str(args.threads)], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {Path(bundle).name} | {kernels} ({r['ran']['prefill']} / {r['ran']['decode']}) | {r['rss_mb']:.0f} | "
                  f"{r['peak_rss_mb']:.0f} | {r['prefill_tokens_per_second']:.0f} | {r['decode_tokens_per_second']:.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
