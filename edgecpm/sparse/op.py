"""`ai.edgecpm.InfLLMv2Attention`: InfLLM v2 as one ONNX operator, defined here once (no onnx or torch import).

The operator is stateless: its inputs are the whole key/value history (past + this call's tokens) and the queries of
the call's tokens, so a graph's I/O is that of dense attention. Its semantics are the numpy reference's
(edgecpm.sparse.infllmv2, whose docstring records every choice): `evaluate` runs exactly that, and is what the
lowering (edgecpm.exporters.onnx.infllmv2) and a TensorRT plugin (runtimes/tensorrt/plugins) are tested against.

Inputs (float32 or float16, batch 1, heads-major "BHSD"; T = total length, S = this call's tokens, S <= T; query
row s is position T - S + s):

| name       | shape                          | meaning |
|------------|--------------------------------|---------|
| query      | [1, num_heads, S, head_dim]    | roped queries |
| key        | [1, kv_heads, T, head_dim]     | roped keys of positions 0..T-1 |
| value      | [1, kv_heads, T, v_dim]        | values of positions 0..T-1 |
| query_nope | [1, num_heads, S, head_dim]    | only with use_nope = 1: the queries before RoPE (block selection) |
| key_nope   | [1, kv_heads, T, head_dim]     | only with use_nope = 1: the keys before RoPE (compression, selection) |

Output `output` [1, num_heads, S, v_dim] in the input's dtype. Query head h reads KV head h // (num_heads/kv_heads).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgecpm.arch.base import SparseAttentionConfig
from edgecpm.sparse.infllmv2 import CompressedKeys, SparseGeometry, sparse_attention

DOMAIN = "ai.edgecpm"
OP_TYPE = "InfLLMv2Attention"
OP_VERSION = 1  # the domain's opset version a model imports
INPUTS = ("query", "key", "value")
NOPE_INPUTS = ("query_nope", "key_nope")  # present exactly when use_nope = 1
OUTPUTS = ("output",)


@dataclass(frozen=True)
class InfLLMv2Attributes:
    """The operator's attributes: SparseGeometry's integers (spec §6.1) and the softmax scale.

    `local_blocks` is window_size // block_size (what the semantics use; a window that is not a multiple of the block
    is floored, as SparseGeometry does). `scale` multiplies q.k in both stages (the reference: 1/sqrt(head_dim)).
    Every attribute is an ONNX INT, except `scale` (FLOAT), so a TensorRT plugin creator receives INT32/FLOAT32 fields.
    """

    kernel_size: int
    kernel_stride: int
    block_size: int
    init_blocks: int
    local_blocks: int
    topk: int
    dense_len: int
    use_nope: int
    scale: float

    @classmethod
    def of(cls, config: Any, head_dim: int) -> InfLLMv2Attributes:
        """From a SparseAttentionConfig (or SparseGeometry) for heads of `head_dim` values."""
        g = SparseGeometry.of(config)
        return cls(kernel_size=g.kernel_size, kernel_stride=g.kernel_stride, block_size=g.block_size,
                   init_blocks=g.init_blocks, local_blocks=g.local_blocks, topk=g.topk, dense_len=g.dense_len,
                   use_nope=int(g.use_nope), scale=1.0 / math.sqrt(head_dim))

    @classmethod
    def from_onnx(cls, attributes: dict[str, Any]) -> InfLLMv2Attributes:
        """From a node's attribute dict; a missing or unknown attribute is one line naming it."""
        names = [f.name for f in dataclasses.fields(cls)]
        for name in names:
            if name not in attributes:
                raise ValueError(f"{OP_TYPE}: attribute {name} is missing")
        unknown = sorted(set(attributes) - set(names))
        if unknown:
            raise ValueError(f"{OP_TYPE}: unknown attribute {unknown[0]}")
        values = {name: (float(attributes[name]) if name == "scale" else int(attributes[name])) for name in names}
        attrs = cls(**values)
        attrs.geometry  # validates the integers the way SparseGeometry does
        return attrs

    def onnx(self) -> dict[str, int | float]:
        return dataclasses.asdict(self)

    @property
    def geometry(self) -> SparseGeometry:
        return SparseGeometry.of(self.sparse_config)

    @property
    def sparse_config(self) -> SparseAttentionConfig:
        """The sparse_config these attributes run (window_size = local_blocks * block_size)."""
        return SparseAttentionConfig(kernel_size=self.kernel_size, kernel_stride=self.kernel_stride,
                                     block_size=self.block_size, init_blocks=self.init_blocks,
                                     window_size=self.local_blocks * self.block_size, topk=self.topk,
                                     dense_len=self.dense_len, use_nope=bool(self.use_nope))

    @property
    def budget(self) -> int:
        """Blocks chosen per (KV head, query): the top-k the lowering asks TopK for (a constant, as TensorRT needs)."""
        return self.topk + self.local_blocks

    @property
    def input_names(self) -> tuple[str, ...]:
        return INPUTS + (NOPE_INPUTS if self.use_nope else ())


def evaluate(attributes: InfLLMv2Attributes, query: np.ndarray, key: np.ndarray, value: np.ndarray,
             query_nope: np.ndarray | None = None, key_nope: np.ndarray | None = None) -> np.ndarray:
    """The operator's semantics: edgecpm.sparse.sparse_attention over the inputs (BHSD, batch 1), the compressed keys
    built from the whole history in one go (bit for bit what the reference's incremental state holds)."""
    if not math.isclose(attributes.scale, 1.0 / math.sqrt(query.shape[-1]), rel_tol=1e-6):
        raise ValueError(f"{OP_TYPE}: the reference evaluates scale = 1/sqrt(head_dim) only, got scale {attributes.scale}")
    geometry = attributes.geometry
    selection_keys = key_nope if attributes.use_nope else key
    state = CompressedKeys(geometry, key.shape[1], key.shape[3], np.result_type(selection_keys.dtype, np.float32))
    out = sparse_attention(query[0], key[0], value[0], state, geometry,
                           q_nope=None if query_nope is None else query_nope[0],
                           k_nope_cache=None if key_nope is None else key_nope[0])
    return np.asarray(out, dtype=query.dtype)[None]


__all__ = ["DOMAIN", "INPUTS", "NOPE_INPUTS", "OP_TYPE", "OP_VERSION", "OUTPUTS", "InfLLMv2Attributes", "evaluate"]
