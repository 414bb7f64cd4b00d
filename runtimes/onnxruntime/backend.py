"""onnxruntime Backend: one InferenceSession, IO binding, over KV buffers allocated once at max context (runtimes/kv.py).

No torch here (the generation loop and CLI run on numpy + onnxruntime only). Per step the Python work is
a handful of small binds; KV memory is never allocated or copied per token:

- `shared_buffer` (ort flavour): each cache tensor is one buffer [1, heads, max_context, dim] bound (as an OrtValue
  over its memory) as both `past_*` input and `present_*` output; GroupQueryAttention appends in place.
- `append` (standard flavour): each cache tensor is one numpy buffer [1, max_context, heads, dim]; the
  `past_*` input is bound to its first `position` rows and the `new_*` output straight after them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgecpm.bundle import Manifest
from edgecpm.runtimes.cpu import physical_cores
from edgecpm.runtimes.kv import HostKV

LOGITS = "logits"
DYNAMIC_BLOCK_BASE = 16  # onnxruntime's dynamic partitioning of parallel loops; see session_options


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

    def __init__(self, kv: HostKV):
        self.tensors = kv.tensors
        self.values = [ort.OrtValue.ortvalue_from_numpy(array) for array in kv.arrays]  # on CPU: the arrays' own memory
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

    def __init__(self, kv: HostKV):
        self.dtype = kv.dtype
        self.tensors = kv.tensors
        self.buffers = kv.arrays
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


class OnnxRuntimeBackend:
    """The `edgecpm.backend.Backend` protocol over one exported bundle's graph on onnxruntime's CPU provider.

    `kv`: the sequence state to compute on (default: a new one); the selector passes one it shares with the
    native kernels' decode. `shared_initializers`: weights, by name, to take from these arrays instead of the
    data file (the kernels' memory map, so the process holds them once; prepacking is then off).
    """

    def __init__(self, model_path: Path, manifest: Manifest, *, threads: int | None = None, prepack: bool = True,
                 spin: bool = True, kv: HostKV | None = None, shared_initializers: dict[str, np.ndarray] | None = None):
        self.max_context = int(manifest.max_context)
        self.vocab_size = int(manifest.architecture["vocab_size"])
        self.kv = kv or HostKV(manifest, path=model_path)
        self.cache = KV_CACHES[self.kv.mode](self.kv)
        self.kernels = {"prefill": "onnxruntime", "decode": "onnxruntime", "native_unavailable": None, "attention": "dense"}
        self._logits = np.zeros((1, self.vocab_size), np.float32)
        # Float weights the kernels read in place are onnxruntime's initializers too, unpacked: the process holds
        # them once (SmolLM2 fp32: 1113 -> ~600 MB resident) for a ~15% slower prefill (MLAS packs per call).
        shared = shared_initializers or {}
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

    @property
    def position(self) -> int:
        return self.kv.position

    def _step(self, token_ids: np.ndarray) -> np.ndarray:
        n = token_ids.shape[1]
        self.kv.check_room(n)
        self.cache.bind_step(token_ids, self.kv.position)
        self.session.run_with_iobinding(self.binding, self._run_options)
        self.kv.position += n
        return self._logits[0].copy()  # the buffer is overwritten by the next step

    def prefill(self, token_ids: np.ndarray) -> np.ndarray:
        return self._step(np.ascontiguousarray(np.asarray(token_ids, dtype=np.int64).reshape(1, -1)))

    def decode(self, token_id: int) -> np.ndarray:
        return self._step(np.array([[int(token_id)]], np.int64))

    def reset(self) -> None:
        self.kv.position = 0

    def truncate(self, position: int) -> None:
        self.kv.truncate(position)
