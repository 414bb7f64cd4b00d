"""TensorRT plugins for edgecpm's custom-domain operators: the InfLLM v2 plugin (runtimes/tensorrt/plugins/infllmv2).

A sparse graph carries each `ai.edgecpm.InfLLMv2Attention` node together with its lowering as a model-local function.
TensorRT 10.x's ONNX parser imports a node whose op_type names a local function as that function's body before it
looks for a plugin (onnx-tensorrt ModelImporter.cpp), so with the function present the lowering runs. `plugin_graph`
writes the same graph without the function: the parser then finds no importer and no local function for the node,
and creates the plugin registered under that name (version "1", namespace "") from the node's attributes.

The library registers its creator when loaded (REGISTER_TENSORRT_PLUGIN), so `load_plugin_library` (dlopen through
ctypes, global symbols) before parsing or deserializing is all TensorRT needs. Nothing here imports TensorRT.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

from edgecpm.errors import BundleError, UnsupportedError
from edgecpm.sparse.op import DOMAIN, OP_TYPE

PLUGIN_DIR = "tensorrt/plugins"  # inside a bundle: the libraries its engines need, copied at build time
PLUGIN_GRAPH_SUFFIX = ".plugin.onnx"  # the rewritten graph, beside model.onnx (its external data is found there)

_loaded: dict[Path, ctypes.CDLL] = {}


@dataclass(frozen=True)
class SparsePlugin:
    """`edgecpm engine build --sparse-plugin`: the built InfLLM v2 plugin library (libedgecpm_infllmv2.so)."""

    library: Path

    def checked(self) -> SparsePlugin:
        library = Path(self.library)
        if not library.is_file():
            raise UnsupportedError(f"no plugin library at {library} (build runtimes/tensorrt/plugins/infllmv2 with cmake)",
                                   field="--sparse-plugin")
        return SparsePlugin(library.resolve())


def plugin_graph(model_path: Path) -> Path:
    """Writes `<model>.plugin.onnx` beside `model_path`: the graph without the InfLLMv2Attention function, so TensorRT
    takes the node from the plugin. Returns its path (the caller deletes it); weights stay in the external data file."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    kept = [f for f in model.functions if not (f.domain == DOMAIN and f.name == OP_TYPE)]
    if len(kept) == len(model.functions):
        raise BundleError(f"the graph has no {DOMAIN}.{OP_TYPE} operator (export it with --attention sparse)",
                          path=model_path)
    del model.functions[:]
    model.functions.extend(kept)
    out = model_path.with_name(model_path.stem + PLUGIN_GRAPH_SUFFIX)
    out.write_bytes(model.SerializeToString())
    return out


def load_plugin_library(library: Path) -> None:
    """Loads a plugin library once per process (its creators register themselves with TensorRT's registry)."""
    library = Path(library).resolve()
    if library not in _loaded:
        try:
            _loaded[library] = ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)
        except OSError as error:
            raise BundleError(f"cannot load the TensorRT plugin library ({error})", path=library) from None


__all__ = ["PLUGIN_DIR", "SparsePlugin", "load_plugin_library", "plugin_graph"]
