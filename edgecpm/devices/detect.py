"""Which shipped device profile fits the machine edgecpm runs on, and why.

Facts are read, never guessed from names alone: a Jetson from `/proc/device-tree/model` (plus MemTotal to
tell modules of one family apart, and the L4T release), else an NVIDIA discrete GPU through NVML, else the
CPU's features from `/proc/cpuinfo`. Every file is read under `root`, so tests run on captured trees, and
`nvml` takes any object with pynvml's function names (a capture of real NVML answers in the tests).
"""

from __future__ import annotations

import platform
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgecpm.devices.profile import GIB, DeviceProfile, list_profiles, load_profile

# How each `[hardware.cpu] isa` feature shows in /proc/cpuinfo: x86 `flags`, arm64 `Features` (the kernel's
# hwcap names, https://docs.kernel.org/arch/arm64/elf_hwcaps.html). Armv8.2-A is read from `dcpop` (DC CVAP,
# FEAT_DPB), which Armv8.2 makes mandatory.
CPUINFO_FLAGS: dict[str, tuple[str, str]] = {
    "armv8.2-a": ("aarch64", "dcpop"),
    "neon": ("aarch64", "asimd"),
    "dotprod": ("aarch64", "asimddp"),
    "i8mm": ("aarch64", "i8mm"),
    "sve": ("aarch64", "sve"),
    "avx2": ("x86_64", "avx2"),
    "fma": ("x86_64", "fma"),
    "avx512f": ("x86_64", "avx512f"),
    "avx512bw": ("x86_64", "avx512bw"),
    "avx512vl": ("x86_64", "avx512vl"),
    "avx512_vnni": ("x86_64", "avx512_vnni"),
    "avx_vnni": ("x86_64", "avx_vnni"),
}
_MACHINES = {"x86_64": "x86_64", "amd64": "x86_64", "i386": "x86_64", "i686": "x86_64", "aarch64": "aarch64",
             "arm64": "aarch64", "armv8l": "aarch64"}
_L4T = re.compile(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*(\d+)\.(\d+)")
_UNDER = 0.85  # MemTotal below this share of a profile's memory: probably a smaller module of the family


@dataclass(frozen=True)
class Detection:
    profile: str
    reasons: tuple[str, ...]
    facts: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"profile": self.profile, "reasons": list(self.reasons), "facts": dict(self.facts)}


def detect(root: Path = Path("/"), nvml: Any = None) -> Detection:
    """The best-matching shipped profile for the machine whose files live under `root`."""
    root = Path(root)
    profiles = [load_profile(name) for name in list_profiles()]
    reasons: list[str] = []
    facts: dict[str, Any] = {}
    mem_total = _mem_total(root)
    if mem_total is not None:
        facts["mem_total_bytes"] = mem_total
    for step in (_jetson, _nvidia_gpu, _cpu):
        chosen = step(root, nvml, profiles, mem_total, reasons, facts)
        if chosen is not None:
            return Detection(profile=chosen, reasons=tuple(reasons), facts=facts)
    raise AssertionError("the CPU step always chooses a profile")


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _mem_total(root: Path) -> int | None:
    data = _read(root / "proc/meminfo")
    match = re.search(rb"^MemTotal:\s+(\d+)\s*kB", data or b"", re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None  # /proc/meminfo's kB are KiB


def _gib(count: float) -> str:
    return f"{count / GIB:.1f} GiB"


def _l4t_release(root: Path) -> str | None:
    data = _read(root / "etc/nv_tegra_release")
    match = _L4T.search((data or b"").decode("utf-8", "replace"))
    return ".".join(match.groups()) if match else None


def _jetson(root: Path, nvml: Any, profiles: list[DeviceProfile], mem_total: int | None, reasons: list[str],
            facts: dict[str, Any]) -> str | None:
    data = _read(root / "proc/device-tree/model")
    if data is None:
        reasons.append("not a Jetson: no /proc/device-tree/model")
        return None
    model = data.decode("utf-8", "replace").strip("\x00 \n")  # the real file ends in a NUL
    facts["device_tree_model"] = model
    candidates = [p for p in profiles if p.hardware.jetson_model and model.startswith(p.hardware.jetson_model)]
    if not candidates:
        known = "an NVIDIA Jetson without a shipped profile" if model.startswith("NVIDIA Jetson") else "not a Jetson"
        reasons.append(f"/proc/device-tree/model is {model!r}: {known}")
        return None
    l4t = _l4t_release(root)
    facts["l4t"] = l4t
    if mem_total is None:
        chosen = min(candidates, key=lambda p: p.hardware.memory_bytes)
        memory_note = "MemTotal unknown, so the smallest module of the family is assumed"
    else:
        chosen = min(candidates, key=lambda p: abs(p.hardware.memory_bytes - mem_total))
        memory_note = f"MemTotal {_gib(mem_total)} is nearest the {_gib(chosen.hardware.memory_bytes)} module"
    reasons.append(f"/proc/device-tree/model is {model!r}, a {chosen.hardware.jetson_model} board; {memory_note}")
    if mem_total is not None and mem_total < _UNDER * chosen.hardware.memory_bytes:
        reasons.append(f"MemTotal {_gib(mem_total)} is well below the profile's {_gib(chosen.hardware.memory_bytes)}: "
                       "this may be a smaller module, whose budget the profile overstates")
    reasons.append(f"L4T {l4t} (/etc/nv_tegra_release)" if l4t else "L4T release unknown (no readable "
                                                                       "/etc/nv_tegra_release)")
    return chosen.name


def _open_nvml(nvml: Any, reasons: list[str]) -> Any:
    if nvml is not None:
        return nvml
    try:
        import pynvml
    except ImportError:
        reasons.append("no NVIDIA GPU check: nvidia-ml-py (pynvml) is not installed")
        return None
    return pynvml


def _nvidia_gpu(root: Path, nvml: Any, profiles: list[DeviceProfile], mem_total: int | None, reasons: list[str],
                facts: dict[str, Any]) -> str | None:
    nvml = _open_nvml(nvml, reasons)
    if nvml is None:
        return None
    try:
        nvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 (pynvml raises NVMLError subclasses; an injected capture anything)
        reasons.append(f"no NVIDIA GPU: NVML did not start ({exc})")
        return None
    try:
        count = nvml.nvmlDeviceGetCount()
        if not count:
            reasons.append("no NVIDIA GPU: NVML reports no devices")
            return None
        handle = nvml.nvmlDeviceGetHandleByIndex(0)
        name = nvml.nvmlDeviceGetName(handle)
        name = name.decode() if isinstance(name, bytes) else str(name)
        major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
        memory = int(nvml.nvmlDeviceGetMemoryInfo(handle).total)
    except Exception as exc:  # noqa: BLE001 (as above: a failing NVML is a reason to fall through)
        reasons.append(f"no NVIDIA GPU: NVML failed ({exc})")
        return None
    finally:
        shutdown = getattr(nvml, "nvmlShutdown", None)
        if shutdown is not None:
            try:
                shutdown()
            except Exception:  # noqa: BLE001, S110 (the answers are read; a failing shutdown changes nothing)
                pass
    sm = f"{major}.{minor}"
    facts["gpu"] = {"count": count, "name": name, "sm": sm, "memory_bytes": memory}
    seen = f"NVML reports {name!r} (SM {sm}, {_gib(memory)})" + (f", GPU 0 of {count}" if count > 1 else "")
    discrete = [p for p in profiles if p.kind == "gpu" and p.hardware.gpu is not None]
    by_name = [p for p in discrete if _same_gpu(p.hardware.gpu.name, name)]
    if by_name:
        reasons.append(f"{seen}: matches {by_name[0].name} by name")
        return by_name[0].name
    if not discrete:
        reasons.append(f"{seen}, but no GPU profile is shipped")
        return None

    def distance(p: DeviceProfile) -> tuple[float, float]:
        p_major, p_minor = p.hardware.gpu.sm_tuple
        return abs((major * 10 + minor) - (p_major * 10 + p_minor)), abs(p.hardware.memory_bytes - memory)

    nearest = min(discrete, key=distance)
    gpu = nearest.hardware.gpu
    reasons.append(f"{seen}: no profile for this GPU; nearest by compute capability and memory is {nearest.name} "
                   f"(SM {gpu.sm}, {_gib(nearest.hardware.memory_bytes)})")
    return nearest.name


def _same_gpu(profile_name: str, nvml_name: str) -> bool:
    def norm(text: str) -> str:
        text = " ".join(text.lower().split())
        return text.removeprefix("nvidia ")

    return norm(profile_name) == norm(nvml_name)


def _cpuinfo_features(root: Path) -> tuple[str | None, set[str], int]:
    """(architecture, feature flags of the first CPU, number of logical CPUs) from /proc/cpuinfo."""
    text = (_read(root / "proc/cpuinfo") or b"").decode("utf-8", "replace")
    logical = len(re.findall(r"^processor\s*:", text, re.MULTILINE))
    for key, arch in (("flags", "x86_64"), ("Features", "aarch64")):
        match = re.search(rf"^{key}\s*:(.*)$", text, re.MULTILINE)
        if match:
            return arch, set(match.group(1).split()), logical
    return None, set(), logical


def _cpu(root: Path, nvml: Any, profiles: list[DeviceProfile], mem_total: int | None, reasons: list[str],
         facts: dict[str, Any]) -> str:
    arch, flags, logical = _cpuinfo_features(root)
    source = "/proc/cpuinfo"
    if arch is None:
        machine = platform.machine().lower()
        arch, source = _MACHINES.get(machine), f"platform.machine() {machine!r} (no CPU features in /proc/cpuinfo)"
    facts["cpu"] = {"arch": arch, "logical_cpus": logical or None}

    def required(p: DeviceProfile) -> list[tuple[str, str]]:
        return [CPUINFO_FLAGS[feature] for feature in p.hardware.cpu.isa]

    cpu_profiles = [p for p in profiles if p.kind == "cpu"]
    same_arch = [p for p in cpu_profiles if arch is not None and all(a == arch for a, _ in required(p))]
    if not same_arch:
        fallback = min(cpu_profiles, key=lambda p: (len(p.hardware.cpu.isa), p.name))
        reasons.append(f"CPU architecture {arch or 'unknown'} ({source}) has no profile; {fallback.name} is the "
                       f"closest, but this CPU is below its floor ({', '.join(fallback.hardware.cpu.isa)})")
        return fallback.name
    meets = [p for p in same_arch if all(flag in flags for _, flag in required(p))]
    if meets:
        chosen = max(meets, key=lambda p: (len(p.hardware.cpu.isa), p.name))  # the most specific that fits
        reasons.append(f"{arch} CPU with {', '.join(chosen.hardware.cpu.isa)} ({source}): {chosen.name}")
    else:
        chosen = max(same_arch, key=lambda p: (sum(f in flags for _, f in required(p)), -len(required(p))))
        missing = [feature for feature in chosen.hardware.cpu.isa if CPUINFO_FLAGS[feature][1] not in flags]
        reasons.append(f"{arch} CPU ({source}) lacks {', '.join(missing)}: below the floor of {chosen.name}, the "
                       "closest profile; expect slower kernels (on Arm, NEON without the dot-product instructions)")
    if mem_total is not None and mem_total < _UNDER * chosen.hardware.memory_bytes:
        reasons.append(f"MemTotal {_gib(mem_total)} is below the profile's {_gib(chosen.hardware.memory_bytes)}: "
                       "its memory budget overstates this machine")
    return chosen.name
