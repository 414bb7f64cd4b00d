"""edgecpm: MiniCPM checkpoints to fast text generation on edge devices."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# Resolved on first access so `import edgecpm` (and `edgecpm --help`) stays instant.
_LAZY = {"load": "edgecpm.api", "Engine": "edgecpm.api", "GenerationSettings": "edgecpm.generate"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'edgecpm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
