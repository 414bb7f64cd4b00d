"""Quantized weights in the graph: how each flavour stores a block-quantized linear or embedding table.

`ort`: com.microsoft MatMulNBits for linears (act-order inputs are permuted by a Gather first) and
GatherBlockQuantized for tables. A table's packed codes are exactly MatMulNBits' B ([V, blocks, blob],
blockwise along hidden), so a tied head reads the same initializer.
`standard`: DequantizeLinear (opset 21, symmetric) feeding a MatMul, as TensorRT 10.x takes it (the spec's `tensorrt`
layout): INT4 blocked along K (axis 0, `block_size`), INT8 per output channel (axis 1, one scale per column of W^T,
no `block_size`: 10.x blocks INT4 only), every scale strictly positive. A table is one DequantizeLinear output
[H, V] that both the Gather (axis 1) and a tied head MatMul read; per channel, each token's row has its own scale.

Both hand back `Projection`s (x -> x @ W^T) and `Table`s, so builders never see the storage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
from onnx import TensorProto

from edgecpm.errors import UnsupportedError
from edgecpm.exporters.onnx.writer import ORT_DOMAIN, GraphWriter
from edgecpm.quant.formats import default_zero_point, pack_int4_bytes, pack_matmul_nbits, to_dequantize_linear
from edgecpm.quant.plan import QuantizedLinear

Projection = Callable[[str], str]  # input name -> output name


class Table:
    """An embedding table: `gather(ids)` -> [1, S, H]; `head` -> the tied LM head over the same storage."""

    def gather(self, ids: str) -> str:
        raise NotImplementedError

    def head(self, x: str) -> str:
        raise NotImplementedError


@dataclass
class FloatTable(Table):
    w: GraphWriter
    name: str

    def gather(self, ids):
        return self.w.op("Gather", [self.name, ids], axis=0)

    def head(self, x):
        # One table for Gather and head: Gemm reads it transposed. Saves V*H weights of memory.
        return self.w.op("Gemm", [x, self.name], transB=1)


# --- ort: MatMulNBits / GatherBlockQuantized -----------------------------------------------------------


@dataclass(frozen=True)
class _NBits:
    b: str
    scales: str
    zero_points: str | None
    k: int
    n: int
    bits: int
    block_size: int
    offsets: str | None = None  # [blocks, N] per-block constants added after a symmetric MatMulNBits (float zero points)
    block_sums: str | None = None  # [K, blocks] 0/1: x @ it = the sum of x over each block


class OrtQuantized:
    def __init__(self, w: GraphWriter, dtype: np.dtype, accuracy_level: int):
        self.w, self.dtype, self.accuracy_level = w, dtype, accuracy_level
        self._block_sums: dict[tuple[int, int], str] = {}

    def _write(self, out: str, layer: QuantizedLinear) -> _NBits:
        quantized, offsets, block_sums = layer.quantized, None, None
        if quantized.float_zero_points:
            # Non-integer zero points (GGUF Q4_1). MatMulNBits accepts them, but onnxruntime 1.31's CPU kernel
            # then takes a path ~25x slower at decode. Exact split instead: (q - zp)*s = (q - z0)*s + (z0 - zp)*s
            # with z0 the default zero point, i.e. a symmetric MatMulNBits plus (x summed per block) @ offsets.
            if quantized.in_features % quantized.block_size:
                raise UnsupportedError("float zero points need whole blocks along the input", field=out)
            z0 = default_zero_point(quantized.bits)
            scales = quantized.scales.astype(np.float32)
            offsets = self.w.weight(f"{out}.block_offsets",
                                    np.ascontiguousarray(((z0 - quantized.zero_points.astype(np.float32)) * scales).T).astype(self.dtype))
            block_sums = self._block_sum_matrix(quantized.in_features, quantized.block_size)
            quantized = replace(quantized, zero_points=np.full(scales.shape, z0, dtype=np.uint8))
        packed = pack_matmul_nbits(quantized)
        n, blocks = packed.out_features, packed.packed.shape[1]
        b = self.w.weight(f"{out}.qweight", packed.packed)
        self.w.describe(b, bits=packed.bits, block_size=packed.block_size, k=packed.in_features, n=n,
                        accuracy_level=self.accuracy_level,
                        **({} if quantized.value_bits is None else {"value_bits": quantized.value_bits}))
        # 2-D [N, blocks] scales: MatMulNBits takes them, and a table's Gather only needs an Unsqueeze.
        scales = self.w.weight(f"{out}.scales", packed.scales.reshape(n, blocks).astype(self.dtype))
        zeros = None if packed.zero_points is None else self.w.weight(f"{out}.qzeros", packed.zero_points)
        return _NBits(b, scales, zeros, packed.in_features, n, packed.bits, packed.block_size, offsets, block_sums)

    def _block_sum_matrix(self, k: int, block_size: int) -> str:
        key = (k, block_size)
        if key not in self._block_sums:
            matrix = np.repeat(np.eye(k // block_size, dtype=self.dtype), block_size, axis=0)  # [K, blocks]
            self._block_sums[key] = self.w.weight(f"block_sums.k{k}.b{block_size}", matrix)
        return self._block_sums[key]

    def _matmul(self, x: str, s: _NBits) -> str:
        inputs = [x, s.b, s.scales] + ([s.zero_points] if s.zero_points else [])
        y = self.w.op("MatMulNBits", inputs, domain=ORT_DOMAIN, K=s.k, N=s.n, bits=s.bits, block_size=s.block_size,
                      accuracy_level=self.accuracy_level)
        if s.offsets is None:
            return y
        sums = self.w.op("MatMul", [x, s.block_sums])  # [..., blocks]
        return self.w.op("Add", [y, self.w.op("MatMul", [sums, s.offsets])])

    def linear(self, out: str, layer: QuantizedLinear) -> Projection:
        stored = self._write(out, layer)
        order = None if layer.input_order is None else self.w.weight(f"{out}.input_order", layer.input_order.astype(np.int64))

        def apply(x: str) -> str:
            if order is not None:  # act-order GPTQ: codes are stored in sorted-by-group channel order
                x = self.w.op("Gather", [x, order], axis=-1)
            return self._matmul(x, stored)
        return apply

    def table(self, out: str, layer: QuantizedLinear) -> Table:
        return _OrtTable(self, self._write(out, layer))


@dataclass
class _OrtTable(Table):
    ops: OrtQuantized
    s: _NBits

    def gather(self, ids):
        w, s = self.ops.w, self.s
        scales = w.op("Unsqueeze", [s.scales, w.const([2])])  # GatherBlockQuantized wants scales of B's rank
        rows = w.op("GatherBlockQuantized", [s.b, ids, scales], domain=ORT_DOMAIN, gather_axis=0, quantize_axis=2,
                    block_size=s.block_size, bits=s.bits)  # [1, S, blocks, block_size]
        padded = -(-s.k // s.block_size) * s.block_size
        hidden = w.op("Reshape", [rows, w.const([1, -1, padded])])
        if padded == s.k:
            return hidden
        return w.op("Slice", [hidden, w.const([0]), w.const([s.k]), w.const([2])])

    def head(self, x):
        return self.ops._matmul(x, self.s)


# --- standard: DequantizeLinear (INT4 blocked, INT8 per channel) + MatMul ------------------------------


class StandardQuantized:
    def __init__(self, w: GraphWriter, dtype: np.dtype, accuracy_level: int):
        self.w, self.dtype = w, dtype

    def _dequantized(self, out: str, layer: QuantizedLinear) -> str:
        """W^T [K, N] as a DequantizeLinear output: INT4 blocked along K, INT8 one scale per output channel."""
        if layer.input_order is not None:
            raise UnsupportedError("act-order weights need the ort flavour", field=out)
        quantized = layer.quantized
        dq = to_dequantize_linear(quantized)
        k, n = dq.data.shape
        scales = dq.scales.astype(self.dtype)
        if not (scales > 0).all():
            raise UnsupportedError(f"{int((scales <= 0).sum())} scales are not strictly positive (TensorRT's "
                                   "DequantizeLinear takes positive scales only)", field=out)
        if dq.bits == 4:
            data = self.w.packed_weight(f"{out}.qweight", TensorProto.INT4, (k, n),
                                        np.frombuffer(pack_int4_bytes(dq.data), np.uint8))
            layout, attributes = {"block_size": dq.block_size}, {"axis": 0, "block_size": dq.block_size}
        elif dq.bits == 8:
            if not dq.per_channel:
                raise UnsupportedError(f"INT8 in blocks of {dq.block_size}: TensorRT 10.x block-quantizes INT4 only "
                                       "(8-bit codes are stored per output channel)", field=out)
            data = self.w.weight(f"{out}.qweight", dq.data)
            scales = scales[0]  # [N]: per-axis DequantizeLinear along the output channels
            layout, attributes = {"per_channel": True}, {"axis": 1}
        else:
            raise UnsupportedError(f"{dq.bits}-bit weights have no standard ONNX form; use --flavour ort", field=out)
        self.w.describe(data, bits=dq.bits, axis=attributes["axis"], k=k, n=n, **layout,
                        **({} if quantized.value_bits is None else {"value_bits": quantized.value_bits}))
        return self.w.op("DequantizeLinear", [data, self.w.weight(f"{out}.scales", scales)], **attributes)

    def linear(self, out: str, layer: QuantizedLinear) -> Projection:
        weight = self._dequantized(out, layer)
        return lambda x: self.w.op("MatMul", [x, weight])

    def table(self, out: str, layer: QuantizedLinear) -> Table:
        return _StandardTable(self.w, self._dequantized(out, layer))


@dataclass
class _StandardTable(Table):
    w: GraphWriter
    transposed: str  # [H, V]

    def gather(self, ids):
        columns = self.w.op("Gather", [self.transposed, ids], axis=1)  # [H, 1, S]
        return self.w.op("Transpose", [columns], perm=[1, 2, 0])

    def head(self, x):
        return self.w.op("MatMul", [x, self.transposed])


QUANTIZED_OPS: dict[str, type] = {"ort": OrtQuantized, "standard": StandardQuantized}
