"""Typed descriptions of what an exported graph takes and returns; they become the manifest's I/O section."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from edgecpm.arch.base import SparseAttentionConfig

FLAVOURS = ("ort", "standard")
PRECISIONS = {"fp32": np.float32, "fp16": np.float16}
TIED_HEAD_MODES = ("shared", "duplicate")

# KV cache modes, read by the runtime:
#  shared_buffer: [1, heads, max_context, dim] buffers bound as both past_* input and present_* output
#                 (onnxruntime GroupQueryAttention writes the new rows in place; seq axis 2).
#  append:        past_* inputs are the first `position` rows of [1, max_context, heads, dim] buffers
#                 (seq axis 1, contiguous prefix); new_* outputs are the S new rows, which the runtime
#                 binds straight into the buffer after the prefix. Standard ONNX ops only.
KV_MODES = ("shared_buffer", "append")


@dataclass(frozen=True)
class ExportOptions:
    flavour: str = "ort"
    precision: str = "fp32"
    max_context: int = 2048
    # Tied embeddings: "shared" keeps one table (Gather + Gemm transB), "duplicate" stores a transposed copy
    # for the LM head MatMul (more memory; the faster layout on x86 onnxruntime, see README/benchmarks).
    tied_head: str = "duplicate"
    # MatMulNBits' compute type (quantized exports, ort flavour): 4 = int8 activations, the fast CPU path
    # (its error is part of the measured quality); 0 = the activation dtype, exact against a reference.
    accuracy_level: int = 4
    # InfLLM v2 sparse attention the graph attends with (one ai.edgecpm.InfLLMv2Attention node per layer, lowered to
    # standard ops: exporters/onnx/infllmv2.py); None: dense attention.
    sparse: SparseAttentionConfig | None = None

    @property
    def np_dtype(self) -> type:
        return PRECISIONS[self.precision]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: tuple  # ints or symbolic names

    def as_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class KVTensor:
    """One cache tensor of one layer; `heads` x `dim` values per token."""

    layer: int
    kind: str  # "key", "value" or "latent" (MLA: [k_pe, c_kv])
    input: str
    output: str
    heads: int
    dim: int

    @property
    def values_per_token(self) -> int:
        return self.heads * self.dim


@dataclass
class GraphIO:
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    kv: list[KVTensor]
    kv_mode: str
    kv_dtype: str
    attention: str = "dense"  # how the graph itself attends (edgecpm.bundle.GRAPH_ATTENTION: the manifest's graph_attention)
    logits: str = "logits"
    tensors: dict = field(default_factory=dict)  # weight name -> {offset, length, dtype, shape} in the data file

    def kv_layout(self, max_context: int) -> dict:
        seq_axis = 2 if self.kv_mode == "shared_buffer" else 1
        tensors = []
        for t in self.kv:
            shape = [1, t.heads, max_context, t.dim] if seq_axis == 2 else [1, max_context, t.heads, t.dim]
            tensors.append({**asdict(t), "shape": shape})
        per_kind: dict[str, int] = {}
        for t in self.kv:
            per_kind[t.kind] = per_kind.get(t.kind, 0) + t.values_per_token
        return {
            "mode": self.kv_mode,
            "dtype": self.kv_dtype,
            "seq_axis": seq_axis,
            "values_per_token": sum(t.values_per_token for t in self.kv),
            "values_per_token_by_kind": per_kind,
            "tensors": tensors,
        }
