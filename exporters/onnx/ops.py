"""Building blocks shared by every architecture and both flavours (standard ONNX ops only).

Weights arrive in HF layout ([out, in]) and are written once, transposed to [in, out] for MatMul, with the
muP constants folded where exact: residual_scale into o_proj/down_proj, 1/logit_scale into the final norm
weight, scale_emb into an untied embedding table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from onnx import TensorProto, helper

from edgecpm.arch.base import DecoderConfig
from edgecpm.checkpoint.base import TensorRef
from edgecpm.errors import UnsupportedError
from edgecpm.exporters.onnx.quantized import FloatTable, Projection, Table
from edgecpm.exporters.onnx.spec import ExportOptions
from edgecpm.exporters.onnx.writer import ONNX_DTYPES, GraphWriter
from edgecpm.quant.plan import fuse, scaled

if TYPE_CHECKING:
    from edgecpm.exporters.onnx.lowering import Lowering


def cast(w: GraphWriter, x: str, dtype) -> str:
    return w.op("Cast", [x], to=ONNX_DTYPES[np.dtype(dtype)])


TABLE = "model.embed_tokens.weight"
HEAD = "lm_head.weight"


@dataclass
class Weights:
    """Reads checkpoint tensors one at a time and writes them in the export dtype, or quantized.

    `quantizer` (edgecpm.quant.plan.WeightQuantizer) decides each weight's storage; `quantized` (a
    flavour's writer from `quantized.py`) lays it out. Both None for a float export.
    """

    w: GraphWriter
    tensors: Mapping[str, TensorRef]
    dtype: np.dtype
    quantizer: Any = None
    quantized: Any = None

    def read(self, name: str) -> np.ndarray:
        return self.tensors[name].numpy(np.float32)

    def vector(self, name: str, scale: float = 1.0, *, out: str | None = None) -> str:
        array = self.read(name)
        if scale != 1.0:
            array = array * np.float32(scale)
        return self.w.weight(out or name, array.astype(self.dtype, copy=False))

    def _storage(self, name: str, role: str | None = None):
        return None if self.quantizer is None else self.quantizer.storage(name, role)

    def matmul(self, names: list[str], *, out: str, scale: float = 1.0, role: str | None = None) -> Projection:
        """x @ W^T for HF [out, in] tensors: one MatMul for fused projections (QKV, gate/up).

        `role`: the tensor whose quantization applies (a tied head reads the table as the LM head).
        """
        stored = [self._storage(name, role) for name in names]
        if any(s is not None for s in stored):
            if any(s is None for s in stored):
                raise UnsupportedError("projections fused into one MatMul must be all quantized or all float", field=names[0])
            return self._quantized_matmul(names, out, scale, role)
        parts = [self.read(name) for name in names]
        fused = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        del parts
        if scale != 1.0:
            fused = fused * np.float32(scale)
        weight = self.w.weight(out, np.ascontiguousarray(fused.T, dtype=self.dtype))
        return lambda x: self.w.op("MatMul", [x, weight])

    def _quantized_matmul(self, names: list[str], out: str, scale: float, role: str | None) -> Projection:
        layers = [scaled(self.quantizer.quantize(name, role), scale) for name in names]
        fused = fuse(layers)
        if fused is not None:
            return self.quantized.linear(out, fused)
        # Layouts differ (e.g. act-order GPTQ layers with their own channel orders): one MatMul each.
        parts = [self.quantized.linear(f"{out}.{i}", layer) for i, layer in enumerate(layers)]
        return lambda x: self.w.op("Concat", [part(x) for part in parts], axis=-1)

    def table(self, name: str, *, out: str, scale: float = 1.0) -> Table:
        if self._storage(name) is None:
            return FloatTable(self.w, self.vector(name, scale, out=out))
        return self.quantized.table(out, scaled(self.quantizer.quantize(name), scale))

    def tied_head(self, table: Table, shared_float: bool) -> Projection:
        """The LM head of a tied model: the table itself when stored alike, else its own copy."""
        shares = self.quantizer is None or self.quantizer.head_shares_table()
        if shares and (self._storage(TABLE) is not None or shared_float):
            return table.head
        return self.matmul([TABLE], out="lm_head", role=HEAD)

    def array(self, out: str, array: np.ndarray) -> str:
        return self.w.weight(out, np.ascontiguousarray(array, dtype=self.dtype))


@dataclass
class BuildContext:
    """What a per-architecture builder gets: config, weights, writer and the flavour's lowering."""

    config: DecoderConfig
    weights: Weights
    w: GraphWriter
    lowering: Lowering
    options: ExportOptions


def linear(w: GraphWriter, x: str, weight: Projection) -> str:
    return weight(x)


def split(w: GraphWriter, x: str, sizes: list[int], axis: int = -1) -> list[str]:
    return w.op("Split", [x, w.const(sizes)], len(sizes), axis=axis)


# ---- embedding and head ---------------------------------------------------------------------------------

def embedding(ctx: BuildContext, ids: str) -> tuple[str, Table]:
    """Returns (hidden [1,S,H], table). A tied table stays raw so the LM head can share it."""
    cfg, w = ctx.config, ctx.w
    if cfg.tie_word_embeddings:
        table = ctx.weights.table(TABLE, out="embed_tokens")
        hidden = table.gather(ids)
        if cfg.scale_emb != 1.0:
            hidden = w.op("Mul", [hidden, w.const(cfg.scale_emb, ctx.weights.dtype)])
        return hidden, table
    table = ctx.weights.table(TABLE, scale=cfg.scale_emb, out="embed_tokens")
    return table.gather(ids), table


def last_position(w: GraphWriter, x: str) -> str:
    """[1,S,H] -> [1,1,H]: prefill only needs the last position's logits."""
    return w.op("Gather", [x, w.const([-1])], axis=1)


def final_logits(ctx: BuildContext, residual: str, branch: str, table: Table) -> str:
    """Final residual add + norm on the last position, then the LM head (1/logit_scale folded in the norm)."""
    cfg, w, low = ctx.config, ctx.w, ctx.lowering
    norm_w = ctx.weights.vector("model.norm.weight", 1.0 / cfg.logit_scale, out="final_norm")
    normed, _ = low.add_norm(last_position(w, residual), last_position(w, branch), norm_w, cfg.rms_norm_eps)
    flat = w.op("Reshape", [normed, w.const([1, cfg.hidden_size])])
    if not cfg.tie_word_embeddings:
        return linear(w, flat, ctx.weights.matmul([HEAD], out="lm_head"))
    return linear(w, flat, ctx.weights.tied_head(table, ctx.options.tied_head == "shared"))


# ---- feed-forward -------------------------------------------------------------------------------------

def activation(ctx: BuildContext) -> Callable[[GraphWriter, str], str]:
    return ACTIVATIONS[ctx.config.hidden_act](ctx.config, ctx.weights.dtype)


def _silu(cfg: DecoderConfig, dtype: np.dtype) -> Callable[[GraphWriter, str], str]:
    return lambda w, x: w.op("Mul", [x, w.op("Sigmoid", [x])])


def _fatrelu(cfg: DecoderConfig, dtype: np.dtype) -> Callable[[GraphWriter, str], str]:
    """gate if gate > threshold else 0 (MiniCPM-S, spec §1.7)."""
    def apply(w: GraphWriter, x: str) -> str:
        keep = w.op("Greater", [x, w.const(cfg.hidden_act_param, dtype)])
        return w.op("Where", [keep, x, w.const(0.0, dtype)])
    return apply


ACTIVATIONS = {"silu": _silu, "fatrelu": _fatrelu}


def mlp(ctx: BuildContext, x: str, prefix: str, residual_scale: float) -> str:
    """GLU MLP with one fused gate/up MatMul; residual_scale folded into down_proj."""
    w, weights, inner = ctx.w, ctx.weights, ctx.config.intermediate_size
    gate_up = weights.matmul([f"{prefix}mlp.gate_proj.weight", f"{prefix}mlp.up_proj.weight"], out=f"{prefix}mlp.gate_up")
    down = weights.matmul([f"{prefix}mlp.down_proj.weight"], out=f"{prefix}mlp.down", scale=residual_scale)
    gate, up = split(w, linear(w, x, gate_up), [inner, inner])
    return linear(w, w.op("Mul", [activation(ctx)(w, gate), up]), down)


def moe(ctx: BuildContext, x: str, prefix: str, residual_scale: float) -> str:
    """Top-k softmax-routed experts, computed densely (every expert on every token, then masked).

    Exact, and on CPU for small batches the dense form is close to free compared with gathers. Router
    softmax, top-k and renormalisation run in fp32.
    """
    cfg, w, weights = ctx.config, ctx.w, ctx.weights
    n, inner, hidden = cfg.num_experts, cfg.intermediate_size, cfg.hidden_size
    router = weights.matmul([f"{prefix}mlp.gate.weight"], out=f"{prefix}mlp.router")
    logits = linear(w, x, router)
    if weights.dtype != np.float32:
        logits = cast(w, logits, np.float32)
    probs = w.op("Softmax", [logits], axis=-1)
    top_values, top_index = w.op("TopK", [probs, w.const([cfg.num_experts_per_tok])], 2, axis=-1)
    top_values = w.op("Div", [top_values, w.op("ReduceSum", [top_values, w.const([-1])], keepdims=1)])
    zeros = w.op("ConstantOfShape", [w.op("Shape", [probs])], value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))
    mix = w.op("ScatterElements", [zeros, top_index, top_values], axis=-1)  # [1,S,E]
    if weights.dtype != np.float32:
        mix = cast(w, mix, weights.dtype)

    names = []
    for e in range(n):
        names += [f"{prefix}mlp.experts.{e}.w1.weight", f"{prefix}mlp.experts.{e}.w3.weight"]
    gate_up = weights.matmul(names, out=f"{prefix}mlp.experts.gate_up")  # [H, E*2I], expert-major
    down = np.stack([weights.read(f"{prefix}mlp.experts.{e}.w2.weight").T for e in range(n)])  # [E, I, H]
    down_name = weights.array(f"{prefix}mlp.experts.down", down * np.float32(residual_scale))
    del down
    h = w.op("Reshape", [linear(w, x, gate_up), w.const([-1, n, 2 * inner])])  # [S,E,2I]
    gate, up = split(w, h, [inner, inner])
    inner_act = w.op("Transpose", [w.op("Mul", [activation(ctx)(w, gate), up])], perm=[1, 0, 2])  # [E,S,I]
    per_expert = w.op("MatMul", [inner_act, down_name])  # [E,S,H]
    mix_e = w.op("Transpose", [w.op("Reshape", [mix, w.const([-1, n, 1])])], perm=[1, 0, 2])  # [E,S,1]
    out = w.op("ReduceSum", [w.op("Mul", [per_expert, mix_e]), w.const([0])], keepdims=0)  # [S,H]
    return w.op("Reshape", [out, w.const([1, -1, hidden])])


def feed_forward(ctx: BuildContext, x: str, prefix: str) -> str:
    block = moe if ctx.config.is_moe else mlp
    return block(ctx, x, prefix, ctx.config.residual_scale)


def decoder_stack(ctx: BuildContext, attention: Callable[[BuildContext, int, str], str]) -> str:
    """Embedding, L pre-norm layers (residual adds fused into the next norm), last-position logits.

    `attention(ctx, layer, x)` returns the layer's attention branch after o_proj (residual scale folded).
    """
    cfg, low, weights = ctx.config, ctx.lowering, ctx.weights
    hidden, table = embedding(ctx, low.ids)
    branch = None
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}."
        norm_w = weights.vector(f"{p}input_layernorm.weight")
        if branch is None:
            x = low.norm(hidden, norm_w, cfg.rms_norm_eps)
        else:
            x, hidden = low.add_norm(hidden, branch, norm_w, cfg.rms_norm_eps)
        post_w = weights.vector(f"{p}post_attention_layernorm.weight")
        x, hidden = low.add_norm(hidden, attention(ctx, layer, x), post_w, cfg.rms_norm_eps)
        branch = feed_forward(ctx, x, p)
    return final_logits(ctx, hidden, branch, table)
