"""TensorRT Backend: one engine, device-resident KV buffers allocated once, one CUDA stream (no torch, no pycuda).

The KV contract is the `standard` graph's (`append`, as `_AppendCache` in the onnxruntime backend): each cache tensor
is one device buffer [1, max_context, heads, dim] in the KV dtype; a step binds `past_*` to its first `position`
rows and the `new_*` output straight after them, so the engine appends in place and nothing is copied per token.
TensorRT wants every tensor address 256-byte aligned (IExecutionContext::setTensorAddress); where `position` rows
do not end on such a boundary (rows of heads * dim * itemsize bytes that are not a multiple of 256) the new rows
go to an aligned scratch buffer and one device-to-device copy on the same stream puts them in place.

Token ids and logits pass through small pinned host buffers; a step is: copy ids in, set shapes and the output
address, enqueue, copy logits out, synchronize. Prefill runs the "prefill" optimization profile (its own execution
context), single tokens the "decode" one; a prompt longer than the prefill profile runs in chunks.
"""

from __future__ import annotations

import ctypes
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgecpm.bundle import EngineRecord, Manifest
from edgecpm.errors import BundleError, GenerationError, UnsupportedError

if TYPE_CHECKING:
    from typing import Self

ALIGNMENT = 256  # bytes: TensorRT's requirement for every I/O tensor address
LOGITS = "logits"
INPUT_IDS = "input_ids"
POSITION_IDS = "position_ids"


class _Cuda:
    """The handful of cuda-python runtime calls the backend makes, each checked (cuda.bindings.runtime or cuda.cudart)."""

    def __init__(self):
        from edgecpm.exporters.tensorrt.pin import import_cudart

        from edgecpm.optional import require

        try:
            self.rt = import_cudart()
        except ImportError:
            require("cuda.bindings.runtime", "tensorrt", "the TensorRT backend (CUDA memory through cuda-python)")
            raise
        self.ok = self.rt.cudaError_t.cudaSuccess
        kinds = self.rt.cudaMemcpyKind
        self.h2d, self.d2h, self.d2d = kinds.cudaMemcpyHostToDevice, kinds.cudaMemcpyDeviceToHost, kinds.cudaMemcpyDeviceToDevice

    def check(self, result, what: str):
        err, *values = result if isinstance(result, tuple) else (result,)
        if err != self.ok:
            name = self.rt.cudaGetErrorName(err)[1]
            raise GenerationError(f"CUDA {what} failed: {name.decode() if isinstance(name, bytes) else name}")
        return values[0] if len(values) == 1 else values

    def malloc(self, nbytes: int) -> int:
        return int(self.check(self.rt.cudaMalloc(max(int(nbytes), 1)), f"cudaMalloc({nbytes})"))

    def malloc_host(self, nbytes: int) -> int:
        return int(self.check(self.rt.cudaMallocHost(max(int(nbytes), 1)), f"cudaMallocHost({nbytes})"))

    def copy(self, dst: int, src: int, nbytes: int, kind, stream) -> None:
        if nbytes:
            self.check(self.rt.cudaMemcpyAsync(dst, src, nbytes, kind, stream), "cudaMemcpyAsync")


class TensorRTBackend:
    """The `edgecpm.backend.Backend` protocol over one pinned TensorRT engine of a bundle."""

    def __init__(self, bundle_dir: str | Path, manifest: Manifest, record: EngineRecord, *, host=None,
                 verify: bool = False):
        from edgecpm.exporters.tensorrt.pin import check_pin, current_host

        from edgecpm.optional import require

        self.bundle = Path(bundle_dir)
        self.record = record
        self._attention = manifest.graph_attention  # the engine computes what its graph computes
        self._buffers: list[int] = []
        self._host_buffers: list[int] = []
        self._stream = None
        self.cuda = None
        trt = require("tensorrt", "tensorrt", "the TensorRT backend")
        check_pin(record, host or current_host(), bundle=self.bundle)
        layout = manifest.kv_layout
        if layout.get("mode") != "append":
            raise BundleError(f"KV layout {layout.get('mode')!r} is not the standard graph's 'append'", path=self.bundle,
                              field="kv_layout.mode")
        if list(record.shape_profiles)[:2] != ["prefill", "decode"]:
            raise BundleError(f"engine record lists profiles {list(record.shape_profiles)}, expected prefill, decode",
                              path=self.bundle, field="engines")
        self.max_context = int(record.max_context)
        self.vocab_size = int(manifest.architecture["vocab_size"])
        self.prefill_max = int(record.shape_profiles["prefill"][INPUT_IDS][2][1])
        self.dtype = np.dtype(layout["dtype"])
        self.tensors = list(layout["tensors"])
        self.position_inputs = list(layout.get("position_inputs", []))
        unknown = [name for name in self.position_inputs if name != POSITION_IDS]
        if unknown:
            raise UnsupportedError(f"position input {unknown[0]!r} is not one the TensorRT backend fills", path=self.bundle,
                                   field="kv_layout.position_inputs")
        self._position = 0

        self.engine = self._load_engine(trt, verify)
        self._check_io(trt)
        self.cuda = cuda = _Cuda()
        self._stream = cuda.check(cuda.rt.cudaStreamCreate(), "cudaStreamCreate")
        self._stream_handle = int(self._stream)
        self.contexts = {}
        # Each context allocates activation memory for its own profile only (the default, STATIC, takes the largest
        # profile's size in both).
        strategy = getattr(getattr(trt, "ExecutionContextAllocationStrategy", None), "ON_PROFILE_CHANGE", None)
        for index, name in enumerate(list(record.shape_profiles)[:2]):
            context = self._context(strategy)
            if context is None:
                raise GenerationError("TensorRT could not create an execution context (out of GPU memory?)")
            if not context.set_optimization_profile_async(index, self._stream_handle):
                raise GenerationError(f"TensorRT refused optimization profile {index} ({name})")
            self.contexts[name] = context

        self._rows = [t["heads"] * t["dim"] * self.dtype.itemsize for t in self.tensors]
        self.kv = [self._device(self.max_context * row) for row in self._rows]
        self._scratch = [self._device(self.prefill_max * row) if row % ALIGNMENT else None for row in self._rows]
        self._ids_device = self._device(self.prefill_max * 8)
        self._logits_device = self._device(self.vocab_size * 4)
        self._positions_device = self._device(self.prefill_max * 8) if self.position_inputs else None
        self._ids_host = self._pinned(ctypes.c_int64, self.prefill_max)
        self._logits_host = self._pinned(ctypes.c_float, self.vocab_size)
        self._positions_host = self._pinned(ctypes.c_int64, self.prefill_max) if self.position_inputs else None
        for context in self.contexts.values():
            self._bind(context, INPUT_IDS, self._ids_device)
            self._bind(context, LOGITS, self._logits_device)
            for tensor, base in zip(self.tensors, self.kv):
                self._bind(context, tensor["input"], base)
            for name in self.position_inputs:
                self._bind(context, name, self._positions_device)
        cuda.check(cuda.rt.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")

    # --- setup ---------------------------------------------------------------------------------------------
    def _load_engine(self, trt, verify: bool):
        from edgecpm.exporters.tensorrt.pin import rebuild_command
        from edgecpm.exporters.tensorrt.plugins import load_plugin_library

        path = self.bundle / self.record.file
        data = path.read_bytes()
        if verify and hashlib.sha256(data).hexdigest() != self.record.sha256:
            raise BundleError(f"engine file does not match its sha256 in the manifest; rebuild it: "
                              f"{rebuild_command(self.bundle, self.record.device)}", path=path)
        self._logger = trt.Logger(trt.Logger.WARNING)
        for plugin in self.record.plugins:  # e.g. the InfLLM v2 plugin: registered before the engine that uses it loads
            load_plugin_library(self.bundle / plugin)
        self._runtime = trt.Runtime(self._logger)
        engine = self._runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise BundleError(f"TensorRT {trt.__version__} could not load the engine; rebuild it: "
                              f"{rebuild_command(self.bundle, self.record.device)}", path=path)
        return engine

    def _check_io(self, trt) -> None:
        engine = self.engine
        names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        wanted = {INPUT_IDS, LOGITS, *self.position_inputs, *(t["input"] for t in self.tensors),
                  *(t["output"] for t in self.tensors)}
        missing = sorted(wanted - names)
        if missing:
            raise BundleError(f"engine has no tensor {missing[0]!r}; it was not built from this bundle's graph",
                              path=self.bundle / self.record.file)
        if engine.num_optimization_profiles < 2:
            raise BundleError("engine has fewer than the two optimization profiles (prefill, decode) it was built with",
                              path=self.bundle / self.record.file)
        kv_type = {np.dtype(np.float16): trt.float16, np.dtype(np.float32): trt.float32}.get(self.dtype)
        expected = {INPUT_IDS: trt.int64, LOGITS: trt.float32,
                    **{t["input"]: kv_type for t in self.tensors}, **{t["output"]: kv_type for t in self.tensors}}
        for name, dtype in expected.items():
            if dtype is not None and engine.get_tensor_dtype(name) != dtype:
                raise BundleError(f"engine tensor {name} is {engine.get_tensor_dtype(name)}, the bundle says {dtype}",
                                  path=self.bundle / self.record.file)

    def _context(self, strategy):
        if strategy is not None:
            try:
                return self.engine.create_execution_context(strategy)
            except TypeError:  # a TensorRT without allocation strategies
                pass
        return self.engine.create_execution_context()

    def _device(self, nbytes: int) -> int:
        pointer = self.cuda.malloc(nbytes)
        self._buffers.append(pointer)
        return pointer

    def _pinned(self, ctype, count: int) -> np.ndarray:
        pointer = self.cuda.malloc_host(count * ctypes.sizeof(ctype))
        self._host_buffers.append(pointer)
        return np.ctypeslib.as_array((ctype * count).from_address(pointer))

    @staticmethod
    def _shape(context, name: str, shape: tuple) -> None:
        if not context.set_input_shape(name, shape):
            raise GenerationError(f"TensorRT refused shape {list(shape)} for {name} (outside the engine's profiles)")

    @staticmethod
    def _bind(context, name: str, address: int) -> None:
        if not context.set_tensor_address(name, int(address)):
            raise GenerationError(f"TensorRT refused the address of {name} (it must be {ALIGNMENT}-byte aligned)")

    # --- the Backend protocol ----------------------------------------------------------------------------
    @property
    def position(self) -> int:
        return self._position

    @property
    def kernels(self) -> dict:
        return {"prefill": "tensorrt", "decode": "tensorrt", "native_unavailable": "the bundle runs on its TensorRT engine",
                "attention": self._attention}

    def prefill(self, token_ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise GenerationError("prefill needs at least one token")
        self._check_room(ids.size)
        for start in range(0, ids.size, self.prefill_max):
            logits = self._step(ids[start:start + self.prefill_max])
        return logits

    def decode(self, token_id: int) -> np.ndarray:
        self._check_room(1)
        return self._step(np.array([int(token_id)], np.int64))

    def reset(self) -> None:
        self._position = 0

    def truncate(self, position: int) -> None:
        if not 0 <= position:
            raise GenerationError(f"cannot truncate to position {position}")
        # Rows at or after `position` are overwritten by the next step; attention never reads past the bound prefix.
        self._position = min(self._position, int(position))

    def _check_room(self, n: int) -> None:
        if self._position + n > self.max_context:
            raise GenerationError(f"{self._position + n} tokens exceed the engine's max context {self.max_context}")

    def _step(self, ids: np.ndarray) -> np.ndarray:
        cuda, stream, n, past = self.cuda, self._stream, int(ids.size), self._position
        context = self.contexts["decode" if n == 1 else "prefill"]
        self._ids_host[:n] = ids
        cuda.copy(self._ids_device, self._ids_host.ctypes.data, n * 8, cuda.h2d, stream)
        self._shape(context, INPUT_IDS, (1, n))
        if self.position_inputs:
            self._positions_host[:n] = np.arange(past, past + n)
            cuda.copy(self._positions_device, self._positions_host.ctypes.data, n * 8, cuda.h2d, stream)
            for name in self.position_inputs:
                self._shape(context, name, (1, n))
        moves = []
        for tensor, base, row, scratch in zip(self.tensors, self.kv, self._rows, self._scratch):
            self._shape(context, tensor["input"], (1, past, tensor["heads"], tensor["dim"]))
            target = base + past * row
            if target % ALIGNMENT == 0:
                self._bind(context, tensor["output"], target)
            else:
                self._bind(context, tensor["output"], scratch)
                moves.append((target, scratch, n * row))
        if not context.execute_async_v3(self._stream_handle):
            raise GenerationError("TensorRT could not run the engine (see its messages above)")
        for target, scratch, nbytes in moves:
            cuda.copy(target, scratch, nbytes, cuda.d2d, stream)
        cuda.copy(self._logits_host.ctypes.data, self._logits_device, self.vocab_size * 4, cuda.d2h, stream)
        cuda.check(cuda.rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
        self._position = past + n
        return self._logits_host.copy()

    # --- teardown ----------------------------------------------------------------------------------------
    def close(self) -> None:
        cuda = self.cuda
        if cuda is None:
            return
        if self._stream is not None:
            cuda.rt.cudaStreamSynchronize(self._stream)
        self.contexts = {}
        self.engine = None
        for pointer in self._buffers:
            cuda.rt.cudaFree(pointer)
        for pointer in self._host_buffers:
            cuda.rt.cudaFreeHost(pointer)
        self._buffers, self._host_buffers = [], []
        if self._stream is not None:
            cuda.rt.cudaStreamDestroy(self._stream)
            self._stream = None
        self.cuda = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001, S110  (interpreter shutdown)
            pass


__all__ = ["TensorRTBackend"]
