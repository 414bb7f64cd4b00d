"""The one place that turns a QuantSpec (or a GPTQ checkpoint's own codes) into the weights an export writes.

`WeightQuantizer.quantize(name)` returns the stored form of one weight, or None for a weight kept in the
export precision. The exporter writes exactly what it returns, and `quantized_weights` dequantizes the
same objects for parity tests, so "what the spec produces" has a single definition.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from edgecpm.errors import UnsupportedError
from edgecpm.quant.calibrate import Hessian
from edgecpm.quant.formats import BlockQuantized, quantize_rtn, quantize_ternary, widened
from edgecpm.quant.gptq import GPTQLinear
from edgecpm.quant.spec import QuantSpec, TensorQuant
from edgecpm.quant.ternary import detect_ternary, pack_ternary_exact

# A stored linear: codes in channel order `input_order` (None = natural order). Only GPTQ act-order
# checkpoints carry an order, so GPTQ's record type is the general one.
QuantizedLinear = GPTQLinear

GPTQ_CHECKPOINT = "gptq-checkpoint"
SOURCE = "source"  # a GGUF file's own Q4_0/Q4_1/Q8_0 blocks, exported as stored
EMBEDDING_TABLE = "model.embed_tokens.weight"  # read by GatherBlockQuantized, which takes no zero points
HEAD = "lm_head.weight"
HEAD_INPUT = "model.norm"  # the final norm of every reference model (models/common.py): the LM head's input
CALIBRATION_TOKENS = 8192  # the shipped calibration text is ~4k tokens (SmolLM2 tokenizer); all of it is used
# GPTQ damping (fraction of the mean Hessian diagonal). With fewer calibration rows than input channels
# H is rank-deficient and the paper's 0.01 overfits (SmolLM2 down_proj, K=1536 from 770 rows: held-out
# output error 0.083 for RTN -> 0.114); 1.0 gives 0.079. Full-rank layers keep a light 0.1.
DAMPING_FULL_RANK, DAMPING_RANK_DEFICIENT = 0.1, 1.0
MIN_BLOCK = 16  # MatMulNBits' smallest block
INT8_BLOCKS = "INT8 blocks"  # GGUF Q8_0 under the tensorrt layout (TensorRT 10.x blocks INT4 only)


class QuantizationWarning(UserWarning):
    """A quantized export that is lossier than asked for (e.g. absmean ternary of non-ternary weights)."""


def _ternary_block(spec_block: int, group: int) -> int:
    """The largest power-of-two block <= spec_block dividing the detected group (lossless repacking)."""
    block = spec_block
    while block >= MIN_BLOCK and group % block:
        block //= 2
    return block


# Scales are computed at fp16 precision whatever dtype stores them (as llama.cpp's and GPTQ's are): the loss is
# nil next to the codes' rounding, and the native kernels then stream them as fp16 exactly (10% fewer bytes
# at int4). Weights beyond fp16's range keep scales at the storage precision.
SCALE_PRECISION = np.dtype(np.float16)
FP16_SAFE_WEIGHT = 6e4


def _scale_dtype(weight: np.ndarray, quantizer) -> np.dtype:
    return SCALE_PRECISION if float(np.abs(weight).max(initial=0.0)) < FP16_SAFE_WEIGHT else quantizer.scale_dtype


def _integer(weight, name, tq, quantizer) -> tuple[BlockQuantized, str]:
    hessian = quantizer.calibration.get(name)
    block = weight.shape[1] if tq.per_channel else tq.block_size  # per channel: one block spans the input
    if quantizer.spec.method == "gptq" and hessian is not None:
        from edgecpm.quant.calibrate import gptq_quantize

        damping = DAMPING_FULL_RANK if hessian.rows >= weight.shape[1] else DAMPING_RANK_DEFICIENT
        return (widened(gptq_quantize(weight, hessian.matrix, tq.bits, block, symmetric=tq.symmetric,
                                      scale_dtype=_scale_dtype(weight, quantizer), damping=damping,
                                      positive=tq.positive_scales)), f"{tq.scheme}-gptq")
    return widened(quantize_rtn(weight, tq.bits, block, symmetric=tq.symmetric, scale_dtype=_scale_dtype(weight, quantizer),
                                positive=tq.positive_scales)), f"{tq.scheme}-rtn"


def _ternary(weight, name, tq, quantizer) -> tuple[BlockQuantized, str]:
    layout = detect_ternary(weight)
    block = None if layout is None else _ternary_block(tq.block_size, layout.group_size)
    if block is not None and block >= MIN_BLOCK:
        packed = pack_ternary_exact(weight, layout, block)
        scales = packed.scales.astype(quantizer.scale_dtype)
        if np.array_equal(scales.astype(np.float32), packed.scales):  # bf16-born scales survive fp16 exactly
            return replace(packed, scales=scales), "ternary-exact"
    if quantizer.spec.method == "lossless":
        raise UnsupportedError("is not ternary (no grouping of {-s, 0, +s} fits, or its scales do not fit the export "
                               "dtype); --method lossless packs only BitCPM-style weights: use --method rtn to "
                               "quantize it (lossy) or another --quant", field=name)
    return quantize_ternary(weight, tq.block_size, scale_dtype=_scale_dtype(weight, quantizer)), "ternary-absmean"


SCHEMES: dict[str, Callable] = {"int8": _integer, "int6": _integer, "int4": _integer, "ternary": _ternary}


@dataclass
class WeightQuantizer:
    spec: QuantSpec
    read: Callable[[str], np.ndarray]  # float32 [N, K] of a checkpoint weight
    prequantized: Mapping[str, Callable[[], GPTQLinear]] = field(default_factory=dict)
    scale_dtype: np.dtype = np.dtype(np.float32)
    calibration: Mapping[str, Hessian] = field(default_factory=dict)  # GPTQ input statistics per weight
    written: dict[str, str] = field(default_factory=dict)  # name -> storage label, for the manifest
    # GGUF blocks (edgecpm.checkpoint.gguf_file.GGUFBlocks) used, where they fit, instead of quantizing.
    source: Mapping[str, Callable[[], GPTQLinear]] = field(default_factory=dict)
    float_zero_points: bool = True  # the flavour can hold non-integer zero points (ort MatMulNBits)
    # name -> the file's blocks it had ("gguf-q4_0: negative scales"), for tensors whose source blocks the layout
    # could not hold, re-quantized instead (warned about by warn_if_lossy)
    requantized: dict[str, str] = field(default_factory=dict)

    def storage(self, name: str, role: str | None = None) -> TensorQuant | None:
        """`role`: the tensor whose spec applies (a tied LM head reads the table as "lm_head.weight")."""
        if role is None and name in self.prequantized:
            return TensorQuant("int4", self.spec.block_size, self.spec.symmetric, positive_scales=self.spec.positive_scales)
        return self.spec.for_tensor(role or name)

    def source_blocks(self, name: str, role: str | None = None):
        """The file's own blocks for `name`, when the spec quantizes it and they are at least as fine as asked.

        A Q8_0 tensor under int4 stays int8 (exact, rather than re-quantized coarser); a Q4_x tensor under
        int8 is re-quantized (RTN) as asked. Float zero points (Q4_1) need MatMulNBits: not for the
        standard flavour nor for the embedding table (GatherBlockQuantized has no zero points). The tensorrt
        layout (standard) holds no INT8 blocks either, and no negative scales (see `_tensorrt_blocks`).
        """
        return self._source(name, role)[0]

    def _source(self, name: str, role: str | None):
        """(blocks or None, why the layout cannot hold the file's blocks or None)."""
        blocks = self.source.get(name)
        tq = None if blocks is None else self.spec.for_tensor(role or name)
        if tq is None or blocks.bits < tq.bits:
            return None, None
        if blocks.float_zero_points and not self.float_zero_points:
            return None, "float zero points"
        if blocks.float_zero_points and name == EMBEDDING_TABLE:
            return None, None  # the role's (GatherBlockQuantized's), not the layout's: re-quantized as before
        if tq.positive_scales and blocks.bits == 8:
            return None, INT8_BLOCKS
        return blocks, None

    def quantize(self, name: str, role: str | None = None) -> QuantizedLinear | None:
        label_name = name if role is None else role
        blocks, refused = self._source(name, role)
        if blocks is not None:
            q = blocks().quantized
            if self.spec.positive_scales:
                q, refused = _tensorrt_blocks(q)
            if q is not None:
                zeros = q.zero_points.astype(self.scale_dtype) if q.float_zero_points else q.zero_points
                self.written[label_name] = blocks.label
                return QuantizedLinear(replace(q, scales=q.scales.astype(self.scale_dtype), zero_points=zeros), None)
        if refused is not None:
            self.requantized[label_name] = f"{self.source[name].label}: {refused}"
        if refused == INT8_BLOCKS:  # kept at 8 bits as the ort flavour keeps them (per channel: as cheap as int6 here)
            return self._quantized(name, label_name, TensorQuant("int8", self.spec.block_size, per_channel=True,
                                                                 positive_scales=True))
        if role is None and name in self.prequantized:
            layer = self.prequantized[name]()
            quantized = replace(layer.quantized, scales=layer.quantized.scales.astype(self.scale_dtype))
            if self.spec.positive_scales:
                quantized = _positive_checkpoint_scales(quantized, name)
            self.written[label_name] = GPTQ_CHECKPOINT
            return QuantizedLinear(quantized, layer.input_order)
        tq = self.storage(name, role)
        return None if tq is None else self._quantized(name, label_name, tq)

    def _quantized(self, name: str, label_name: str, tq: TensorQuant) -> QuantizedLinear:
        quantized, label = SCHEMES[tq.scheme](self.read(name), label_name, tq, self)
        self.written[label_name] = label
        return QuantizedLinear(replace(quantized, scales=quantized.scales.astype(self.scale_dtype)), None)

    def calibrated(self, name: str) -> bool:
        """Whether `name` (or the role "lm_head.weight") is quantized with its own calibration statistics."""
        return self.spec.method == "gptq" and name in self.calibration

    def head_shares_table(self) -> bool:
        """A tied LM head reads the embedding table's storage unless it is stored or calibrated differently."""
        return self.storage(EMBEDDING_TABLE) == self.storage(EMBEDDING_TABLE, HEAD) and not self.calibrated(HEAD)

    def counts(self) -> dict[str, int]:
        return dict(Counter(self.written.values()))

    def check_lossless(self, names: Iterable[str]) -> None:
        """--method lossless: every selected weight must be exactly ternary, checked before anything is written."""
        for name in names:
            tq = self.storage(name)
            if tq is not None and tq.scheme == "ternary" and name not in self.prequantized:
                SCHEMES["ternary"](self.read(name), name, tq, self)


def _zero_blocks_at_scale_one(quantized: BlockQuantized) -> BlockQuantized:
    """Blocks of scale 0 (all-zero weights) as codes at their zero point over scale 1: the same zeros, a positive scale."""
    empty = quantized.scales == 0
    if not empty.any():
        return quantized
    codes = quantized.codes.reshape(quantized.out_features, quantized.n_blocks, quantized.block_size)
    codes = np.where(empty[..., None], quantized.zero_points[..., None], codes).astype(np.uint8)
    return replace(quantized, codes=codes.reshape(quantized.out_features, -1),
                   scales=np.where(empty, np.ones((), quantized.scales.dtype), quantized.scales))


def _tensorrt_blocks(quantized: BlockQuantized) -> tuple[BlockQuantized | None, str | None]:
    """A GGUF tensor's blocks as the tensorrt layout holds them (zero scales made 1), or (None, why not): a negative
    scale (Q4_0 gives every block whose extreme is positive one) cannot be flipped, as its code -8 would become +8."""
    if (quantized.scales < 0).any():
        return None, "negative scales"
    return _zero_blocks_at_scale_one(quantized), None


def _positive_checkpoint_scales(quantized: BlockQuantized, name: str) -> BlockQuantized:
    """A GPTQ checkpoint's scales for the tensorrt layout. AutoGPTQ's are positive ((max - min) / maxq, with a zero
    range widened to [-1, 1]); a zero scale becomes 1 over zero codes, a negative one is refused."""
    negative = int((quantized.scales < 0).sum())
    if negative:
        raise UnsupportedError(f"has {negative} negative scales, which TensorRT's DequantizeLinear cannot take (and "
                               "the codes cannot be negated into range without re-quantizing): use --flavour ort",
                               field=name)
    return _zero_blocks_at_scale_one(quantized)


def fuse(parts: list[QuantizedLinear]) -> QuantizedLinear | None:
    """Row-concatenation of projections reading one input; None when their layouts differ.

    Blockwise quantization runs along the input dimension, so stacking output rows (and their scales
    and zero points) is exact, provided block size, bits and input channel order agree.
    """
    first = parts[0]
    same = all(p.quantized.bits == first.quantized.bits and p.quantized.block_size == first.quantized.block_size
               and p.quantized.in_features == first.quantized.in_features
               and _same_order(p.input_order, first.input_order) for p in parts)
    if not same:
        return None
    if len(parts) == 1:
        return first
    q = first.quantized
    if any(p.quantized.float_zero_points for p in parts):  # e.g. GGUF Q4_1 fused with RTN blocks: all float
        dtype = next(p.quantized.zero_points.dtype for p in parts if p.quantized.float_zero_points)
        parts = [QuantizedLinear(replace(p.quantized, zero_points=p.quantized.zero_points.astype(dtype)), p.input_order)
                 for p in parts]
    cat = lambda attr: np.concatenate([getattr(p.quantized, attr) for p in parts], axis=0)  # noqa: E731
    return QuantizedLinear(BlockQuantized(cat("codes"), cat("scales"), cat("zero_points"), q.bits, q.block_size,
                                          q.in_features), first.input_order)


def _same_order(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))


def scaled(layer: QuantizedLinear, scale: float) -> QuantizedLinear:
    """Folds a constant (muP residual or embedding scale) into the block scales; the codes are kept."""
    if scale == 1.0:
        return layer
    q = layer.quantized
    scales = (q.scales.astype(np.float32) * np.float32(scale)).astype(q.scales.dtype)
    return QuantizedLinear(replace(q, scales=scales), layer.input_order)


def dequantized(layer: QuantizedLinear) -> np.ndarray:
    """The float [N, K] weight in the checkpoint's channel order."""
    weight = layer.quantized.dequantize().astype(np.float32)
    if layer.input_order is None:
        return weight
    natural = np.empty_like(weight)
    natural[:, layer.input_order] = weight
    return natural


# --- building a quantizer for a checkpoint -----------------------------------------------------------


def checkpoint_spec(checkpoint, spec: QuantSpec | None) -> QuantSpec | None:
    """GPTQ checkpoints export their own codes: the spec records them (int4, method gptq-checkpoint).

    Method `auto` (the CLI default): a GGUF file with Q4_0/Q4_1/Q8_0 tensors asked for int4 exports those
    tensors' own blocks instead of re-quantizing them (method source); anything else is round-to-nearest.
    An explicit `rtn` always re-quantizes.
    """
    if spec is not None and spec.method == "auto":
        gguf_blocks = checkpoint.format == "gguf" and checkpoint.prequantized and spec.scheme == "int4"
        spec = replace(spec, method=SOURCE if gguf_blocks else "rtn")
    if not checkpoint.prequantized or checkpoint.format == "gguf":
        return spec
    source = checkpoint.quantization or {}
    requested = spec or QuantSpec()
    if requested.scheme not in ("none", "int4"):
        raise UnsupportedError(f"a GPTQ checkpoint is exported as its own int4 codes; --quant {requested.scheme} "
                               "would re-quantize them", field="--quant")
    return replace(requested, scheme="int4", method=GPTQ_CHECKPOINT, block_size=int(source.get("group_size", 128)),
                   symmetric=bool(source.get("symmetric", True)))


def check_flavour(checkpoint, spec: QuantSpec, flavour: str) -> None:
    source = checkpoint.quantization or {}
    if checkpoint.format != "gguf" and checkpoint.prequantized and flavour == "standard" and (source.get("act_order") or not source.get("symmetric", True)):
        raise UnsupportedError("the standard flavour takes symmetric GPTQ checkpoints without act-order only "
                               "(blocked DequantizeLinear has no zero points or channel order); use --flavour ort",
                               path=checkpoint.path, field="quantization_config")
    if spec.method == "gptq" and spec.scheme not in ("int4", "int8"):
        raise UnsupportedError(f"--method gptq quantizes int4 or int8 weights, not {spec.scheme}", field="--method")
    if spec.method == "gptq":  # checked before anything is hashed or written; the quality gate needs no torch
        _require_torch_for_gptq()
    if spec.method == "lossless" and spec.scheme != "ternary":
        raise UnsupportedError("--method lossless applies to --quant ternary (exact BitCPM packing)", field="--method")


def _require_torch_for_gptq() -> None:
    """GPTQ calibrates on the PyTorch reference model: the one quantized export that still needs torch."""
    from edgecpm.optional import require

    require("torch", "reference", "--method gptq (calibration on the PyTorch reference model)")


def calibration_hessians(checkpoint, spec: QuantSpec, max_tokens: int = CALIBRATION_TOKENS) -> dict[str, Hessian]:
    """Input statistics of every decoder linear the spec quantizes, from the fp32 reference on the calibration text."""
    _require_torch_for_gptq()
    from edgecpm.models import reference_model
    from edgecpm.quant.calibrate import accumulate_hessians, calibration_sequences, calibration_text
    from edgecpm.text import TextTokenizer

    ids = np.asarray(TextTokenizer.from_checkpoint(checkpoint.tokenizer).encode(calibration_text())[:max_tokens])
    names = [n for n in checkpoint.tensors if n.startswith("model.layers.") and spec.for_tensor(n) is not None]
    head = spec.for_tensor(HEAD)
    if head is not None and head.scheme == "int4":  # an int8 head is near-lossless as it is
        names.append(HEAD)
    return accumulate_hessians(reference_model(checkpoint), calibration_sequences(ids), names,
                               checkpoint.architecture.kv_projections, head_input=HEAD_INPUT)


def make_quantizer(checkpoint, spec: QuantSpec, scale_dtype=np.float32, flavour: str = "ort") -> WeightQuantizer:
    """The quantizer of an export to `flavour`; a spec whose layout is already chosen (as a manifest records it) keeps it."""
    spec = spec.for_flavour(flavour)
    calibration = calibration_hessians(checkpoint, spec) if spec.method == "gptq" else {}
    gguf = checkpoint.format == "gguf"
    quantizer = WeightQuantizer(spec, lambda name: checkpoint.tensors[name].numpy(np.float32),
                                {} if gguf else checkpoint.prequantized, np.dtype(scale_dtype), calibration,
                                source=checkpoint.prequantized if gguf and spec.method == SOURCE else {},
                                float_zero_points=flavour == "ort")
    if spec.method == "lossless":
        quantizer.check_lossless(checkpoint.tensors)
    return quantizer


def quantized_weights(checkpoint, spec: QuantSpec, names: Iterable[str] | Mapping[str, str] | None = None,
                      scale_dtype=np.float32, flavour: str = "ort") -> dict[str, np.ndarray]:
    """Every checkpoint tensor as the export stores it (dequantized where quantized), for parity references.

    `names`: the tensors the export quantized (the manifest's `quantization.tensors`); by default every
    tensor the spec selects. A tied model's "lm_head.weight" entry is the head's view of the table.
    """
    spec = checkpoint_spec(checkpoint, spec)
    quantizer = make_quantizer(checkpoint, spec, scale_dtype, flavour)
    selected = list(names) if names is not None else [n for n in checkpoint.tensors if quantizer.storage(n) is not None]
    weights = {name: ref.numpy(np.float32) for name, ref in checkpoint.tensors.items()}
    for name in selected:
        if name not in checkpoint.tensors:  # a tied head
            if not quantizer.head_shares_table():
                weights[name] = dequantized(quantizer.quantize(EMBEDDING_TABLE, role=name))
            continue
        weights[name] = dequantized(quantizer.quantize(name))
    return weights


def warn_if_lossy(quantizer: WeightQuantizer, quality: dict | None) -> None:
    measured = "" if quality is None else (f"; measured perplexity {quality['perplexity_increase']:+.1%}, "
                                           f"mean KL {quality['mean_kl']:.4f}, top-1 agreement {quality['top1_agreement']:.1%}")
    absmean = sum(1 for label in quantizer.written.values() if label == "ternary-absmean")
    if absmean:
        warnings.warn(f"{absmean} of {len(quantizer.written)} weights are not ternary and were quantized with absmean "
                      f"ternary (lossy){measured}", QuantizationWarning, stacklevel=3)
    if quantizer.requantized:
        reasons = ", ".join(f"{why} ({count})" for why, count in sorted(Counter(quantizer.requantized.values()).items()))
        warnings.warn(f"{len(quantizer.requantized)} of {len(quantizer.written)} weights were re-quantized (RTN) instead "
                      f"of exported as the file's own blocks, which the {quantizer.spec.layout} layout (the standard flavour's, "
                      f"TensorRT's DequantizeLinear rules) cannot hold: "
                      f"{reasons}{measured}", QuantizationWarning, stacklevel=3)
