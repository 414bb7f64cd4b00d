"""QuantSpec: what to quantize and how, as data recorded in the bundle manifest.

Nothing about quantization is ever inferred from file names: a bundle's `quantization` entry is this
spec plus the measured quality (perplexity, KL divergence) of the export.
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from edgecpm.errors import UnsupportedError

SCHEMES = ("none", "int8", "int4", "ternary")
AUTO_SCHEME = "auto"  # not yet chosen: the device profile's weights, or none (resolved by edgecpm.export_plan)
# gptq-checkpoint: codes taken from a GPTQ checkpoint; source: a GGUF file's own Q4_0/Q4_1/Q8_0 blocks where
# they fit (chosen for `--quant int4` of such a file), RTN for its other tensors.
# auto: a GGUF file's own Q4_0/Q4_1/Q8_0 blocks where they exist ("source"), round-to-nearest elsewhere.
METHODS = ("auto", "rtn", "awq", "gptq", "lossless", "gptq-checkpoint", "source")
CLI_METHODS = ("auto", "rtn", "gptq", "lossless", "source")
TABLE_SCHEMES = ("int8", "int6", "int4", "none")  # lm_head / embeddings
AUTO_TABLE = "auto"
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
BITS = {"none": 16, "int8": 8, "int6": 6, "int4": 4, "ternary": 2}
BLOCK_SIZES = (16, 32, 64, 128, 256)
FLAVOURS = ("ort", "standard")
# How quantized tensors are laid out, which the flavour decides ("auto" until then; a manifest without the field
# is a "blocked" bundle, as every bundle was before the field):
# - blocked (ort: MatMulNBits, GatherBlockQuantized): every tensor in blocks of `block_size` along its input; a
#   symmetric block's scale by llama.cpp's Q4_0 rule (the signed extreme at the most negative code), so about half
#   the scales are negative.
# - tensorrt (standard: TensorRT 10.x's DequantizeLinear rules, exporters/tensorrt/onnx_ops_trt10.toml): every scale
#   strictly positive; int4 in blocks of `block_size`; 8-bit codes (int8, and int6 values in int8 codes) per output
#   channel (one scale per channel), since 10.x block-quantizes INT4 only.
LAYOUTS = ("blocked", "tensorrt")
AUTO_LAYOUT = "auto"
FLAVOUR_LAYOUTS = {"ort": "blocked", "standard": "tensorrt"}
PER_CHANNEL_SCHEMES = ("int8", "int6")  # stored in 8-bit codes: per output channel under the tensorrt layout

# 2-D weights of the decoder layers; embeddings and lm_head are chosen separately (see `embeddings`, `lm_head`).
LAYER_WEIGHTS = "model.layers.*.weight"


@dataclass(frozen=True)
class TensorQuant:
    """How one tensor is stored: scheme, block size along the input dimension, symmetric or not.

    `per_channel`: one block spanning the whole input (one scale per output channel; `block_size` unused);
    `positive_scales`: symmetric scales strictly positive, where the Q4_0 rule gives signed ones.
    """

    scheme: str
    block_size: int = 32
    symmetric: bool = True
    per_channel: bool = False
    positive_scales: bool = False

    @property
    def bits(self) -> int:
        return BITS[self.scheme]


@dataclass(frozen=True)
class QuantSpec:
    scheme: str = "none"
    method: str = "auto"
    block_size: int = 32
    symmetric: bool = True
    # lm_head and the embedding table are a large share of the bytes read per token on small models (on
    # MiniCPM4-0.5B the tied head is a fifth of the weights). "auto": int8 under int8 weights, else int6 (llama.cpp's
    # Q4_K_M keeps its output matrix at 6 bits too): on SmolLM2 with GPTQ int4, +7.5% perplexity against int8's
    # +6.5% and int4's +10.8%, for three quarters of int8's bytes per token (docs/QUANTIZATION.md).
    lm_head: str = AUTO_TABLE
    embeddings: str = AUTO_TABLE
    overrides: dict[str, str] = field(default_factory=dict)
    layout: str = AUTO_LAYOUT  # see LAYOUTS; `validate(flavour)` returns the spec with the flavour's

    def __post_init__(self):
        if self.scheme == AUTO_SCHEME:
            return  # the tables are resolved with the scheme
        default = "int8" if self.scheme == "int8" else "int6"
        for name in ("lm_head", "embeddings"):
            if getattr(self, name) == AUTO_TABLE:
                object.__setattr__(self, name, default)  # recorded resolved: a bundle says what it stores

    def validate(self, flavour: str | None) -> QuantSpec:
        """Raises a clear error for combinations a flavour cannot represent, before anything is written; returns
        the spec with the flavour's layout (unchanged while the flavour is not yet chosen, `flavour` None)."""
        if self.scheme not in (*SCHEMES, AUTO_SCHEME):  # auto: checked again once the device profile chose a scheme
            raise UnsupportedError(f"unknown scheme {self.scheme!r} (choose from {', '.join(SCHEMES)})", field="--quant")
        if self.method not in METHODS:
            raise UnsupportedError(f"unknown method {self.method!r} (choose from {', '.join(METHODS)})", field="--method")
        if self.block_size not in BLOCK_SIZES:
            raise UnsupportedError(f"block size {self.block_size} is not one of {BLOCK_SIZES}", field="--block-size")
        for name, scheme in self.overrides.items():
            if scheme not in SCHEMES:
                raise UnsupportedError(f"unknown scheme {scheme!r}", field=name)
        for name, scheme in (("--lm-head", self.lm_head), ("--embeddings", self.embeddings)):
            if scheme not in TABLE_SCHEMES and not (scheme == AUTO_TABLE and self.scheme == AUTO_SCHEME):
                raise UnsupportedError(f"{scheme} is not a table format (choose from {', '.join(TABLE_SCHEMES)})", field=name)
        if flavour == "standard":
            if self.scheme == "int4" and not self.symmetric:
                raise UnsupportedError("asymmetric int4 cannot be expressed for the standard flavour (TensorRT takes "
                                       "symmetric blocked INT4 DequantizeLinear); use --symmetric or --flavour ort", field="--asymmetric")
            if self.scheme == "ternary":
                raise UnsupportedError("ternary weights need MatMulNBits (bits=2): use --flavour ort", field="--quant")
        if self.layout not in (AUTO_LAYOUT, *LAYOUTS):
            raise UnsupportedError(f"unknown layout {self.layout!r} (choose from {', '.join(LAYOUTS)})", field="layout")
        wanted = FLAVOUR_LAYOUTS.get(flavour)
        if wanted is not None and self.layout not in (AUTO_LAYOUT, wanted):
            raise UnsupportedError(f"the {flavour} flavour stores the {wanted} layout, not {self.layout}", field="layout")
        return self.for_flavour(flavour)

    def for_flavour(self, flavour: str | None) -> QuantSpec:
        """The spec with the flavour's layout where it is still "auto" (a chosen layout is kept)."""
        if self.layout != AUTO_LAYOUT or flavour not in FLAVOUR_LAYOUTS:
            return self
        return replace(self, layout=FLAVOUR_LAYOUTS[flavour])

    @property
    def positive_scales(self) -> bool:
        return self.layout == "tensorrt"

    def for_tensor(self, name: str) -> TensorQuant | None:
        """The storage of one weight, or None for tensors kept in the export precision (norms, biases)."""
        for pattern, scheme in self.overrides.items():
            if fnmatch.fnmatchcase(name, pattern):
                return self._tensor_quant(scheme)
        # Tables are always symmetric: one layout serves GatherBlockQuantized and a tied MatMulNBits head.
        if name == "lm_head.weight":
            return self._tensor_quant(self.lm_head, symmetric=True)
        if name == "model.embed_tokens.weight":
            return self._tensor_quant(self.embeddings, symmetric=True)
        if fnmatch.fnmatchcase(name, LAYER_WEIGHTS) and "norm" not in name:
            return self._tensor_quant(self.scheme)
        return None

    def _tensor_quant(self, scheme: str, *, symmetric: bool | None = None) -> TensorQuant | None:
        if scheme == "none" or self.scheme == "none":
            return None
        if symmetric is None:
            symmetric = self.symmetric if scheme == self.scheme else True
        tensorrt = self.layout == "tensorrt"
        return TensorQuant(scheme, self.block_size, symmetric, per_channel=tensorrt and scheme in PER_CHANNEL_SCHEMES,
                           positive_scales=tensorrt)

    @property
    def enabled(self) -> bool:
        return self.scheme != "none"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantSpec:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def with_method(self, method: str) -> QuantSpec:
        return replace(self, method=method)
