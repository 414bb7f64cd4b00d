"""Pieces every reference model shares: RMSNorm, rotary tables, causal attention, MLPs, the KV cache,
the muP decoder layer and the causal-LM shell with strict weight loading (spec §1).

Everything runs in fp32 and is written for clarity, not speed: these modules are the specification
that exported graphs are compared against. Module attribute names are chosen so that
`named_parameters()` yields exactly the HF tensor names; loading is then a strict name-for-name copy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgecpm.arch.base import DecoderConfig
from edgecpm.arch.rope import RopeConfig
from edgecpm.errors import CheckpointError

DTYPE = torch.float32


def linear(in_features: int, out_features: int) -> nn.Linear:
    """A bias-free projection whose weight is left uninitialized: `load_tensors` overwrites every one."""
    return nn.utils.skip_init(nn.Linear, in_features, out_features, bias=False, dtype=DTYPE)


class RMSNorm(nn.Module):
    """Spec §1.4: variance in fp32, normalized value cast back to the input dtype, then times the weight."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=DTYPE))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.float32)
        variance = x32.pow(2).mean(dim=-1, keepdim=True)
        return self.weight * (x32 * torch.rsqrt(variance + self.eps)).to(x.dtype)


# ---------------------------------------------------------------------------------------------- RoPE


def rotary_tables(rope: RopeConfig, offset: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [length, rotary_dim] (fp32) for positions offset..offset+length-1.

    The frequencies are those of a sequence whose total length is offset+length (HF-native semantics):
    for dynamic NTK and LongRoPE a forward that reaches past the threshold uses the extended
    frequencies for its new tokens, while keys already in the cache keep the rotation they got.
    """
    positions = np.arange(offset, offset + length, dtype=np.int64)
    cos, sin = rope.cos_sin(positions, seq_len=offset + length)
    return torch.from_numpy(cos), torch.from_numpy(sin)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on the last axis of x [..., T, d]; computed in fp32 and cast back (spec §1.5)."""
    x32 = x.to(torch.float32)
    return (x32 * cos + rotate_half(x32) * sin).to(x.dtype)


# ----------------------------------------------------------------------------------------- attention


def softmax_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """query [B, h, T, dk], key [B, h, S, dk], value [B, h, S, dv] -> [B, h, T, dv].

    The T queries are the last T positions of the S keys (S - T of them come from the cache), so query
    i may see keys 0 .. S-T+i. Scores and softmax are fp32.
    """
    new, total = query.shape[-2], key.shape[-2]
    scores = torch.matmul(query.to(torch.float32), key.to(torch.float32).transpose(-1, -2)) * scale
    query_positions = torch.arange(total - new, total).unsqueeze(1)
    key_positions = torch.arange(total).unsqueeze(0)
    scores = scores.masked_fill(key_positions > query_positions, float("-inf"))
    weights = torch.softmax(scores, dim=-1).to(value.dtype)
    return torch.matmul(weights, value)


class LayerCache:
    """What one layer keeps per token: a tuple of tensors [..., S, X] that grow along the sequence axis."""

    def __init__(self) -> None:
        self.tensors: tuple[torch.Tensor, ...] | None = None
        self.state = None  # what an attention keeps besides its tensors (InfLLM v2's compressed keys)

    def extend(self, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Appends this forward's tensors and returns everything cached so far (including them)."""
        if self.tensors is None:
            self.tensors = tuple(new)
        else:
            self.tensors = tuple(torch.cat([old, fresh], dim=-2) for old, fresh in zip(self.tensors, new, strict=True))
        return self.tensors


class KVCache:
    """The contract's cache object: one LayerCache per layer and the number of positions already seen."""

    def __init__(self, num_layers: int) -> None:
        self.layers = [LayerCache() for _ in range(num_layers)]
        self.length = 0


# ---------------------------------------------------------------------------------------------- MLPs


def gate_activation(config: DecoderConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    if config.hidden_act == "fatrelu":
        threshold = config.hidden_act_param
        # FATReLU (spec §1.7): the gate passes where it exceeds the threshold, zero elsewhere.
        return lambda gate: torch.where(gate > threshold, gate, torch.zeros_like(gate))
    return F.silu


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with HF names gate_proj / up_proj / down_proj."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.gate_proj = linear(config.hidden_size, config.intermediate_size)
        self.up_proj = linear(config.hidden_size, config.intermediate_size)
        self.down_proj = linear(config.intermediate_size, config.hidden_size)
        self.activation = gate_activation(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.activation(self.gate_proj(x)) * self.up_proj(x))


class Expert(nn.Module):
    """One MoE expert: a SiLU GLU with the w1 (gate) / w3 (up) / w2 (down) names of MiniCPM-MoE."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.w1 = linear(config.hidden_size, config.intermediate_size)
        self.w3 = linear(config.hidden_size, config.intermediate_size)
        self.w2 = linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoEMLP(nn.Module):
    """Spec §1.8: softmax over all experts, keep the top k, renormalize them to sum to 1.

    Every expert runs on every token and unselected experts get weight 0: exact, and simpler to read
    than gathering tokens per expert.
    """

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.gate = linear(config.hidden_size, config.num_experts)
        self.experts = nn.ModuleList(Expert(config) for _ in range(config.num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self.gate(x).to(torch.float32), dim=-1)
        top_probs, top_index = torch.topk(probs, self.top_k, dim=-1)
        top_probs = top_probs / top_probs.sum(dim=-1, keepdim=True)
        routing = torch.zeros_like(probs).scatter(-1, top_index, top_probs).to(x.dtype)  # [..., E]
        outputs = torch.stack([expert(x) for expert in self.experts], dim=-1)  # [..., H, E]
        return (outputs * routing.unsqueeze(-2)).sum(dim=-1)


def make_mlp(config: DecoderConfig) -> nn.Module:
    return MoEMLP(config) if config.is_moe else GatedMLP(config)


# ------------------------------------------------------------------------------------ decoder layers


class DecoderLayer(nn.Module):
    """Pre-norm block whose two residual branches are scaled by scale_depth/sqrt(L) (spec §1.2)."""

    def __init__(self, config: DecoderConfig, attention: nn.Module):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = attention
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = make_mlp(config)
        self.residual_scale = config.residual_scale

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerCache) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos, sin, cache) * self.residual_scale
        return hidden + self.mlp(self.post_attention_layernorm(hidden)) * self.residual_scale


class DecoderStack(nn.Module):
    """HF's `model.` prefix: embed_tokens, layers, norm."""

    def __init__(self, config: DecoderConfig, make_attention: Callable[[DecoderConfig], nn.Module]):
        super().__init__()
        self.embed_tokens = nn.utils.skip_init(nn.Embedding, config.vocab_size, config.hidden_size, dtype=DTYPE)
        self.layers = nn.ModuleList(DecoderLayer(config, make_attention(config)) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class CausalLM(nn.Module):
    """The reference-model contract (edgecpm.models): muP embedding, decoder stack, scaled LM head.

    Subclasses only say which attention module a layer uses (`attention_class(config)`).
    """

    attention_class: Callable[[DecoderConfig], nn.Module]

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        self.model = DecoderStack(config, self.attention_class)
        # Tied: the head is the raw embedding matrix E, not E * scale_emb (spec §1.3).
        self.lm_head = None if config.tie_word_embeddings else linear(config.hidden_size, config.vocab_size)

    def new_cache(self) -> KVCache:
        return KVCache(self.config.num_hidden_layers)

    def use_sparse_attention(self, sparse) -> CausalLM:
        """Runs InfLLM v2 sparse attention (a SparseAttentionConfig; None: dense) in every layer that has it."""
        for layer in self.model.layers:
            if not hasattr(type(layer.self_attn), "sparse"):
                raise ValueError(f"{type(layer.self_attn).__name__} has no sparse attention")
            layer.self_attn.sparse = sparse
        return self

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """input_ids [B, T] -> fp32 logits [B, T, V]; with a cache, continues after its positions."""
        cache = self.new_cache() if cache is None else cache
        length = input_ids.shape[-1]
        cos, sin = rotary_tables(self.config.rope, cache.length, length)
        hidden = self.model.embed_tokens(input_ids) * self.config.scale_emb
        for layer, layer_cache in zip(self.model.layers, cache.layers, strict=True):
            hidden = layer(hidden, cos, sin, layer_cache)
        hidden = self.model.norm(hidden) / self.config.logit_scale
        head = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        cache.length += length
        return F.linear(hidden, head).to(torch.float32)

    @torch.no_grad()
    def load_tensors(self, tensors: Mapping[str, np.ndarray]) -> None:
        """Copies HF-named arrays into the parameters; a missing, unexpected or misshapen tensor raises.

        A tied model given its own "lm_head.weight" (a quantized export that stores its head apart from
        the table) computes logits with that instead of the embedding matrix.
        """
        if self.lm_head is None and "lm_head.weight" in tensors:
            self.lm_head = linear(self.config.hidden_size, self.config.vocab_size)
        parameters = dict(self.named_parameters())
        missing = sorted(set(parameters) - set(tensors))
        unexpected = sorted(set(tensors) - set(parameters))
        if missing:
            raise CheckpointError(f"missing tensor (and {len(missing) - 1} more)" if len(missing) > 1 else "missing tensor",
                                  field=missing[0])
        if unexpected:
            raise CheckpointError(f"unexpected tensor for the reference model ({len(unexpected)} in all)", field=unexpected[0])
        for name, parameter in parameters.items():
            array = np.asarray(tensors[name], dtype=np.float32)
            if tuple(array.shape) != tuple(parameter.shape):
                raise CheckpointError(f"shape {list(array.shape)}, the model expects {list(parameter.shape)}", field=name)
            parameter.copy_(torch.tensor(array))
