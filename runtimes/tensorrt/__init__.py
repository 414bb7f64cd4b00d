"""TensorRT backend (imported as `edgecpm.runtimes.tensorrt`); torch-free, and nothing heavy at import time.

`engine_for_this_device(bundle_dir, manifest)` says whether the bundle holds an engine that runs on this machine
(the record, "") or why not (None, the reason, with the command that builds one here); the one selector,
`edgecpm.runtimes.load_backend`, opens it. tensorrt and cuda-python are imported inside functions only.
"""

from __future__ import annotations

from pathlib import Path

from edgecpm.bundle import EngineRecord, Manifest


def engine_for_this_device(bundle_dir: str | Path, manifest: Manifest, *, host=None) -> tuple[EngineRecord | None, str]:
    """(the engine record that runs here, "") or (None, why none does).

    Reasons, in order: the bundle has no engine; TensorRT is not installed; there is no CUDA GPU; every engine is
    pinned to another TensorRT version, GPU or L4T release (the first such engine's mismatch is named). Each reason
    ends with the rebuild command. `host` (a `HostFacts`) defaults to this machine's.
    """
    from edgecpm.exporters.tensorrt.pin import current_host, pin_mismatch, rebuild_command

    bundle_dir = Path(bundle_dir)
    engines = list(manifest.engines)
    if not engines:
        return None, (f"the bundle has no TensorRT engine; build one on the target: "
                      f"{rebuild_command(bundle_dir, 'NAME')}")
    here = host if host is not None else current_host()
    if here.tensorrt_version is None:
        return None, ("TensorRT is not installed (the 'tensorrt' Python package; on a Jetson it ships with JetPack): "
                      "pip install 'edgecpm[tensorrt]'")
    if not here.has_gpu:
        return None, f"no CUDA GPU found ({here.gpu_problem or 'none visible'})"
    reasons = []
    for record in engines:
        reason = pin_mismatch(record, here)
        if reason is None:
            return record, ""
        reasons.append((record, reason))
    # Prefer the engine for this GPU (same SM) when naming the mismatch: it is the one a rebuild replaces.
    record, reason = next(((r, why) for r, why in reasons if r.sm == here.sm), reasons[0])
    others = f" ({len(engines) - 1} other engine(s) do not match either)" if len(engines) > 1 else ""
    return None, (f"the engine for device {record.device} is pinned elsewhere: {reason}{others}; rebuild it here: "
                  f"{rebuild_command(bundle_dir, record.device)}")


__all__ = ["engine_for_this_device"]
