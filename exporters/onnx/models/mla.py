"""`minicpm3`: Multi-head Latent Attention with a compressed latent cache (spec §3).

Absorbed form: per layer and token only [k_pe, c_kv] (rope + kv_lora values) is cached. Each query head
is [q_pe, q_nope @ W_kc] so q·k = q_pe·k_pe + q_nope·(W_kc c_kv); the attention output over the cached
latent goes through W_vc per head and then o_proj. W_kc/W_vc are applied as batched MatMuls at run time
rather than folded into q_b/o_proj, which would multiply those weights by kv_lora/qk_nope.
"""

from __future__ import annotations

import numpy as np

from edgecpm.arch.minicpm3 import LATENT_NORM_EPS
from edgecpm.exporters.onnx import ops
from edgecpm.exporters.onnx.lowering import AttentionShape, softmax_scale
from edgecpm.exporters.onnx.ops import BuildContext


def _absorbed_weights(ctx: BuildContext, attn: str) -> tuple[str, str]:
    """W_kc [nh, nope, r] (query side) and W_vc [nh, r, v] (output side) from kv_b_proj."""
    cfg = ctx.config
    kv_b = ctx.weights.read(f"{attn}kv_b_proj.weight").reshape(cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.v_head_dim,
                                                               cfg.kv_lora_rank)
    w_kc = kv_b[:, : cfg.qk_nope_head_dim, :]
    w_vc = np.transpose(kv_b[:, cfg.qk_nope_head_dim:, :], (0, 2, 1))
    return ctx.weights.array(f"{attn}w_kc", w_kc), ctx.weights.array(f"{attn}w_vc", w_vc)


def attention(ctx: BuildContext, layer: int, x: str) -> str:
    cfg, w, weights = ctx.config, ctx.w, ctx.weights
    nh, nope, rope, rank, v = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank,
                               cfg.v_head_dim)
    attn = f"model.layers.{layer}.self_attn."
    q_name = f"{attn}q_a_proj.weight" if cfg.q_lora_rank is not None else f"{attn}q_proj.weight"
    q_width = cfg.q_lora_rank if cfg.q_lora_rank is not None else nh * (nope + rope)
    # q_a (or q) and kv_a read the same input: one MatMul.
    fused = weights.matmul([q_name, f"{attn}kv_a_proj_with_mqa.weight"], out=f"{attn}q_kv_a")
    q, c_kv, k_pe = ops.split(w, ops.linear(w, x, fused), [q_width, rank, rope])
    if cfg.q_lora_rank is not None:
        q = ctx.lowering.norm(q, weights.vector(f"{attn}q_a_layernorm.weight"), LATENT_NORM_EPS)
        q = ops.linear(w, q, weights.matmul([f"{attn}q_b_proj.weight"], out=f"{attn}q_b"))
    c_kv = ctx.lowering.norm(c_kv, weights.vector(f"{attn}kv_a_layernorm.weight"), LATENT_NORM_EPS)
    key = w.op("Concat", [k_pe, c_kv], axis=-1)  # [1,S,rope+r]; rotary part first

    w_kc, w_vc = _absorbed_weights(ctx, attn)
    q_nope, q_pe = ops.split(w, w.op("Reshape", [q, w.const([1, -1, nh, nope + rope])]), [nope, rope])
    q_abs = w.op("MatMul", [w.op("Transpose", [q_nope], perm=[0, 2, 1, 3]), w_kc])  # [1,nh,S,r]
    query = w.op("Concat", [q_pe, w.op("Transpose", [q_abs], perm=[0, 2, 1, 3])], axis=-1)  # [1,S,nh,rope+r]
    query = w.op("Reshape", [query, w.const([1, -1, nh * (rope + rank)])])

    shape = AttentionShape(num_heads=nh, kv_heads=1, head_dim=rope + rank, v_dim=rank, rotary_dim=rope,
                           scale=softmax_scale(nope + rope), value_is_key=True)
    latent_out = ctx.lowering.attention(layer, query, key, None, shape)
    latent_out = w.op("Transpose", [w.op("Reshape", [latent_out, w.const([1, -1, nh, rank])])], perm=[0, 2, 1, 3])
    heads = w.op("Transpose", [w.op("MatMul", [latent_out, w_vc])], perm=[0, 2, 1, 3])  # [1,S,nh,v]
    o_proj = weights.matmul([f"{attn}o_proj.weight"], out=f"{attn}o", scale=cfg.residual_scale)
    return ops.linear(w, w.op("Reshape", [heads, w.const([1, -1, nh * v])]), o_proj)


def build(ctx: BuildContext) -> str:
    return ops.decoder_stack(ctx, attention)
