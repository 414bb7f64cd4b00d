"""Reference model for `minicpm3`: Multi-head Latent Attention (spec §3) inside the muP decoder (spec §1).

The cache keeps the compressed latent per token — the normed c_kv and the roped shared k_pe — which is
what the exported graph caches; keys and values are expanded from it on every forward.
"""

from __future__ import annotations

import torch
from torch import nn

from edgecpm.arch.minicpm3 import LATENT_NORM_EPS, MiniCPM3Config
from edgecpm.models.common import CausalLM, LayerCache, RMSNorm, apply_rotary, causal_attention, linear, softmax_scale


class MLAAttention(nn.Module):
    """Per head: q = [q_nope, rope(q_pe)], k = [k_nope, rope(k_pe) shared], v; scale 1/sqrt(d_nope + d_rope)."""

    def __init__(self, config: MiniCPM3Config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.nope_dim = config.qk_nope_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.qk_dim = config.qk_head_dim
        self.v_dim = config.v_head_dim
        self.kv_rank = config.kv_lora_rank
        hidden, heads = config.hidden_size, config.num_attention_heads
        self.has_q_lora = config.q_lora_rank is not None
        if self.has_q_lora:
            self.q_a_proj = linear(hidden, config.q_lora_rank)
            # HF builds both latent norms without passing the config eps (spec §1.4).
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = linear(config.q_lora_rank, heads * self.qk_dim)
        else:
            self.q_proj = linear(hidden, heads * self.qk_dim)
        self.kv_a_proj_with_mqa = linear(hidden, self.kv_rank + self.rope_dim)
        self.kv_a_layernorm = RMSNorm(self.kv_rank, LATENT_NORM_EPS)
        self.kv_b_proj = linear(self.kv_rank, heads * (self.nope_dim + self.v_dim))
        self.o_proj = linear(heads * self.v_dim, hidden)

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        if self.has_q_lora:
            return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        return self.q_proj(x)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerCache) -> torch.Tensor:
        batch, length, _ = x.shape
        query = self._query(x).view(batch, length, self.num_heads, self.qk_dim).transpose(1, 2)  # [B, h, T, dqk]
        q_nope, q_pe = query.split([self.nope_dim, self.rope_dim], dim=-1)
        q_pe = apply_rotary(q_pe, cos, sin)

        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)  # [B, T, r_kv]
        k_pe = apply_rotary(k_pe, cos, sin)  # [B, T, d_rope]: one key head shared by every query head
        c_kv, k_pe = cache.extend(c_kv, k_pe)

        total = c_kv.shape[1]
        kv = self.kv_b_proj(c_kv).view(batch, total, self.num_heads, self.nope_dim + self.v_dim).transpose(1, 2)
        k_nope, value = kv.split([self.nope_dim, self.v_dim], dim=-1)
        shared_pe = k_pe.unsqueeze(1).expand(batch, self.num_heads, total, self.rope_dim)
        key = torch.cat([k_nope, shared_pe], dim=-1)
        query = torch.cat([q_nope, q_pe], dim=-1)

        out = causal_attention(query, key, value, softmax_scale(self.qk_dim))  # [B, h, T, dv]
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, self.num_heads * self.v_dim))


class MiniCPM3ForCausalLM(CausalLM):
    attention_class = MLAAttention
