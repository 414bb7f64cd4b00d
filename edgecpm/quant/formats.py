"""Numpy references for every packed weight format edgecpm writes.

`BlockQuantized` is the logical form (one unsigned code per weight, one scale and zero point per block of
`block_size` input channels); the `pack_*` functions lay it out for a runtime kernel and the `unpack_*`
functions invert them. Dequantization is `(code - zero_point) * scale`, the order onnxruntime's
MatMulNBits and ONNX DequantizeLinear use, so a reference dequantization matches the kernel bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgecpm.errors import UnsupportedError


@dataclass(frozen=True)
class BlockQuantized:
    codes: np.ndarray  # uint8 [N, K_padded], K_padded a multiple of block_size; padding codes equal the zero point
    scales: np.ndarray  # float [N, n_blocks]
    zero_points: np.ndarray  # uint8 [N, n_blocks], or float [N, n_blocks] (GGUF Q4_1: zp = -min/scale)
    bits: int
    block_size: int
    in_features: int  # K before padding
    # Values narrower than the codes (6-bit values in the 8-bit codes onnxruntime reads, see `widened`), or None
    value_bits: int | None = None

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def n_blocks(self) -> int:
        return self.scales.shape[1]

    @property
    def symmetric(self) -> bool:
        return bool(np.all(self.zero_points == default_zero_point(self.bits)))

    @property
    def float_zero_points(self) -> bool:
        """Zero points off the integer grid (MatMulNBits takes them in the scales' float type, unpacked)."""
        return bool(np.issubdtype(self.zero_points.dtype, np.floating))

    def dequantize(self) -> np.ndarray:
        codes = self.codes.reshape(self.out_features, self.n_blocks, self.block_size).astype(self.scales.dtype)
        zeros = self.zero_points.astype(self.scales.dtype)[:, :, None]
        scales = self.scales[:, :, None]
        if self.float_zero_points:  # onnxruntime's order for float zero points: q*s - zp*s (bit for bit)
            weight = codes * scales - zeros * scales
        else:
            weight = (codes - zeros) * scales
        return weight.reshape(self.out_features, -1)[:, : self.in_features]


def default_zero_point(bits: int) -> int:
    """MatMulNBits' implied zero point: the middle code (8 for int4, 2 for 2-bit, 128 for int8)."""
    return 1 << (bits - 1)


# Bits onnxruntime and ONNX have no kernel or type for, and the codes that carry them
CARRIER_BITS = {6: 8}


def widened(quantized: BlockQuantized) -> BlockQuantized:
    """The same values in the codes of CARRIER_BITS (6-bit values as 8-bit codes: what MatMulNBits,
    GatherBlockQuantized and DequantizeLinear read, at 8 bits' cost; edgecpm's kernels stream them at 6): codes
    and zero points move by the difference of the middle codes, so every dequantized weight is unchanged."""
    bits = CARRIER_BITS.get(quantized.bits)
    if bits is None:
        return quantized
    shift = np.uint8(default_zero_point(bits) - default_zero_point(quantized.bits))
    return BlockQuantized(quantized.codes + shift, quantized.scales, quantized.zero_points + shift, bits,
                          quantized.block_size, quantized.in_features, value_bits=quantized.bits)


def _blocks(weight: np.ndarray, block_size: int, pad_value: float = 0.0) -> np.ndarray:
    out_features, in_features = weight.shape
    padded = -(-in_features // block_size) * block_size
    if padded != in_features:
        weight = np.pad(weight, ((0, 0), (0, padded - in_features)), constant_values=pad_value)
    return weight.reshape(out_features, padded // block_size, block_size)


# Candidate scales per block, as fractions of the Q4_0 rule's (the extreme value at the most negative code) and of
# the mirrored rule (the extreme at the most positive code); the rule itself is a candidate, so a searched block
# is never worse than it (under `positive`, only the candidates of positive sign compete). Searched only where
# per-channel importance is known (GPTQ's Hessian diagonal): on SmolLM2 an unweighted search cut int4 RTN's
# squared weight error by 22% and left perplexity as it was (+19.1% vs +18.6%), while the weighted one moved GPTQ
# from +8.7% to +6.5% (mean KL 0.086 -> 0.077).
SCALE_SEARCH = np.linspace(0.6, 1.0, 17)
SEARCHED_BITS = 4  # at 8 bits the rule is already near-lossless; searching would only slow the export
SEARCH_ROWS = 2048  # rows per pass: bounds the temporaries at a few times that many rows of the weight


def quantize_rtn(weight: np.ndarray, bits: int, block_size: int, *, symmetric: bool = True,
                 scale_dtype: np.dtype = np.float32, importance: np.ndarray | None = None,
                 positive: bool = False) -> BlockQuantized:
    """Round-to-nearest blockwise quantization of a [N, K] weight (`block_size` K: one scale per output channel).

    Symmetric blocks use the llama.cpp Q4_0 rule (the largest-magnitude value maps to the most negative code,
    so the full code range is used, and the scale takes the sign of minus that value); given `importance` [K]
    (GPTQ passes its Hessian diagonal, each input channel's mean squared activation), 4-bit blocks take instead
    the SCALE_SEARCH candidate with the least importance-weighted squared rounding error. `positive` (TensorRT's
    DequantizeLinear takes strictly positive scales only): the largest-magnitude value maps to the end of the code
    range of its own sign (-8 or +7 at 4 bits; a negative one exactly as Q4_0 does), and an all-zero block takes
    scale 1. Asymmetric blocks span [min(w, 0), max(w, 0)].
    """
    weight = np.asarray(weight, dtype=np.float32)
    blocks = _blocks(weight, block_size)
    top = (1 << bits) - 1
    if symmetric:
        scales = np.concatenate([_symmetric_scales(blocks[start:start + SEARCH_ROWS], bits, scale_dtype, importance,
                                                   positive)
                                 for start in range(0, blocks.shape[0], SEARCH_ROWS)])
        zeros = np.full(scales.shape, default_zero_point(bits), dtype=np.uint8)
    else:
        low, high = np.minimum(blocks.min(axis=-1), 0), np.maximum(blocks.max(axis=-1), 0)
        scales = ((high - low) / top).astype(scale_dtype)
        safe = np.where(scales == 0, 1, scales).astype(np.float32)
        zeros = np.clip(np.round(-low / safe), 0, top).astype(np.uint8)
    return encode_with_scales(weight, scales, zeros, bits, block_size)


def _symmetric_scales(blocks: np.ndarray, bits: int, scale_dtype, importance: np.ndarray | None,
                      positive: bool = False) -> np.ndarray:
    middle = default_zero_point(bits)
    index = np.abs(blocks).argmax(axis=-1)[..., None]
    extreme = np.take_along_axis(blocks, index, axis=-1)[..., 0]
    # the divisors the candidates are tried with: both signs, or under `positive` the one of the extreme's sign
    divisors = (np.where(extreme < 0, np.float32(-middle), np.float32(middle - 1)),) if positive else (-middle, middle - 1)
    rule = _positive(extreme / divisors[0], scale_dtype) if positive else (extreme / -middle).astype(scale_dtype)
    if bits > SEARCHED_BITS or importance is None:
        return rule
    channel_weight = _blocks(np.asarray(importance, dtype=np.float32)[None, :], blocks.shape[-1])  # [1, blocks, block]

    def error(scales: np.ndarray) -> np.ndarray:
        step = scales.astype(np.float32)[..., None]
        codes = np.clip(np.round(blocks / np.where(step == 0, 1, step)), -middle, middle - 1)
        return (np.square(blocks - codes * step) * channel_weight).sum(axis=-1)

    best, best_error = rule, error(rule)
    for divisor in divisors:
        for fraction in SCALE_SEARCH:
            candidate = extreme * np.float32(fraction) / divisor
            candidate = _positive(candidate, scale_dtype) if positive else candidate.astype(scale_dtype)
            candidate_error = error(candidate)
            better = candidate_error < best_error
            best, best_error = np.where(better, candidate, best), np.where(better, candidate_error, best_error)
    return best


def _positive(scales: np.ndarray, scale_dtype) -> np.ndarray:
    """Scales rounded to their storage type, 1 where that is not positive: an all-zero block, or one so small that
    its scale underflows (every code of such a block rounds to 0 at scale 1, so its values stay 0)."""
    stored = scales.astype(scale_dtype)
    return np.where(stored > 0, stored, np.ones((), scale_dtype)).astype(scale_dtype)


def encode_with_scales(weight: np.ndarray, scales: np.ndarray, zeros: np.ndarray, bits: int, block_size: int) -> BlockQuantized:
    """Codes for given (already storage-rounded) scales and zero points: round(w / s) + z, clipped."""
    blocks = _blocks(np.asarray(weight, dtype=np.float32), block_size)
    safe = np.where(scales == 0, 1, scales).astype(np.float32)[..., None]
    codes = np.clip(np.round(blocks / safe) + zeros[..., None], 0, (1 << bits) - 1).astype(np.uint8)
    codes = np.where(scales[..., None] == 0, zeros[..., None], codes).astype(np.uint8)
    return BlockQuantized(codes.reshape(weight.shape[0], -1), np.ascontiguousarray(scales), zeros, bits, block_size, weight.shape[1])


def quantize_ternary(weight: np.ndarray, block_size: int, *, scale_dtype: np.dtype = np.float32) -> BlockQuantized:
    """Absmean ternary quantization (BitCPM's rule, spec §7.1): codes {1, 2, 3} = {-1, 0, +1} x scale."""
    blocks = _blocks(np.asarray(weight, dtype=np.float32), block_size)
    scales = np.maximum(np.abs(blocks).mean(axis=-1), 1e-8).astype(scale_dtype)
    zeros = np.full(scales.shape, 2, dtype=np.uint8)
    quantized = encode_with_scales(weight, scales, zeros, 2, block_size)
    codes = np.clip(quantized.codes, 1, 3)  # the 2-bit code 0 (-2) is never a ternary value
    return BlockQuantized(codes, quantized.scales, zeros, 2, block_size, quantized.in_features)


# --- MatMulNBits (onnxruntime contrib op) -------------------------------------------------------------


def pack_low_first(values: np.ndarray, bits: int) -> np.ndarray:
    """Packs unsigned codes along the last axis, lowest bits first (the MatMulNBits and GGUF order)."""
    per_byte = 8 // bits
    values = values.astype(np.uint8)
    pad = (-values.shape[-1]) % per_byte
    if pad:
        values = np.pad(values, [(0, 0)] * (values.ndim - 1) + [(0, pad)])
    grouped = values.reshape(*values.shape[:-1], -1, per_byte)
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
    return np.bitwise_or.reduce(grouped << shifts, axis=-1).astype(np.uint8)


def unpack_low_first(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    per_byte = 8 // bits
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
    values = (packed[..., None] >> shifts) & ((1 << bits) - 1)
    return values.reshape(*packed.shape[:-1], -1)[..., :count].astype(np.uint8)


@dataclass(frozen=True)
class MatMulNBitsWeights:
    packed: np.ndarray  # uint8 [N, n_blocks, block_size * bits / 8]
    scales: np.ndarray  # [N * n_blocks]
    # uint8 [N * ceil(n_blocks * bits / 8)], or float [N * n_blocks] (not packed) for non-integer zero
    # points; None when every zero point is the default
    zero_points: np.ndarray | None
    bits: int
    block_size: int
    in_features: int
    out_features: int


def pack_matmul_nbits(quantized: BlockQuantized) -> MatMulNBitsWeights:
    if quantized.bits not in (2, 4, 8):
        raise UnsupportedError(f"MatMulNBits takes 2, 4 or 8 bits, not {quantized.bits}")
    n, blocks = quantized.out_features, quantized.n_blocks
    codes = quantized.codes.reshape(n, blocks, quantized.block_size)
    packed = pack_low_first(codes, quantized.bits)
    if quantized.symmetric:
        zero_points = None
    elif quantized.float_zero_points:
        zero_points = np.ascontiguousarray(quantized.zero_points.astype(quantized.scales.dtype).reshape(-1))
    else:
        zero_points = pack_low_first(quantized.zero_points, quantized.bits).reshape(-1)
    return MatMulNBitsWeights(packed, quantized.scales.reshape(-1), zero_points, quantized.bits, quantized.block_size,
                              quantized.in_features, n)


def unpack_matmul_nbits(weights: MatMulNBitsWeights) -> BlockQuantized:
    n, bits = weights.out_features, weights.bits
    blocks = weights.packed.shape[1]
    codes = unpack_low_first(weights.packed, bits, weights.block_size).reshape(n, -1)
    if weights.zero_points is None:
        zeros = np.full((n, blocks), default_zero_point(bits), dtype=np.uint8)
    elif np.issubdtype(weights.zero_points.dtype, np.floating):
        zeros = weights.zero_points.reshape(n, blocks)
    else:
        zeros = unpack_low_first(weights.zero_points.reshape(n, -1), bits, blocks)
    return BlockQuantized(codes, weights.scales.reshape(n, blocks), zeros, bits, weights.block_size, weights.in_features)


# --- DequantizeLinear (standard ONNX, opset 21; what TensorRT takes for weight-only int4/int8) ----------


@dataclass(frozen=True)
class DequantizeLinearWeights:
    """A transposed weight [K, N] as signed integers blocked along axis 0, for MatMul(x, DQ(w)).

    One block spanning K (`per_channel`) is per-axis DequantizeLinear: scales [N] along axis 1, no block_size.
    """

    data: np.ndarray  # int8 [K, N] values in [-2^(bits-1), 2^(bits-1)); pack_int4_bytes gives the INT4 layout
    scales: np.ndarray  # [n_blocks, N]
    bits: int
    block_size: int

    @property
    def per_channel(self) -> bool:
        return self.scales.shape[0] == 1 and self.block_size == self.data.shape[0]


def to_dequantize_linear(quantized: BlockQuantized) -> DequantizeLinearWeights:
    if not quantized.symmetric:
        raise UnsupportedError("blocked DequantizeLinear weights are written symmetric (no zero point)")
    if quantized.in_features % quantized.block_size:
        raise UnsupportedError(f"in_features {quantized.in_features} is not a multiple of block size {quantized.block_size}")
    signed = quantized.codes.astype(np.int16) - default_zero_point(quantized.bits)  # symmetric: zp is the default
    return DequantizeLinearWeights(np.ascontiguousarray(signed.T.astype(np.int8)), np.ascontiguousarray(quantized.scales.T),
                                   quantized.bits, quantized.block_size)


def dequantize_linear_reference(weights: DequantizeLinearWeights) -> np.ndarray:
    scales = np.repeat(weights.scales, weights.block_size, axis=0)
    return weights.data.astype(scales.dtype) * scales


def pack_int4_bytes(values: np.ndarray) -> bytes:
    """ONNX INT4 raw data: two's-complement nibbles, element 0 in the low nibble."""
    return pack_low_first((values.reshape(-1).astype(np.int8) & 0x0F).astype(np.uint8)[None, :], 4).tobytes()
