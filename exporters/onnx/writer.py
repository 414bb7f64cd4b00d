"""GraphWriter: the one place that makes ONNX protos. Weights stream straight into the external-data file.

Every weight is appended to `model.onnx.data` the moment it is added and only a reference (offset,
length) stays in memory, so an export holds at most one fused weight at a time (an 8B model exports
inside 24 GB); small constants (shapes, axes, scalars) stay inside model.onnx. `tensor_index` records where
each weight lies in the data file, so a runtime can map weights without an ONNX parser (the native
decode kernels read them in place). Builders call `op()` / `weight()` / `const()` and never touch protos.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# onnxruntime memory-maps external data; page-aligned large tensors can be mapped without a copy.
PAGE_ALIGN = 4096
SMALL_ALIGN = 64
INLINE_BYTES = 1024  # constants up to this size are kept inside model.onnx
ORT_DOMAIN = "com.microsoft"
OPSET = 21
IR_VERSION = 10  # what onnxruntime >= 1.20 loads

ONNX_DTYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
               np.dtype(np.int64): TensorProto.INT64, np.dtype(np.int32): TensorProto.INT32,
               np.dtype(np.bool_): TensorProto.BOOL, np.dtype(np.uint8): TensorProto.UINT8,
               np.dtype(np.int8): TensorProto.INT8}


class GraphWriter:
    def __init__(self, data_path: Path):
        self.data_path = data_path
        self.data_name = data_path.name
        self._data: BinaryIO = open(data_path, "wb")
        self._offset = 0
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._names = itertools.count()
        self._consts: dict[tuple, str] = {}
        self.tensor_index: dict[str, dict] = {}
        self.functions: dict[tuple[str, str], onnx.FunctionProto] = {}  # model-local functions (custom-domain ops)

    # ---- names and values -------------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        return f"{hint}_{next(self._names)}"

    def weight(self, name: str, array: np.ndarray) -> str:
        """Adds an initializer, written to the external-data file right away."""
        array = np.ascontiguousarray(array)
        return self._external(name, ONNX_DTYPES[array.dtype], array.shape, array, array.dtype.name)

    def packed_weight(self, name: str, data_type: int, dims: tuple, raw: np.ndarray) -> str:
        """An initializer whose element type numpy lacks (ONNX INT4): `raw` holds its packed bytes."""
        raw = np.ascontiguousarray(raw, dtype=np.uint8)
        return self._external(name, data_type, dims, raw, TensorProto.DataType.Name(data_type).lower())

    def _external(self, name: str, data_type: int, dims: tuple, array: np.ndarray, dtype_name: str) -> str:
        align = PAGE_ALIGN if array.nbytes >= 64 * 1024 else SMALL_ALIGN
        pad = (-self._offset) % align
        if pad:
            self._data.write(b"\0" * pad)
            self._offset += pad
        self._data.write(array.data)  # no bytes copy of a large tensor
        tensor = TensorProto(name=name, data_type=data_type, dims=dims)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.data_name), ("offset", str(self._offset)), ("length", str(array.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.tensor_index[name] = {"offset": self._offset, "length": array.nbytes, "dtype": dtype_name,
                                   "shape": [int(d) for d in dims]}
        self._offset += array.nbytes
        self.initializers.append(tensor)
        return name

    def describe(self, name: str, **attributes: Any) -> None:
        """Adds how to read a weight (e.g. its quantization) to its tensor_index entry."""
        self.tensor_index[name].update(attributes)

    def const(self, values: Any, dtype: Any = np.int64) -> str:
        """A small constant (shape, axis list, scalar), deduplicated."""
        array = np.asarray(values, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            name = self.fresh("const")
            if array.nbytes <= INLINE_BYTES:
                self.initializers.append(numpy_helper.from_array(array, name))
            else:
                self.weight(name, array)
            self._consts[key] = name
        return self._consts[key]

    # ---- nodes --------------------------------------------------------------------------------------
    def op(self, op_type: str, inputs: list[str], n_out: int = 1, *, domain: str = "", outputs: list[str] | None = None,
           **attrs: Any) -> Any:
        """Appends a node; returns its output name (or the list of names when n_out > 1)."""
        if outputs is None:
            outputs = [self.fresh(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=self.fresh(op_type), domain=domain, **attrs))
        return outputs[0] if len(outputs) == 1 else outputs

    def function(self, proto: onnx.FunctionProto) -> None:
        """Adds a model-local function (the body of a custom-domain op) once; one body per op in a model."""
        known = self.functions.setdefault((proto.domain, proto.name), proto)
        if known is not proto and known.SerializeToString() != proto.SerializeToString():
            raise ValueError(f"{proto.domain}.{proto.name} is already defined with another body in this graph")

    def add_input(self, name: str, elem_type: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def add_output(self, name: str, elem_type: int, shape: list) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))

    # ---- finish -------------------------------------------------------------------------------------
    def save(self, model_path: Path, *, uses_contrib_ops: bool, producer: str) -> None:
        self._data.close()
        graph = helper.make_graph(self.nodes, "edgecpm", self.inputs, self.outputs, self.initializers)
        opsets = [helper.make_opsetid("", OPSET)]
        if uses_contrib_ops:
            opsets.append(helper.make_opsetid(ORT_DOMAIN, 1))
        opsets += [helper.make_opsetid(domain, 1) for domain in sorted({domain for domain, _ in self.functions})]
        model = helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION, producer_name=producer,
                                  functions=list(self.functions.values()))
        # The proto holds only references to the data file, so it stays small even for 8B models.
        model_path.write_bytes(model.SerializeToString())

    def close(self) -> None:
        if not self._data.closed:
            self._data.close()
