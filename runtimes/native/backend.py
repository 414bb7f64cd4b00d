"""The native Backend: edgecpm's own CPU kernels (runtimes/native/kernels.c) over one sequence's KV state.

Where the kernels implement the bundle's prompt passes (every linear quantized) they run prefill too and no
onnxruntime session is ever opened, so the process holds the weights once. Elsewhere (fp32 bundles) a
prompt still runs here, one decode step per token, bit for bit what decoding it gives; the selector
(runtimes/select.py) prefers onnxruntime's GEMMs for such prompts and lets this backend decode the same KV.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgecpm.arch.base import SparseAttentionConfig
from edgecpm.bundle import Manifest
from edgecpm.runtimes.cpu import physical_cores
from edgecpm.runtimes.kv import HostKV
from edgecpm.runtimes.native.decoder import EXACT_DEFAULT, native_decoder


class NativeBackend:
    """Raises KernelsUnavailable (with the reason) where the kernels do not implement the bundle;
    `only_if_faster` also refuses bundles they implement but run slower than onnxruntime; `exact`: the linear roles
    that take exact (float) activations instead of int8 ones (decoder.LINEAR_ROLES); `kv_cache`: what its KV cache
    stores (runtimes.kv.KV_CACHES)."""

    def __init__(self, bundle_dir: str | Path, manifest: Manifest, *, threads: int | None = None,
                 only_if_faster: bool = False, sparse: SparseAttentionConfig | None = None,
                 exact: frozenset[str] = EXACT_DEFAULT, kv_cache: str = "float32"):
        self.max_context = int(manifest.max_context)
        self.vocab_size = int(manifest.architecture["vocab_size"])
        self._kv: HostKV | None = None
        self._manifest, self._path = manifest, Path(bundle_dir)
        # native_decoder checks the bundle (the KV layout a shared buffer among them) before it asks for the buffers
        self.decoder = native_decoder(Path(bundle_dir), manifest, self._kv_pointers, threads or physical_cores(),
                                      only_if_faster=only_if_faster, sparse=sparse, exact=exact,
                                      kv_cache=kv_cache)
        self.prefills = self.decoder.prefills
        self.kernels = {"prefill": "native", "decode": "native", "native_unavailable": None,
                        "attention": "dense" if sparse is None else "sparse", "isa": self.decoder.isa,
                        "activations": self.decoder.activations, "kv_cache": self._kv.dtype.name}
        self._logits = np.zeros((1, self.vocab_size), np.float32)

    def _kv_pointers(self, dtype: type) -> list[int]:
        if self._kv is None:
            self._kv = HostKV(self._manifest, path=self._path, dtype=dtype)
        return [array.ctypes.data for array in self._kv.arrays]

    @property
    def kv(self) -> HostKV:
        return self._kv

    def in_place_tensors(self) -> dict[str, np.ndarray]:
        return self.decoder.in_place_tensors()

    @property
    def position(self) -> int:
        return self._kv.position

    def prefill(self, token_ids: np.ndarray) -> np.ndarray:
        ids = np.ascontiguousarray(np.asarray(token_ids, dtype=np.int64).reshape(-1))
        self._kv.check_room(len(ids))
        run = self.decoder.prefill if self.prefills else self.decoder.decode_prompt
        run(ids, self._kv.position, self._logits)
        self._kv.position += len(ids)
        return self._logits[0].copy()

    def decode(self, token_id: int) -> np.ndarray:
        self._kv.check_room(1)
        self.decoder.decode(token_id, self._kv.position, self._logits)
        self._kv.position += 1
        return self._logits[0].copy()

    def reset(self) -> None:
        self.truncate(0)

    def truncate(self, position: int) -> None:
        self._kv.truncate(position)
        self.decoder.forget(self._kv.position)
