"""AutoGPTQ checkpoints (v1 "gptq" format): float views for the reference, packed codes for export.

Each quantized linear `X` stores `X.qweight / X.qzeros / X.scales / X.g_idx` instead of `X.weight`. The
importer exposes `X.weight` as a lazily dequantized float TensorRef (so the config checks, the reference
model and `inspect` see an ordinary checkpoint) and keeps the packed codes in `Checkpoint.prequantized`
so export converts them to MatMulNBits without re-quantizing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgecpm.arch.fields import ConfigFields
from edgecpm.checkpoint.base import TensorRef
from edgecpm.errors import CheckpointError, UnsupportedError
from edgecpm.quant.gptq import GPTQLinear, convert_gptq, dequantize_gptq

PARTS = ("qweight", "qzeros", "scales", "g_idx")


@dataclass(frozen=True)
class GPTQConfig:
    bits: int
    group_size: int
    symmetric: bool
    act_order: bool

    @classmethod
    def from_config(cls, fields: ConfigFields) -> GPTQConfig:
        fmt = fields.str("checkpoint_format", "gptq")
        if fmt != "gptq":
            raise UnsupportedError(f"GPTQ checkpoint_format {fmt!r:.20} is not supported (only the v1 'gptq' layout)",
                                   path=fields.source, field="checkpoint_format")
        bits = fields.int("bits")
        if bits != 4:
            raise UnsupportedError(f"{bits}-bit GPTQ is not supported (4-bit only)", path=fields.source, field="bits")
        group_size = fields.int("group_size", minimum=-1)
        if group_size == -1 or group_size < 16 or group_size & (group_size - 1):
            raise UnsupportedError(f"group_size {group_size} is not a power of two >= 16", path=fields.source, field="group_size")
        return cls(bits, group_size, fields.bool("sym", True), fields.bool("desc_act", False))

    def to_dict(self) -> dict[str, Any]:
        return {"method": "gptq", "bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric,
                "act_order": self.act_order}


def split_gptq_tensors(found: Mapping[str, TensorRef], config: GPTQConfig, source: Path
                       ) -> tuple[dict[str, TensorRef], dict[str, Callable[[], GPTQLinear]]]:
    """Replaces each group of GPTQ tensors by a float `.weight` view; returns (tensors, prequantized)."""
    tensors: dict[str, TensorRef] = {}
    prequantized: dict[str, Callable[[], GPTQLinear]] = {}
    prefixes = {name.rsplit(".", 1)[0] for name in found if name.endswith(".qweight")}
    if not prefixes:
        raise CheckpointError("quantization_config says GPTQ but no tensor ends in .qweight", path=source, field="quantization_config")
    for name, ref in found.items():
        prefix, _, part = name.rpartition(".")
        if prefix in prefixes and part in (*PARTS, "bias"):
            continue
        tensors[name] = ref
    for prefix in sorted(prefixes):
        parts = {}
        for part in PARTS:
            ref = found.get(f"{prefix}.{part}")
            if ref is None and part != "g_idx":
                raise CheckpointError("missing tensor of a GPTQ layer", path=source, field=f"{prefix}.{part}")
            parts[part] = ref
        _check_no_bias(found.get(f"{prefix}.bias"), prefix)
        in_features, out_features = parts["qweight"].shape[0] * 8, parts["qweight"].shape[1]

        def load(prefix=prefix, parts=parts) -> GPTQLinear:
            arrays = {part: (None if ref is None else ref.read()) for part, ref in parts.items()}
            return convert_gptq(prefix, arrays["qweight"], arrays["qzeros"], arrays["scales"], arrays["g_idx"],
                                group_size=config.group_size, source=parts["qweight"].file)

        def dequantized(parts=parts) -> np.ndarray:
            g_idx = parts["g_idx"].read() if parts["g_idx"] is not None else np.arange(in_features) // config.group_size
            return dequantize_gptq(parts["qweight"].read(), parts["qzeros"].read(), parts["scales"].read(), g_idx)

        weight_name = f"{prefix}.weight"
        tensors[weight_name] = TensorRef(weight_name, (out_features, in_features), "GPTQ-int4", parts["qweight"].file, dequantized)
        prequantized[weight_name] = load
    return tensors, prequantized


def _check_no_bias(ref: TensorRef | None, prefix: str) -> None:
    """AutoGPTQ saves a zero bias for bias-free layers; a non-zero one has no place in a MiniCPM layer."""
    if ref is not None and np.any(ref.numpy() != 0):
        raise CheckpointError("non-zero bias on a layer that has none in this architecture", path=ref.file, field=f"{prefix}.bias")
