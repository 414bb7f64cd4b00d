"""Writes tiny GGUF files the way llama.cpp's convert_hf_to_gguf does, with gguf-py's own GGUFWriter.

Only the parts of the converter that matter for import are reproduced (spec §5): architecture names,
the generic `{arch}.*` keys, the muP keys of `minicpm`, the MLA keys of `minicpm3`, LongRoPE factor
tensors, the q/k row permutation of `llama`/`minicpm`, tied models without `output.weight`, a gpt2-style
BPE vocabulary, and the converter's tensor types (1-D tensors stay F32; 2-D weights become F16 or a
gguf.quants type, falling back to F16 where a row does not fill whole quant blocks).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from tiny_models import CHATML_TEMPLATE, SPECIAL_TOKENS, TINY_CONFIGS, VOCAB, byte_tokenizer_json, parse_tiny_config, random_tensors

Q = gguf.GGMLQuantizationType
FILE_TYPES = {Q.F32: gguf.LlamaFileType.ALL_F32, Q.F16: gguf.LlamaFileType.MOSTLY_F16,
              Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0, Q.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
              Q.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1}

HF_TO_GGUF_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}
HF_TO_GGUF_LAYER = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "self_attn.q_a_proj": "attn_q_a",
    "self_attn.q_a_layernorm": "attn_q_a_norm", "self_attn.q_b_proj": "attn_q_b",
    "self_attn.kv_a_proj_with_mqa": "attn_kv_a_mqa", "self_attn.kv_a_layernorm": "attn_kv_a_norm",
    "self_attn.kv_b_proj": "attn_kv_b",
}


def gguf_name(hf_name: str) -> str:
    if hf_name in HF_TO_GGUF_GLOBAL:
        return HF_TO_GGUF_GLOBAL[hf_name]
    parts = hf_name.split(".")  # model.layers.{i}.<module...>.weight
    return f"blk.{parts[2]}.{HF_TO_GGUF_LAYER['.'.join(parts[3:-1])]}.weight"


def permute_qk(weights: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute: HF rotate-half rows -> llama.cpp interleaved pairs (spec §5.1)."""
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def stored_type(array: np.ndarray, qtype: Q) -> Q:
    """The converter's choice: 1-D tensors stay F32; rows that do not fill whole quant blocks fall back to F16."""
    if array.ndim == 1 or qtype == Q.F32:
        return Q.F32
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    return qtype if array.shape[-1] % block_size == 0 else Q.F16


def encode(array: np.ndarray, qtype: Q) -> np.ndarray:
    return gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype)


def round_trip(array: np.ndarray, qtype: Q) -> np.ndarray:
    """What a reader gets back: gguf's own dequantization of what `encode` stored."""
    qtype = stored_type(array, qtype)
    return gguf.quants.dequantize(encode(array, qtype), qtype).reshape(array.shape).astype(np.float32)


@dataclass
class WrittenGGUF:
    path: Path
    hf_tensors: dict[str, np.ndarray]   # the HF-layout fp32 weights that went in
    expected: dict[str, np.ndarray]     # what an importer must return for each HF name (after dequantization)


def _write_vocab(writer: gguf.GGUFWriter) -> None:
    """gpt2-style BPE vocabulary as the converter's `get_vocab_base` + SpecialVocab write it."""
    tokenizer = json.loads(byte_tokenizer_json())
    vocab: dict[str, int] = tokenizer["model"]["vocab"]
    by_id = {index: token for token, index in vocab.items()}
    tokens, types = [], []
    for index in range(VOCAB):
        token = by_id.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if token in SPECIAL_TOKENS else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)  # gguf-py skips empty arrays, as the converter's output shows
    writer.add_bos_token_id(vocab["<s>"])
    writer.add_eos_token_id(vocab["<|im_end|>"])
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)


def _write_hparams(writer: gguf.GGUFWriter, arch: str, raw: dict, config) -> None:
    writer.add_context_length(raw["max_position_embeddings"])
    writer.add_embedding_length(raw["hidden_size"])
    writer.add_block_count(raw["num_hidden_layers"])
    writer.add_feed_forward_length(raw["intermediate_size"])
    writer.add_head_count(raw["num_attention_heads"])
    writer.add_head_count_kv(raw["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(raw["rms_norm_eps"])
    writer.add_vocab_size(raw["vocab_size"])
    if "rope_theta" in raw:
        writer.add_rope_freq_base(raw["rope_theta"])
    if arch == "llama":
        writer.add_rope_dimension_count(config.head_dim)
    if arch == "minicpm":
        writer.add_embedding_scale(float(raw["scale_emb"]))
        writer.add_residual_scale(raw["scale_depth"] / math.sqrt(raw["num_hidden_layers"]))
        writer.add_logit_scale(raw["hidden_size"] / raw["dim_model_base"])
        if (raw.get("rope_scaling") or {}).get("rope_type") == "longrope":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
    if arch == "minicpm3":
        if raw.get("q_lora_rank") is not None:
            writer.add_q_lora_rank(raw["q_lora_rank"])
        writer.add_kv_lora_rank(raw["kv_lora_rank"])
        writer.add_key_length(raw["qk_nope_head_dim"] + raw["qk_rope_head_dim"])
        writer.add_rope_dimension_count(raw["qk_rope_head_dim"])


def write_gguf(
    path: Path,
    key: tuple[str, str],
    *,
    seed: int = 0,
    qtype: Q = Q.F32,
    hf_tensors: dict[str, np.ndarray] | None = None,
    architecture: str | None = None,
    raw_tensors: dict[str, tuple[np.ndarray, Q]] | None = None,
) -> WrittenGGUF:
    """Converts the tiny model `key` (random weights unless `hf_tensors`) to a GGUF file at `path`.

    `architecture` overrides `general.architecture` (the `{arch}.` keys follow it); `raw_tensors` adds or
    replaces GGUF tensors with already-encoded bytes, for files the converter would never write.
    """
    raw = TINY_CONFIGS[key]
    arch = raw["model_type"]
    _, config = parse_tiny_config(key)
    hf_tensors = random_tensors(key, seed) if hf_tensors is None else hf_tensors
    writer = gguf.GGUFWriter(path, architecture or arch)
    writer.add_name(f"tiny-{arch}-{key[1]}")
    writer.add_file_type(FILE_TYPES[qtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write_hparams(writer, arch, raw, config)
    _write_vocab(writer)

    rope = raw.get("rope_scaling") or {}
    if rope.get("rope_type") == "longrope":
        writer.add_tensor("rope_factors_long.weight", np.asarray(rope["long_factor"], dtype=np.float32))
        writer.add_tensor("rope_factors_short.weight", np.asarray(rope["short_factor"], dtype=np.float32))

    expected = {}
    raw_tensors = dict(raw_tensors or {})
    for hf_name, array in hf_tensors.items():
        name = gguf_name(hf_name)
        if arch in ("llama", "minicpm") and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if hf_name.endswith("q_proj.weight") else config.num_key_value_heads
            array_out = permute_qk(array, heads)
        else:
            array_out = array
        # Row-wise block quantization commutes with the q/k row permutation, so the HF-layout round trip
        # is exactly what an importer returns after un-permuting.
        expected[hf_name] = round_trip(array, qtype)
        if name in raw_tensors:
            continue
        tensor_type = stored_type(array_out, qtype)
        if tensor_type in (Q.F32, Q.F16):
            writer.add_tensor(name, array_out.astype(np.float32 if tensor_type == Q.F32 else np.float16))
        else:
            writer.add_tensor(name, encode(array_out, tensor_type), raw_dtype=tensor_type)
    for name, (data, tensor_type) in raw_tensors.items():
        writer.add_tensor(name, data, raw_dtype=tensor_type if data.dtype == np.uint8 else None)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return WrittenGGUF(path, hf_tensors, expected)
