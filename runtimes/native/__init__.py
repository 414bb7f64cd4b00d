"""Native CPU kernels for decode and prefill (imported as `edgecpm.runtimes.native`): C + OpenMP, built on first use, torch-free.

The onnxruntime backend hands its decode steps, and for quantized bundles its prefill too (then it opens no
onnxruntime session), to `native_decoder` when the bundle is one the kernels implement; where onnxruntime
still prefills (fp32 bundles), both write the same KV buffers.
"""

from edgecpm.runtimes.native.build import KernelsUnavailable, load_library
from edgecpm.runtimes.native.decoder import NativeDecoder, native_decoder

__all__ = ["KernelsUnavailable", "NativeDecoder", "load_library", "native_decoder"]
