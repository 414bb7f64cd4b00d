"""`minicpm`: MiniCPM 1/2/4/4.1, -S (FATReLU), -MoE, 2B-128k (dynamic NTK), BitCPM4, QAT; and `llama`.

A Llama-style decoder plus three muP scalars (spec §1). `llama` is the same math with unit scales:
the `-llama-format` releases, MiniCPM5-1B, SmolLM2.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edgecpm.arch.base import (
    Architecture,
    DecoderConfig,
    gguf_common_config,
    mlp_tensor_shapes,
    outer_tensor_shapes,
    read_common_fields,
    register,
)
from edgecpm.arch.fields import ConfigFields
from edgecpm.arch.rope import RopeConfig


@dataclass(frozen=True, kw_only=True)
class MiniCPMConfig(DecoderConfig):
    pass


def _parse(fields: ConfigFields, tensor_names: frozenset[str], *, architecture: str, mup: bool) -> MiniCPMConfig:
    values = read_common_fields(fields, architecture, tied="lm_head.weight" not in tensor_names, mup=mup)
    values["rope"] = RopeConfig.from_config(fields, values["head_dim"], values["max_position_embeddings"])
    return MiniCPMConfig(**values)


def tensor_shapes(config: DecoderConfig) -> dict[str, tuple[int, ...]]:
    hidden, head_dim = config.hidden_size, config.head_dim
    q_rows, kv_rows = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    shapes = outer_tensor_shapes(config)
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}."
        shapes |= {
            f"{p}input_layernorm.weight": (hidden,),
            f"{p}self_attn.q_proj.weight": (q_rows, hidden),
            f"{p}self_attn.k_proj.weight": (kv_rows, hidden),
            f"{p}self_attn.v_proj.weight": (kv_rows, hidden),
            f"{p}self_attn.o_proj.weight": (hidden, q_rows),
            f"{p}post_attention_layernorm.weight": (hidden,),
        }
        shapes |= mlp_tensor_shapes(config, p)
    return shapes


def _gguf_minicpm(meta: Mapping[str, Any]) -> dict[str, Any]:
    config = gguf_common_config(meta, "minicpm")
    layers, hidden = config.get("num_hidden_layers", 1), config.get("hidden_size", 1)
    # Files from before the muP keys existed were run with MiniCPM-2B's constants (spec §5.4).
    config["scale_emb"] = meta.get("minicpm.embedding_scale", 12.0)
    config["scale_depth"] = meta.get("minicpm.residual_scale", 1.4 / math.sqrt(layers)) * math.sqrt(layers)
    config["dim_model_base"] = hidden / meta.get("minicpm.logit_scale", hidden / 256)
    if meta.get("minicpm.rope.scaling.type") == "longrope":
        config["rope_scaling"] = {"rope_type": "longrope", "long_factor": meta.get("rope_factors_long"),
                                  "short_factor": meta.get("rope_factors_short")}
    return config


MINICPM_VARIANTS = {
    "dense": "MiniCPM-1B/2B, MiniCPM4-0.5B/8B, BitCPM4, QAT-unquantized: SiLU GLU, default or LongRoPE",
    "untied": "MiniCPM-2B-128k, MiniCPM4-8B: separate lm_head",
    "longrope": "MiniCPM4/4.1: LongRoPE per-frequency factors",
    "dynamic": "MiniCPM-2B-128k: dynamic NTK RoPE",
    "fatrelu": "MiniCPM-S-1B: FATReLU gate",
    "moe": "MiniCPM-MoE-8x2B: top-2 softmax router",
}

register(
    Architecture(
        name="minicpm",
        config_class=MiniCPMConfig,
        parse_config=lambda fields, names: _parse(fields, names, architecture="minicpm", mup=True),
        tensor_shapes=tensor_shapes,
        gguf_config=_gguf_minicpm,
        gguf_permutes_qk=True,
        reference_model="edgecpm.models.decoder:DecoderForCausalLM",
        variants=MINICPM_VARIANTS,
    )
)

register(
    Architecture(
        name="llama",
        config_class=MiniCPMConfig,
        parse_config=lambda fields, names: _parse(fields, names, architecture="llama", mup=False),
        tensor_shapes=tensor_shapes,
        gguf_config=lambda meta: gguf_common_config(meta, "llama"),
        gguf_permutes_qk=True,
        reference_model="edgecpm.models.decoder:DecoderForCausalLM",
        variants={"dense": "Llama / SmolLM2 / -llama-format MiniCPM", "llama3_rope": "Llama 3.x RoPE smoothing"},
    )
)
