"""A Llama GGUF with MiniCPM4-0.5B's shapes and random weights: the second model of the int4 peer benchmark.

    python benchmarks/make_llama_shape_gguf.py /work/bench_cache/llama-0.5b-shape.gguf
    python benchmarks/bench_decode.py --precision int4 --source /work/bench_cache/llama-0.5b-shape.gguf \
        --cache /work/bench_cache/llama-0.5b-shape

MiniCPM's math with unit muP scales and plain RoPE is Llama's (spec §1), and neither llama.cpp nor
onnxruntime-genai loads MiniCPM offline, so the peers meet edgecpm on this twin: H 1024, L 24, 16/2 heads,
I 4096, V 73448, tied embeddings — about 0.5B weights, far beyond the CPU caches, so decode is memory bound.
Weights are N(0, 0.02) in F16; the vocabulary is SmolLM2's (from the embedded model) padded with unused
tokens, so prompts tokenize as in the SmolLM2 benchmark. prepare_weights.py then derives every peer's
weights from this file exactly as from the SmolLM2 GGUF.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from prepare_weights import default_source_gguf  # noqa: E402

SHAPE = {"hidden": 1024, "intermediate": 4096, "layers": 24, "heads": 16, "kv_heads": 2, "vocab": 73448,
         "context": 32768}


def tensor_shapes(shape: dict) -> dict[str, tuple[int, ...]]:
    """GGUF tensor names -> numpy shapes ([out, in] for matrices), tied embeddings (no output.weight)."""
    h, i, head_dim = shape["hidden"], shape["intermediate"], shape["hidden"] // shape["heads"]
    shapes = {"token_embd.weight": (shape["vocab"], h), "output_norm.weight": (h,)}
    for layer in range(shape["layers"]):
        block = f"blk.{layer}."
        shapes |= {block + "attn_norm.weight": (h,), block + "ffn_norm.weight": (h,),
                   block + "attn_q.weight": (h, h), block + "attn_k.weight": (shape["kv_heads"] * head_dim, h),
                   block + "attn_v.weight": (shape["kv_heads"] * head_dim, h), block + "attn_output.weight": (h, h),
                   block + "ffn_gate.weight": (i, h), block + "ffn_up.weight": (i, h), block + "ffn_down.weight": (h, i)}
    return shapes


def write_gguf(path: Path, shape: dict = SHAPE, seed: int = 0) -> Path:
    from gguf import GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType, TokenType

    vocabulary = GGUFReader(str(default_source_gguf()))
    tokens = vocabulary.fields["tokenizer.ggml.tokens"].contents()
    if len(tokens) > shape["vocab"]:
        raise SystemExit(f"the vocabulary has {len(tokens)} tokens, more than the model's {shape['vocab']}")
    padding = shape["vocab"] - len(tokens)
    partial = path.with_name(path.name + ".partial")
    writer = GGUFWriter(str(partial), arch="llama")
    writer.add_name("llama-0.5b-shape (random weights, edgecpm benchmark)")
    writer.add_file_type(int(LlamaFileType.MOSTLY_F16))
    writer.add_context_length(shape["context"])
    writer.add_embedding_length(shape["hidden"])
    writer.add_block_count(shape["layers"])
    writer.add_feed_forward_length(shape["intermediate"])
    writer.add_head_count(shape["heads"])
    writer.add_head_count_kv(shape["kv_heads"])
    writer.add_rope_dimension_count(shape["hidden"] // shape["heads"])
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(shape["vocab"])
    for name, field in vocabulary.fields.items():
        if not name.startswith("tokenizer."):
            continue
        value = field.contents()
        if name == "tokenizer.ggml.tokens":
            value = value + [f"<|unused_{i}|>" for i in range(padding)]
        elif name in ("tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
            value = value + [int(TokenType.UNUSED) if name.endswith("type") else 0.0] * padding
        kind = field.types[0]
        writer.add_key_value(name, value, kind, sub_type=field.types[-1] if kind == GGUFValueType.ARRAY else None)
    rng = np.random.default_rng(seed)
    for name, tensor_shape in tensor_shapes(shape).items():
        if len(tensor_shape) == 1:
            writer.add_tensor(name, np.ones(tensor_shape, np.float32))
        else:
            writer.add_tensor(name, (rng.standard_normal(tensor_shape, np.float32) * 0.02).astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.replace(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    if args.out.exists():
        print(f"exists: {args.out}")
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(f"wrote {write_gguf(args.out)}")


if __name__ == "__main__":
    main()
