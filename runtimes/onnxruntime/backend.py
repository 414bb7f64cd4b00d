"""onnxruntime Backend: one InferenceSession, IO binding, KV buffers allocated once at max context.

No torch here (the generation loop and CLI run on numpy + onnxruntime only). Per step the Python work is
a handful of small binds; KV memory is never allocated or copied per token:

- `shared_buffer` (ort flavour): each cache tensor is one OrtValue [1, heads, max_context, dim] bound as
  both `past_*` input and `present_*` output; GroupQueryAttention appends in place.
- `append` (standard flavour): each cache tensor is one numpy buffer [1, max_context, heads, dim]; the
  `past_*` input is bound to its first `position` rows and the `new_*` output straight after them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgecpm.bundle import Manifest
from edgecpm.errors import BundleError, GenerationError

LOGITS = "logits"
DYNAMIC_BLOCK_BASE = 16  # onnxruntime's dynamic partitioning of parallel loops; see session_options


def physical_cores() -> int:
    try:
        import psutil

        cores = psutil.cpu_count(logical=False)
        if cores:
            return cores
    except ImportError:
        pass
    return os.cpu_count() or 1


def session_options(threads: int | None, *, prepack: bool = True, spin: bool = True) -> ort.SessionOptions:
    """ORT_ENABLE_ALL, sequential, `threads` intra-op threads (default: physical cores).

    Weight prepacking (`prepack`): with one thread the unpacked M=1 kernel streams an fp32 lm_head faster
    (SmolLM2, 16.6 ms -> 5.1 ms), but with two threads packed weights win overall and MatMulNBits needs
    them for its int8-activation path; see load_backend.

    Intra-op spinning (`spin`) saves a thread wake-up per op on an idle machine (SmolLM2 int4, 2 threads:
    ~+10% decode); on a 2-core machine shared with other busy processes, spinning workers fight for the
    cores and decode drops ~45%, so callers there pass spin=False.

    Parallel loops are split dynamically (`DYNAMIC_BLOCK_BASE`) instead of into one static chunk per
    thread: a decode step is hundreds of small ops, and with static chunks every op waits for its slowest
    thread (SmolLM2 int4, 2 threads: +6% to +17% decode in 5 of 5 alternated A/B rounds, mean +11%;
    fp32 and the larger, bandwidth-bound MiniCPM4-0.5B shape: unchanged within noise).
    """
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    options.add_session_config_entry("session.dynamic_block_base", str(DYNAMIC_BLOCK_BASE))
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or physical_cores()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return options


class _SharedBufferCache:
    """KV for GroupQueryAttention graphs: bound once, the graph writes new rows in place."""

    def __init__(self, layout: dict, max_context: int):
        dtype = np.dtype(layout["dtype"])
        self.tensors = layout["tensors"]
        self.values = [ort.OrtValue.ortvalue_from_shape_and_type([1, t["heads"], max_context, t["dim"]], dtype, "cpu", 0)
                       for t in self.tensors]
        # Decode inputs live in OrtValues updated in place: no allocation, no rebinding per token.
        self._ids = np.zeros((1, 1), np.int64)
        self._seqlens = np.zeros((1,), np.int32)
        self._total = np.zeros((), np.int32)
        self._decode_values = [ort.OrtValue.ortvalue_from_numpy(a) for a in (self._ids, self._seqlens, self._total)]
        self._decode_bound = False

    def bind(self, binding: ort.IOBinding) -> None:
        self.binding = binding
        for tensor, value in zip(self.tensors, self.values):
            binding.bind_ortvalue_input(tensor["input"], value)
            binding.bind_ortvalue_output(tensor["output"], value)

    def bind_step(self, token_ids: np.ndarray, position: int) -> None:
        total = position + token_ids.shape[1]
        if token_ids.shape[1] == 1:
            self._ids[0, 0], self._seqlens[0], self._total[()] = token_ids[0, 0], total - 1, total
            for array, value in zip((self._ids, self._seqlens, self._total), self._decode_values):
                value.update_inplace(array)
            if not self._decode_bound:
                for name, value in zip(("input_ids", "seqlens_k", "total_sequence_length"), self._decode_values):
                    self.binding.bind_ortvalue_input(name, value)
                self._decode_bound = True
            return
        self._decode_bound = False
        self.binding.bind_cpu_input("input_ids", token_ids)
        self.binding.bind_cpu_input("seqlens_k", np.array([total - 1], np.int32))
        self.binding.bind_cpu_input("total_sequence_length", np.array(total, np.int32))


class _AppendCache:
    """KV for standard-op graphs: past = buffer prefix, new rows written by the graph right after it."""

    def __init__(self, layout: dict, max_context: int):
        self.dtype = np.dtype(layout["dtype"])
        self.tensors = layout["tensors"]
        self.buffers = [np.zeros((1, max_context, t["heads"], t["dim"]), self.dtype) for t in self.tensors]
        self._ids = np.zeros((1, 1), np.int64)

    def bind(self, binding: ort.IOBinding) -> None:
        self.binding = binding

    def bind_step(self, token_ids: np.ndarray, position: int) -> None:
        n = token_ids.shape[1]
        if n == 1:
            self._ids[0, 0] = token_ids[0, 0]
            token_ids = self._ids
        self.binding.bind_cpu_input("input_ids", token_ids)
        for tensor, buffer in zip(self.tensors, self.buffers):
            heads, dim = tensor["heads"], tensor["dim"]
            row = heads * dim * self.dtype.itemsize
            base = buffer.ctypes.data
            self.binding.bind_input(tensor["input"], "cpu", 0, self.dtype, [1, position, heads, dim], base)
            self.binding.bind_output(tensor["output"], "cpu", 0, self.dtype, [1, n, heads, dim], base + position * row)


KV_CACHES = {"shared_buffer": _SharedBufferCache, "append": _AppendCache}


KERNELS = ("auto", "native", "onnxruntime")


class OnnxRuntimeBackend:
    """The `edgecpm.backend.Backend` protocol over one exported bundle.

    `kernels`: who runs the steps. "native" runs edgecpm's own kernels (edgecpm.runtimes.native) and fails where
    they do not implement the bundle; "onnxruntime" runs the graph; "auto" (default) uses the kernels where they
    implement the bundle on a CPU with their vectorised path (docs/BENCHMARKS.md) and the graph elsewhere
    (`native_unavailable` says why). Where the kernels also prefill (every linear quantized) no onnxruntime
    session is opened at all (`session` is None): the process holds the weights once, as the kernels'
    interleaved copy. Otherwise the graph prefills, over the same KV buffers.
    """

    def __init__(self, model_path: Path, manifest: Manifest, *, threads: int | None = None, prepack: bool = True,
                 spin: bool = True, kernels: str = "auto"):
        if kernels not in KERNELS:
            raise GenerationError(f"unknown kernels {kernels!r} (choose from {', '.join(KERNELS)})")
        self.max_context = int(manifest.max_context)
        self.vocab_size = int(manifest.architecture["vocab_size"])
        layout = manifest.kv_layout
        if layout.get("mode") not in KV_CACHES:
            raise BundleError(f"unknown KV layout mode {layout.get('mode')!r}", path=model_path, field="kv_layout.mode")
        self.cache = KV_CACHES[layout["mode"]](layout, self.max_context)
        self.native, self.native_unavailable = None, "not requested"
        if kernels != "onnxruntime":
            self._attach_native(model_path, manifest, threads, required=kernels == "native")
        self._logits = np.zeros((1, self.vocab_size), np.float32)
        self._position = 0
        self._shared_values: dict[str, ort.OrtValue] = {}
        self.session = None
        if self.native is None or not self.native.prefills:  # else the kernels run it all: no graph, weights held once
            self._open_session(model_path, threads, prepack, spin)

    def _open_session(self, model_path: Path, threads: int | None, prepack: bool, spin: bool) -> None:
        # Float weights the kernels read in place are onnxruntime's initializers too, unpacked: the process holds
        # them once (SmolLM2 fp32: 1113 -> ~600 MB resident) for a ~15% slower prefill (MLAS packs per call).
        shared = self.native.in_place_tensors() if self.native else {}
        options = session_options(threads, prepack=prepack and not shared, spin=spin)
        self._shared_values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in shared.items()}
        for name, value in self._shared_values.items():
            options.add_initializer(name, value)
        self.session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        self.binding = self.session.io_binding()
        self.cache.bind(self.binding)
        self._logits_value = ort.OrtValue.ortvalue_from_numpy(self._logits)
        self.binding.bind_ortvalue_output(LOGITS, self._logits_value)
        self._run_options = ort.RunOptions()

    def _attach_native(self, model_path: Path, manifest: Manifest, threads: int | None, *, required: bool) -> None:
        from edgecpm.runtimes.native import KernelsUnavailable, native_decoder

        try:  # native_decoder checks the KV layout is a shared buffer (OrtValues) before it asks for their pointers
            self.native = native_decoder(model_path.parent, manifest,
                                         lambda: [value.data_ptr() for value in self.cache.values],
                                         threads or physical_cores(), only_if_faster=not required)
            self.native_unavailable = None
        except KernelsUnavailable as error:
            if required:
                raise BundleError(f"native kernels unavailable: {error}", path=model_path) from None
            self.native_unavailable = str(error)

    @property
    def kernels(self) -> dict:
        """Who runs prefill and decode, and why not the native kernels where they do not."""
        return {"prefill": "onnxruntime" if self.session is not None else "native",
                "decode": "onnxruntime" if self.native is None else "native", "native_unavailable": self.native_unavailable}

    @property
    def position(self) -> int:
        return self._position

    def _check_room(self, n: int) -> None:
        if n == 0:
            raise GenerationError("prefill needs at least one token")
        if self._position + n > self.max_context:
            raise GenerationError(f"{self._position + n} tokens exceed the bundle's max context {self.max_context}")

    def _step(self, token_ids: np.ndarray) -> np.ndarray:
        n = token_ids.shape[1]
        self._check_room(n)
        self.cache.bind_step(token_ids, self._position)
        self.session.run_with_iobinding(self.binding, self._run_options)
        self._position += n
        return self._logits[0].copy()  # the buffer is overwritten by the next step

    def prefill(self, token_ids: np.ndarray) -> np.ndarray:
        ids = np.ascontiguousarray(np.asarray(token_ids, dtype=np.int64).reshape(1, -1))
        if self.session is not None:
            return self._step(ids)
        return self._native_step(lambda position, logits: self.native.prefill(ids, position, logits), ids.shape[1])

    def decode(self, token_id: int) -> np.ndarray:
        if self.native is None:
            return self._step(np.array([[int(token_id)]], np.int64))
        return self._native_step(lambda position, logits: self.native.decode(token_id, position, logits), 1)

    def _native_step(self, run, count: int) -> np.ndarray:
        self._check_room(count)
        run(self._position, self._logits)
        self._position += count
        return self._logits[0].copy()

    def reset(self) -> None:
        self._position = 0

    def truncate(self, position: int) -> None:
        if not 0 <= position:
            raise GenerationError(f"cannot truncate to position {position}")
        # Rows at or after `position` are simply overwritten by the next step; attention never reads them.
        self._position = min(self._position, int(position))
