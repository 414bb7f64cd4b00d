"""Long-context speed of InfLLM v2 sparse vs dense attention on the native kernels (MiniCPM4-0.5B shape, int4).

    python benchmarks/bench_long_context.py [--cache /work/bench_cache] [--lengths 4096,8192,16384,32768]
                                            [--decode-tokens 32] [--chunk 64] [--rounds 2] [--threads 2]

The checkpoint is bench_minicpm4_shape.py's (MiniCPM4-0.5B's shapes, LongRoPE to 32K, random BitCPM-style
weights), exported int4 (RTN, block 32) with max context 32768 and OpenBMB's InfLLM v2 sparse_config for MiniCPM4
(kernel 32/16, block 64, 1 init block, window 2048, topk 64, dense_len 8192; spec §6.1).

What is measured, per context length L, in one process, dense and sparse alternating (`--rounds`):
- decode: tok/s of `--decode-tokens` single-token steps, the last of which makes L tokens;
- prefill at depth: tok/s of one `--chunk`-token prompt pass just before them (the marginal prefill rate at that
  depth: what each further chunk of a long prompt costs there).
The cache is filled with random keys and values instead of by prefilling L tokens first: a decode step's cost
depends on how many positions it reads, not their values, and a dense 32K prompt on 2 cores takes longer than
this whole benchmark. The first sparse step compresses the whole filled history once (as the crossing of
dense_len does); it is a warm-up, not timed. Random weights make block selection arbitrary: the speeds are
those of the selection and of the blocks read, which is what the roofline counts.

`--llama-gguf` (a Q4_0 GGUF of the same shapes as a Llama, e.g. make_llama_shape_gguf.py's quantized by llama.cpp)
adds llama.cpp's dense decode at `--peer-lengths`: it cannot start from a filled cache, so it first prefills the
whole prompt (random token ids; its prefill rate is over the whole prompt, not at depth), then decodes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bandwidth import read_bandwidth  # noqa: E402
from bench_minicpm4_shape import write_checkpoint  # noqa: E402

MAX_CONTEXT = 32768
MINICPM4_SPARSE = {"kernel_size": 32, "kernel_stride": 16, "block_size": 64, "init_blocks": 1, "window_size": 2048,
                   "topk": 64, "use_nope": False, "dense_len": 8192}


def bundle_path(cache: Path) -> Path:
    from edgecpm.export import export_checkpoint
    from edgecpm.quant import QuantSpec
    from edgecpm.sparse.choice import AttentionChoice

    bundle = cache / "edgecpm-minicpm4-0.5b-int4-32k"
    if not (bundle / "edgecpm.json").is_file():
        checkpoint = write_checkpoint(cache / "minicpm4-0.5b-shape")
        export_checkpoint(checkpoint, bundle, max_context=MAX_CONTEXT, overwrite=bundle.exists(),
                          quant=QuantSpec("int4", method="rtn", block_size=32), quality_tokens=64,
                          attention=AttentionChoice("sparse", MINICPM4_SPARSE))
    return bundle


def fill(backend, length: int, rng: np.random.Generator) -> None:
    """L cached positions of random keys and values (unit-scale, as normed projections give)."""
    backend.reset()
    for array in backend.kv.arrays:
        array[..., :length, :] = rng.standard_normal(array[..., :length, :].shape, np.float32)
    backend.kv.position = length


def measure(backend, length: int, decode_tokens: int, chunk: int, rng: np.random.Generator) -> dict:
    """The prompt chunk ends `decode_tokens` before `length`, the decode steps at it (the last one's total: `length`)."""
    vocab, start = backend.vocab_size, length - decode_tokens - chunk
    fill(backend, start, rng)
    backend.decode(int(rng.integers(vocab)))  # warm-up; a sparse backend compresses the filled history here
    backend.truncate(start)
    tokens = rng.integers(100, vocab, chunk)
    started = time.perf_counter()
    backend.prefill(tokens)
    prefill = chunk / (time.perf_counter() - started)
    started = time.perf_counter()
    for _ in range(decode_tokens):
        backend.decode(int(rng.integers(100, vocab)))
    decode = decode_tokens / (time.perf_counter() - started)
    return {"prefill_tokens_per_second": prefill, "decode_tokens_per_second": decode}


def kv_bytes_read(backend, length: int, sparse: bool) -> int:
    """Key and value bytes one decode step reads at L cached positions (sparse: the selected blocks, at most)."""
    per_position = sum(array[..., :1, :].nbytes for array in backend.kv.arrays)
    if not sparse:
        return per_position * length
    blocks = MINICPM4_SPARSE["topk"] + MINICPM4_SPARSE["window_size"] // MINICPM4_SPARSE["block_size"]
    return per_position * min(length, blocks * MINICPM4_SPARSE["block_size"]) + backend.decoder.sparse_bytes * length // MAX_CONTEXT


def measure_llama_cpp(gguf: Path, length: int, decode_tokens: int, threads: int, rng: np.random.Generator) -> dict:
    """llama-cpp-python, n_ctx = length, prompt in batches of 512, KV at llama.cpp's default fp16."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=length, n_batch=512, n_ubatch=512, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    try:
        prompt = rng.integers(100, llm.n_vocab(), length - decode_tokens).tolist()
        started = time.perf_counter()
        llm.eval(prompt)
        prefill = len(prompt) / (time.perf_counter() - started)
        started = time.perf_counter()
        for _ in range(decode_tokens - 1):
            llm.eval([int(rng.integers(100, llm.n_vocab()))])
        decode = (decode_tokens - 1) / (time.perf_counter() - started)
    finally:
        llm.close()
    return {"prefill_tokens_per_second": prefill, "decode_tokens_per_second": decode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path("/work/bench_cache"))
    parser.add_argument("--lengths", default="4096,8192,16384,32768")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    parser.add_argument("--llama-gguf", type=Path, help="llama.cpp's dense decode on this GGUF too (see above)")
    parser.add_argument("--peer-lengths", default="32768")
    args = parser.parse_args()

    from edgecpm.runtimes import load_backend
    from edgecpm.sparse.choice import AttentionChoice

    bundle = bundle_path(args.cache)
    backends = {mode: load_backend(bundle, kernels="native", threads=args.threads, attention=AttentionChoice(mode))
                for mode in ("dense", "sparse")}
    assert {mode: b.kernels["attention"] for mode, b in backends.items()} == {"dense": "dense", "sparse": "sparse"}
    weights = backends["dense"].decoder.streamed_bytes
    bandwidth = read_bandwidth(1.0, args.threads, 5)
    rng = np.random.default_rng(0)
    lengths = [int(x) for x in args.lengths.split(",")]
    samples: dict[tuple[str, int], list[dict]] = {}
    for _ in range(args.rounds):
        for length in lengths:
            for mode, backend in backends.items():  # dense and sparse alternate at each length
                samples.setdefault((mode, length), []).append(measure(backend, length, args.decode_tokens, args.chunk, rng))
    rows = []
    for length in lengths:
        row = {"length": length}
        for mode in backends:
            for key in ("prefill_tokens_per_second", "decode_tokens_per_second"):
                row[f"{mode}_{key}"] = statistics.median(s[key] for s in samples[(mode, length)])
            row[f"{mode}_bytes_per_step"] = weights + kv_bytes_read(backends[mode], length, mode == "sparse")
        rows.append(row)
    print(f"read bandwidth: {bandwidth / 1e9:.1f} GB/s ({args.threads} threads); weights read per step: {weights / 1e6:.0f} MB")
    print("| cached tokens | dense decode tok/s | sparse decode tok/s | sparse/dense | dense prefill tok/s (at depth) | "
          "sparse prefill tok/s | sparse/dense | MB read per step, dense / sparse |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['length']} | {row['dense_decode_tokens_per_second']:.1f} | {row['sparse_decode_tokens_per_second']:.1f} | "
              f"{row['sparse_decode_tokens_per_second'] / row['dense_decode_tokens_per_second']:.2f}x | "
              f"{row['dense_prefill_tokens_per_second']:.1f} | {row['sparse_prefill_tokens_per_second']:.1f} | "
              f"{row['sparse_prefill_tokens_per_second'] / row['dense_prefill_tokens_per_second']:.2f}x | "
              f"{row['dense_bytes_per_step'] / 1e6:.0f} / {row['sparse_bytes_per_step'] / 1e6:.0f} |")
    first, last = rows[0], rows[-1]
    print(f"sparse decode at {last['length']} vs its own at {first['length']}: "
          f"{first['sparse_decode_tokens_per_second'] / last['sparse_decode_tokens_per_second']:.2f}x slower")
    peers = {}
    for length in (int(x) for x in args.peer_lengths.split(",")) if args.llama_gguf else ():
        peers[length] = measure_llama_cpp(args.llama_gguf, length, args.decode_tokens, args.threads, rng)
        ours = next((row for row in rows if row["length"] == length), None)
        ratio = "" if ours is None else (f"; edgecpm sparse / llama.cpp decode: "
                                         f"{ours['sparse_decode_tokens_per_second'] / peers[length]['decode_tokens_per_second']:.2f}x")
        print(f"llama.cpp Q4_0, {length} tokens: prefill {peers[length]['prefill_tokens_per_second']:.1f} tok/s "
              f"(whole prompt), decode {peers[length]['decode_tokens_per_second']:.1f} tok/s{ratio}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "samples": {f"{m}-{n}": s for (m, n), s in samples.items()},
                                         "llama_cpp": peers}, indent=1))


if __name__ == "__main__":
    main()
