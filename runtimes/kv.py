"""A sequence's KV state in host memory, shared by whichever backends compute on it.

One buffer per cache tensor, allocated once at max context in the layout the bundle's manifest records
(`kv_layout`: [1, heads, max_context, dim] for the `shared_buffer` mode, [1, max_context, heads, dim] for
`append`), and `position`: how many positions hold tokens. Backends are compute over this state, so the
selector can let one backend prefill and another decode the same sequence without either hosting the other.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgecpm.bundle import Manifest
from edgecpm.errors import BundleError, GenerationError

KV_MODES = ("shared_buffer", "append")
KV_CACHES = ("float32", "float16")  # what a cache may store (runtimes/select.py: half floats are the native kernels')


class HostKV:
    def __init__(self, manifest: Manifest, *, path: str | Path | None = None, dtype: type | None = None):
        """`dtype`: what the buffers hold, where a backend that owns them alone chooses (default: the layout's)."""
        layout = manifest.kv_layout
        if layout.get("mode") not in KV_MODES:
            raise BundleError(f"unknown KV layout mode {layout.get('mode')!r}", path=path, field="kv_layout.mode")
        self.mode = layout["mode"]
        self.dtype = np.dtype(dtype or layout["dtype"])
        self.tensors = layout["tensors"]
        self.max_context = int(manifest.max_context)
        self.arrays = [np.zeros(tensor["shape"], self.dtype) for tensor in self.tensors]
        self.position = 0

    def check_room(self, count: int) -> None:
        if count == 0:
            raise GenerationError("prefill needs at least one token")
        if self.position + count > self.max_context:
            raise GenerationError(f"{self.position + count} tokens exceed the bundle's max context {self.max_context}")

    def truncate(self, position: int) -> None:
        if not 0 <= position:
            raise GenerationError(f"cannot truncate to position {position}")
        # Rows at or after `position` are simply overwritten by the next step; attention never reads them.
        self.position = min(self.position, int(position))
