"""Which ONNX graphs TensorRT's ONNX parser takes: the operator table (data, with its source) and a graph check.

The table (`onnx_ops_trt10.toml`) holds what onnx-tensorrt's support matrix states per operator: supported or not,
element types, inputs that must be constants, required attribute values. `check_model` reads a graph's proto (never
its weights, except the small scale tensors of DequantizeLinear) and returns every place where it leaves the table
or TensorRT's documented DequantizeLinear rules; `int4_weight_only_findings` checks the one pattern TensorRT's
weight-only INT4 GEMM takes (see its docstring). Both are pure reads: `engine build` prints the findings as warnings
before parsing, and the tests hold the exporter's standard graphs to them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from edgecpm.errors import UnsupportedError

TABLES = {10: "onnx_ops_trt10.toml"}  # TensorRT major version -> table file (package data)

# ONNX element types by the names the support matrix uses.
ONNX_TYPE_NAMES = {1: "FP32", 2: "UINT8", 3: "INT8", 5: "INT16", 6: "INT32", 7: "INT64", 9: "BOOL", 10: "FP16",
                   11: "DOUBLE", 16: "BF16", 17: "FP8", 18: "FP8", 19: "FP8", 20: "FP8", 21: "UINT4", 22: "INT4",
                   23: "FP4"}


@dataclass(frozen=True)
class OperatorSupport:
    name: str
    supported: bool
    types: tuple[str, ...] = ()
    constant_inputs: tuple[int, ...] = ()
    attributes: dict[str, int] = field(default_factory=dict)
    constant_max: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class SupportTable:
    file: str
    versions: str
    major: int
    source: dict[str, str]
    opset_min: int
    opset_parser_max: int
    quantization: dict[str, Any]
    operators: dict[str, OperatorSupport]

    def supports(self, op_type: str) -> bool:
        entry = self.operators.get(op_type)
        return entry is not None and entry.supported


@dataclass(frozen=True)
class Finding:
    """One place where a graph leaves what the table allows."""

    node: str
    op: str
    rule: str  # "operator", "opset", "type", "constant", "attribute", "quantization", "int4-woq"
    message: str

    def __str__(self) -> str:
        return f"{self.node} ({self.op}): {self.message}"


def _toml_loads(text: str) -> dict:
    from edgecpm.resources import tomllib

    return tomllib.loads(text)


def load_table(major: int = 10) -> SupportTable:
    """The operator table for a TensorRT major version (UnsupportedError where edgecpm has none)."""
    if major not in TABLES:
        known = ", ".join(f"{m}.x" for m in TABLES)
        raise UnsupportedError(f"no ONNX operator table for TensorRT {major}.x (edgecpm has {known})")
    name = TABLES[major]
    data = _toml_loads(resources.files("edgecpm.exporters.tensorrt").joinpath(name).read_text(encoding="utf-8"))
    operators = {}
    for op, entry in data["operators"].items():
        operators[op] = OperatorSupport(
            name=op, supported=bool(entry["supported"]), types=tuple(entry.get("types", ())),
            constant_inputs=tuple(entry.get("constant_inputs", ())), attributes=dict(entry.get("attributes", {})),
            constant_max={int(k): int(v) for k, v in entry.get("constant_max", {}).items()})
    trt = data["tensorrt"]
    return SupportTable(file=name, versions=trt["versions"], major=int(trt["major"]), source=dict(data["source"]),
                        opset_min=int(trt["opset_min"]), opset_parser_max=int(trt["opset_parser_max"]),
                        quantization=dict(data["quantization"]), operators=operators)


def table_for_version(version: str) -> SupportTable | None:
    """The table for an installed TensorRT version string ("10.3.0.30"), or None where edgecpm has none."""
    try:
        major = int(str(version).split(".")[0])
    except ValueError:
        return None
    return load_table(major) if major in TABLES else None


# --- reading a graph ---------------------------------------------------------------------------------------


class _Graph:
    """A model proto (weights left on disk) with what the checks ask of it."""

    def __init__(self, model_path: Path):
        import onnx

        self.path = Path(model_path)
        self.model = onnx.load(str(self.path), load_external_data=False)
        graph = self.model.graph
        self.initializers = {t.name: t for t in graph.initializer}
        self.constants = {out: node for node in graph.node if node.op_type == "Constant" for out in node.output}
        self.consumers: dict[str, list] = {}
        for node in graph.node:
            for index, name in enumerate(node.input):
                self.consumers.setdefault(name, []).append((node, index))
        self.types = self._element_types()

    def _element_types(self) -> dict[str, int]:
        import onnx

        types: dict[str, int] = {t.name: t.data_type for t in self.model.graph.initializer}
        try:
            inferred = onnx.shape_inference.infer_shapes(self.model, strict_mode=False, data_prop=False)
        except Exception:  # noqa: BLE001  (type inference is best effort; unknown types are not judged)
            inferred = self.model
        graph = inferred.graph
        for info in (*graph.input, *graph.output, *graph.value_info):
            if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type:
                types.setdefault(info.name, info.type.tensor_type.elem_type)
        for name, node in self.constants.items():
            for attribute in node.attribute:
                if attribute.name == "value":
                    types.setdefault(name, attribute.t.data_type)
        return types

    def is_constant(self, name: str) -> bool:
        return name in self.initializers or name in self.constants

    def array(self, name: str):
        """The value of a (small) initializer or Constant, read from the external data file when it is there."""
        from onnx import numpy_helper

        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name], base_dir=str(self.path.parent))
        for attribute in self.constants[name].attribute:
            if attribute.name == "value":
                return numpy_helper.to_array(attribute.t)
        raise KeyError(name)

    def type_name(self, name: str) -> str | None:
        code = self.types.get(name)
        return None if code is None else ONNX_TYPE_NAMES.get(code, f"onnx type {code}")

    def dims(self, name: str) -> list[int] | None:
        tensor = self.initializers.get(name)
        return None if tensor is None else [int(d) for d in tensor.dims]


class _FunctionBody:
    """A model-local function's body as the checks see it: its own Constant nodes (a body sees no initializers), its
    element types unknown (not judged). TensorRT's parser imports such a function in place of a node of its name."""

    def __init__(self, function):
        self.nodes = list(function.node)
        self.constants = {out: node for node in self.nodes if node.op_type == "Constant" for out in node.output}

    def is_constant(self, name: str) -> bool:
        return name in self.constants

    def array(self, name: str):
        from onnx import numpy_helper

        return numpy_helper.to_array(next(a.t for a in self.constants[name].attribute if a.name == "value"))

    def type_name(self, name: str) -> str | None:
        return None

    def dims(self, name: str) -> list[int] | None:
        return None


def _attribute(node, name: str, default: Any = None) -> Any:
    from onnx import helper

    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _label(node) -> str:
    return node.name or (node.output[0] if node.output else node.op_type)


def graph_operators(model_path: str | Path) -> Counter:
    """op_type (with its domain where not the default one) -> node count."""
    graph = _Graph(Path(model_path))
    return Counter((n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}") for n in graph.model.graph.node)


def check_model(model_path: str | Path, table: SupportTable) -> list[Finding]:
    """Every place where the graph leaves the operator table or TensorRT's DequantizeLinear rules."""
    graph = _Graph(Path(model_path))
    findings: list[Finding] = []
    for opset in graph.model.opset_import:
        if opset.domain in ("", "ai.onnx") and not table.opset_min <= opset.version <= table.opset_parser_max:
            findings.append(Finding("model", "opset", "opset", f"opset {opset.version} is outside {table.opset_min}.."
                                    f"{table.opset_parser_max}, what TensorRT {table.versions}'s parser knows"))
    # The parser imports a node whose op_type names a model-local function as that function's body (looked up by name
    # only: onnx-tensorrt ModelImporter.cpp), before it looks for a plugin; each body is checked once.
    functions = {function.name: function for function in graph.model.functions}
    findings.extend(_nodes_findings(graph, graph.model.graph.node, functions, set(), table))
    return findings


def _nodes_findings(scope, nodes, functions: dict, checked: set[str], table: SupportTable, within: str = "") -> list[Finding]:
    findings: list[Finding] = []
    for node in nodes:
        label = within + _label(node)
        if node.op_type in functions and node.domain not in ("", "ai.onnx"):
            if node.op_type not in checked:
                checked.add(node.op_type)
                body = functions[node.op_type]
                findings.extend(_nodes_findings(_FunctionBody(body), body.node, functions, checked, table,
                                                f"{body.domain}.{body.name}/"))
            continue
        if node.domain not in ("", "ai.onnx"):
            findings.append(Finding(label, node.op_type, "operator", f"custom-domain operator {node.domain}.{node.op_type}"))
            continue
        entry = table.operators.get(node.op_type)
        if entry is None or not entry.supported:
            findings.append(Finding(label, node.op_type, "operator",
                                    f"not supported by TensorRT {table.versions}'s ONNX parser"))
            continue
        findings.extend(_node_findings(scope, node, entry, label))
        if node.op_type == "DequantizeLinear":
            findings.extend(_dequantize_findings(scope, node, table.quantization, label))
    return findings


def _node_findings(graph: _Graph, node, entry: OperatorSupport, label: str) -> list[Finding]:
    findings = []
    first = node.input[0] if node.input else ""
    kind = graph.type_name(first) if first else None
    if kind is not None and entry.types and kind not in entry.types:
        findings.append(Finding(label, node.op_type, "type", f"input type {kind} is not one of {', '.join(entry.types)}"))
    for index in entry.constant_inputs:
        if index < len(node.input) and node.input[index] and not graph.is_constant(node.input[index]):
            findings.append(Finding(label, node.op_type, "constant", f"input {index} ({node.input[index]}) must be a "
                                    "constant (initializer or Constant)"))
    for name, wanted in entry.attributes.items():
        value = _attribute(node, name, 1 if name == "sorted" else None)
        if value != wanted:
            findings.append(Finding(label, node.op_type, "attribute", f"attribute {name} must be {wanted}, is {value}"))
    for index, limit in entry.constant_max.items():
        if index < len(node.input) and graph.is_constant(node.input[index]):
            value = int(graph.array(node.input[index]).max())
            if value > limit:
                findings.append(Finding(label, node.op_type, "constant", f"input {index} is {value}, more than {limit}"))
    return findings


def _dequantize_findings(graph: _Graph, node, rules: dict[str, Any], label: str) -> list[Finding]:
    findings = []
    say = lambda message: findings.append(Finding(label, node.op_type, "quantization", message))
    data, scale = node.input[0], node.input[1] if len(node.input) > 1 else ""
    kind = graph.type_name(data)
    if len(node.input) > 2 and node.input[2]:
        if not graph.is_constant(node.input[2]):
            say("zero point is not a constant")
        elif graph.array(node.input[2]).astype("int64").any():
            say("zero point is not all zeros (TensorRT quantizes symmetrically only)")
    if not scale or not graph.is_constant(scale):
        say("scale is not a build-time constant")
        return findings
    values = graph.array(scale)
    if rules.get("scale_positive") and not (values > 0).all():
        say(f"{int((values <= 0).sum())} scale coefficient(s) are not strictly positive")
    data_dims = graph.dims(data)
    if values.ndim >= 2:  # a scale of the input's rank: block quantization
        if kind not in rules.get("block_types", ()):
            say(f"block-quantized {kind} weights: TensorRT {', '.join(rules['block_types'])} only (blocks of other "
                "types need per-channel scales)")
        if values.ndim not in rules.get("block_ranks", (2,)):
            say(f"block quantization of a rank-{values.ndim} tensor (TensorRT: rank 2)")
        axis = int(_attribute(node, "axis", 1))
        rank = values.ndim
        if axis % rank not in (rank - 1, rank - 2):
            say(f"blocked axis {axis} is not one of the last two")
    elif values.ndim == 1 and values.size > 1 and kind not in rules.get("per_channel_types", ()):
        say(f"per-channel {kind} weights are not supported")
    if kind == "INT4" and rules.get("int4_even_last_dim") and data_dims and data_dims[-1] % 2:
        say(f"INT4 tensor with an odd last dimension ({data_dims[-1]})")
    return findings


def int4_weight_only_findings(model_path: str | Path) -> list[Finding]:
    """Where an INT4 DequantizeLinear leaves the pattern TensorRT's weight-only INT4 GEMM takes.

    The pattern is TensorRT's IDequantizeLayer rules plus the layout NVIDIA's Model Optimizer (the tool TensorRT's
    documentation points to for quantized ONNX models) writes for INT4 weight-only MatMuls: the weight is MatMul's
    right-hand operand [K, N], blocked along axis 0, the input-channel dimension K.
    https://docs.nvidia.com/deeplearning/tensorrt/api/c_api/classnvinfer1_1_1_i_dequantize_layer.html
    https://github.com/NVIDIA/TensorRT-Model-Optimizer/blob/main/modelopt/onnx/quantization/int4.py (quantize_rtn)

    - the INT4 codes are an initializer W^T of shape [K, N] (K = input features), fed to MatMul as its input B;
    - DequantizeLinear blocks along K: axis 0, a `block_size` attribute, scales [K / block_size, N] (rank 2),
      every scale strictly positive;
    - symmetric: no zero point (or all zeros);
    - N even (TensorRT packs INT4 in pairs along the last dimension).
    """
    graph = _Graph(Path(model_path))
    findings = []
    for node in graph.model.graph.node:
        if node.op_type != "DequantizeLinear" or graph.type_name(node.input[0]) != "INT4":
            continue
        label = _label(node)
        say = lambda message, label=label: findings.append(Finding(label, "DequantizeLinear", "int4-woq", message))
        dims = graph.dims(node.input[0])
        if dims is None:
            say("INT4 codes are not an initializer")
            continue
        if len(dims) != 2:
            say(f"INT4 codes of rank {len(dims)} (the GEMM takes [K, N])")
            continue
        k, n = dims
        axis, block = int(_attribute(node, "axis", 1)), _attribute(node, "block_size")
        if axis % 2 != 0:
            say(f"blocked along axis {axis}, not K (axis 0 of [K, N])")
        if not block:
            say("no block_size attribute")
        if not graph.is_constant(node.input[1]):
            say("scale is not a constant")
            continue
        scales = graph.array(node.input[1])
        if block and list(scales.shape) != [-(-k // int(block)), n]:
            say(f"scales {list(scales.shape)}, expected [{-(-k // int(block))}, {n}] for [K, N] = [{k}, {n}], block {block}")
        if not (scales > 0).all():
            say("scales are not all strictly positive")
        if len(node.input) > 2 and node.input[2] and graph.array(node.input[2]).astype("int64").any():
            say("zero points are not all zero (asymmetric)")
        if n % 2:
            say(f"N = {n} is odd")
        uses = graph.consumers.get(node.output[0], [])
        matmuls = [(consumer, index) for consumer, index in uses if consumer.op_type in ("MatMul", "Gemm")]
        if any(index != 1 for _, index in matmuls):
            say("feeds a MatMul as its input A (the GEMM takes the weights as B)")
        if not matmuls and not any(consumer.op_type == "Gather" for consumer, _ in uses):
            say("feeds neither a MatMul nor an embedding Gather")
    return findings


__all__ = ["Finding", "OperatorSupport", "SupportTable", "check_model", "graph_operators", "int4_weight_only_findings",
           "load_table", "table_for_version"]
