"""Native CPU kernels for decode and prefill (imported as `edgecpm.runtimes.native`): C + OpenMP, built on first use, torch-free.

`NativeBackend` runs a bundle the kernels implement (`native_decoder` says why not otherwise): decode steps,
and for quantized bundles prompts too (then no onnxruntime session exists). For fp32 bundles the selector
(runtimes/select.py) lets onnxruntime prefill the same KV state.
"""

from edgecpm.runtimes.native.build import KernelsUnavailable, load_library
from edgecpm.runtimes.native.decoder import NativeDecoder, native_decoder

__all__ = ["KernelsUnavailable", "NativeDecoder", "load_library", "native_decoder"]
