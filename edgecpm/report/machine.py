"""Facts about the machine and the process that a profiling report records: CPU, memory, versions, resident memory."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

VERSIONED = ("edgecpm", "numpy", "onnxruntime", "tokenizers", "jinja2", "rich", "typer")
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "asimd", "asimddp", "sve")


def _cpuinfo(root: Path) -> tuple[str | None, list[str]]:
    model, flags = None, set()
    try:
        text = (root / "proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return None, []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model", "Hardware") and model is None:
            model = value.strip()
        elif key in ("flags", "Features"):
            flags |= set(value.split())
    return model, [flag for flag in CPU_FLAGS if flag in flags]


def _mem_total(root: Path) -> int | None:
    try:
        for line in (root / "proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def machine_facts(root: Path = Path("/")) -> dict[str, Any]:
    from edgecpm.runtimes.cpu import physical_cores

    model, flags = _cpuinfo(Path(root))
    return {"system": platform.system(), "release": platform.release(), "machine": platform.machine(),
            "cpu_model": model or platform.processor() or None, "cpu_flags": flags, "logical_cpus": os.cpu_count(),
            "physical_cores": physical_cores(), "memory_bytes": _mem_total(Path(root)),
            "python": sys.version.split()[0]}


def versions() -> dict[str, str | None]:
    found = {}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def process_memory() -> dict[str, int | None]:
    """This process's resident set now (VmRSS) and its peak (VmHWM), in bytes, from /proc/self/status (Linux)."""
    try:
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    except OSError:
        return {"rss_bytes": None, "peak_rss_bytes": None}

    def kib(key: str) -> int | None:
        return int(status[key].split()[0]) * 1024 if key in status else None

    return {"rss_bytes": kib("VmRSS"), "peak_rss_bytes": kib("VmHWM")}
