"""Long-context speed of InfLLM v2 sparse vs dense attention on the native kernels (MiniCPM4-0.5B shape, int4).

    python benchmarks/bench_long_context.py [--cache /work/bench_cache] [--lengths 4096,8192,16384,32768]
                                            [--decode-tokens 32] [--chunk 64] [--rounds 2] [--threads 2]
                                            [--llama-gguf Q4_0.gguf] [--ortgenai-dir DIR [--ortgenai-check]]
                                            [--peer-lengths 32768] [--kv-caches float32,float16] [--json OUT]

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

`--ortgenai-dir` (the int4 onnxruntime-genai folder prepare_weights.py's make_hf_dir and make_ortgenai build from the
same Llama twin's F16 GGUF, e.g. /work/bench_cache/llama-0.5b-shape/ortgenai-int4; context_length 32768)
adds onnxruntime-genai's dense decode at `--peer-lengths`. genai cannot start from a filled cache either, and its
32K prompt would take about as long as llama.cpp's (one pass would also need a [16, 32K, 32K] score matrix), so its
decode step is measured the way genai runs it rather than through its Generator: the builder's model.onnx in a plain
onnxruntime session with the session options genai gives it on CPU (genai_config.json's; intra_op = --threads,
inter_op 1 as peers.py overlays), its KV cache in genai's past-present-share-buffer mode (one max_length buffer per
past_key_values.* input, bound by IOBinding as that input and as its present output, so GroupQueryAttention writes
the new position in place and nothing is copied), filled with random N(0, 1) keys and values like edgecpm's, then
`--decode-tokens` greedy single-token steps (input_ids, the all-ones attention_mask over the total length that genai
feeds at batch 1), the last of which makes L tokens. It is onnxruntime-genai's graph, kernels and session options;
only the Generator's bookkeeping around Run is ours. `--ortgenai-check` shows that this is faithful: on a 64-token
prompt (the cache filled by running the graph on it) and 8 decode steps the stepped graph gives genai's Generator's
logits and greedy tokens, and at 2048 tokens it decodes as fast as the Generator does after a real 2016-token prompt
(3 alternating runs each).
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
from peers import _argmax_no_eos, _run_ortgenai  # noqa: E402

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


class GenaiGraph:
    """onnxruntime-genai's decoder graph in plain onnxruntime, fed as genai's Generator feeds it on CPU (see above)."""

    def __init__(self, model_dir: Path, threads: int):
        import onnxruntime as ort

        config = json.loads((model_dir / "genai_config.json").read_text())["model"]
        decoder = config["decoder"]
        session_options = decoder["session_options"]
        if session_options.get("provider_options"):
            raise SystemExit(f"{model_dir} is not a CPU build (provider_options: {session_options['provider_options']})")
        options = ort.SessionOptions()  # what genai's CreateSessionOptionsFromConfig sets for this config
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.logid = session_options.get("log_id", "")
        options.add_session_config_entry("session.use_env_allocators", "1")
        self.session = ort.InferenceSession(str(model_dir / decoder["filename"]), options, providers=["CPUExecutionProvider"])
        self.inputs, self.outputs = decoder["inputs"], decoder["outputs"]
        self.kv_shape = (decoder["num_hidden_layers"], decoder["num_key_value_heads"], decoder["head_size"])
        self.vocab_size = config["vocab_size"]
        graph_inputs = {i.name for i in self.session.get_inputs()}
        fed = {self.inputs[k] for k in ("input_ids", "attention_mask", "position_ids") if self.inputs.get(k) in graph_inputs}
        fed |= {self.inputs[k] % layer for k in ("past_key_names", "past_value_names") for layer in range(self.kv_shape[0])}
        if graph_inputs != fed:  # e.g. seqlens_k / total_sequence_length graphs: not fed by run() yet
            raise SystemExit(f"model.onnx has inputs this harness does not feed: {sorted(graph_inputs - fed)}")
        self.has_position_ids = self.inputs.get("position_ids") in graph_inputs

    def reset(self, max_length: int) -> None:
        """Empty share-buffers of max_length positions (genai sizes them by the Generator's max_length), bound in place."""
        import onnxruntime as ort

        layers, kv_heads, head_size = self.kv_shape
        self.binding = self.session.io_binding()
        self.kv = []  # (array, OrtValue over it): the OrtValue borrows the array's memory, both stay alive
        for layer in range(layers):
            for past, present in (("past_key_names", "present_key_names"), ("past_value_names", "present_value_names")):
                array = np.zeros((1, kv_heads, max_length, head_size), np.float32)
                value = ort.OrtValue.ortvalue_from_numpy(array)
                self.binding.bind_ortvalue_input(self.inputs[past] % layer, value)
                self.binding.bind_ortvalue_output(self.outputs[present] % layer, value)
                self.kv.append((array, value))
        self.mask = np.ones(max_length, np.int64)
        self.logits = np.empty((1, 0, self.vocab_size), np.float32)
        self.length = 0

    def run(self, tokens: list[int]) -> np.ndarray:
        """One forward pass of `tokens` after the `length` cached positions; the last position's logits."""
        import onnxruntime as ort

        count, total = len(tokens), self.length + len(tokens)
        feeds = {"input_ids": np.asarray(tokens, np.int64).reshape(1, count),
                 "attention_mask": self.mask[:total].reshape(1, total)}
        if self.has_position_ids:
            feeds["position_ids"] = np.arange(self.length, total, dtype=np.int64).reshape(1, count)
        values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in feeds.items()}
        for name, value in values.items():
            self.binding.bind_ortvalue_input(self.inputs[name], value)
        if self.logits.shape[1] != count:  # one preallocated logits buffer per shape, as genai keeps one
            self.logits = np.empty((1, count, self.vocab_size), np.float32)
            self.binding.bind_ortvalue_output(self.outputs["logits"], ort.OrtValue.ortvalue_from_numpy(self.logits))
        self.session.run_with_iobinding(self.binding)
        self.length = total
        return self.logits[0, -1]


def measure_ortgenai(graph: GenaiGraph, length: int, decode_tokens: int, rng: np.random.Generator) -> dict:
    """`decode_tokens` greedy steps (EOS masked, as peers.py's min_length does) after length - decode_tokens random
    cached positions, the last step making `length`; buffers of `length` positions, as a Generator of that max_length."""
    start = length - decode_tokens
    graph.reset(length)
    for array, _ in graph.kv:
        array[..., :start, :] = rng.standard_normal(array[..., :start, :].shape, np.float32)
    token = int(rng.integers(100, graph.vocab_size))
    graph.length = start
    graph.run([token])  # warm-up (first run with these bindings); its position is written again below
    graph.length = start
    started = time.perf_counter()
    for _ in range(decode_tokens):
        token = _argmax_no_eos(graph.run([token]))
    return {"decode_tokens_per_second": decode_tokens / (time.perf_counter() - started)}


def generator_steps(model_dir: Path, threads: int, prompt: list[int], steps: int) -> tuple[list[np.ndarray], list[int]]:
    """onnxruntime-genai's own Generator (peers.py's settings): the prompt's logits and `steps` decode steps' logits,
    and the steps + 1 greedy tokens picked from them."""
    import onnxruntime_genai as og

    config = og.Config(str(model_dir))
    config.clear_providers()  # CPU
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    model = og.Model(config)
    total = len(prompt) + steps + 1
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=total, min_length=total, batch_size=1)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    logits, tokens = [], []
    for _ in range(steps + 1):
        # get_logits() runs the forward pass of the last picked token if it has not run yet (the prompt's after
        # append_tokens), so these are the logits the next generate_next_token picks from.
        logits.append(np.array(generator.get_logits(), np.float32).reshape(-1))
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return logits, tokens


def check_ortgenai(graph: GenaiGraph, model_dir: Path, threads: int, decode_tokens: int, rng: np.random.Generator,
                   prompt_tokens: int = 64, steps: int = 8, length: int = 2048, pairs: int = 3) -> dict:
    """The stepped graph against genai's Generator: the same logits and greedy tokens on a short prompt (the cache
    filled by the graph itself), and the same decode speed at `length` (the Generator after a real prompt; medians
    of `pairs` alternating Generator and graph runs, as this VM's neighbour moves single runs by 5-30%)."""
    prompt = rng.integers(100, graph.vocab_size, prompt_tokens).tolist()
    theirs, their_tokens = generator_steps(model_dir, threads, prompt, steps)
    graph.reset(prompt_tokens + steps + 1)
    ours, our_tokens = [graph.run(prompt).copy()], []
    for _ in range(steps):
        our_tokens.append(_argmax_no_eos(ours[-1]))
        ours.append(graph.run([our_tokens[-1]]).copy())
    our_tokens.append(_argmax_no_eos(ours[-1]))
    difference = max(float(np.abs(a - b).max()) for a, b in zip(ours, theirs))
    speeds = {"generator": [], "graph": []}
    for _ in range(pairs):
        prompt = rng.integers(100, graph.vocab_size, length - decode_tokens).tolist()
        generator = _run_ortgenai("onnxruntime-genai-int4", model_dir, prompt, decode_tokens + 1, runs=1, threads=threads)
        speeds["generator"].append(generator["decode_tokens_per_second"])
        speeds["graph"].append(measure_ortgenai(graph, length, decode_tokens, rng)["decode_tokens_per_second"])
    return {"prompt_tokens": prompt_tokens, "steps": steps, "max_abs_logit_difference": difference,
            "max_abs_logit": float(max(np.abs(a).max() for a in theirs)), "same_tokens": our_tokens == their_tokens,
            "tokens": our_tokens, "generator_tokens": their_tokens, "length": length, "decode_tokens_per_second": speeds,
            "generator_decode_tokens_per_second": statistics.median(speeds["generator"]),
            "graph_decode_tokens_per_second": statistics.median(speeds["graph"])}


def versus(rows: list[dict], length: int, peer: dict, name: str) -> str:
    """edgecpm's sparse decode over a peer's, where edgecpm measured that length too."""
    ours = next((row for row in rows if row["length"] == length), None)
    return "" if ours is None else (f"; edgecpm sparse / {name} decode: "
                                    f"{ours['sparse_decode_tokens_per_second'] / peer['decode_tokens_per_second']:.2f}x")


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
    parser.add_argument("--ortgenai-dir", type=Path, help="onnxruntime-genai's dense decode on this int4 folder too (see above)")
    parser.add_argument("--ortgenai-check", action="store_true", help="first check the onnxruntime-genai harness (see above)")
    parser.add_argument("--peer-lengths", default="32768")
    parser.add_argument("--kv-caches", default="float32", help="edgecpm's KV caches to measure, e.g. float32,float16")
    args = parser.parse_args()

    from edgecpm.runtimes import load_backend
    from edgecpm.sparse.choice import AttentionChoice

    bundle = bundle_path(args.cache)
    kv_caches = args.kv_caches.split(",")
    backends = {(mode, kv): load_backend(bundle, kernels="native", threads=args.threads, attention=AttentionChoice(mode),
                                         kv_cache=kv) for kv in kv_caches for mode in ("dense", "sparse")}
    assert all(b.kernels["attention"] == mode and b.kernels["kv_cache"] == kv for (mode, kv), b in backends.items())
    weights = backends["dense", kv_caches[0]].decoder.streamed_bytes
    bandwidth = read_bandwidth(1.0, args.threads, 5)
    rng = np.random.default_rng(0)
    lengths = [int(x) for x in args.lengths.split(",")]
    samples: dict[tuple[str, str, int], list[dict]] = {}
    for _ in range(args.rounds):
        for length in lengths:
            for (mode, kv), backend in backends.items():  # dense and sparse (and KV caches) alternate at each length
                samples.setdefault((mode, kv, length), []).append(
                    measure(backend, length, args.decode_tokens, args.chunk, rng))
    rows = []
    for kv in kv_caches:
        for length in lengths:
            row = {"length": length, "kv_cache": kv}
            for mode in ("dense", "sparse"):
                for key in ("prefill_tokens_per_second", "decode_tokens_per_second"):
                    row[f"{mode}_{key}"] = statistics.median(s[key] for s in samples[(mode, kv, length)])
                row[f"{mode}_bytes_per_step"] = weights + kv_bytes_read(backends[mode, kv], length, mode == "sparse")
            rows.append(row)
    print(f"read bandwidth: {bandwidth / 1e9:.1f} GB/s ({args.threads} threads); weights read per step: {weights / 1e6:.0f} MB")
    print("| KV cache | cached tokens | dense decode tok/s | sparse decode tok/s | sparse/dense | dense prefill tok/s (at depth) | "
          "sparse prefill tok/s | sparse/dense | MB read per step, dense / sparse |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['kv_cache']} | {row['length']} | {row['dense_decode_tokens_per_second']:.1f} | "
              f"{row['sparse_decode_tokens_per_second']:.1f} | "
              f"{row['sparse_decode_tokens_per_second'] / row['dense_decode_tokens_per_second']:.2f}x | "
              f"{row['dense_prefill_tokens_per_second']:.1f} | {row['sparse_prefill_tokens_per_second']:.1f} | "
              f"{row['sparse_prefill_tokens_per_second'] / row['dense_prefill_tokens_per_second']:.2f}x | "
              f"{row['dense_bytes_per_step'] / 1e6:.0f} / {row['sparse_bytes_per_step'] / 1e6:.0f} |")
    for kv in kv_caches:
        first, *_, last = [row for row in rows if row["kv_cache"] == kv] * 2  # a single length: itself twice
        print(f"{kv} KV: sparse decode at {last['length']} vs its own at {first['length']}: "
              f"{first['sparse_decode_tokens_per_second'] / last['sparse_decode_tokens_per_second']:.2f}x slower")
    rows_first_kv = [row for row in rows if row["kv_cache"] == kv_caches[0]]  # what the peers are set against
    peer_lengths = [int(x) for x in args.peer_lengths.split(",")]
    llama = {}
    for length in peer_lengths if args.llama_gguf else ():
        llama[length] = measure_llama_cpp(args.llama_gguf, length, args.decode_tokens, args.threads, rng)
        print(f"llama.cpp Q4_0, {length} tokens: prefill {llama[length]['prefill_tokens_per_second']:.1f} tok/s "
              f"(whole prompt), decode {llama[length]['decode_tokens_per_second']:.1f} tok/s"
              f"{versus(rows_first_kv, length, llama[length], 'llama.cpp')}", flush=True)
    ortgenai, check = {}, None
    graph = GenaiGraph(args.ortgenai_dir, args.threads) if args.ortgenai_dir else None
    if graph and args.ortgenai_check:
        check = check_ortgenai(graph, args.ortgenai_dir, args.threads, args.decode_tokens, rng)
        print(f"onnxruntime-genai harness check: {check['prompt_tokens']}-token prompt + {check['steps']} steps, "
              f"max |logit difference| {check['max_abs_logit_difference']:.3g} (max |logit| {check['max_abs_logit']:.3g}), "
              f"same greedy tokens: {check['same_tokens']}; decode at {check['length']} tokens: Generator "
              f"{check['generator_decode_tokens_per_second']:.1f} tok/s, stepped graph "
              f"{check['graph_decode_tokens_per_second']:.1f} tok/s (medians of {len(check['decode_tokens_per_second']['graph'])} "
              f"alternating runs)", flush=True)
        if not check["same_tokens"]:
            raise SystemExit("the stepped graph does not reproduce onnxruntime-genai's tokens")
    for length in peer_lengths if graph else ():
        ortgenai[length] = measure_ortgenai(graph, length, args.decode_tokens, rng)
        print(f"onnxruntime-genai int4 (its graph stepped), {length} tokens: decode "
              f"{ortgenai[length]['decode_tokens_per_second']:.1f} tok/s"
              f"{versus(rows_first_kv, length, ortgenai[length], 'onnxruntime-genai')}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "samples": {f"{m}-{kv}-{n}": s for (m, kv, n), s in samples.items()},
                                         "llama_cpp": llama, "onnxruntime_genai": ortgenai,
                                         "onnxruntime_genai_check": check}, indent=1))


if __name__ == "__main__":
    main()
