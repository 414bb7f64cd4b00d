"""The lowering of `ai.edgecpm.InfLLMv2Attention` (edgecpm.sparse.op) to standard ONNX opset-21 operators.

A graph holds one `InfLLMv2Attention` node per layer and one model-local function of that name whose body is this
lowering. onnxruntime inlines the body; TensorRT's ONNX parser imports model-local functions before it looks for a
plugin, so the body is also the TensorRT path, and `edgecpm engine build --sparse-plugin` drops the body to let
its plugin take the node (exporters/tensorrt/build.py). Both flavours use this one lowering.

The operator is stateless: the compressed keys Kc1/Kc2 are recomputed from the whole key history (past + new) on
every call, as window means (AveragePool), which costs O(T*d) per KV head against attention's O(S*T*d), so the graph
keeps dense attention's I/O and the runtimes keep no sparse state. Everything runs in float32 (the reference's
precision: at least fp32); float16 inputs are cast.

Only operators in TensorRT 10.x's ONNX parser table (exporters/tensorrt/onnx_ops_trt10.toml) are used, with the
constant inputs it requires (TopK's K, reduction axes, ...). Selection does not rely on TopK's order among equal
values (ONNX says lower index first; TensorRT does not promise it): TopK gives only the budget's K-th largest score,
and ties at that score are broken by a running count (CumSum), lower block index first, as the reference does.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgecpm.exporters.onnx.writer import ONNX_DTYPES, OPSET, GraphWriter
from edgecpm.sparse.op import DOMAIN, OP_TYPE, OUTPUTS, InfLLMv2Attributes

NEG_INF = -np.inf


class _Body:
    """Nodes of a function body: constants are Constant nodes (a function has no initializers)."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self._names = itertools.count()
        self._consts: dict[tuple, str] = {}

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, **attrs) -> str | list[str]:
        outputs = [f"{op_type.lower()}_{next(self._names)}" for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, **attrs))
        return outputs[0] if n_out == 1 else outputs

    def const(self, values, dtype=np.int64) -> str:
        array = np.asarray(values, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            name = f"const_{next(self._names)}"
            self.nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array, name)))
            self._consts[key] = name
        return self._consts[key]

    def f32(self, value: float) -> str:
        return self.const(value, np.float32)


def _log_sum_exp(b: _Body, x: str) -> str:
    """Over the last axis, kept; -inf for a row that is all -inf (the shift is then 0, not -inf, so no NaN)."""
    peak = b.op("ReduceMax", [x, b.const([-1])], keepdims=1)
    shift = b.op("Where", [b.op("IsInf", [peak]), b.f32(0.0), peak])
    total = b.op("ReduceSum", [b.op("Exp", [b.op("Sub", [x, shift])]), b.const([-1])], keepdims=1)
    return b.op("Add", [b.op("Log", [total]), shift])


def _compressed(b: _Body, keys: str, size: int, stride: int, pad: int) -> str:
    """Window means of keys [1, kvh, T, d] along T: [1, kvh, floor((T + pad - size) / stride) + 1, d].

    The keys are zero-padded by `pad` rows first, so there is at least one window even when T < size; windows that
    reach into the padding never pass the visibility test (a kernel is visible only when its last token is <= the
    query's position <= T - 1), so they are never read.
    """
    padded = b.op("Pad", [keys, b.const([0, 0, 0, 0, 0, 0, pad, 0])])
    # NCHW pooling with N = 1, C = kv heads, H = tokens, W = head values: one window of `size` tokens per output row.
    return b.op("AveragePool", [padded], kernel_shape=[size, 1], strides=[stride, 1])


def _visible(b: _Body, kernels: str, size: int, stride: int, positions: str) -> str:
    """[S, n] bool: kernel j (of the compressed [1, kvh, n, d]) is visible from position p when j*stride + size - 1 <= p."""
    count = b.op("Squeeze", [b.op("Shape", [kernels], start=2, end=3), b.const([0])])
    last = b.op("Add", [b.op("Mul", [b.op("Range", [b.const(0), count, b.const(1)]), b.const(stride)]), b.const(size - 1)])
    return b.op("LessOrEqual", [b.op("Unsqueeze", [last, b.const([0])]), b.op("Unsqueeze", [positions, b.const([1])])])


def _stage1_logits(b: _Body, queries: str, kernels: str, visible: str, scale: str) -> str:
    """queries [1, kvh, g, S, d] . kernels [1, kvh, n, d] -> [1, kvh, g, S, n] scaled, -inf where not visible."""
    kt = b.op("Unsqueeze", [b.op("Transpose", [kernels], perm=[0, 1, 3, 2]), b.const([2])])  # [1, kvh, 1, d, n]
    logits = b.op("Mul", [b.op("MatMul", [queries, kt]), scale])
    return b.op("Where", [visible, logits, b.f32(NEG_INF)])


def _block_scores(b: _Body, a: InfLLMv2Attributes, sel_queries: str, sel_keys: str, positions: str, num_blocks: str,
                  scale: str) -> str:
    """Stage 1 and pooling: [1, kvh, S, num_blocks] scores (the group's summed kernel probabilities, max-pooled over
    the kernels overlapping each block), -inf for a block without a visible kernel."""
    size2, stride2 = a.geometry.kernel_size2, a.geometry.kernel_stride2
    r = a.geometry.pool_ratio
    # Kc1 padding of block_size + kernel_size rows leaves at least num_blocks * r + 1 kernels, all the windows need.
    kc1 = _compressed(b, sel_keys, a.kernel_size, a.kernel_stride, a.block_size + a.kernel_size)
    kc2 = _compressed(b, sel_keys, size2, stride2, size2)
    visible1 = _visible(b, kc1, a.kernel_size, a.kernel_stride, positions)
    visible2 = _visible(b, kc2, size2, stride2, positions)
    logits1 = _stage1_logits(b, sel_queries, kc1, visible1, scale)
    lse = _log_sum_exp(b, logits1)
    # The Kc2 normalizer (LSE approximation); a query that sees no Kc2 kernel yet keeps the exact Kc1 one.
    sees_coarse = b.op("Greater", [b.op("ReduceMax", [b.op("Cast", [visible2], to=TensorProto.FLOAT), b.const([-1])],
                                        keepdims=1), b.f32(0.0)])  # [S, 1]
    lse = b.op("Where", [sees_coarse, _log_sum_exp(b, _stage1_logits(b, sel_queries, kc2, visible2, scale)), lse])
    shift = b.op("Where", [b.op("IsInf", [lse]), b.f32(0.0), lse])
    probs = b.op("Exp", [b.op("Sub", [logits1, shift])])  # exp(-inf) = 0 for kernels the query cannot see
    shared = b.op("ReduceSum", [probs, b.const([2])], keepdims=0)  # [1, kvh, S, n1]: summed over the group
    shared = b.op("Where", [visible1, shared, b.f32(NEG_INF)])
    # Block b pools kernels [b*r - 1, b*r + r - 1]: a window of r + 1 at stride r, padded by one at the front.
    pooled = b.op("MaxPool", [shared], kernel_shape=[1, r + 1], strides=[1, r], pads=[0, 1, 0, 0])
    pooled = b.op("Slice", [pooled, b.const([0]), num_blocks, b.const([3])])
    # Visible scores are sums of exponentials (>= 0); an all-invisible window may pool to the lowest float, not -inf.
    return b.op("Where", [b.op("Less", [pooled, b.f32(0.0)]), b.f32(NEG_INF), pooled])


def _select(b: _Body, a: InfLLMv2Attributes, scores: str, positions: str, num_blocks: str) -> str:
    """[1, kvh, S, num_blocks] bool: forced blocks, then the highest scores up to topk + local_blocks (ties: lower
    block index first), never a block after the query's own."""
    blocks = b.op("Unsqueeze", [b.op("Range", [b.const(0), b.op("Squeeze", [num_blocks, b.const([0])]), b.const(1)]),
                                b.const([0])])  # [1, nb]
    query_block = b.op("Unsqueeze", [b.op("Div", [positions, b.const(a.block_size)]), b.const([1])])  # [S, 1]
    candidate = b.op("LessOrEqual", [blocks, query_block])
    local = b.op("GreaterOrEqual", [blocks, b.op("Sub", [query_block, b.const(a.local_blocks)])])
    forced = b.op("And", [candidate, b.op("Or", [b.op("Less", [blocks, b.const(a.init_blocks)]), local])])
    ranked = b.op("Where", [forced, b.f32(np.inf), b.op("Where", [candidate, scores, b.f32(NEG_INF)])])
    budget = a.budget
    # TopK's K must be a constant no larger than the axis: pad the axis by K entries below every candidate (the
    # padding comes after every block, so lower-index-first ties still prefer real blocks).
    padded = b.op("Pad", [ranked, b.const([0, 0, 0, 0, 0, 0, 0, max(budget, 1)]), b.f32(NEG_INF)])
    top = b.op("TopK", [padded, b.const([max(budget, 1)])], 2, axis=-1, largest=1, sorted=1)[0]
    threshold = b.op("Slice", [top, b.const([max(budget, 1) - 1]), b.const([max(budget, 1)]), b.const([3])])
    above = b.op("Greater", [ranked, threshold])
    at = b.op("Equal", [ranked, threshold])
    as_float = lambda x: b.op("Cast", [x], to=TensorProto.FLOAT)  # noqa: E731
    count_above = b.op("ReduceSum", [as_float(above), b.const([-1])], keepdims=1)
    # Forced blocks are all kept even when they outnumber the budget (then the threshold is +inf).
    keep = b.op("Max", [b.op("ReduceSum", [as_float(forced), b.const([-1])], keepdims=1), b.f32(float(budget))])
    before = b.op("CumSum", [as_float(at), b.const(-1)], exclusive=1)  # equal scores ahead of this block
    tie_kept = b.op("And", [at, b.op("Less", [before, b.op("Sub", [keep, count_above])])])
    return b.op("And", [candidate, b.op("Or", [above, tie_kept])])


def lowering_function(attributes: InfLLMv2Attributes, dtype: np.dtype) -> onnx.FunctionProto:
    """The model-local function `ai.edgecpm.InfLLMv2Attention` for these attributes and float dtype (the body bakes
    both in: an export writes one function, every layer shares it)."""
    a, b = attributes, _Body()
    names = a.input_names
    to_float = (lambda x: x) if np.dtype(dtype) == np.float32 else (lambda x: b.op("Cast", [x], to=TensorProto.FLOAT))
    query, key, value = (to_float(n) for n in names[:3])
    sel_query, sel_key = (to_float(n) for n in names[3:]) if a.use_nope else (query, key)
    scale = b.f32(a.scale)

    total = b.op("Shape", [key], start=2, end=3)  # [1] = T
    new = b.op("Shape", [query], start=2, end=3)  # [1] = S
    scalar = lambda t: b.op("Squeeze", [t, b.const([0])])  # noqa: E731
    positions = b.op("Range", [scalar(b.op("Sub", [total, new])), scalar(total), b.const(1)])  # [S]
    num_blocks = b.op("Div", [b.op("Add", [total, b.const([a.block_size - 1])]), b.const([a.block_size])])  # [1]
    # [1, nh, S, d] -> [1, kvh, g, S, d]: query head h = kv * g + j (HF repeat_kv order)
    grouped = b.op("Concat", [b.const([1]), b.op("Shape", [key], start=1, end=2), b.const([-1]), new,
                              b.op("Shape", [query], start=3, end=4)], axis=0)
    group = lambda q: b.op("Reshape", [q, grouped])  # noqa: E731

    scores = _block_scores(b, a, group(sel_query), sel_key, positions, num_blocks, scale)
    selected = _select(b, a, scores, positions, num_blocks)
    if a.dense_len >= 0:
        # Spec §6.2: a call whose total length is below dense_len is dense attention: every block allowed, so one
        # attention path serves both (stage 1 still runs; its answer is unused).
        selected = b.op("Or", [selected, b.op("Less", [total, b.const([a.dense_len])])])
    tokens = b.op("Range", [b.const(0), scalar(total), b.const(1)])
    allowed = b.op("Gather", [selected, b.op("Div", [tokens, b.const(a.block_size)])], axis=3)  # [1, kvh, S, T]
    causal = b.op("LessOrEqual", [b.op("Unsqueeze", [tokens, b.const([0])]), b.op("Unsqueeze", [positions, b.const([1])])])
    allowed = b.op("Unsqueeze", [b.op("And", [allowed, causal]), b.const([2])])  # [1, kvh, 1, S, T]

    kt = b.op("Unsqueeze", [b.op("Transpose", [key], perm=[0, 1, 3, 2]), b.const([2])])  # [1, kvh, 1, d, T]
    logits = b.op("Mul", [b.op("MatMul", [group(query), kt]), scale])
    probs = b.op("Softmax", [b.op("Where", [allowed, logits, b.f32(NEG_INF)])], axis=-1)
    out = b.op("MatMul", [probs, b.op("Unsqueeze", [value, b.const([2])])])  # [1, kvh, g, S, dv]
    heads = b.op("Concat", [b.const([1, -1]), b.op("Shape", [out], start=3, end=5)], axis=0)
    out = b.op("Reshape", [out, heads])  # [1, nh, S, dv]
    if np.dtype(dtype) != np.float32:
        out = b.op("Cast", [out], to=ONNX_DTYPES[np.dtype(dtype)])
    b.nodes.append(helper.make_node("Identity", [out], [OUTPUTS[0]]))
    return helper.make_function(DOMAIN, OP_TYPE, list(names), list(OUTPUTS), b.nodes,
                                [helper.make_opsetid("", OPSET)], attributes=list(a.onnx()))


def attention_node(w: GraphWriter, attributes: InfLLMv2Attributes, inputs: list[str], dtype: np.dtype) -> str:
    """Adds one `InfLLMv2Attention` node (inputs in `attributes.input_names` order, BHSD, of float `dtype`) to `w`,
    and the lowering function once; returns the output [1, num_heads, S, v_dim]."""
    if len(inputs) != len(attributes.input_names):
        raise ValueError(f"{OP_TYPE} takes {', '.join(attributes.input_names)}; got {len(inputs)} inputs")
    w.function(lowering_function(attributes, dtype))
    return w.op(OP_TYPE, inputs, domain=DOMAIN, **attributes.onnx())
