"""`minicpm` and `llama`: pre-norm GQA decoder (spec §1), muP scales folded by the shared blocks."""

from __future__ import annotations

from edgecpm.exporters.onnx import ops
from edgecpm.exporters.onnx.lowering import AttentionShape, softmax_scale
from edgecpm.exporters.onnx.ops import BuildContext


def attention(ctx: BuildContext, layer: int, x: str) -> str:
    """Fused QKV MatMul -> the flavour's attention over the cache -> o_proj (residual scale folded)."""
    cfg, w, weights = ctx.config, ctx.w, ctx.weights
    d = cfg.head_dim
    shape = AttentionShape(num_heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads, head_dim=d, v_dim=d,
                           rotary_dim=cfg.rope.rotary_dim, scale=softmax_scale(d))
    p = f"model.layers.{layer}.self_attn."
    qkv = weights.matmul([f"{p}{n}_proj.weight" for n in "qkv"], out=f"{p}qkv")
    attn = ctx.lowering.attention(layer, ops.linear(w, x, qkv), None, None, shape, packed=True)
    o_proj = weights.matmul([f"{p}o_proj.weight"], out=f"{p}o", scale=cfg.residual_scale)
    return ops.linear(w, attn, o_proj)


def build(ctx: BuildContext) -> str:
    """Adds the whole decoder to ctx.w; returns the logits tensor [1, V] of the last position."""
    return ops.decoder_stack(ctx, attention)
