"""BitCPM4 fake-quantized ternary weights: find the group size and scales exactly, pack losslessly (spec §7.1)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgecpm.quant.formats import BlockQuantized

CANDIDATE_GROUPS = (None, 128, 64, 32)  # None: one group per output row


@dataclass(frozen=True)
class TernaryLayout:
    group_size: int
    scales: np.ndarray  # [N, K / group_size], the one non-zero magnitude of each group (0 for all-zero groups)


def detect_ternary(weight: np.ndarray) -> TernaryLayout | None:
    """The coarsest grouping in which every group holds only {-s, 0, +s}; None if no grouping fits."""
    weight = np.asarray(weight, dtype=np.float32)
    out_features, in_features = weight.shape
    magnitudes = np.abs(weight)
    for candidate in CANDIDATE_GROUPS:
        group = in_features if candidate is None else candidate
        if in_features % group:
            continue
        grouped = magnitudes.reshape(out_features, in_features // group, group)
        scales = grouped.max(axis=-1)
        if np.all((grouped == 0) | (grouped == scales[..., None])):
            return TernaryLayout(group, scales)
    return None


def pack_ternary_exact(weight: np.ndarray, layout: TernaryLayout, block_size: int) -> BlockQuantized:
    """Codes {1,2,3} with zero point 2; dequantization reproduces `weight` bit for bit.

    `block_size` must divide the group size: each group's scale is repeated over its blocks.
    """
    weight = np.asarray(weight, dtype=np.float32)
    if layout.group_size % block_size:
        raise ValueError(f"block size {block_size} does not divide the ternary group size {layout.group_size}")
    scales = np.repeat(layout.scales, layout.group_size // block_size, axis=1).astype(np.float32)
    codes = (np.sign(weight) + 2).astype(np.uint8)
    zeros = np.full(scales.shape, 2, dtype=np.uint8)
    return BlockQuantized(codes, scales, zeros, 2, block_size, weight.shape[1])
