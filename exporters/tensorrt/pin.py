"""What pins a TensorRT engine to a machine, and the check that refuses one built elsewhere.

A serialized engine runs only with the TensorRT version that built it and on the GPU model it was tuned for; on
a Jetson the L4T release (the BSP: driver, CUDA stack) is part of that too. `HostFacts` are those facts for this
machine (`current_host()` reads them: tensorrt.__version__, cuda-python's cudaGetDeviceProperties or NVML,
/etc/nv_tegra_release); `check_pin(record, here)` raises BundleError naming the first mismatch and the command that
rebuilds the engine here. `parse_l4t_release` is a pure function over the release file's text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from edgecpm.bundle import EngineRecord
from edgecpm.errors import BundleError

NV_TEGRA_RELEASE = Path("/etc/nv_tegra_release")
# "# R36 (release), REVISION: 3.0, GCID: 36191598, BOARD: generic, EABI: aarch64, DATE: ..."
_L4T = re.compile(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*(\d+(?:\.\d+)*)", re.IGNORECASE)


def parse_l4t_release(text: str) -> str | None:
    """The L4T release in /etc/nv_tegra_release's first line: "# R36 (release), REVISION: 3.0, ..." -> "36.3.0".

    None when the text is not such a line. A one-part revision ("REVISION: 1") reads as "<major>.1.0".
    """
    match = _L4T.search(text or "")
    if match is None:
        return None
    parts = match.group(2).split(".")
    if len(parts) == 1:
        parts.append("0")
    return ".".join([match.group(1), *parts])


@dataclass(frozen=True)
class HostFacts:
    """This machine as an engine sees it. None: not installed / not found; `gpu_problem` says why there is no GPU."""

    tensorrt_version: str | None
    gpu_name: str | None
    sm: str | None               # compute capability, "8.7"
    l4t_release: str | None      # Jetsons only
    gpu_problem: str | None = None
    tensorrt_problem: str | None = None

    @property
    def has_gpu(self) -> bool:
        return self.gpu_name is not None and self.sm is not None


def rebuild_command(bundle: str | Path, device: str) -> str:
    return f"edgecpm engine build {bundle} --device {device}"


def pin_mismatch(record: EngineRecord, here: HostFacts) -> str | None:
    """Why `record` does not run here (the first mismatch, in the order version, GPU, L4T), or None."""
    if here.tensorrt_version is None:
        return "TensorRT is not installed here"
    if record.tensorrt_version != here.tensorrt_version:
        return f"it was built with TensorRT {record.tensorrt_version}, this machine has TensorRT {here.tensorrt_version}"
    if not here.has_gpu:
        return f"this machine has no CUDA GPU ({here.gpu_problem or 'none found'})"
    if record.sm != here.sm:
        return f"it was built for SM {record.sm} ({record.gpu_name}), this GPU is SM {here.sm} ({here.gpu_name})"
    if record.gpu_name != here.gpu_name:
        return f"it was built on a {record.gpu_name}, this GPU is a {here.gpu_name}"
    if record.l4t_release != here.l4t_release:
        built = f"L4T {record.l4t_release}" if record.l4t_release else "a machine without L4T"
        now = f"L4T {here.l4t_release}" if here.l4t_release else "no L4T"
        return f"it was built on {built}, this machine has {now}"
    return None


def check_pin(record: EngineRecord, here: HostFacts, *, bundle: str | Path = "BUNDLE") -> None:
    """Raises BundleError (one line: the mismatch and the rebuild command) unless `record` runs on `here`."""
    reason = pin_mismatch(record, here)
    if reason is not None:
        raise BundleError(f"engine for device {record.device} does not run here: {reason}; rebuild it on this machine: "
                          f"{rebuild_command(bundle, record.device)}", path=Path(bundle) / record.file)


# --- reading this machine ------------------------------------------------------------------------------------


def tensorrt_version() -> tuple[str | None, str | None]:
    """(tensorrt.__version__, None) or (None, why it cannot be imported)."""
    try:
        import tensorrt
    except ImportError as exc:  # a broken install is as unusable as none
        return None, f"the 'tensorrt' package cannot be imported ({str(exc).splitlines()[0][:120]})"
    return str(tensorrt.__version__), None


def import_cudart():
    """cuda-python's runtime module: `cuda.bindings.runtime` (cuda-python >= 12.6) or the older `cuda.cudart`."""
    try:
        from cuda.bindings import runtime
        return runtime
    except ImportError:
        from cuda import cudart  # raises ImportError where cuda-python is missing
        return cudart


def _gpu_from_cudart() -> tuple[str, str]:
    cudart = import_cudart()
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess or count < 1:
        name = cudart.cudaGetErrorName(err)[1] if err != cudart.cudaError_t.cudaSuccess else b"no devices"
        raise RuntimeError(f"cudaGetDeviceCount: {name.decode() if isinstance(name, bytes) else name}")
    err, props = cudart.cudaGetDeviceProperties(0)
    if err != cudart.cudaError_t.cudaSuccess:
        raise RuntimeError(f"cudaGetDeviceProperties: {cudart.cudaGetErrorName(err)[1]}")
    name = props.name
    name = name.split(b"\0", 1)[0].decode(errors="replace") if isinstance(name, (bytes, bytearray)) else str(name)
    return name.strip(), f"{props.major}.{props.minor}"


def _gpu_from_nvml() -> tuple[str, str]:
    import pynvml

    pynvml.nvmlInit()
    try:
        if pynvml.nvmlDeviceGetCount() < 1:
            raise RuntimeError("NVML sees no devices")
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        name = pynvml.nvmlDeviceGetName(handle)
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
    finally:
        pynvml.nvmlShutdown()
    return (name.decode() if isinstance(name, bytes) else str(name)).strip(), f"{major}.{minor}"


def detect_gpu() -> tuple[str | None, str | None, str | None]:
    """(name, sm, None) of CUDA device 0, or (None, None, why not): cuda-python first, NVML where it is missing."""
    problems = []
    for label, probe in (("cuda-python", _gpu_from_cudart), ("NVML", _gpu_from_nvml)):
        try:
            name, sm = probe()
            return name, sm, None
        except ImportError:
            problems.append(f"{label} is not installed")
        except Exception as exc:  # noqa: BLE001  (driver/runtime errors: report, try the next probe)
            problems.append(f"{label}: {str(exc).splitlines()[0][:120] if str(exc) else exc.__class__.__name__}")
    return None, None, "; ".join(problems)


def read_l4t_release(path: Path = NV_TEGRA_RELEASE) -> str | None:
    try:
        return parse_l4t_release(path.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return None


def current_host() -> HostFacts:
    version, trt_problem = tensorrt_version()
    name, sm, gpu_problem = detect_gpu()
    return HostFacts(tensorrt_version=version, gpu_name=name, sm=sm, l4t_release=read_l4t_release(),
                     gpu_problem=gpu_problem, tensorrt_problem=trt_problem)


__all__ = ["HostFacts", "check_pin", "current_host", "detect_gpu", "parse_l4t_release", "pin_mismatch", "read_l4t_release",
           "rebuild_command"]
