"""GGUF files (llama.cpp): metadata -> HF config, tensor names -> HF names, q/k un-permutation, dequant."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from edgecpm.arch.base import get_architecture
from edgecpm.arch.fields import ConfigFields
from edgecpm.checkpoint.base import Checkpoint, TensorRef, TokenizerFiles, select_tensors
from edgecpm.checkpoint.tokenizer import pick_chat_template
from edgecpm.errors import CheckpointError, UnsupportedError

GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",
    "attn_q_a": "self_attn.q_a_proj",
    "attn_q_a_norm": "self_attn.q_a_layernorm",
    "attn_q_b": "self_attn.q_b_proj",
    "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa",
    "attn_kv_a_norm": "self_attn.kv_a_layernorm",
    "attn_kv_b": "self_attn.kv_b_proj",
}
EXPERT_NAMES = {"ffn_gate_exps": "w1", "ffn_up_exps": "w3", "ffn_down_exps": "w2"}
ROPE_FACTOR_TENSORS = {"rope_factors_long.weight": "rope_factors_long", "rope_factors_short.weight": "rope_factors_short"}
LAYER_TENSOR = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.weight$")
# Arrays needed whole for the tokenizer; any other metadata array is left unread.
MAX_METADATA_ITEMS = 4_000_000


def open_gguf(path: Path) -> Checkpoint:
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # the reader raises ValueError/IndexError/struct errors on damaged files
        raise CheckpointError(f"not a readable GGUF file ({exc.__class__.__name__}: {str(exc)[:120]})", path=path) from None
    meta = _metadata(reader, path)
    arch_name = meta.get("general.architecture")
    if not isinstance(arch_name, str):
        raise CheckpointError("required metadata key is missing", path=path, field="general.architecture")
    architecture = get_architecture(arch_name, source=path, field_name="general.architecture")

    raw_tensors: dict[str, Any] = {}
    for tensor in reader.tensors:
        raw_tensors[tensor.name] = tensor
    for gguf_name, meta_key in ROPE_FACTOR_TENSORS.items():
        if gguf_name in raw_tensors:
            meta[meta_key] = [float(v) for v in _dequantize(raw_tensors.pop(gguf_name), path)]
    if "rope_freqs.weight" in raw_tensors:
        raise UnsupportedError("per-frequency rope_freqs (Llama 3 RoPE in GGUF) is not supported", path=path, field="rope_freqs.weight")

    fields = ConfigFields(architecture.gguf_config(meta), f"{path} (metadata)")
    config = architecture.parse_config(fields, frozenset(_hf_name(name, path) for name in raw_tensors))
    found: dict[str, TensorRef] = {}
    for name, tensor in raw_tensors.items():
        found |= _tensor_refs(name, tensor, path, config, architecture.gguf_permutes_qk)
    return Checkpoint(
        path=path,
        format="gguf",
        architecture=architecture,
        config=config,
        tensors=select_tensors(architecture, config, found, path),
        files=[path],
        load_tokenizer=lambda: _tokenizer(path, meta),
        has_tokenizer="tokenizer.ggml.tokens" in meta,
        has_chat_template="tokenizer.chat_template" in meta,
        quantization={"gguf_file_type": meta.get("general.file_type")},
    )


def _metadata(reader: Any, path: Path) -> dict[str, Any]:
    meta = {}
    for key, field in reader.fields.items():
        if len(field.data) > MAX_METADATA_ITEMS:
            raise CheckpointError(f"metadata array has {len(field.data)} items (limit {MAX_METADATA_ITEMS})", path=path, field=key)
        try:
            meta[key] = field.contents()
        except Exception:
            raise CheckpointError("metadata value cannot be decoded", path=path, field=key) from None
    return meta


def _hf_name(name: str, path: Path) -> str:
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    match = LAYER_TENSOR.match(name)
    if match and match.group(2) in LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{LAYER_NAMES[match.group(2)]}.weight"
    if match and match.group(2) in EXPERT_NAMES:
        return name
    raise CheckpointError("unexpected tensor (no HF equivalent known)", path=path, field=name)


def _dequantize(tensor: Any, path: Path) -> np.ndarray:
    import gguf

    shape = tuple(int(d) for d in reversed(tensor.shape))
    try:
        if tensor.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            array = np.asarray(tensor.data)
        else:
            array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise UnsupportedError(f"GGUF type {tensor.tensor_type.name} cannot be dequantized", path=path, field=tensor.name) from None
    except Exception as exc:
        raise CheckpointError(f"tensor data is damaged ({exc.__class__.__name__})", path=path, field=tensor.name) from None
    return array.reshape(shape)


def _unpermute(array: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k row permutation (HF rotate-half -> interleaved pairs), spec §5.1."""
    rows = array.shape[0]
    return array.reshape(heads, rows // heads // 2, 2, *array.shape[1:]).swapaxes(1, 2).reshape(array.shape)


def _tensor_refs(name: str, tensor: Any, path: Path, config: Any, permuted: bool) -> dict[str, TensorRef]:
    shape = tuple(int(d) for d in reversed(tensor.shape))
    dtype = tensor.tensor_type.name
    base = TensorRef(name, shape, dtype, path, lambda: _dequantize(tensor, path))
    match = LAYER_TENSOR.match(name)
    if match and match.group(2) in EXPERT_NAMES:
        layer, kind = match.group(1), EXPERT_NAMES[match.group(2)]
        return {
            f"model.layers.{layer}.mlp.experts.{e}.{kind}.weight": TensorRef(
                name, shape[1:], dtype, path, lambda e=e: _dequantize(tensor, path)[e]
            )
            for e in range(shape[0])
        }
    hf_name = _hf_name(name, path)
    transform = None
    if permuted and hf_name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
        heads = config.num_attention_heads if hf_name.endswith("q_proj.weight") else config.num_key_value_heads
        transform = lambda array, heads=heads: _unpermute(array, heads)  # noqa: E731
    return {hf_name: base.renamed(hf_name, transform)}


def _tokenizer(path: Path, meta: dict[str, Any]) -> TokenizerFiles | None:
    if "tokenizer.ggml.tokens" not in meta:
        return None
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer

    try:
        architecture, tokenizer_dict, tokenizer_config = get_gguf_tokenizer(str(path))
        tokenizer, _ = convert_gguf_tokenizer(architecture, tokenizer_dict)
    except Exception as exc:
        raise CheckpointError(f"cannot build a tokenizer from the metadata: {str(exc)[:160]}", path=path, field="tokenizer.ggml.model") from None
    return TokenizerFiles(
        tokenizer_json=tokenizer.to_str(),
        chat_template=pick_chat_template(meta.get("tokenizer.chat_template"), path),
        bos_token=tokenizer_config.get("bos_token"),
        eos_token=tokenizer_config.get("eos_token"),
        add_bos_token=bool(tokenizer_config.get("add_bos_token", False)),
        add_eos_token=bool(tokenizer_config.get("add_eos_token", False)),
        source=str(path),
    )
