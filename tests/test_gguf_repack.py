"""GGUF Q4_0 / Q4_1 / Q8_0 blocks exported as MatMulNBits codes without re-quantizing (`--quant int4`).

The bundle must compute the checkpoint's own float view (the GGUF dequantization) at accuracy level 0:
the codes, scales and zero points are the file's, only re-laid out.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import gguf
import numpy as np
import pytest

from edgecpm.bundle import read_manifest
from edgecpm.checkpoint import open_checkpoint
from edgecpm.checkpoint.gguf_file import decode_blocks
from edgecpm.models import reference_model
from edgecpm.quant.formats import pack_matmul_nbits, unpack_matmul_nbits
from edgecpm.quant.plan import make_quantizer
from edgecpm.quant.spec import QuantSpec
from edgecpm.runtimes import load_backend
from gguf_writer import Q, write_gguf
from test_quant_formats import matmul_nbits_weight

torch = pytest.importorskip("torch")

from test_quant_export import FP32_ATOL, _graph, export, run_both  # noqa: E402

FLOAT_TABLES = {"lm_head": "none", "embeddings": "none"}


def _fake_tensor(array: np.ndarray, qtype: Q) -> SimpleNamespace:
    data = gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype)
    return SimpleNamespace(name="w", tensor_type=qtype, shape=list(reversed(array.shape)), data=data)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0], ids=lambda q: q.name)
def test_decoded_blocks_are_the_gguf_dequantization(qtype):
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((24, 96)).astype(np.float32)
    weight[0, :32] = 0.0       # an all-zero block (Q4_1: d = 0)
    weight[1, :32] = 0.75      # a constant block (Q4_1: d = 0, m != 0)
    weight[2] += 3.0           # Q4_1: min far from zero
    tensor = _fake_tensor(weight, qtype)
    quantized = decode_blocks(tensor, Path("x.gguf"))
    expected = gguf.quants.dequantize(tensor.data, qtype).reshape(weight.shape)
    assert quantized.block_size == 32 and quantized.bits == (8 if qtype == Q.Q8_0 else 4)
    assert quantized.float_zero_points == (qtype == Q.Q4_1)
    np.testing.assert_allclose(quantized.dequantize(), expected, rtol=1e-6, atol=1e-6)  # Q4_1: d*q + m cancels
    if qtype != Q.Q4_1:  # integer zero points: exact
        assert np.array_equal(quantized.dequantize(), expected)
    # onnxruntime reads the packing (float zero points included) as the reference dequantizes it
    assert np.array_equal(matmul_nbits_weight(quantized), quantized.dequantize().T)
    roundtrip = unpack_matmul_nbits(pack_matmul_nbits(quantized))
    for attr in ("codes", "scales", "zero_points"):
        assert np.array_equal(getattr(roundtrip, attr), getattr(quantized, attr)), attr


def test_q4_1_float_zero_points_fp16():
    weight = np.random.default_rng(5).standard_normal((16, 64)).astype(np.float32) + 1.0
    quantized = decode_blocks(_fake_tensor(weight, Q.Q4_1), Path("x.gguf"))
    from dataclasses import replace

    half = replace(quantized, scales=quantized.scales.astype(np.float16), zero_points=quantized.zero_points.astype(np.float16))
    np.testing.assert_allclose(matmul_nbits_weight(half, np.float16), half.dequantize().T, rtol=2e-3, atol=2e-3)


def _float_view(checkpoint) -> dict:
    return {name: ref.numpy(np.float32) for name, ref in checkpoint.tensors.items()}


@pytest.mark.parametrize("qtype,key,spec", [
    (Q.Q4_1, ("llama", "dense"), QuantSpec("int4", **FLOAT_TABLES)),   # q/k rows un-permuted, float zero points
    (Q.Q4_0, ("minicpm", "untied"), QuantSpec("int4", lm_head="int4", embeddings="int4")),  # Q4_0 tables too
    (Q.Q8_0, ("llama", "dense"), QuantSpec("int4")),                  # int8 codes, table included
], ids=lambda v: getattr(v, "name", None) or ("-".join(v) if isinstance(v, tuple) else None))
def test_gguf_blocks_export_losslessly(tmp_path, qtype, key, spec):
    from onnx import numpy_helper

    written = write_gguf(tmp_path / "m.gguf", key, qtype=qtype)
    bundle = export(written.path, tmp_path / "bundle", quant=spec)
    record = read_manifest(bundle).quantization
    label = f"gguf-{qtype.name.lower()}"
    assert record["method"] == "source"
    assert set(record["tensors"].values()) == {label}
    assert record["tensor_counts"][label] >= 14
    checkpoint = open_checkpoint(written.path)
    assert run_both(reference_model(checkpoint, _float_view(checkpoint)), load_backend(bundle, threads=1)) <= FP32_ATOL
    stored = {t.name: numpy_helper.to_array(t, base_dir=str(bundle)) for t in _graph(bundle).graph.initializer}
    o_proj = checkpoint.prequantized["model.layers.1.self_attn.o_proj.weight"]().quantized
    assert np.array_equal(stored["model.layers.1.self_attn.o.qweight"], pack_matmul_nbits(o_proj).packed)
    # Float zero points are written as symmetric MatMulNBits + per-block offsets (onnxruntime's float-zero-point
    # kernel is ~25x slower on CPU), so no MatMulNBits in these bundles takes zero points.
    assert "model.layers.1.self_attn.o.qzeros" not in stored
    assert all(len(n.input) == 3 for n in _graph(bundle).graph.node if n.op_type == "MatMulNBits")
    if qtype == Q.Q4_1:
        offsets = (8 - o_proj.zero_points) * o_proj.scales
        np.testing.assert_allclose(stored["model.layers.1.self_attn.o.block_offsets"], offsets.T, rtol=1e-6)
    else:
        assert "model.layers.1.self_attn.o.block_offsets" not in stored


def test_q4_1_falls_back_to_rtn_where_float_zero_points_cannot_go(tmp_path):
    checkpoint = open_checkpoint(write_gguf(tmp_path / "m.gguf", ("llama", "dense"), qtype=Q.Q4_1).path)
    spec = QuantSpec("int4", embeddings="int4", lm_head="int4", method="source")
    ort = make_quantizer(checkpoint, spec, flavour="ort")
    standard = make_quantizer(checkpoint, spec, flavour="standard")
    for name in checkpoint.tensors:
        if ort.storage(name) is not None:
            ort.quantize(name)
            standard.quantize(name)
    # GatherBlockQuantized takes no zero points: the table is RTN; DequantizeLinear (standard) is symmetric only
    assert ort.written.pop("model.embed_tokens.weight") == "int4-rtn"
    assert set(ort.written.values()) == {"gguf-q4_1"}
    assert set(standard.written.values()) == {"int4-rtn"}


def test_other_schemes_and_methods_requantize(tmp_path):
    from edgecpm.quant.plan import checkpoint_spec

    checkpoint = open_checkpoint(write_gguf(tmp_path / "m.gguf", ("llama", "dense"), qtype=Q.Q4_0).path)
    assert checkpoint_spec(checkpoint, QuantSpec("int4")).method == "source"
    assert checkpoint_spec(checkpoint, QuantSpec("int4", method="rtn")).method == "rtn"  # explicit rtn re-quantizes
    assert checkpoint_spec(checkpoint, QuantSpec("int8")).method == "rtn"
    assert checkpoint_spec(checkpoint, QuantSpec("int4", method="gptq")).method == "gptq"
    int8 = make_quantizer(checkpoint, QuantSpec("int8", method="source"))
    int8.quantize("model.layers.0.self_attn.q_proj.weight")  # Q4_0 asked as int8: re-quantized as asked
    assert int8.written == {"model.layers.0.self_attn.q_proj.weight": "int8-rtn"}
