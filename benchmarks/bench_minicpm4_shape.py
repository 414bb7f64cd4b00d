"""Decode speed and memory-bandwidth roofline on a MiniCPM4-0.5B-shaped checkpoint (random BitCPM-style weights).

    python benchmarks/bench_minicpm4_shape.py [--cache /work/bench_cache] [--schemes int4,ternary] [--runs 3]
                                              [--rounds 1] [--kernels auto|native|onnxruntime]

The checkpoint has MiniCPM4-0.5B's shapes (H 1024, L 24, 16/2 heads, I 4096, V 73448, tied, LongRoPE) and
fake-quantized ternary decoder weights like BitCPM4-0.5B, so `--quant ternary --method lossless` packs it
exactly and int4 RTN sees a realistic weight grid. It is far bigger than the CPU caches, so decode is
memory bound: the roofline column is weight bytes read per token × tok/s ÷ measured read bandwidth.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bandwidth import read_bandwidth  # noqa: E402
from edgecpm_engine import run_edgecpm  # noqa: E402

CONFIG = {
    "model_type": "minicpm", "vocab_size": 73448, "hidden_size": 1024, "intermediate_size": 4096,
    "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 2, "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5, "scale_emb": 12, "scale_depth": 1.4, "dim_model_base": 256, "bos_token_id": 1,
    "eos_token_id": [2, 73440], "rope_theta": 10000.0,
    "rope_scaling": {"rope_type": "longrope", "original_max_position_embeddings": 32768,
                     "long_factor": list(np.geomspace(1.0, 49.85, 32)), "short_factor": list(np.geomspace(1.0, 49.85, 32))},
}
SCHEMES = {
    "int4": {"scheme": "int4", "method": "rtn", "block_size": 32},
    "ternary": {"scheme": "ternary", "method": "lossless", "block_size": 64},
}


def write_checkpoint(directory: Path) -> Path:
    """fp16 safetensors; decoder matrices ternary with one scale per row (BitCPM's fake-quantized layout)."""
    from safetensors.numpy import save_file

    from edgecpm.arch import get_architecture
    from edgecpm.arch.fields import ConfigFields

    if (directory / "config.json").is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    architecture = get_architecture("minicpm")
    config = architecture.parse_config(ConfigFields(CONFIG, "config"), frozenset())
    rng = np.random.default_rng(0)
    tensors = {}
    for name, shape in architecture.tensor_shapes(config).items():
        if len(shape) == 1:
            tensors[name] = np.ones(shape, np.float16)
        elif name == "model.embed_tokens.weight":
            tensors[name] = (rng.standard_normal(shape, np.float32) * 0.02).astype(np.float16)
        else:
            scales = (0.5 / np.sqrt(shape[1]) * (1 + rng.random((shape[0], 1)))).astype(np.float16).astype(np.float32)
            tensors[name] = (rng.integers(-1, 2, size=shape).astype(np.float32) * scales).astype(np.float16)
    save_file(tensors, str(directory / "model.safetensors"))
    # Any real tokenizer with ids below the vocabulary size will do: SmolLM2's, from the embedded model.
    from edgecpm.checkpoint import open_checkpoint
    from edgecpm.resources import default_model_path

    tokenizer = open_checkpoint(default_model_path()).tokenizer
    (directory / "tokenizer.json").write_text(tokenizer.tokenizer_json)
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": tokenizer.chat_template, "bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token}))
    (directory / "config.json").write_text(json.dumps(CONFIG))
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path("/work/bench_cache"))
    parser.add_argument("--schemes", default="int4,ternary")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1, help="the schemes in turn, this many times (this VM is noisy)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kernels", default=None, help="who decodes: auto (default), native or onnxruntime")
    args = parser.parse_args()

    from edgecpm.export import export_checkpoint
    from edgecpm.quant import QuantSpec
    from edgecpm.runtimes import load_backend

    checkpoint = write_checkpoint(args.cache / "minicpm4-0.5b-shape")
    bandwidth = read_bandwidth(1.0, args.threads, 5)
    prompt = (np.arange(100) * 37 + 11) % 1000 + 100
    rows = []
    for scheme in args.schemes.split(",") * args.rounds:
        bundle = args.cache / f"edgecpm-minicpm4-0.5b-{scheme}"
        if not (bundle / "edgecpm.json").is_file():
            export_checkpoint(checkpoint, bundle, max_context=1024, overwrite=bundle.exists(),
                              quant=QuantSpec(**SCHEMES[scheme]))
        backend = load_backend(bundle, threads=args.threads, kernels=args.kernels)
        run_edgecpm(bundle, prompt, 8, backend=backend)  # warm-up
        runs = [run_edgecpm(bundle, prompt, args.new_tokens, backend=backend) for _ in range(args.runs)]
        decode = float(np.median([r["decode_tokens_per_second"] for r in runs]))
        prefill = float(np.median([r["prefill_tokens_per_second"] for r in runs]))
        # Every weight is streamed once per decoded token (the tied table through the LM head): as the native
        # kernels lay it out where they decode, else the bundle's own bytes.
        decoder = getattr(getattr(backend, "steps", backend), "decoder", None)  # the native kernels', if they decode
        weight_bytes = decoder.streamed_bytes if decoder else (bundle / "model.onnx.data").stat().st_size
        rows.append({"scheme": scheme, "kernels": backend.kernels["decode"],
                     "prefill_tokens_per_second": prefill, "decode_tokens_per_second": decode,
                     "weight_bytes": weight_bytes, "roofline_fraction": weight_bytes * decode / bandwidth})
    print(f"read bandwidth: {bandwidth / 1e9:.1f} GB/s ({args.threads} threads)")
    print("| scheme | decode kernels | weights read per token, MB | prefill tok/s | decode tok/s | % of roofline |")
    print("|---|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['scheme']} | {row['kernels']} | {row['weight_bytes'] / 1e6:.1f} | "
              f"{row['prefill_tokens_per_second']:.1f} | {row['decode_tokens_per_second']:.1f} | "
              f"{100 * row['roofline_fraction']:.0f}% |")
    per_round = len(args.schemes.split(","))
    for start in range(0, len(rows), per_round) if per_round == 2 else ():
        first, second = rows[start: start + 2]
        print(f"{second['scheme']} / {first['scheme']} decode: "
              f"{second['decode_tokens_per_second'] / first['decode_tokens_per_second']:.2f}x")


if __name__ == "__main__":
    main()
