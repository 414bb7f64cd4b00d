"""onnxruntime backend (imported as `edgecpm.runtimes.onnxruntime`); torch-free."""

from __future__ import annotations

import os
from pathlib import Path

from edgecpm.bundle import Manifest, read_manifest


def load_backend(bundle_dir: str | Path, manifest: Manifest | None = None, *, threads: int | None = None,
                 prepack: bool | None = None, spin: bool = True, kernels: str | None = None):
    """Opens the bundle's graph; `threads` defaults to the number of physical cores.

    `prepack` repacks weights into MLAS's layouts: MatMulNBits needs it for its int8-activation kernels
    (SmolLM2 int8 without it: 1.4 vs 57 tok/s), and on 2 threads fp32 decode is faster with it too (SmolLM2:
    ~39 vs ~34 tok/s). Default: on for the `ort` flavour, off for `standard` (the TensorRT input, run on
    onnxruntime as an exact reference: with prepacking onnxruntime rewrites its DequantizeLinear+MatMul into
    int8-activation MatMulNBits, which changes the numbers). `spin` is onnxruntime's default.
    `spin` (onnxruntime's default, and what its peers run with) keeps idle intra-op threads spinning between
    the many small decode ops; pass `spin=False` where other busy processes share the cores.
    `kernels` (default: $EDGECPM_KERNELS, else "auto"): who runs decode steps, see OnnxRuntimeBackend.
    """
    from edgecpm.runtimes.onnxruntime.backend import OnnxRuntimeBackend

    bundle_dir = Path(bundle_dir)
    manifest = manifest or read_manifest(bundle_dir)
    if prepack is None:
        prepack = manifest.flavour == "ort"
    kernels = kernels or os.environ.get("EDGECPM_KERNELS") or "auto"
    return OnnxRuntimeBackend(bundle_dir / manifest.model_file, manifest, threads=threads, prepack=prepack, spin=spin,
                              kernels=kernels)


__all__ = ["load_backend"]
