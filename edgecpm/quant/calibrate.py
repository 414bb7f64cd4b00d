"""Calibrated int4: GPTQ (error-compensating rounding driven by the layer's input statistics).

The fp32 reference model reads the calibration text shipped in `edgecpm/data/` as independent
sequences of `SEQUENCE_TOKENS` tokens; for every decoder linear the second moment of its inputs
(H = Σ xxᵀ, the GPTQ Hessian) is accumulated, so memory is one K×K matrix per distinct input, never the
activations themselves. Each weight is then quantized against its H with the block scales fixed up front
from the original weight (AutoGPTQ's `static_groups`), so the result is the same BlockQuantized layout
round-to-nearest produces, only with better-chosen codes.

Attention sinks: every later query attends heavily to a sequence's first position, so the keys and
values cached there matter far more than their one row in H says. Unweighted, GPTQ moves rounding error
onto exactly those rows (SmolLM2 v_proj: 100%+ relative error at position 0 vs 30% for round-to-nearest,
and +55% perplexity end to end). The architecture names its K/V projections; their first row in each
sequence is weighted by half the sequence length (the attention mass it receives, roughly).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from edgecpm.quant.formats import BlockQuantized, encode_with_scales, quantize_rtn
from edgecpm.resources import shipped_text

DAMPING = 0.01  # fraction of the mean Hessian diagonal added for numerical stability (the GPTQ paper's default)
COLUMN_BLOCK = 128
SEQUENCE_TOKENS = 128
CALIBRATION_FILES = ("calibration.txt", "calibration_extra.txt")


def calibration_text() -> str:
    return shipped_text(*CALIBRATION_FILES)


def calibration_sequences(token_ids: Sequence[int], length: int = SEQUENCE_TOKENS) -> list[np.ndarray]:
    """Consecutive, non-overlapping windows; a shorter tail is kept only when it is the whole text."""
    ids = np.asarray(token_ids, dtype=np.int64)
    windows = [ids[i:i + length] for i in range(0, len(ids) - length + 1, length)]
    return windows or [ids]


@dataclass
class Hessian:
    """Weighted input second moment of one linear: Σ wᵢ xᵢxᵢᵀ / Σ wᵢ over `rows` input rows."""

    matrix: np.ndarray  # [K, K] float32
    rows: int


def accumulate_hessians(model, sequences: Iterable[np.ndarray], weight_names: Iterable[str],
                        kv_projections: Sequence[str] = (), head_input: str | None = None) -> dict[str, Hessian]:
    """Runs the reference once per sequence (fresh cache each) and accumulates every named linear's H.

    Linears reading the same activation with the same row weights (k with v, gate with up) share one
    matrix. `head_input`: the module whose output the LM head reads (a tied head is no Linear module);
    its H is returned as "lm_head.weight" (a constant logit scale in between does not change GPTQ).
    """
    import torch

    wanted = {name.removesuffix(".weight") for name in weight_names}
    sink_weighted = {name for name in wanted if name.endswith(tuple(kv_projections))}
    groups: dict[str, tuple] = {}  # module name -> (first module reading its activation, sink weighted)
    sums: dict[tuple, list] = {}  # group -> [Σ w xxᵀ, Σ w, rows]
    seen: dict[tuple, tuple] = {}  # this pass: (id(activation), weighted) -> group; keeps the tensor alive
    handles = []

    def hook(name):
        def record(module, args, output):
            activation = args[0]
            weighted = name in sink_weighted
            key = (id(activation), weighted)
            if key in seen:
                groups.setdefault(name, seen[key][1])
                return
            group = groups.setdefault(name, (name, weighted))
            seen[key] = (activation, group)
            x = activation.detach().reshape(-1, activation.shape[-1]).float()
            weights = torch.ones(x.shape[0])
            if weighted:
                weights[0] = x.shape[0] / 2
            accumulated = sums.setdefault(group, [torch.zeros(x.shape[1], x.shape[1]), 0.0, 0])
            accumulated[0] += (x * weights[:, None]).T @ x
            accumulated[1] += float(weights.sum())
            accumulated[2] += x.shape[0]
        return record

    for name, module in model.named_modules():
        if name in wanted and isinstance(module, torch.nn.Linear):
            handles.append(module.register_forward_hook(hook(name)))
    linear_head = isinstance(getattr(model, "lm_head", None), torch.nn.Linear)  # untied: hooked above
    if head_input is not None and "lm_head" in wanted and not linear_head:
        record_head = hook("lm_head")
        handles.append(model.get_submodule(head_input).register_forward_hook(
            lambda module, args, output: record_head(module, (output,), None)))
    try:
        with torch.no_grad():
            for ids in sequences:
                seen.clear()
                model(torch.from_numpy(np.asarray(ids, dtype=np.int64)[None, :]), model.new_cache())
    finally:
        seen.clear()
        for handle in handles:
            handle.remove()
    hessians = {group: Hessian((total / weight).numpy(), rows) for group, (total, weight, rows) in sums.items()}
    return {f"{name}.weight": hessians[group] for name, group in groups.items()}


def gptq_quantize(weight: np.ndarray, hessian: np.ndarray, bits: int, block_size: int, *, symmetric: bool = True,
                  scale_dtype=np.float32, damping: float = DAMPING, act_order: bool = True,
                  positive: bool = False) -> BlockQuantized:
    """GPTQ (Frantar et al., 2022) with static per-block scales; returns codes in the RTN layout.

    `hessian`: the [K, K] second moment of the layer's inputs (any positive scale). `act_order` rounds the
    most active input channels first, while the most error can still be compensated; with static scales
    the stored layout stays in natural channel order. `positive`: strictly positive scales (quantize_rtn's).
    """
    import torch

    reference = quantize_rtn(weight, bits, block_size, symmetric=symmetric, scale_dtype=scale_dtype,
                             importance=np.diag(hessian), positive=positive)
    if weight.shape[1] % block_size:
        return reference  # the padded tail block has no Hessian rows; RTN is exact enough for such shapes
    w = torch.from_numpy(np.array(weight, dtype=np.float32))
    hessian = torch.from_numpy(np.array(hessian, dtype=np.float64))
    dead = torch.diag(hessian) == 0
    hessian[dead, dead] = 1.0
    w[:, dead] = 0.0
    hessian += damping * torch.mean(torch.diag(hessian)) * torch.eye(hessian.shape[0], dtype=hessian.dtype)
    order = torch.argsort(torch.diag(hessian), descending=True) if act_order else torch.arange(hessian.shape[0])
    hessian, w = hessian[order][:, order], w[:, order]
    group_of = (order // block_size).tolist()
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True).float()

    scales = torch.from_numpy(reference.scales.astype(np.float32))
    zeros = torch.from_numpy(reference.zero_points.astype(np.float32))
    top = (1 << bits) - 1
    in_features = w.shape[1]
    for start in range(0, in_features, COLUMN_BLOCK):
        stop = min(start + COLUMN_BLOCK, in_features)
        block = w[:, start:stop].clone()
        errors = torch.zeros_like(block)
        block_inverse = inverse[start:stop, start:stop]
        for i in range(stop - start):
            group = group_of[start + i]
            scale, zero = scales[:, group], zeros[:, group]
            safe = torch.where(scale == 0, torch.ones_like(scale), scale)
            column = block[:, i]
            dequantized = (torch.clamp(torch.round(column / safe) + zero, 0, top) - zero) * scale
            error = (column - dequantized) / block_inverse[i, i]
            block[:, i:] -= error[:, None] * block_inverse[i, i:][None, :]
            block[:, i] = dequantized
            errors[:, i] = error
        w[:, start:stop] = block
        w[:, stop:] -= errors @ inverse[start:stop, stop:]
    natural = torch.empty_like(w)
    natural[:, order] = w
    return encode_with_scales(natural.numpy(), reference.scales, reference.zero_points, bits, block_size)
