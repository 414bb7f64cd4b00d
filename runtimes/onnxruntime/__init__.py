"""onnxruntime backend (imported as `edgecpm.runtimes.onnxruntime`); torch-free."""

from __future__ import annotations

from pathlib import Path

from edgecpm.bundle import Manifest, read_manifest


def load_backend(bundle_dir: str | Path, manifest: Manifest | None = None, *, threads: int | None = None,
                 prepack: bool | None = None, spin: bool = False):
    """Opens the bundle's graph; `threads` defaults to the number of physical cores.

    `prepack=True` lets onnxruntime repack weights for blocked GEMM: faster prefill, slower float decode.
    Default: on for quantized `ort` bundles only, where MatMulNBits needs its prepacked (MLAS) layout for
    the int8-activation kernels; without it every step dequantizes (SmolLM2 int8: 1.4 vs 57 tok/s).
    `spin=True` keeps idle intra-op threads spinning: best on a dedicated machine, bad on a shared one.
    """
    from edgecpm.runtimes.onnxruntime.backend import OnnxRuntimeBackend

    bundle_dir = Path(bundle_dir)
    manifest = manifest or read_manifest(bundle_dir)
    if prepack is None:
        prepack = bool(manifest.quantization) and manifest.flavour == "ort"
    return OnnxRuntimeBackend(bundle_dir / manifest.model_file, manifest, threads=threads, prepack=prepack, spin=spin)


__all__ = ["load_backend"]
