"""Calibrated int4: GPTQ (error-compensating rounding driven by the layer's input statistics).

Inputs of every decoder linear are recorded once from the fp32 reference model on the calibration text
shipped in `edgecpm/data/calibration.txt`; each weight is then quantized against H = XᵀX with the block
scales fixed up front from the original weight (AutoGPTQ's `static_groups`), so the result is the same
BlockQuantized layout round-to-nearest produces, only with better-chosen codes.
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib import resources

import numpy as np

from edgecpm.quant.formats import BlockQuantized, encode_with_scales, quantize_rtn

DAMPING = 0.01  # fraction of the mean Hessian diagonal added for numerical stability (the GPTQ paper's default)
COLUMN_BLOCK = 128


def calibration_text() -> str:
    return resources.files("edgecpm.data").joinpath("calibration.txt").read_text(encoding="utf-8")


def record_linear_inputs(model, input_ids: np.ndarray, weight_names: Iterable[str]) -> dict[str, np.ndarray]:
    """Runs the reference once and keeps each named linear's input rows [T, K] (fp32).

    Layers that read the same activation (q/k/v, gate/up) share one array, so memory is one copy per
    distinct input, not per weight.
    """
    import torch

    wanted = {name.removesuffix(".weight") for name in weight_names}
    captured: dict[str, np.ndarray] = {}
    # Keyed by tensor identity; the tensor itself is kept alive so its id cannot be reused by another.
    by_tensor: dict[int, tuple[object, np.ndarray]] = {}
    handles = []

    def hook(name):
        def record(module, args, output):
            activation = args[0]
            key = id(activation)
            if key not in by_tensor:
                by_tensor[key] = (activation, activation.detach().reshape(-1, activation.shape[-1]).float().numpy())
            captured[f"{name}.weight"] = by_tensor[key][1]
        return record

    for name, module in model.named_modules():
        if name in wanted and isinstance(module, torch.nn.Linear):
            handles.append(module.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            model(torch.from_numpy(np.asarray(input_ids, dtype=np.int64)[None, :]), model.new_cache())
    finally:
        for handle in handles:
            handle.remove()
    return captured


def gptq_quantize(weight: np.ndarray, inputs: np.ndarray, bits: int, block_size: int, *, symmetric: bool = True,
                  scale_dtype=np.float32, damping: float = DAMPING) -> BlockQuantized:
    """GPTQ (Frantar et al., 2022) with static per-block scales; returns codes in the RTN layout."""
    import torch

    reference = quantize_rtn(weight, bits, block_size, symmetric=symmetric, scale_dtype=scale_dtype)
    if weight.shape[1] % block_size:
        return reference  # the padded tail block has no Hessian rows; RTN is exact enough for such shapes
    w = torch.from_numpy(np.array(weight, dtype=np.float32))
    x = torch.from_numpy(inputs.astype(np.float32))
    hessian = (x.T @ x / max(len(inputs), 1)).double()
    dead = torch.diag(hessian) == 0
    hessian[dead, dead] = 1.0
    w[:, dead] = 0.0
    hessian += damping * torch.mean(torch.diag(hessian)) * torch.eye(hessian.shape[0], dtype=hessian.dtype)
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
            group = (start + i) // block_size
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
    return encode_with_scales(w.numpy().astype(np.float32), reference.scales, reference.zero_points, bits, block_size)
