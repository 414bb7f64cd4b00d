"""The thin lowering layer: the few operations whose ONNX form depends on the flavour.

Builders speak in model terms (norm, residual+norm, attention over a cache); a `Lowering` turns each into
nodes. `OrtLowering` uses onnxruntime contrib ops (GroupQueryAttention over a shared past/present buffer,
SkipSimplifiedLayerNormalization); `StandardLowering` uses only standard ONNX ops (explicit causal
attention, KV concatenation) so TensorRT can take the graph. Everything else is common code in `ops.py`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from edgecpm.arch.rope import RopeConfig
from edgecpm.errors import UnsupportedError
from edgecpm.exporters.onnx import ops
from edgecpm.exporters.onnx.infllmv2 import attention_node
from edgecpm.exporters.onnx.spec import ExportOptions, GraphIO, KVTensor, TensorSpec
from edgecpm.exporters.onnx.writer import ONNX_DTYPES, ORT_DOMAIN, GraphWriter
from edgecpm.sparse.op import InfLLMv2Attributes

GQA_HEAD_MULTIPLE = 16
GQA_ROTARY_MULTIPLE = 16
INPUT_IDS = "input_ids"
LOGITS = "logits"


@dataclass(frozen=True)
class AttentionShape:
    """One attention layer as the lowering sees it.

    q and k carry `head_dim` values per head with the rotary part FIRST (`rotary_dim` values; the rest
    has no position). `value_is_key` (absorbed MLA): the cache holds only the key, the value is the key's
    non-rotary part, so attention returns `head_dim - rotary_dim` values per query head.
    """

    num_heads: int
    kv_heads: int
    head_dim: int
    v_dim: int
    rotary_dim: int
    scale: float
    value_is_key: bool = False


def rope_tables(rope: RopeConfig, max_context: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [max_context, rotary_dim/2], baked once (fp32 math, LongRoPE factors and mscale included).

    Frequencies are those of a sequence of `max_context` tokens. max_context <= max_position_embeddings is
    enforced, so dynamic NTK is exactly plain RoPE here; LongRoPE picks short/long factors by that length
    (identical in every released config, where long == short or max_pos == original_max).
    """
    cos, sin = rope.cos_sin(np.arange(max_context), seq_len=max_context)
    half = rope.rotary_dim // 2
    return cos[:, :half], sin[:, :half]


class Lowering:
    flavour = ""
    uses_contrib_ops = False
    kv_mode = ""

    def __init__(self, w: GraphWriter, options: ExportOptions, rope: RopeConfig):
        self.w = w
        self.options = options
        self.dtype = np.dtype(options.np_dtype)
        self.rope = rope
        self.kv: list[KVTensor] = []
        self.inputs: list[TensorSpec] = []
        self.outputs: list[TensorSpec] = []
        cos, sin = rope_tables(rope, options.max_context)
        self.cos = w.weight("rope_cos", cos.astype(self.dtype))
        self.sin = w.weight("rope_sin", sin.astype(self.dtype))

    # --- graph boundary ------------------------------------------------------------------------------
    def _input(self, name: str, dtype: type, shape: list) -> str:
        self.w.add_input(name, ONNX_DTYPES[np.dtype(dtype)], shape)
        self.inputs.append(TensorSpec(name, np.dtype(dtype).name, tuple(shape)))
        return name

    def _output(self, name: str, dtype: type, shape: list) -> None:
        self.w.add_output(name, ONNX_DTYPES[np.dtype(dtype)], shape)
        self.outputs.append(TensorSpec(name, np.dtype(dtype).name, tuple(shape)))

    def input_ids(self) -> str:
        return self._input(INPUT_IDS, np.int64, [1, "sequence_length"])

    def logits_output(self, logits: str) -> None:
        """logits [1, V] fp32 for the last position."""
        if self.dtype != np.float32:
            logits = self.w.op("Cast", [logits], to=TensorProto.FLOAT, outputs=[LOGITS])
        else:
            self.w.op("Identity", [logits], outputs=[LOGITS])
        self._output(LOGITS, np.float32, [1, "vocab_size"])
        # logits first, then the cache outputs in layer order
        self.w.outputs.insert(0, self.w.outputs.pop())
        self.outputs.insert(0, self.outputs.pop())

    def graph_io(self) -> GraphIO:
        # KV tensors are listed after the position inputs, in layer order, as the runtime binds them.
        return GraphIO(self.inputs, self.outputs, self.kv, self.kv_mode, self.dtype.name,
                       attention="dense" if self.options.sparse is None else "sparse")

    def _sparse_shape(self, shape: AttentionShape) -> InfLLMv2Attributes:
        """The InfLLMv2Attention attributes of a layer (UnsupportedError where the attention has no sparse form)."""
        if shape.value_is_key:
            raise UnsupportedError("InfLLM v2 sparse attention is defined for GQA attention (minicpm, llama), not for "
                                   "MLA's latent cache; export with --attention dense", field="--attention")
        return dataclasses.replace(InfLLMv2Attributes.of(self.options.sparse, shape.head_dim), scale=shape.scale)

    def _infllmv2(self, q4: str, q_raw: str, keys: str, values: str, shape: AttentionShape, total: str) -> str:
        """InfLLM v2 attention (one ai.edgecpm.InfLLMv2Attention node): q4 [1,S,nh,d] roped, q_raw [1,S,nh*d] before
        RoPE, keys/values [1,kvh,T,d|v] the whole history (heads-major), total [1] = T -> [1,S,nh*v]."""
        w = self.w
        attributes = self._sparse_shape(shape)
        nh, d = shape.num_heads, shape.head_dim
        inputs = [w.op("Transpose", [q4], perm=[0, 2, 1, 3]), keys, values]
        if attributes.use_nope:
            q_nope = w.op("Reshape", [q_raw, w.const([1, -1, nh, d])])
            inputs += [w.op("Transpose", [q_nope], perm=[0, 2, 1, 3]), self._unrope(keys, d, total)]
        out = attention_node(w, attributes, inputs, self.dtype)  # [1,nh,S,v]
        return w.op("Reshape", [w.op("Transpose", [out], perm=[0, 2, 1, 3]), w.const([1, -1, nh * shape.v_dim])])

    def _unrope(self, keys: str, dim: int, total: str) -> str:
        """The keys before RoPE, keys [1,kvh,T,dim] of positions 0..T-1 rotated back (use_nope's selection keys).

        Recovered from the roped cache rather than kept in a second cache, so the graph's I/O stays that of dense
        attention; the inverse rotation is exact up to float rounding (a few ulp).
        """
        w = self.w
        rd, half = self.rope.rotary_dim, self.rope.rotary_dim // 2
        positions = w.op("Range", [w.const(0), w.op("Squeeze", [total, w.const([0])]), w.const(1)])
        cos, sin = (w.op("Gather", [table, positions], axis=0) for table in (self.cos, self.sin))  # [T, half]
        splits = [half, half] + ([dim - rd] if dim > rd else [])
        parts = w.op("Split", [keys, w.const(splits)], len(splits), axis=3)
        r1, r2 = parts[0], parts[1]
        x1 = w.op("Add", [w.op("Mul", [r1, cos]), w.op("Mul", [r2, sin])])
        x2 = w.op("Sub", [w.op("Mul", [r2, cos]), w.op("Mul", [r1, sin])])
        return w.op("Concat", [x1, x2, *parts[2:]], axis=3)

    def _rope(self, x: str, heads: int, dim: int, positions: str) -> str:
        """Rotate-half RoPE on the first rotary_dim values of each head of x [1,S,heads*dim]."""
        w = self.w
        rd, half = self.rope.rotary_dim, self.rope.rotary_dim // 2
        x4 = w.op("Reshape", [x, w.const([1, -1, heads, dim])])
        cos = w.op("Unsqueeze", [w.op("Gather", [self.cos, positions], axis=0), w.const([1])])  # [S,1,half]
        sin = w.op("Unsqueeze", [w.op("Gather", [self.sin, positions], axis=0), w.const([1])])
        splits = [half, half] + ([dim - rd] if dim > rd else [])
        parts = w.op("Split", [x4, w.const(splits)], len(splits), axis=3)
        x1, x2 = parts[0], parts[1]
        r1 = w.op("Sub", [w.op("Mul", [x1, cos]), w.op("Mul", [x2, sin])])
        r2 = w.op("Add", [w.op("Mul", [x2, cos]), w.op("Mul", [x1, sin])])
        return w.op("Concat", [r1, r2, *parts[2:]], axis=3)  # [1,S,heads,dim]

    # --- flavour-specific operations -----------------------------------------------------------------
    def norm(self, x: str, weight: str, eps: float) -> str:
        raise NotImplementedError

    def add_norm(self, residual: str, branch: str, weight: str, eps: float) -> tuple[str, str]:
        """(RMSNorm(residual + branch), residual + branch)."""
        raise NotImplementedError

    def attention(self, layer: int, q: str, k: str, v: str | None, shape: AttentionShape, *, packed: bool = False) -> str:
        """q [1,S,nh*head_dim], k [1,S,kvh*head_dim], v [1,S,kvh*v_dim] (un-roped) -> [1,S,nh*v_out].

        `packed`: q is one [1,S,(nh+2*kvh)*head_dim] tensor (fused QKV projection), k and v unused.
        """
        raise NotImplementedError


class OrtLowering(Lowering):
    flavour = "ort"
    uses_contrib_ops = True
    kv_mode = "shared_buffer"

    def __init__(self, w: GraphWriter, options: ExportOptions, rope: RopeConfig):
        super().__init__(w, options, rope)
        self.ids = self.input_ids()
        # GroupQueryAttention's own conventions: seqlens_k = total length - 1, total_sequence_length scalar.
        self.seqlens_k = self._input("seqlens_k", np.int32, [1])
        self.total_length = self._input("total_sequence_length", np.int32, [])

    def norm(self, x: str, weight: str, eps: float) -> str:
        return self.w.op("SimplifiedLayerNormalization", [x, weight], axis=-1, epsilon=eps, stash_type=1)

    def add_norm(self, residual: str, branch: str, weight: str, eps: float) -> tuple[str, str]:
        normed, _, _, total = self.w.op("SkipSimplifiedLayerNormalization", [branch, residual, weight], 4,
                                        domain=ORT_DOMAIN, epsilon=eps)
        return normed, total

    def attention(self, layer, q, k, v, shape: AttentionShape, *, packed=False):
        if self.options.sparse is not None:
            return self._sparse_attention(layer, q, k, v, shape, packed)
        w = self.w
        nh, kvh, d = shape.num_heads, shape.kv_heads, shape.head_dim
        # GroupQueryAttention (CPU) needs head_size % 16 == 0: zero-pad every head at its end (scores and
        # rotary are unchanged); real MiniCPM/MiniCPM3 head sizes (64, 128, 32+256) need no padding.
        padded = -(-d // GQA_HEAD_MULTIPLE) * GQA_HEAD_MULTIPLE
        if packed and (padded != d or shape.rotary_dim % GQA_ROTARY_MULTIPLE):
            q, k, v = w.op("Split", [q, w.const([nh * d, kvh * d, kvh * shape.v_dim])], 3, axis=2)
            packed = False
        if not packed and shape.value_is_key:
            v = k  # the un-roped key is the value (its rotary part is sliced away afterwards)
        if padded != d:
            q, k, v = (self._pad_heads(t, heads, d, padded) for t, heads in ((q, nh), (k, kvh), (v, kvh)))
        past, present = [], []
        for kind in ("key", "value"):
            name_in, name_out = f"past_{kind}.{layer}", f"present_{kind}.{layer}"
            self._input(name_in, self.dtype, [1, kvh, "kv_capacity", padded])
            self._output(name_out, self.dtype, [1, kvh, "kv_capacity", padded])
            self.kv.append(KVTensor(layer, kind, name_in, name_out, kvh, padded))
            past.append(name_in)
            present.append(name_out)
        # GQA's fused rotary needs rotary_dim % 16 == 0 (all released models); otherwise rotate explicitly.
        fused_rotary = shape.rotary_dim % GQA_ROTARY_MULTIPLE == 0
        if not fused_rotary:
            positions = self._positions()
            q, k = self._rope(q, nh, padded, positions), self._rope(k, kvh, padded, positions)
            q, k = (w.op("Reshape", [t, w.const([1, -1, heads * padded])]) for t, heads in ((q, nh), (k, kvh)))
        q_in, k_in, v_in = (q, "", "") if packed else (q, k, v)
        rotary = [self.cos, self.sin] if fused_rotary else []
        out = w.op("GroupQueryAttention", [q_in, k_in, v_in, *past, self.seqlens_k, self.total_length, *rotary],
                   3, domain=ORT_DOMAIN, outputs=[w.fresh("attn"), *present], num_heads=nh, kv_num_heads=kvh,
                   scale=shape.scale, do_rotary=int(fused_rotary), rotary_interleaved=0)[0]
        start, stop = (shape.rotary_dim, d) if shape.value_is_key else (0, shape.v_dim)
        if (start, stop) == (0, padded):
            return out
        heads = w.op("Reshape", [out, w.const([1, -1, nh, padded])])
        kept = w.op("Slice", [heads, w.const([start]), w.const([stop]), w.const([3])])
        return w.op("Reshape", [kept, w.const([1, -1, nh * (stop - start)])])

    def _sparse_attention(self, layer, q, k, v, shape: AttentionShape, packed: bool) -> str:
        """InfLLM v2 in place of GroupQueryAttention, over the same shared past/present buffers.

        The new rows are scattered into the buffer at positions total - S .. total - 1 (the runtime binds past_* and
        present_* to one buffer, so this writes in place, as GroupQueryAttention does), and attention reads the first
        `total` rows. No head padding: that was for GroupQueryAttention's kernels only.
        """
        w = self.w
        nh, kvh, d = shape.num_heads, shape.kv_heads, shape.head_dim
        self._sparse_shape(shape)
        if packed:
            q, k, v = w.op("Split", [q, w.const([nh * d, kvh * d, kvh * shape.v_dim])], 3, axis=2)
        positions = self._positions()
        total = w.op("Reshape", [w.op("Cast", [self.total_length], to=TensorProto.INT64), w.const([1])])
        rows = {"key": self._rope(k, kvh, d, positions), "value": w.op("Reshape", [v, w.const([1, -1, kvh, shape.v_dim])])}
        history = {}
        for kind, dim in (("key", d), ("value", shape.v_dim)):
            name_in, name_out = f"past_{kind}.{layer}", f"present_{kind}.{layer}"
            self._input(name_in, self.dtype, [1, kvh, "kv_capacity", dim])
            self._output(name_out, self.dtype, [1, kvh, "kv_capacity", dim])
            self.kv.append(KVTensor(layer, kind, name_in, name_out, kvh, dim))
            new = w.op("Transpose", [rows[kind]], perm=[0, 2, 1, 3])  # [1,kvh,S,dim]
            where = w.op("Expand", [w.op("Reshape", [positions, w.const([1, 1, -1, 1])]), w.op("Shape", [new])])
            present = w.op("ScatterElements", [name_in, where, new], axis=2, outputs=[name_out])
            history[kind] = w.op("Slice", [present, w.const([0]), total, w.const([2])])  # [1,kvh,T,dim]
        return self._infllmv2(self._rope(q, nh, d, positions), q, history["key"], history["value"], shape, total)

    def _positions(self) -> str:
        """Positions of the new tokens, total - S .. total - 1 (explicit rotary: the fallback and sparse attention)."""
        w = self.w
        total = w.op("Cast", [self.total_length], to=TensorProto.INT64)
        seq_len = w.op("Squeeze", [w.op("Shape", [self.ids], start=1, end=2), w.const([0])])
        return w.op("Range", [w.op("Sub", [total, seq_len]), total, w.const(1)])

    def _pad_heads(self, x: str, heads: int, dim: int, padded: int) -> str:
        w = self.w
        x4 = w.op("Reshape", [x, w.const([1, -1, heads, dim])])
        x4 = w.op("Pad", [x4, w.const([0, 0, 0, 0, 0, 0, 0, padded - dim])])
        return w.op("Reshape", [x4, w.const([1, -1, heads * padded])])


class StandardLowering(Lowering):
    flavour = "standard"
    kv_mode = "append"

    def __init__(self, w: GraphWriter, options: ExportOptions, rope: RopeConfig):
        super().__init__(w, options, rope)
        self.ids = self.input_ids()
        self._positions: tuple[str, str] | None = None
        self._mask: str | None = None
        self._masks: dict[int, str] = {}

    # RMSNorm exactly as the reference: variance in fp32, cast back before the weight multiply.
    def norm(self, x: str, weight: str, eps: float) -> str:
        w = self.w
        xf = ops.cast(w, x, np.float32) if self.dtype != np.float32 else x
        var = w.op("ReduceMean", [w.op("Mul", [xf, xf]), w.const([-1])], keepdims=1)
        inv = w.op("Reciprocal", [w.op("Sqrt", [w.op("Add", [var, w.const(eps, np.float32)])])])
        y = w.op("Mul", [xf, inv])
        if self.dtype != np.float32:
            y = ops.cast(w, y, self.dtype)
        return w.op("Mul", [y, weight])

    def add_norm(self, residual, branch, weight, eps):
        total = self.w.op("Add", [residual, branch])
        return self.norm(total, weight, eps), total

    def _past_and_positions(self, first_past: str) -> tuple[str, str]:
        """(past length P as [1] int64, positions P..P+S-1 [S]) from the first cache input and input_ids."""
        if self._positions is None:
            w = self.w
            past_len = w.op("Shape", [first_past], start=1, end=2)
            seq_len = w.op("Shape", [self.ids], start=1, end=2)
            end = w.op("Add", [past_len, seq_len])
            scalar = lambda t: w.op("Squeeze", [t, w.const([0])])  # noqa: E731
            positions = w.op("Range", [scalar(past_len), scalar(end), w.const(1)])
            self._positions = (end, positions)
        return self._positions

    def attention(self, layer, q, k, v, shape: AttentionShape, *, packed=False):
        w = self.w
        nh, kvh, d = shape.num_heads, shape.kv_heads, shape.head_dim
        if packed:
            q, k, v = w.op("Split", [q, w.const([nh * d, kvh * d, kvh * shape.v_dim])], 3, axis=2)
        kinds = [("latent", d)] if shape.value_is_key else [("key", d), ("value", shape.v_dim)]
        past = {}
        for kind, dim in kinds:
            name_in, name_out = f"past_{kind}.{layer}", f"new_{kind}.{layer}"
            self._input(name_in, self.dtype, [1, "past_sequence_length", kvh, dim])
            self._output(name_out, self.dtype, [1, "sequence_length", kvh, dim])
            self.kv.append(KVTensor(layer, kind, name_in, name_out, kvh, dim))
            past[kind] = (name_in, name_out)
        end, positions = self._past_and_positions(self.kv[0].input)
        q4 = self._rope(q, nh, d, positions)
        k4 = self._rope(k, kvh, d, positions)
        key_kind = "latent" if shape.value_is_key else "key"
        w.op("Identity", [k4], outputs=[past[key_kind][1]])
        keys = w.op("Concat", [past[key_kind][0], k4], axis=1)  # [1,T,kvh,d]
        if shape.value_is_key:
            values = w.op("Slice", [keys, w.const([shape.rotary_dim]), w.const([d]), w.const([3])])
            v_dim = d - shape.rotary_dim
        else:
            v4 = w.op("Reshape", [v, w.const([1, -1, kvh, shape.v_dim])])
            w.op("Identity", [v4], outputs=[past["value"][1]])
            values = w.op("Concat", [past["value"][0], v4], axis=1)
            v_dim = shape.v_dim
        if self.options.sparse is not None:
            heads_major = lambda t: w.op("Transpose", [t], perm=[0, 2, 1, 3])  # noqa: E731  [1,T,kvh,*] -> [1,kvh,T,*]
            return self._infllmv2(q4, q, heads_major(keys), heads_major(values), shape, end)
        return self._attend(q4, keys, values, shape, v_dim, end, positions)

    def _attend(self, q4, keys, values, shape: AttentionShape, v_dim: int, end: str, positions: str) -> str:
        """Grouped causal attention: the g query heads of a KV head are stacked along the row axis."""
        w = self.w
        nh, kvh, d = shape.num_heads, shape.kv_heads, shape.head_dim
        g = nh // kvh
        # q [1,S,nh,d] -> [1,kvh,g*S,d]; head h = kv*g + j (HF repeat_kv order).
        qg = w.op("Reshape", [w.op("Transpose", [q4], perm=[0, 2, 1, 3]), w.const([1, kvh, -1, d])])
        kt = w.op("Transpose", [keys], perm=[0, 2, 3, 1])  # [1,kvh,d,T]
        vt = w.op("Transpose", [values], perm=[0, 2, 1, 3])  # [1,kvh,T,v]
        scores = w.op("MatMul", [qg, kt])  # [1,kvh,g*S,T]
        scores = ops.cast(w, scores, np.float32) if self.dtype != np.float32 else scores
        scores = w.op("Mul", [scores, w.const(shape.scale, np.float32)])
        scores = w.op("Where", [self._causal_mask(end, positions, g), scores, w.const(-np.inf, np.float32)])
        probs = w.op("Softmax", [scores], axis=-1)
        probs = ops.cast(w, probs, self.dtype) if self.dtype != np.float32 else probs
        out = w.op("MatMul", [probs, vt])  # [1,kvh,g*S,v]
        out = w.op("Reshape", [out, w.const([1, nh, -1, v_dim])])
        out = w.op("Transpose", [out], perm=[0, 2, 1, 3])  # [1,S,nh,v]
        return w.op("Reshape", [out, w.const([1, -1, nh * v_dim])])

    def _causal_mask(self, end: str, positions: str, groups: int) -> str:
        """[g*S,T] bool: key j is visible from query position p when j <= p (rows repeat per group)."""
        if groups not in self._masks:
            w = self.w
            if self._mask is None:
                keys = w.op("Range", [w.const(0), w.op("Squeeze", [end, w.const([0])]), w.const(1)])
                self._mask = w.op("LessOrEqual", [w.op("Unsqueeze", [keys, w.const([0])]),
                                                  w.op("Unsqueeze", [positions, w.const([1])])])
            self._masks[groups] = self._mask if groups == 1 else w.op("Tile", [self._mask, w.const([groups, 1])])
        return self._masks[groups]


LOWERINGS: dict[str, type[Lowering]] = {"ort": OrtLowering, "standard": StandardLowering}


def make_lowering(w: GraphWriter, options: ExportOptions, rope: RopeConfig) -> Lowering:
    return LOWERINGS[options.flavour](w, options, rope)


def softmax_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
