"""CPU facts the runtimes size themselves by."""

from __future__ import annotations

import os


def physical_cores() -> int:
    try:
        import psutil

        cores = psutil.cpu_count(logical=False)
        if cores:
            return cores
    except ImportError:
        pass
    return os.cpu_count() or 1
