"""Facts about a checkpoint or a bundle as a plain dict for tables and `--json`."""

from __future__ import annotations

import dataclasses
from typing import Any

from edgecpm.checkpoint import Checkpoint
from edgecpm.planner import sparse_state_bytes

WEIGHT_SCHEMES = ("none", "int8", "int4", "ternary")


def weight_bytes_by_scheme(checkpoint: Checkpoint) -> dict[str, int]:
    """Bytes of weights as an fp16 export stores them under each scheme (edgecpm.planner's arithmetic)."""
    from edgecpm.planner import Storage, weight_bytes
    from edgecpm.quant.spec import QuantSpec

    result = {}
    for scheme in WEIGHT_SCHEMES:
        roles = weight_bytes(checkpoint.config, Storage("fp16", None if scheme == "none" else QuantSpec(scheme=scheme)))
        result["fp16" if scheme == "none" else scheme] = sum(v for k, v in roles.items() if k != "rope_bytes_per_position")
    return result


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
        "sparse_attention": None if config.sparse is None else {
            **dataclasses.asdict(config.sparse),
            "state_bytes_at_context": sparse_state_bytes(config, config.sparse, config.max_position_embeddings)},
        "eos_token_ids": list(config.eos_token_ids),
        "tokenizer": checkpoint.has_tokenizer,
        "chat_template": checkpoint.has_chat_template,
        "kv_bytes_per_token": {"fp16": kv_values * 2, "fp32": kv_values * 4},
        "weight_bytes": weight_bytes_by_scheme(checkpoint),
    }


def describe_plan(checkpoint: Checkpoint, device) -> dict[str, Any]:
    """The memory plan on a device: what `export --device` would choose (or why it refuses), and the
    alternatives' weight bytes and largest context at the profile's precision."""
    from edgecpm.errors import UnsupportedError
    from edgecpm.export_plan import plan_export, resolve_profile
    from edgecpm.planner import Storage, plan_memory
    from edgecpm.quant.spec import QuantSpec

    profile = resolve_profile(device)
    try:
        export = plan_export(checkpoint, device=profile).to_dict()
    except UnsupportedError as refused:
        export = {"refused": refused.message}
    alternatives = {}
    for scheme in WEIGHT_SCHEMES[:3]:  # float, int8, int4 (ternary needs a BitCPM checkpoint)
        quant = None if scheme == "none" else QuantSpec(scheme=scheme).for_flavour(profile.export.flavour)
        storage = Storage(profile.export.dtype, quant)
        plan = plan_memory(checkpoint.config, storage, profile)
        alternatives[storage.label] = {"weight_bytes": plan.weight_bytes, "max_context": plan.max_context, "fits": plan.fits}
    return {"device": profile.name, "budget_bytes": profile.budget_bytes, "export": export, "alternatives": alternatives}


def describe_bundle(bundle) -> dict[str, Any]:
    """What `edgecpm inspect BUNDLE` shows: facts from the manifest plus the bytes on disk."""
    from pathlib import Path

    import numpy as np

    from edgecpm.arch import config_from_dict
    from edgecpm.bundle import read_manifest

    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    quantization = dict(manifest.quantization or {})
    quality = quantization.pop("quality", None)
    quantization.pop("tensors", None)  # per-tensor detail stays in the manifest; the counts are shown
    layout = manifest.kv_layout
    files = [manifest.model_file, *manifest.data_files]
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
        "attention": "dense" if manifest.sparse_attention is None else {
            "sparse": dataclasses.asdict(manifest.sparse_attention),
            "state_bytes_at_max_context": sparse_state_bytes(config_from_dict(manifest.architecture),
                                                             manifest.sparse_attention, manifest.max_context)},
        "max_context": manifest.max_context,
        "eos_token_ids": manifest.eos_token_ids,
        "device": None if manifest.device is None else manifest.device.to_dict(),
        "engines": [engine.to_dict() for engine in manifest.engines],
    }
