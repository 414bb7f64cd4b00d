"""Facts about a checkpoint or a bundle as a plain dict for tables and `--json`."""

from __future__ import annotations

from typing import Any

from edgecpm.checkpoint import Checkpoint

# Bits per weight of 2-D matrices, including one fp16 scale per block of 32 (and a zero point for int4).
BITS_PER_WEIGHT = {"fp16": 16.0, "int8": 8 + 16 / 32, "int4": 4 + 16 / 32 + 4 / 32, "ternary": 2 + 16 / 32}


def estimated_weight_bytes(checkpoint: Checkpoint) -> dict[str, int]:
    """Bytes of weights per precision: matrices at that precision, vectors (norms) kept at fp16."""
    matrices = sum(ref.numel for ref in checkpoint.tensors.values() if len(ref.shape) >= 2)
    vectors = checkpoint.parameter_count() - matrices
    return {name: int(matrices * bits / 8 + vectors * 2) for name, bits in BITS_PER_WEIGHT.items()}


def describe_checkpoint(checkpoint: Checkpoint) -> dict[str, Any]:
    config = checkpoint.config
    quantized_types = sorted(t for t in checkpoint.stored_dtypes() if t not in ("F32", "F16", "BF16", "F64", "float32", "float16", "bfloat16"))
    kv_values = config.kv_values_per_token()
    return {
        "kind": "checkpoint",
        "path": str(checkpoint.path),
        "format": checkpoint.format,
        "architecture": checkpoint.architecture.name,
        "parameters": checkpoint.parameter_count(),
        "tensors": len(checkpoint.tensors),
        "stored_dtypes": checkpoint.stored_dtypes(),
        "quantization": ", ".join(quantized_types) if quantized_types else "none",
        "tied_embeddings": config.tie_word_embeddings,
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "attention_heads": config.num_attention_heads,
        "kv_heads": config.num_key_value_heads,
        "vocab_size": config.vocab_size,
        "rope": config.rope.kind,
        "rope_theta": config.rope.theta,
        "context_length": config.max_position_embeddings,
        "mup": {"scale_emb": config.scale_emb, "residual_scale": config.residual_scale, "logit_scale": config.logit_scale},
        "activation": config.hidden_act,
        "experts": config.num_experts,
        "sparse_attention": config.sparse is not None,
        "eos_token_ids": list(config.eos_token_ids),
        "tokenizer": checkpoint.has_tokenizer,
        "chat_template": checkpoint.has_chat_template,
        "kv_bytes_per_token": {"fp16": kv_values * 2, "fp32": kv_values * 4},
        "estimated_weight_bytes": estimated_weight_bytes(checkpoint),
    }


def describe_bundle(bundle) -> dict[str, Any]:
    """What `edgecpm inspect BUNDLE` shows: facts from the manifest plus the bytes on disk."""
    from pathlib import Path

    import numpy as np

    from edgecpm.bundle import read_manifest

    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    quantization = dict(manifest.quantization or {})
    quality = quantization.pop("quality", None)
    quantization.pop("tensors", None)  # per-tensor detail stays in the manifest; the counts are shown
    layout = manifest.kv_layout
    files = [manifest.model_file, *manifest.extra.get("data_files", [])]
    return {
        "kind": "bundle",
        "path": str(bundle),
        "architecture": manifest.architecture["architecture"],
        "flavour": manifest.flavour,
        "precision": manifest.precision,
        "quantization": quantization or "none",
        "quality": quality or "not measured (float export)",
        "weight_bytes": sum((bundle / name).stat().st_size for name in files),
        "kv_bytes_per_token": int(layout["values_per_token"]) * np.dtype(layout["dtype"]).itemsize,
        "kv_mode": layout["mode"],
        "max_context": manifest.max_context,
        "eos_token_ids": manifest.eos_token_ids,
    }
