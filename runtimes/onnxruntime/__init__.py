"""onnxruntime backend (imported as `edgecpm.runtimes.onnxruntime`); torch-free. Bundles are opened through the
one selector, `edgecpm.runtimes.load_backend`."""

from edgecpm.runtimes.onnxruntime.backend import OnnxRuntimeBackend

__all__ = ["OnnxRuntimeBackend"]
