"""Reference model for `minicpm` and `llama`: Llama-style GQA decoder plus MiniCPM's muP scalars (spec §1).

Llama checkpoints parse to unit scales (scale_emb 1, residual 1, logit divisor 1), so one module
serves both. MLP flavour (SiLU GLU, FATReLU GLU, MoE) and RoPE variant come from the config.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edgecpm.arch.minicpm import MiniCPMConfig
from edgecpm.models.common import CausalLM, LayerCache, apply_rotary, causal_attention, linear, softmax_scale


class GQAAttention(nn.Module):
    """q/k/v/o projections, rotate-half RoPE on full heads, kv heads shared by nh/nkv query heads (§1.5).

    The cache holds rotated keys and values per kv head: [B, nkv, S, d] each. With `sparse` set (a
    SparseAttentionConfig: InfLLM v2, spec §6) attention is the numpy reference edgecpm.sparse.sparse_attention
    (batch 1), the cache also holding the layer's compressed keys and, under use_nope, the keys before RoPE.
    """

    sparse = None  # set through CausalLM.use_sparse_attention

    def __init__(self, config: MiniCPMConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_proj = linear(config.hidden_size, self.num_heads * self.head_dim)
        self.k_proj = linear(config.hidden_size, self.num_kv_heads * self.head_dim)
        self.v_proj = linear(config.hidden_size, self.num_kv_heads * self.head_dim)
        self.o_proj = linear(self.num_heads * self.head_dim, config.hidden_size)

    def _split_heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, heads, self.head_dim).transpose(1, 2)  # [B, heads, T, d]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerCache) -> torch.Tensor:
        query_nope = self._split_heads(self.q_proj(x), self.num_heads)
        key_nope = self._split_heads(self.k_proj(x), self.num_kv_heads)
        query, key = apply_rotary(query_nope, cos, sin), apply_rotary(key_nope, cos, sin)
        value = self._split_heads(self.v_proj(x), self.num_kv_heads)
        if self.sparse is not None:
            out = self._sparse_attention(query, query_nope, key, key_nope, value, cache)
        else:
            key, value = cache.extend(key, value)
            # Query head h reads kv head h // group (HF repeat_kv order).
            group = self.num_heads // self.num_kv_heads
            key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
            out = causal_attention(query, key, value, softmax_scale(self.head_dim))
        batch, _, length, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim))


    def _sparse_attention(self, query, query_nope, key, key_nope, value, cache: LayerCache) -> torch.Tensor:
        from edgecpm.sparse import CompressedKeys, sparse_attention

        if query.shape[0] != 1:
            raise ValueError("the sparse attention reference runs batch 1")
        use_nope = self.sparse.use_nope
        cached = cache.extend(key, value, key_nope) if use_nope else cache.extend(key, value)
        if cache.state is None:
            cache.state = CompressedKeys(self.sparse, self.num_kv_heads, self.head_dim)
        numpy = [t[0].detach().to(torch.float32).numpy() for t in (query, *cached)]
        out = sparse_attention(numpy[0], numpy[1], numpy[2], cache.state, self.sparse,
                               q_nope=query_nope[0].detach().to(torch.float32).numpy() if use_nope else None,
                               k_nope_cache=numpy[3] if use_nope else None)
        return torch.from_numpy(np.ascontiguousarray(out))[None].to(query.dtype)


class DecoderForCausalLM(CausalLM):
    attention_class = GQAAttention
