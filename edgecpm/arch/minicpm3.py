"""`minicpm3`: MiniCPM3-4B, DeepSeek-V2-style Multi-head Latent Attention plus muP scalars (spec §3)."""

from __future__ import annotations

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

# HF builds q_a_layernorm and kv_a_layernorm without passing eps (spec §1.4).
LATENT_NORM_EPS = 1e-6


@dataclass(frozen=True, kw_only=True)
class MiniCPM3Config(DecoderConfig):
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def kv_values_per_token(self) -> int:
        """The exported graph caches the compressed latent (c_kv) and the shared roped key per layer."""
        return self.num_hidden_layers * (self.kv_lora_rank + self.qk_rope_head_dim)


def _parse(fields: ConfigFields, tensor_names: frozenset[str]) -> MiniCPM3Config:
    rope_dim = fields.int("qk_rope_head_dim", 32)
    values = read_common_fields(fields, "minicpm3", tied="lm_head.weight" not in tensor_names, mup=True, head_dim=rope_dim)
    values["rope"] = RopeConfig.from_config(fields, rope_dim, values["max_position_embeddings"])
    if rope_dim % 2:
        raise fields.error("qk_rope_head_dim", f"must be even, got {rope_dim}")
    return MiniCPM3Config(
        **values,
        q_lora_rank=fields.int("q_lora_rank", None),
        kv_lora_rank=fields.int("kv_lora_rank", 256),
        qk_nope_head_dim=fields.int("qk_nope_head_dim", 64),
        qk_rope_head_dim=rope_dim,
        v_head_dim=fields.int("v_head_dim", values["hidden_size"] // values["num_attention_heads"]),
    )


def tensor_shapes(config: MiniCPM3Config) -> dict[str, tuple[int, ...]]:
    hidden, heads = config.hidden_size, config.num_attention_heads
    shapes = outer_tensor_shapes(config)
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}."
        attn = f"{p}self_attn."
        if config.q_lora_rank is None:
            shapes[f"{attn}q_proj.weight"] = (heads * config.qk_head_dim, hidden)
        else:
            shapes |= {
                f"{attn}q_a_proj.weight": (config.q_lora_rank, hidden),
                f"{attn}q_a_layernorm.weight": (config.q_lora_rank,),
                f"{attn}q_b_proj.weight": (heads * config.qk_head_dim, config.q_lora_rank),
            }
        shapes |= {
            f"{p}input_layernorm.weight": (hidden,),
            f"{attn}kv_a_proj_with_mqa.weight": (config.kv_lora_rank + config.qk_rope_head_dim, hidden),
            f"{attn}kv_a_layernorm.weight": (config.kv_lora_rank,),
            f"{attn}kv_b_proj.weight": (heads * (config.qk_nope_head_dim + config.v_head_dim), config.kv_lora_rank),
            f"{attn}o_proj.weight": (hidden, heads * config.v_head_dim),
            f"{p}post_attention_layernorm.weight": (hidden,),
        }
        shapes |= mlp_tensor_shapes(config, p)
    return shapes


def _gguf_minicpm3(meta: Mapping[str, Any]) -> dict[str, Any]:
    config = gguf_common_config(meta, "minicpm3")
    key_length = config.pop("head_dim", None)
    rope_dim = meta.get("minicpm3.rope.dimension_count", 32)
    config |= {
        "q_lora_rank": meta.get("minicpm3.attention.q_lora_rank"),
        "kv_lora_rank": meta.get("minicpm3.attention.kv_lora_rank"),
        "qk_rope_head_dim": rope_dim,
        "qk_nope_head_dim": (key_length - rope_dim) if key_length else None,
        # llama.cpp's minicpm3 graph hard-codes MiniCPM3-4B's muP constants (spec §5.3).
        "scale_emb": 12.0,
        "scale_depth": 1.4,
        "dim_model_base": 256.0,
    }
    if "rope_factors_long" in meta:
        config["rope_scaling"] = {"rope_type": "longrope", "long_factor": meta["rope_factors_long"],
                                  "short_factor": meta.get("rope_factors_short", meta["rope_factors_long"])}
    return config


register(
    Architecture(
        name="minicpm3",
        config_class=MiniCPM3Config,
        parse_config=_parse,
        tensor_shapes=tensor_shapes,
        gguf_config=_gguf_minicpm3,
        gguf_permutes_qk=False,
        reference_model="edgecpm.models.minicpm3:MiniCPM3ForCausalLM",
        variants={"mla": "MiniCPM3-4B: q_lora + latent KV, LongRoPE", "mla_no_q_lora": "q_lora_rank null: dense q_proj"},
        kv_projections=("self_attn.kv_a_proj_with_mqa", "self_attn.kv_b_proj"),
        float_weights=("self_attn.kv_b_proj.weight",),  # absorbed into per-head W_kc/W_vc (exporters/onnx/models/mla.py)
    )
)
