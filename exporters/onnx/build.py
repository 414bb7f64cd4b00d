"""checkpoint -> model.onnx + model.onnx.data in a directory (the bundle writer calls this)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgecpm.checkpoint.base import Checkpoint
from edgecpm.errors import UnsupportedError
from edgecpm.quant.spec import ACCURACY_LEVELS
from edgecpm.exporters.onnx.lowering import make_lowering
from edgecpm.exporters.onnx.models import builder_for
from edgecpm.exporters.onnx.ops import BuildContext, Weights
from edgecpm.exporters.onnx.quantized import QUANTIZED_OPS
from edgecpm.exporters.onnx.spec import FLAVOURS, PRECISIONS, TIED_HEAD_MODES, ExportOptions, GraphIO
from edgecpm.exporters.onnx.writer import GraphWriter
from edgecpm.quant.plan import WeightQuantizer

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"


def check_options(options: ExportOptions) -> None:
    for value, allowed, name in ((options.flavour, FLAVOURS, "flavour"), (options.precision, tuple(PRECISIONS), "precision"),
                                 (options.tied_head, TIED_HEAD_MODES, "tied_head")):
        if value not in allowed:
            raise UnsupportedError(f"unknown {name} {value!r} (choose from {', '.join(allowed)})", field=name)
    if options.accuracy_level not in ACCURACY_LEVELS:
        raise UnsupportedError(f"accuracy level {options.accuracy_level} is not one of {ACCURACY_LEVELS}", field="--accuracy-level")


def build_onnx(checkpoint: Checkpoint, options: ExportOptions, out_dir: Path,
               progress: Callable[[str], None] | None = None, quantizer: WeightQuantizer | None = None) -> GraphIO:
    """Writes the graph; weights stream from the checkpoint one (fused) tensor at a time.

    `quantizer` decides which weights are stored quantized (edgecpm.quant.plan); None: all float.
    """
    check_options(options)
    builder = builder_for(checkpoint.architecture.name)
    writer = GraphWriter(out_dir / DATA_FILE)
    try:
        lowering = make_lowering(writer, options, checkpoint.config.rope)
        dtype = np.dtype(options.np_dtype)
        quantized = QUANTIZED_OPS[options.flavour](writer, dtype, options.accuracy_level) if quantizer else None
        weights = Weights(writer, checkpoint.tensors, dtype, quantizer, quantized)
        ctx = BuildContext(checkpoint.config, weights, writer, lowering, options)
        lowering.logits_output(builder(ctx))
        if progress:
            progress(f"wrote {len(writer.initializers)} initializers, {len(writer.nodes)} nodes")
        writer.save(out_dir / MODEL_FILE, uses_contrib_ops=lowering.uses_contrib_ops, producer="edgecpm")
    finally:
        writer.close()
    graph_io = lowering.graph_io()
    graph_io.tensors = writer.tensor_index
    return graph_io
