"""AutoGPTQ v1 ("gptq" checkpoint_format) linear layers → block-quantized weights, without re-quantizing.

Layout (spec §7.2), for in_features K, out_features N, group size G:
qweight int32 [K/8, N] (4-bit codes packed along K, low bits first); qzeros int32 [K/G, N/8] storing
zero - 1; scales fp16 [K/G, N]; g_idx int32 [K]. W[n, k] = scales[g, n] * (code[k, n] - zero[g, n]),
g = g_idx[k]. With act-order, input channels are permuted: sorting them by group makes every group
contiguous, so the layer becomes x[..., order] @ W[:, order]^T, exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgecpm.errors import CheckpointError
from edgecpm.quant.formats import BlockQuantized

BITS = 4
PER_INT32 = 32 // BITS


@dataclass(frozen=True)
class GPTQLinear:
    quantized: BlockQuantized  # codes/scales/zeros in channel order `input_order`
    input_order: np.ndarray | None  # None when g_idx is the identity grouping k // G


def _unpack_int32(packed: np.ndarray, axis: int) -> np.ndarray:
    shifts = np.arange(PER_INT32, dtype=np.uint32) * BITS
    values = (packed.astype(np.uint32)[..., None] >> shifts) & 0xF
    if axis == 0:  # [K/8, N, 8] -> [K, N]
        return values.transpose(0, 2, 1).reshape(-1, packed.shape[1]).astype(np.uint8)
    return values.reshape(packed.shape[0], -1).astype(np.uint8)  # [G, N/8, 8] -> [G, N]


def dequantize_gptq(qweight, qzeros, scales, g_idx) -> np.ndarray:
    """Reference dequantization straight from the spec formula: [N, K] float32."""
    codes = _unpack_int32(qweight, axis=0).astype(np.float32)  # [K, N]
    zeros = _unpack_int32(qzeros, axis=1).astype(np.float32) + 1  # [G, N]
    g = np.asarray(g_idx, dtype=np.int64)
    weight = scales.astype(np.float32)[g] * (codes - zeros[g])
    return weight.T.copy()


def convert_gptq(name: str, qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, g_idx: np.ndarray | None,
                 *, group_size: int, source: object = None) -> GPTQLinear:
    """Checks every shape against (K, N, G) and returns the same codes in MatMulNBits' logical layout."""
    def bad(field: str, message: str) -> CheckpointError:
        return CheckpointError(message, path=source, field=f"{name}.{field}")

    if qweight.dtype != np.int32 or qweight.ndim != 2:
        raise bad("qweight", f"expected a 2-D int32 tensor, got {qweight.dtype} {list(qweight.shape)}")
    in_features, out_features = qweight.shape[0] * PER_INT32, qweight.shape[1]
    if in_features % group_size:
        raise bad("qweight", f"in_features {in_features} is not a multiple of group_size {group_size}")
    groups = in_features // group_size
    if scales.shape != (groups, out_features):
        raise bad("scales", f"shape {list(scales.shape)} does not match [K/G, N] = {[groups, out_features]}")
    if qzeros.dtype != np.int32 or qzeros.shape != (groups, -(-out_features // PER_INT32)):
        raise bad("qzeros", f"shape {list(qzeros.shape)} does not match [K/G, N/8] = {[groups, -(-out_features // PER_INT32)]}")
    identity = np.arange(in_features) // group_size
    g_idx = identity if g_idx is None else np.asarray(g_idx, dtype=np.int64)
    if g_idx.shape != (in_features,) or g_idx.min() < 0 or g_idx.max() >= groups:
        raise bad("g_idx", f"expected {in_features} group indices in [0, {groups})")
    if np.any(np.bincount(g_idx, minlength=groups) != group_size):
        raise bad("g_idx", f"every group must hold exactly {group_size} input channels")

    order = None if np.array_equal(g_idx, identity) else np.argsort(g_idx, kind="stable")
    codes = _unpack_int32(qweight, axis=0).T  # [N, K]
    if order is not None:
        codes = codes[:, order]
    zeros = (_unpack_int32(qzeros, axis=1)[:, :out_features].astype(np.int16) + 1).T  # [N, G]
    if zeros.max() > 15:
        raise bad("qzeros", "a stored zero of 15 means zero point 16, which 4-bit codes cannot hold")
    quantized = BlockQuantized(np.ascontiguousarray(codes), np.ascontiguousarray(scales.astype(np.float32).T),
                               np.ascontiguousarray(zeros.astype(np.uint8)), BITS, group_size, in_features)
    return GPTQLinear(quantized, order)
