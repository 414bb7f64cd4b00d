"""Sparse attention references (torch-free numpy): InfLLM v2, MiniCPM4's trainable block-sparse attention (spec §6)."""

from edgecpm.sparse.infllmv2 import (
    LEVEL2_FACTOR,
    CompressedKeys,
    SparseGeometry,
    compress_keys,
    dense_attention,
    kernel_count,
    sparse_attention,
    state_bytes,
    uses_sparse,
)

__all__ = [
    "LEVEL2_FACTOR",
    "CompressedKeys",
    "SparseGeometry",
    "compress_keys",
    "dense_attention",
    "kernel_count",
    "sparse_attention",
    "state_bytes",
    "uses_sparse",
]
