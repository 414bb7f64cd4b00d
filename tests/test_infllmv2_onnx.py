"""InfLLM v2 in ONNX graphs: the `ai.edgecpm.InfLLMv2Attention` op's lowering to standard ops against the reference.

Single-op level: a one-node graph (the op and its lowering function) on onnxruntime CPU against
edgecpm.sparse.op.evaluate (= edgecpm.sparse.sparse_attention) over configs and shapes chosen to hit the edges:
n < kernel_size, a query at a block's first/last token, forced blocks outnumbering the budget, kernel_size ==
kernel_stride, use_nope, GQA ratios 1, 2, 4, a call crossing dense_len. Model level: tiny fp32 bundles of both
flavours exported with sparse attention against the PyTorch reference (which calls the numpy reference), a prefill
and decode steps that cross dense_len.

Tolerances (fp32): OP_ATOL 1e-5 on attention outputs of O(1) (observed ~1e-6), FP32_ATOL 1e-5 on logits (observed
~4e-7: the graph does the reference's float math in another order). Sparse attention moves the logits by ~0.1 from
dense here, four orders of magnitude more, so a selection that differs from the reference's cannot hide in them.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from edgecpm.arch.base import SparseAttentionConfig
from edgecpm.bundle import MANIFEST_NAME, read_manifest
from edgecpm.errors import BundleError, UnsupportedError
from edgecpm.export import export_checkpoint
from edgecpm.exporters.onnx.infllmv2 import lowering_function
from edgecpm.exporters.tensorrt.onnx_support import check_model, graph_operators, load_table
from edgecpm.runtimes import load_backend
from edgecpm.sparse import dense_attention
from edgecpm.sparse.choice import AttentionChoice
from edgecpm.sparse.op import DOMAIN, OP_TYPE, InfLLMv2Attributes, evaluate
from test_infllmv2_reference import random_config
from test_native_decode import needs_kernels

torch = pytest.importorskip("torch")

OP_ATOL = 1e-5
FP32_ATOL = 1e-5
MAX_CONTEXT = 256
# 16-token blocks, kernels of 8 at stride 4 (Kc2: 32 at 16), 1 init + 2 local + 3 chosen blocks (as test_infllmv2_native)
SMALL = SparseAttentionConfig(kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1, window_size=32, topk=3,
                              dense_len=-1)
OP_CONFIGS = {
    "always": SMALL,
    "nope": replace(SMALL, use_nope=True, init_blocks=2),
    "crossing": replace(SMALL, dense_len=100),
    "wide-kernels": replace(SMALL, kernel_size=16, kernel_stride=16, block_size=32, window_size=32, topk=2),
    "forced-over-budget": replace(SMALL, init_blocks=3, window_size=16, topk=0),  # budget 1 < 3 init + 2 local
}
# (total length T, new tokens S): n < kernel_size, one block exactly, queries at a block's last/first token (the
# window edge), long prefills and a prefill chunk after a past
SHAPES = [(5, 5), (7, 1), (16, 16), (47, 1), (48, 1), (49, 1), (80, 80), (150, 150), (200, 60), (201, 1)]
GQA = [(2, 2), (4, 2), (8, 2)]  # (num_heads, kv_heads): ratios 1, 2, 4
HEAD_DIM = 16


def one_op_session(attributes: InfLLMv2Attributes) -> ort.InferenceSession:
    """A graph of one InfLLMv2Attention node with its lowering function (dynamic shapes)."""
    names = list(attributes.input_names)
    node = helper.make_node(OP_TYPE, names, ["output"], domain=DOMAIN, **attributes.onnx())
    dims = lambda name: [1, f"{name}_heads", f"{name}_length", HEAD_DIM]  # noqa: E731
    graph = helper.make_graph([node], "one_op", [helper.make_tensor_value_info(n, TensorProto.FLOAT, dims(n)) for n in names],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, dims("output"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, 1)],
                              ir_version=10, functions=[lowering_function(attributes, np.dtype(np.float32))])
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def op_inputs(attributes: InfLLMv2Attributes, heads: int, kv_heads: int, total: int, new: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {"query": rng.standard_normal((1, heads, new, HEAD_DIM)), "key": rng.standard_normal((1, kv_heads, total, HEAD_DIM)),
              "value": rng.standard_normal((1, kv_heads, total, HEAD_DIM))}
    if attributes.use_nope:
        arrays["query_nope"] = rng.standard_normal((1, heads, new, HEAD_DIM))
        arrays["key_nope"] = rng.standard_normal((1, kv_heads, total, HEAD_DIM))
    return {name: array.astype(np.float32) for name, array in arrays.items()}


@pytest.mark.parametrize("heads,kv_heads", GQA)
@pytest.mark.parametrize("name", list(OP_CONFIGS))
def test_the_lowered_op_computes_the_reference(name, heads, kv_heads):
    attributes = InfLLMv2Attributes.of(OP_CONFIGS[name], HEAD_DIM)
    session = one_op_session(attributes)
    moved = {}
    for seed, (total, new) in enumerate(SHAPES):
        inputs = op_inputs(attributes, heads, kv_heads, total, new, seed)
        expected = evaluate(attributes, **inputs)
        got = session.run(None, inputs)[0]
        assert got.shape == (1, heads, new, HEAD_DIM)
        assert np.abs(got - expected).max() <= OP_ATOL, f"T={total} S={new}"
        dense = dense_attention(inputs["query"][0], inputs["key"][0], inputs["value"][0])[None]
        moved[total, new] = np.abs(expected - dense).max()
    # the shapes reach far enough for selection to matter: the reference differs from dense by far more than OP_ATOL
    assert moved[150, 150] > 1000 * OP_ATOL and moved[201, 1] > 1000 * OP_ATOL
    assert moved[16, 16] < OP_ATOL  # one block: every budget covers it, sparse is dense
    if name == "crossing":  # dense_len 100: calls of total length < 100 are dense attention, exactly the same path
        assert max(moved[t, s] for t, s in SHAPES if t < 100) < OP_ATOL


def test_the_lowered_op_computes_the_reference_on_random_configs():
    """80 random sparse_configs (test_infllmv2_reference.random_config), shapes, GQA ratios and prefill chunks."""
    rng = np.random.default_rng(11)
    for case in range(80):
        attributes = InfLLMv2Attributes.of(random_config(rng), HEAD_DIM)
        kv_heads = int(rng.integers(1, 3))
        total = int(rng.integers(1, 90))
        new = total if rng.integers(0, 2) else int(rng.integers(1, total + 1))
        inputs = op_inputs(attributes, kv_heads * int(rng.choice([1, 2, 4, 8])), kv_heads, total, new, case)
        got = one_op_session(attributes).run(None, inputs)[0]
        assert np.abs(got - evaluate(attributes, **inputs)).max() <= OP_ATOL, (attributes, total, new)


def test_op_attributes_are_checked_one_line_each():
    attributes = InfLLMv2Attributes.of(SMALL, HEAD_DIM)
    assert InfLLMv2Attributes.from_onnx(attributes.onnx()) == attributes
    assert attributes.sparse_config == SMALL
    with pytest.raises(ValueError, match="attribute topk is missing"):
        InfLLMv2Attributes.from_onnx({k: v for k, v in attributes.onnx().items() if k != "topk"})
    with pytest.raises(ValueError, match="unknown attribute window"):
        InfLLMv2Attributes.from_onnx({**attributes.onnx(), "window": 3})
    with pytest.raises(ValueError, match="multiple of kernel_stride"):
        InfLLMv2Attributes.from_onnx({**attributes.onnx(), "block_size": 18})


# --- bundles ------------------------------------------------------------------------------------------------------

BUNDLE_CONFIGS = {"crossing": replace(SMALL, dense_len=150), "nope": replace(SMALL, use_nope=True, init_blocks=2)}
RNG = np.random.default_rng(3)
PROMPT = RNG.integers(5, 260, 240)
CALLS = [PROMPT[:140], *(PROMPT[140 + i:141 + i] for i in range(20))]  # decode steps cross dense_len 150


def _fields(config: SparseAttentionConfig) -> dict:
    return {name: getattr(config, name) for name in config.__dataclass_fields__}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    from tiny_models import write_hf_checkpoint

    root = tmp_path_factory.mktemp("infllmv2_onnx")
    checkpoint = write_hf_checkpoint(root / "checkpoint", ("minicpm", "untied"))
    bundles = {(flavour, name): export_checkpoint(checkpoint, root / f"{flavour}-{name}", flavour=flavour, dtype="fp32",
                                                  max_context=MAX_CONTEXT,
                                                  attention=AttentionChoice("sparse", _fields(config)))
               for flavour in ("ort", "standard") for name, config in BUNDLE_CONFIGS.items()}
    return {"checkpoint": checkpoint, "root": root, **bundles}


_references: dict = {}


def reference_logits(checkpoint: Path, name: str | None) -> list[np.ndarray]:
    from edgecpm.checkpoint import open_checkpoint
    from edgecpm.models import reference_model

    if name not in _references:
        model = reference_model(open_checkpoint(checkpoint)).use_sparse_attention(BUNDLE_CONFIGS.get(name))
        cache = model.new_cache()
        with torch.no_grad():
            _references[name] = [model(torch.tensor(ids[None], dtype=torch.long), cache)[0, -1].numpy() for ids in CALLS]
    return _references[name]


@pytest.mark.parametrize("flavour", ["ort", "standard"])
@pytest.mark.parametrize("name", list(BUNDLE_CONFIGS))
def test_sparse_graphs_match_the_reference_on_onnxruntime(tiny, flavour, name):
    backend = load_backend(tiny[flavour, name], kernels="onnxruntime", threads=1)  # auto: the bundle's recorded choice
    assert backend.kernels["attention"] == "sparse"
    got = [backend.prefill(ids) if len(ids) > 1 else backend.decode(int(ids[0])) for ids in CALLS]
    expected, dense = reference_logits(tiny["checkpoint"], name), reference_logits(tiny["checkpoint"], None)
    for step, (g, e) in enumerate(zip(got, expected)):
        assert np.abs(g - e).max() <= FP32_ATOL, f"call {step}"
    moved = [np.abs(e - d).max() for e, d in zip(expected, dense)]
    assert max(moved) > 1000 * FP32_ATOL
    dense_len = BUNDLE_CONFIGS[name].dense_len
    if dense_len > 0:  # the decode step whose total length reaches dense_len turns sparse
        first_sparse = dense_len - len(CALLS[0])
        assert max(moved[:first_sparse]) < FP32_ATOL < 1000 * FP32_ATOL < min(moved[first_sparse:])


def test_a_sparse_graph_has_one_op_per_layer_and_says_so(tiny):
    for flavour in ("ort", "standard"):
        bundle = tiny[flavour, "nope"]
        manifest = read_manifest(bundle)
        assert manifest.graph_attention == "sparse" and manifest.sparse_attention == BUNDLE_CONFIGS["nope"]
        operators = graph_operators(bundle / "model.onnx")
        assert operators[f"{DOMAIN}.{OP_TYPE}"] == manifest.architecture["num_hidden_layers"]
        assert "com.microsoft.GroupQueryAttention" not in operators  # sparse layers attend over the shared buffer
        model = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
        assert [(f.domain, f.name) for f in model.functions] == [(DOMAIN, OP_TYPE)]
        node = next(n for n in model.graph.node if n.op_type == OP_TYPE)
        attributes = InfLLMv2Attributes.from_onnx({a.name: helper.get_attribute_value(a) for a in node.attribute})
        assert attributes.sparse_config == BUNDLE_CONFIGS["nope"] and len(node.input) == 5
        assert [t.name for t in model.graph.input] == manifest.graph_inputs  # the dense graph's I/O, unchanged


@pytest.mark.parametrize("name", list(BUNDLE_CONFIGS))
def test_standard_sparse_graphs_use_only_operators_tensorrt_10_parses(tiny, name):
    model = tiny["standard", name] / "model.onnx"
    assert check_model(model, load_table(10)) == []
    body = onnx.load(str(model), load_external_data=False).functions[0]
    assert {"TopK", "CumSum", "AveragePool", "MaxPool", "Softmax"} <= {n.op_type for n in body.node}


def test_a_context_that_never_reaches_dense_len_exports_a_dense_graph(tiny, tmp_path):
    far = replace(SMALL, dense_len=MAX_CONTEXT + 1)
    bundle = export_checkpoint(tiny["checkpoint"], tmp_path / "far", flavour="standard", dtype="fp32",
                               max_context=MAX_CONTEXT, attention=AttentionChoice("sparse", _fields(far)))
    manifest = read_manifest(bundle)
    assert manifest.graph_attention == "dense" and manifest.sparse_attention == far
    assert f"{DOMAIN}.{OP_TYPE}" not in graph_operators(bundle / "model.onnx")


def test_a_sparse_graph_refuses_other_attention_on_graph_backends(tiny):
    bundle = tiny["standard", "crossing"]
    for choice in (AttentionChoice("dense"), AttentionChoice("sparse", {"topk": 5})):
        with pytest.raises(BundleError, match="graph attends sparsely .* need --kernels native .* re-export"):
            load_backend(bundle, kernels="onnxruntime", attention=choice)
    same = AttentionChoice("sparse", _fields(BUNDLE_CONFIGS["crossing"]))
    assert load_backend(bundle, kernels="onnxruntime", attention=same).kernels["attention"] == "sparse"
    with pytest.raises(BundleError, match="TensorRT engine"):  # no engine here: the TensorRT path says why
        load_backend(bundle, kernels="tensorrt")


@needs_kernels
def test_the_native_kernels_still_run_any_attention_on_a_sparse_graph(tiny):
    native = load_backend(tiny["ort", "crossing"], kernels="native", threads=1, attention=AttentionChoice("dense"))
    assert native.kernels["attention"] == "dense" and native.kernels["prefill"] != "onnxruntime"
    got = [native.prefill(ids) if len(ids) > 1 else native.decode(int(ids[0])) for ids in CALLS[:3]]
    dense = reference_logits(tiny["checkpoint"], None)[:3]
    assert max(np.abs(g - d).max() for g, d in zip(got, dense)) <= 2e-4  # test_infllmv2_native's FP32_ATOL


def test_manifest_graph_attention_is_validated(tiny, tmp_path):
    bundle = tiny["standard", "crossing"]
    data = json.loads((bundle / MANIFEST_NAME).read_text())
    for bad, field in (({"graph_attention": "blocky"}, "graph_attention"),
                       ({"sparse_attention": None}, "sparse_attention")):
        copy = tmp_path / field
        copy.mkdir()
        for item in bundle.iterdir():
            (copy / item.name).symlink_to(item)
        (copy / MANIFEST_NAME).unlink()
        (copy / MANIFEST_NAME).write_text(json.dumps({**data, **bad}))
        with pytest.raises(BundleError, match=field):
            read_manifest(copy)


def test_mla_has_no_sparse_graph(tmp_path):
    from tiny_models import write_hf_checkpoint

    checkpoint = write_hf_checkpoint(tmp_path / "mla", ("minicpm3", "mla"))
    with pytest.raises(UnsupportedError, match="--attention: .*not for MLA"):
        export_checkpoint(checkpoint, tmp_path / "bundle", flavour="standard", max_context=64,
                          attention=AttentionChoice("sparse", {"dense_len": -1}))
    assert not (tmp_path / "bundle").exists()


# --- TensorRT plugin (deliverable 3c): what runs without TensorRT ---------------------------------------------------

PLUGIN_SOURCE = Path(__file__).resolve().parents[1] / "runtimes/tensorrt/plugins/infllmv2/InfLLMv2Plugin.cpp"


def test_the_plugin_graph_leaves_the_node_to_the_plugin(tiny):
    from edgecpm.exporters.tensorrt.plugins import plugin_graph

    model_path = tiny["standard", "nope"] / "model.onnx"
    rewritten = plugin_graph(model_path)
    try:
        model = onnx.load(str(rewritten), load_external_data=False)
        assert list(model.functions) == [] and rewritten.parent == model_path.parent  # external data found beside it
        nodes = [n for n in model.graph.node if n.op_type == OP_TYPE]
        assert len(nodes) == 2 and all(n.domain == DOMAIN for n in nodes)
        # TensorRT's fallback importer passes INT attributes as kINT32 fields and FLOAT ones as kFLOAT32
        types = {a.name: a.type for a in nodes[0].attribute}
        assert types == {name: (onnx.AttributeProto.FLOAT if name == "scale" else onnx.AttributeProto.INT)
                         for name in InfLLMv2Attributes.__dataclass_fields__}
        # without its function the node is a custom operator: only a registered plugin can take it
        assert {f.rule for f in check_model(rewritten, load_table(10))} == {"operator"}
    finally:
        rewritten.unlink()


def test_the_plugin_reads_every_attribute_the_op_defines():
    import re

    source = PLUGIN_SOURCE.read_text()
    int_fields = re.findall(r'\{"(\w+)", &InfLLMv2Params::\w+\}', source)
    scale = re.findall(r'kScaleField = "(\w+)"', source)
    assert int_fields + scale == list(InfLLMv2Attributes.__dataclass_fields__)
    assert re.search(r'kInfLLMv2Name = "' + OP_TYPE + '"', (PLUGIN_SOURCE.parent / "InfLLMv2Plugin.h").read_text())


def test_sparse_plugin_option_is_checked_before_tensorrt(tiny, tmp_path):
    from edgecpm.exporters.tensorrt.build import check_sparse_plugin
    from edgecpm.exporters.tensorrt.plugins import SparsePlugin

    library = tmp_path / "libedgecpm_infllmv2.so"
    with pytest.raises(UnsupportedError, match="--sparse-plugin: no plugin library"):
        check_sparse_plugin(read_manifest(tiny["standard", "crossing"]), SparsePlugin(library))
    library.write_bytes(b"\x7fELF")
    assert check_sparse_plugin(read_manifest(tiny["standard", "crossing"]), SparsePlugin(library)).library == library
    dense = export_checkpoint(tiny["checkpoint"], tmp_path / "dense", flavour="standard", max_context=64)
    with pytest.raises(UnsupportedError, match="--sparse-plugin: .*graph attends densely"):
        check_sparse_plugin(read_manifest(dense), SparsePlugin(library))
