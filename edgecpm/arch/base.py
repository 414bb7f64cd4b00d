"""What every architecture shares: the registry, the common decoder config, the MLP tensor layout."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from edgecpm.arch.fields import ConfigFields
from edgecpm.arch.rope import RopeConfig
from edgecpm.errors import UnsupportedError

ACTIVATIONS = ("silu", "fatrelu")


@dataclass(frozen=True, kw_only=True)
class SparseAttentionConfig:
    """InfLLM v2 `sparse_config` (spec §6.1); recorded so exports can choose dense or sparse attention."""

    kernel_size: int = 32
    kernel_stride: int = 16
    init_blocks: int = 1
    block_size: int = 64
    window_size: int = 2048
    topk: int = 64
    use_nope: bool = False
    dense_len: int = 8192

    @classmethod
    def from_config(cls, fields: ConfigFields | None) -> SparseAttentionConfig | None:
        if fields is None:
            return None
        defaults = cls()
        return cls(
            kernel_size=fields.int("kernel_size", defaults.kernel_size),
            kernel_stride=fields.int("kernel_stride", defaults.kernel_stride),
            init_blocks=fields.int("init_blocks", defaults.init_blocks, minimum=0),
            block_size=fields.int("block_size", defaults.block_size),
            # 0 is meaningful for both: no local blocks but the query's own, and only the forced blocks
            window_size=fields.int("window_size", defaults.window_size, minimum=0),
            topk=fields.int("topk", defaults.topk, minimum=0),
            use_nope=fields.bool("use_nope", defaults.use_nope),
            dense_len=fields.int("dense_len", defaults.dense_len, minimum=-1),
        )


@dataclass(frozen=True, kw_only=True)
class DecoderConfig:
    """Fields shared by every registered architecture (spec §2). Values are as config.json states them."""

    architecture: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeConfig
    tie_word_embeddings: bool
    scale_emb: float = 1.0
    scale_depth: float | None = None
    dim_model_base: float | None = None
    hidden_act: str = "silu"
    hidden_act_param: float = 0.0
    num_experts: int = 0
    num_experts_per_tok: int = 0
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    sparse: SparseAttentionConfig | None = None

    @property
    def residual_scale(self) -> float:
        """Multiplier on every residual branch: scale_depth / sqrt(L) (1.0 for Llama)."""
        if self.scale_depth is None:
            return 1.0
        return self.scale_depth / math.sqrt(self.num_hidden_layers)

    @property
    def logit_scale(self) -> float:
        """The final normed hidden state is divided by this before the LM head: H / dim_model_base."""
        return 1.0 if self.dim_model_base is None else self.hidden_size / self.dim_model_base

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def kv_values_per_token(self) -> int:
        """Cached numbers per token over all layers (K and V), as edgecpm's exported graphs store them."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["rope"] = self.rope.as_dict()
        data["eos_token_ids"] = list(self.eos_token_ids)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DecoderConfig:
        values = dict(data)
        values["rope"] = RopeConfig.from_dict(values["rope"])
        values["eos_token_ids"] = tuple(values.get("eos_token_ids", ()))
        if values.get("sparse") is not None:
            values["sparse"] = SparseAttentionConfig(**values["sparse"])
        return cls(**values)


def read_common_fields(
    fields: ConfigFields, architecture: str, *, tied: bool, mup: bool, head_dim: int | None = None
) -> dict[str, Any]:
    """Parses the fields of `DecoderConfig`; `mup=False` gives Llama's unit scales whatever the file says."""
    hidden = fields.int("hidden_size")
    heads = fields.int("num_attention_heads")
    if head_dim is None:
        head_dim = fields.int("head_dim", None) or hidden // heads
        if fields.int("head_dim", None) is None and hidden % heads:
            raise fields.error("hidden_size", f"{hidden} is not divisible by num_attention_heads {heads}")
    kv_heads = fields.int("num_key_value_heads", heads)
    if heads % kv_heads:
        raise fields.error("num_key_value_heads", f"{kv_heads} does not divide num_attention_heads {heads}")
    layers = fields.int("num_hidden_layers")
    max_positions = fields.int("max_position_embeddings", 4096)
    activation = fields.str("hidden_act", "silu")
    if activation not in ACTIVATIONS:
        raise fields.error("hidden_act", f"unsupported activation {activation!r:.40} (supported: {', '.join(ACTIVATIONS)})")
    for flag in ("attention_bias", "mlp_bias"):
        if fields.bool(flag, False):
            raise UnsupportedError("biases are not part of any MiniCPM variant", path=fields.source, field=flag)
    num_experts = fields.int("num_experts", 0, minimum=0)
    values: dict[str, Any] = dict(
        architecture=architecture,
        vocab_size=fields.int("vocab_size"),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=fields.int("intermediate_size"),
        max_position_embeddings=max_positions,
        rms_norm_eps=fields.float("rms_norm_eps", 1e-6, minimum=0.0),
        tie_word_embeddings=tied,
        hidden_act=activation,
        hidden_act_param=fields.float("hidden_act_param", 0.0),
        num_experts=num_experts,
        num_experts_per_tok=fields.int("num_experts_per_tok", 2 if num_experts else 0, minimum=0),
        bos_token_id=fields.int("bos_token_id", None, minimum=0),
        eos_token_ids=fields.token_ids("eos_token_id"),
        pad_token_id=fields.int("pad_token_id", None, minimum=0),
        sparse=SparseAttentionConfig.from_config(fields.sub("sparse_config")),
    )
    if num_experts and not 0 < values["num_experts_per_tok"] <= num_experts:
        raise fields.error("num_experts_per_tok", f"must be in 1..{num_experts}")
    if mup:
        values.update(
            scale_emb=fields.float("scale_emb", 12.0),
            scale_depth=fields.float("scale_depth", 1.4),
            dim_model_base=fields.float("dim_model_base", 256.0, minimum=1e-6),
        )
    return values


def mlp_tensor_shapes(config: DecoderConfig, prefix: str) -> dict[str, tuple[int, ...]]:
    hidden, inner = config.hidden_size, config.intermediate_size
    if not config.is_moe:
        return {
            f"{prefix}mlp.gate_proj.weight": (inner, hidden),
            f"{prefix}mlp.up_proj.weight": (inner, hidden),
            f"{prefix}mlp.down_proj.weight": (hidden, inner),
        }
    shapes = {f"{prefix}mlp.gate.weight": (config.num_experts, hidden)}
    for expert in range(config.num_experts):
        p = f"{prefix}mlp.experts.{expert}."
        shapes |= {f"{p}w1.weight": (inner, hidden), f"{p}w3.weight": (inner, hidden), f"{p}w2.weight": (hidden, inner)}
    return shapes


def outer_tensor_shapes(config: DecoderConfig) -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (config.vocab_size, config.hidden_size), "model.norm.weight": (config.hidden_size,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, config.hidden_size)
    return shapes


@dataclass(frozen=True)
class Architecture:
    """One registered architecture: how to read its config and which tensors it must have.

    `name` is both the HF `model_type` and the GGUF `general.architecture`. `variants` names every
    behaviour switch of the config that needs its own tiny test model (the meta-test checks this).
    """

    name: str
    config_class: type[DecoderConfig]
    parse_config: Callable[[ConfigFields, frozenset[str]], DecoderConfig]
    tensor_shapes: Callable[[DecoderConfig], dict[str, tuple[int, ...]]]
    gguf_config: Callable[[Mapping[str, Any]], dict[str, Any]]
    gguf_permutes_qk: bool
    reference_model: str
    variants: Mapping[str, str] = field(default_factory=dict)
    # Linears whose outputs become cached keys/values (by module-name suffix): every later query reads
    # the first position's (the attention sink's), so calibration weights that row up.
    kv_projections: tuple[str, ...] = ("self_attn.k_proj", "self_attn.v_proj")
    # Weights (by name suffix) the graph builder reads as floats whatever the QuantSpec says: the planner counts
    # them at the export precision (tests compare its bytes with every tiny export's tensor index).
    float_weights: tuple[str, ...] = ()

    registry: ClassVar[dict[str, Architecture]] = {}


def register(architecture: Architecture) -> Architecture:
    Architecture.registry[architecture.name] = architecture
    return architecture


def get_architecture(name: str, *, source: Any = None, field_name: str = "model_type") -> Architecture:
    try:
        return Architecture.registry[name]
    except KeyError:
        known = ", ".join(sorted(Architecture.registry))
        raise UnsupportedError(f"unknown architecture {name!r:.60} (supported: {known})", path=source, field=field_name) from None


def gguf_common_config(meta: Mapping[str, Any], arch: str) -> dict[str, Any]:
    """HF config.json fields from the generic `{arch}.*` GGUF keys (spec §5.3)."""
    renames = {
        "context_length": "max_position_embeddings",
        "embedding_length": "hidden_size",
        "block_count": "num_hidden_layers",
        "feed_forward_length": "intermediate_size",
        "attention.head_count": "num_attention_heads",
        "attention.head_count_kv": "num_key_value_heads",
        "attention.layer_norm_rms_epsilon": "rms_norm_eps",
        "rope.freq_base": "rope_theta",
        "vocab_size": "vocab_size",
        "expert_count": "num_experts",
        "expert_used_count": "num_experts_per_tok",
        "attention.key_length": "head_dim",
    }
    config = {hf: meta[f"{arch}.{key}"] for key, hf in renames.items() if f"{arch}.{key}" in meta}
    if "vocab_size" not in config and "tokenizer.ggml.tokens" in meta:
        config["vocab_size"] = len(meta["tokenizer.ggml.tokens"])
    for gguf_key, hf in (("tokenizer.ggml.bos_token_id", "bos_token_id"), ("tokenizer.ggml.eos_token_id", "eos_token_id")):
        if gguf_key in meta:
            config[hf] = meta[gguf_key]
    return config
