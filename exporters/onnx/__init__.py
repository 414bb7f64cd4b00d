"""ONNX graph builder (imported as `edgecpm.exporters.onnx`), built directly from checkpoint tensors.

Layout: `writer` (protos + streamed external data), `lowering` (the flavour-dependent ops: `ort` contrib
ops or `standard` ONNX), `ops` (shared blocks: embedding, MLP/MoE, decoder stack, head), `models/` (one
builder per architecture, found by registry name), `spec` (typed graph I/O and KV layout), `build`.
"""

from edgecpm.optional import require

require("onnx", "export", "exporting ONNX graphs")  # every module below imports it; name the extra if it is missing

from edgecpm.exporters.onnx.build import DATA_FILE, MODEL_FILE, build_onnx  # noqa: E402
from edgecpm.exporters.onnx.spec import FLAVOURS, PRECISIONS, ExportOptions, GraphIO  # noqa: E402

__all__ = ["DATA_FILE", "FLAVOURS", "MODEL_FILE", "PRECISIONS", "ExportOptions", "GraphIO", "build_onnx"]
