"""Quantized export: every scheme against a reference built from exactly the weights the export wrote.

Parity runs at accuracy_level 0 (MatMulNBits computes in the activation dtype), so the only difference
between graph and reference is float summation order: FP32_ATOL as for float exports. The quality gate
runs on QUALITY_TOKENS evaluation tokens to keep the suite quick.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from edgecpm.bundle import read_manifest
from edgecpm.checkpoint import open_checkpoint
from edgecpm.errors import QualityError, UnsupportedError
from edgecpm.export import export_checkpoint
from edgecpm.models import reference_model
from edgecpm.quant.plan import QuantizationWarning, make_quantizer, quantized_weights
from edgecpm.quant.spec import QuantSpec
from edgecpm.runtimes import load_backend
from gptq_writer import write_gptq_checkpoint
from tiny_models import write_bitcpm_checkpoint, write_hf_checkpoint

torch = pytest.importorskip("torch")

FP32_ATOL = 1e-4
PROMPT = np.array([5, 9, 11, 40, 7, 100, 3], dtype=np.int64)
DECODE_STEPS = 10
MAX_CONTEXT = 64
QUALITY_TOKENS = 32
KEYS = [("minicpm", "dense"), ("minicpm", "untied"), ("minicpm3", "mla"), ("llama", "dense")]
SCHEMES = {"int4": QuantSpec("int4"), "int4-asym": QuantSpec("int4", symmetric=False), "int8": QuantSpec("int8"),
           "int4-tables4": QuantSpec("int4", lm_head="int4", embeddings="int4"), "int4-gptq": QuantSpec("int4", method="gptq"),
           "int4-gptq-int4-head": QuantSpec("int4", method="gptq", lm_head="int4")}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("quant_export")


def export(source, out: Path, flavour="ort", **kwargs) -> Path:
    kwargs.setdefault("accuracy_level", 0)
    return export_checkpoint(source, out, flavour=flavour, max_context=MAX_CONTEXT, quality_tokens=QUALITY_TOKENS, **kwargs)


def run_both(model, backend) -> float:
    """Max |logit difference| over prefill + DECODE_STEPS greedy steps (the reference picks the tokens)."""
    cache = model.new_cache()
    with torch.no_grad():
        ref = [model(torch.from_numpy(PROMPT)[None], cache)[0, -1].numpy()]
        got = [backend.prefill(PROMPT)]
        for _ in range(DECODE_STEPS):
            token = int(ref[-1].argmax())
            ref.append(model(torch.tensor([[token]]), cache)[0, -1].numpy())
            got.append(backend.decode(token))
    return max(float(np.abs(r - g).max()) for r, g in zip(ref, got))


def parity(checkpoint_dir: Path, bundle: Path, spec: QuantSpec | None) -> float:
    """The bundle against the reference on the dequantized weights named in its manifest (as its flavour stores them)."""
    checkpoint = open_checkpoint(checkpoint_dir)
    manifest = read_manifest(bundle)
    weights = quantized_weights(checkpoint, spec, manifest.quantization["tensors"], flavour=manifest.flavour)
    return run_both(reference_model(checkpoint, weights), load_backend(bundle, threads=1))


def _cases():
    for key in KEYS:
        for flavour in ("ort", "standard"):
            for scheme, spec in SCHEMES.items():
                try:
                    spec.validate(flavour)
                except UnsupportedError:
                    continue
                yield pytest.param(key, flavour, scheme, id=f"{'-'.join(key)}-{flavour}-{scheme}")


@pytest.mark.parametrize("key,flavour,scheme", list(_cases()))
def test_quantized_export_matches_reference_on_dequantized_weights(workdir, key, flavour, scheme):
    checkpoint_dir = workdir / "-".join(key)
    if not checkpoint_dir.exists():
        write_hf_checkpoint(checkpoint_dir, key)
    bundle = export(checkpoint_dir, workdir / f"{'-'.join(key)}-{flavour}-{scheme}", flavour, quant=SCHEMES[scheme])
    assert parity(checkpoint_dir, bundle, SCHEMES[scheme]) <= FP32_ATOL
    if flavour == "standard":
        assert_tensorrt_layout(bundle)
    record = read_manifest(bundle).quantization
    assert record["tensors"]["model.embed_tokens.weight"] == f"{SCHEMES[scheme].embeddings}-rtn"
    assert SCHEMES[scheme].embeddings == {"int4-tables4": "int4", "int8": "int8"}.get(scheme, "int6")  # "auto" resolved
    assert record["scheme"] == SCHEMES[scheme].scheme and record["model_bytes"] > 0
    assert set(record["quality"]) >= {"perplexity", "reference_perplexity", "mean_kl", "top1_agreement",
                                      "perplexity_increase"}


def _graph(bundle: Path):
    import onnx

    return onnx.load(str(bundle / "model.onnx"))


def assert_tensorrt_layout(bundle: Path) -> None:
    """A standard bundle as TensorRT 10.x takes it: every DequantizeLinear scale strictly positive, INT4 blocked along
    K, INT8 per output channel (no blocks), and the tensor index saying which."""
    from onnx import TensorProto, helper, numpy_helper

    from edgecpm.exporters.tensorrt.onnx_support import check_model, load_table

    assert check_model(bundle / "model.onnx", load_table(10)) == []
    graph, index = _graph(bundle).graph, read_manifest(bundle).tensors
    initializers = {t.name: t for t in graph.initializer}
    nodes = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    assert nodes
    for node in nodes:
        data, scales = initializers[node.input[0]], numpy_helper.to_array(initializers[node.input[1]], base_dir=str(bundle))
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert (scales > 0).all(), node.input[0]
        entry = index[node.input[0]]
        assert entry["axis"] == attributes["axis"] and (entry["k"], entry["n"]) == tuple(data.dims)
        if data.data_type == TensorProto.INT8:
            assert scales.shape == (data.dims[1],) and attributes == {"axis": 1} and entry["per_channel"] is True
            assert "block_size" not in entry and entry["bits"] == 8
        else:
            assert data.data_type == TensorProto.INT4 and attributes["axis"] == 0
            assert entry["block_size"] == attributes["block_size"] and "per_channel" not in entry
            assert scales.shape == (data.dims[0] // attributes["block_size"], data.dims[1])


def test_standard_int8_gptq_is_per_channel(workdir, tmp_path):
    """GPTQ int8 for the standard flavour: static per-channel scales (one block spanning each row), positive."""
    source = workdir / "llama-dense"
    if not source.exists():
        write_hf_checkpoint(source, ("llama", "dense"))
    spec = QuantSpec("int8", method="gptq")
    bundle = export(source, tmp_path / "b", "standard", quant=spec)
    record = read_manifest(bundle).quantization
    assert record["tensor_counts"] == {"int8-gptq": 14, "int8-rtn": 1}  # 2 layers of 7 linears, and the tied table
    assert parity(source, bundle, spec) <= FP32_ATOL
    assert_tensorrt_layout(bundle)


def test_tied_ort_head_shares_the_table_initializer(workdir):
    key = ("minicpm", "dense")
    bundle = workdir / f"{'-'.join(key)}-ort-int4"
    if not bundle.exists():
        pytest.skip("runs after the parity test that exports it")
    graph = _graph(bundle).graph
    gather = next(n for n in graph.node if n.op_type == "GatherBlockQuantized")
    heads = [n for n in graph.node if n.op_type == "MatMulNBits" and n.input[1] == gather.input[0]]
    assert len(heads) == 1  # the LM head reads the embedding's packed codes, no second copy
    assert all(n.op_type != "MatMul" for n in graph.node)


# --- BitCPM ternary ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bitcpm_checkpoint(workdir, monkeypatch_module) -> Path:
    return write_bitcpm_checkpoint(workdir / "bitcpm", monkeypatch_module)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_bitcpm_lossless_ternary_equals_the_float_export(workdir, bitcpm_checkpoint):
    spec = QuantSpec("ternary", method="lossless", lm_head="none", embeddings="none")
    bundle = export(bitcpm_checkpoint, workdir / "bitcpm-ternary", quant=spec)
    float_bundle = export(bitcpm_checkpoint, workdir / "bitcpm-fp32")
    record = read_manifest(bundle).quantization
    assert record["tensor_counts"] == {"ternary-exact": 14}
    assert abs(record["quality"]["perplexity_increase"]) < 1e-4
    ternary, dense = load_backend(bundle, threads=1), load_backend(float_bundle, threads=1)
    diffs = [np.abs(ternary.prefill(PROMPT) - dense.prefill(PROMPT)).max()]
    for token in range(20, 20 + DECODE_STEPS):
        diffs.append(np.abs(ternary.decode(token) - dense.decode(token)).max())
    assert max(diffs) <= FP32_ATOL
    bits = {a.i for n in _graph(bundle).graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"}
    assert bits == {2}
    assert record["model_bytes"] < 0.5 * read_manifest(float_bundle).model_bytes


def test_lossless_ternary_of_dense_weights_fails_and_writes_nothing(workdir, tmp_path):
    dense = write_hf_checkpoint(tmp_path / "dense", ("minicpm", "dense"))
    with pytest.raises(UnsupportedError, match=r"model\.layers\.0\..*not ternary"):
        export(dense, tmp_path / "out", quant=QuantSpec("ternary", method="lossless"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense"]


def test_absmean_ternary_of_dense_weights_warns_with_the_measured_loss(tmp_path):
    dense = write_hf_checkpoint(tmp_path / "dense", ("minicpm", "dense"))
    with pytest.warns(QuantizationWarning, match=r"14 of 15 weights are not ternary.*perplexity [+-]\d"):
        export(dense, tmp_path / "out", quant=QuantSpec("ternary"))
    assert read_manifest(tmp_path / "out").quantization["tensor_counts"] == {"ternary-absmean": 14, "int6-rtn": 1}


# --- GPTQ checkpoints --------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric,act_order", [(True, False), (False, False), (False, True)])
def test_gptq_checkpoint_exports_its_own_codes(tmp_path, symmetric, act_order):
    from onnx import numpy_helper

    from edgecpm.quant.formats import pack_matmul_nbits

    source = tmp_path / "gptq"
    write_gptq_checkpoint(source, ("minicpm", "dense"), group_size=32, symmetric=symmetric, act_order=act_order)
    bundle = export(source, tmp_path / "bundle")
    record = read_manifest(bundle).quantization
    assert (record["scheme"], record["method"], record["block_size"]) == ("int4", "gptq-checkpoint", 32)
    assert record["tensor_counts"]["gptq-checkpoint"] == 14
    assert parity(source, bundle, None) <= FP32_ATOL
    checkpoint = open_checkpoint(source)
    stored = {t.name: numpy_helper.to_array(t, base_dir=str(bundle)) for t in _graph(bundle).graph.initializer}
    o_proj = checkpoint.prequantized["model.layers.1.self_attn.o_proj.weight"]().quantized
    assert np.array_equal(stored["model.layers.1.self_attn.o.qweight"], pack_matmul_nbits(o_proj).packed)
    gathers = [n for n in _graph(bundle).graph.node if n.op_type == "Gather" and n.input[1].endswith("input_order")]
    assert bool(gathers) == act_order


def test_gptq_checkpoint_exports_its_own_positive_scales_for_standard(tmp_path):
    source = tmp_path / "gptq"
    write_gptq_checkpoint(source, ("minicpm", "dense"), group_size=32, symmetric=True, act_order=False)
    bundle = export(source, tmp_path / "bundle", "standard")
    record = read_manifest(bundle).quantization
    assert record["tensor_counts"]["gptq-checkpoint"] == 14
    assert parity(source, bundle, None) <= FP32_ATOL
    assert_tensorrt_layout(bundle)


def test_gptq_checkpoint_scales_for_the_tensorrt_layout():
    from edgecpm.quant.formats import quantize_rtn
    from edgecpm.quant.plan import _positive_checkpoint_scales

    weight = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    weight[0, :32] = 0.0
    positive = quantize_rtn(weight, 4, 32, positive=True)
    zero_scale = replace(positive, scales=np.where(np.arange(2) == 0, 0, positive.scales).astype(np.float32))
    held = _positive_checkpoint_scales(zero_scale, "w")
    assert (held.scales > 0).all() and np.array_equal(held.dequantize(), zero_scale.dequantize())
    with pytest.raises(UnsupportedError, match="negative scales.*--flavour ort"):
        _positive_checkpoint_scales(quantize_rtn(weight, 4, 32), "w")


@pytest.mark.parametrize("qtype,labels", [
    ("Q4_0", {"int4-rtn", "int6-rtn"}),  # negative Q4_0 scales cannot be flipped: re-quantized with positive ones
    ("Q8_0", {"int8-rtn"}),  # INT8 blocks: per channel, at 8 bits as the file's blocks
    ("Q4_1", {"int4-rtn", "int6-rtn"}),  # float zero points (the 4-bit table: re-quantized at int6 as ever)
])
def test_gguf_blocks_the_tensorrt_layout_cannot_hold_are_requantized_with_a_warning(tmp_path, qtype, labels):
    from gguf_writer import Q, write_gguf

    written = write_gguf(tmp_path / "m.gguf", ("llama", "dense"), qtype=getattr(Q, qtype))
    spec = QuantSpec("int4")
    with pytest.warns(QuantizationWarning, match=rf"were re-quantized \(RTN\).*gguf-{qtype.lower()}: .*perplexity"):
        bundle = export(written.path, tmp_path / "bundle", "standard", quant=spec)
    record = read_manifest(bundle).quantization
    assert record["method"] == "source" and set(record["tensors"].values()) == labels
    assert parity(written.path, bundle, spec) <= FP32_ATOL
    assert_tensorrt_layout(bundle)


def test_gptq_act_order_is_refused_for_standard(tmp_path):
    write_gptq_checkpoint(tmp_path / "gptq", ("minicpm", "dense"), group_size=32, symmetric=True, act_order=True)
    with pytest.raises(UnsupportedError, match="standard flavour"):
        export(tmp_path / "gptq", tmp_path / "out", "standard")
    assert not (tmp_path / "out").exists()


def test_gptq_method_beats_rtn_on_layer_outputs(tmp_path):
    checkpoint = open_checkpoint(write_hf_checkpoint(tmp_path / "m", ("minicpm", "dense")))
    gptq = make_quantizer(checkpoint, QuantSpec("int4", method="gptq"))
    rtn = make_quantizer(checkpoint, QuantSpec("int4"))
    errors = {"gptq": 0.0, "rtn": 0.0}
    energy = lambda w, h: float(np.einsum("nk,kl,nl->", w, h, w))  # noqa: E731  ‖X wᵀ‖² from H = XᵀX
    for name, hessian in gptq.calibration.items():
        weight = checkpoint.tensors[name].numpy()
        for label, quantizer in (("gptq", gptq), ("rtn", rtn)):
            approx = quantizer.quantize(name).quantized.dequantize()
            errors[label] += (energy(weight - approx, hessian.matrix) / energy(weight, hessian.matrix)) ** 0.5
    assert set(gptq.written.values()) == {"int4-gptq"}
    assert errors["gptq"] < 0.95 * errors["rtn"]


def test_gptq_int4_head_of_a_tied_model_is_calibrated_and_stored_apart(workdir, tmp_path):
    source = workdir / "minicpm-dense"
    if not source.exists():
        write_hf_checkpoint(source, ("minicpm", "dense"))
    bundle = export(source, tmp_path / "b", quant=QuantSpec("int4", method="gptq", lm_head="int4"))
    record = read_manifest(bundle).quantization
    assert record["tensors"]["lm_head.weight"] == "int4-gptq"
    assert record["tensors"]["model.embed_tokens.weight"] == "int6-rtn"
    initializers = {t.name for t in _graph(bundle).graph.initializer}
    assert any(name.startswith("lm_head") for name in initializers)


# --- the quality gate and bad input ----------------------------------------------------------------


def test_quality_gate_limit_fails_and_leaves_no_bundle(tmp_path):
    source = write_hf_checkpoint(tmp_path / "m", ("llama", "dense"))
    spec = QuantSpec("int4", lm_head="int4", embeddings="int4")
    measured = read_manifest(export(source, tmp_path / "ok", quant=spec)).quantization["quality"]["perplexity_increase"]
    with pytest.raises(QualityError, match="exceeds the limit"):
        export(source, tmp_path / "strict", quant=spec, max_ppl_increase=measured - 1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "ok"]


def test_quality_gate_measures_the_kernels_the_bundle_runs_on_by_default(tmp_path, monkeypatch):
    """The gate runs the bundle as `auto` does (native kernels with int8 activations where they implement it), not as
    $EDGECPM_KERNELS says for the exporting process, and records which kernels those were."""
    from edgecpm.quant.quality import backend_logits, compare, describe_kernels, evaluation_text, graph_reference_logits
    from edgecpm.text import TextTokenizer

    source = write_hf_checkpoint(tmp_path / "m", ("llama", "dense"))
    monkeypatch.setenv("EDGECPM_KERNELS", "onnxruntime")
    manifest = read_manifest(export(source, tmp_path / "b", quant=QuantSpec("int4"), accuracy_level=4))
    monkeypatch.delenv("EDGECPM_KERNELS")
    quality, default = manifest.quantization["quality"], load_backend(tmp_path / "b")
    assert quality["kernels"] == describe_kernels(default.kernels)
    tokenizer = TextTokenizer.from_file(tmp_path / "b" / "tokenizer.json", manifest.tokenizer)
    ids = np.asarray(tokenizer.encode(evaluation_text())[:QUALITY_TOKENS], dtype=np.int64)
    expected = compare(graph_reference_logits(open_checkpoint(source), ids), backend_logits(default, ids), ids)
    assert quality["mean_kl"] == pytest.approx(expected.mean_kl, rel=1e-6)


def _cli(*args: str, capsys) -> tuple[int, str]:
    from edgecpm.cli import main

    try:
        main(list(args))
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--flavour", "standard", "--quant", "int4", "--asymmetric"], "asymmetric int4"),
    (["--flavour", "standard", "--quant", "ternary"], "MatMulNBits"),
    (["--quant", "int4", "--block-size", "48"], "block size 48"),
    (["--quant", "int3"], "unknown scheme 'int3'"),
    (["--quant", "int4", "--lm-head", "ternary"], "not a table format"),
    (["--quant", "int4", "--method", "awq"], "unknown method"),
    (["--quant", "int4", "--accuracy-level", "7"], "accuracy level 7"),
])
def test_bad_quant_options_are_one_line_errors(workdir, tmp_path, capsys, args, message):
    source = workdir / "llama-dense"
    if not source.exists():
        write_hf_checkpoint(source, ("llama", "dense"))
    code, err = _cli("export", str(source), "-o", str(tmp_path / "out"), "--max-context", "32", *args, capsys=capsys)
    assert code == 1
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_cli_quantized_export_and_inspect(workdir, tmp_path, capsys):
    import json

    source = workdir / "llama-dense"
    if not source.exists():
        write_hf_checkpoint(source, ("llama", "dense"))
    out = tmp_path / "bundle"
    code, _ = _cli("export", str(source), "-o", str(out), "--max-context", "32", "--quant", "int4", "--quality-tokens", "16",
                   capsys=capsys)
    assert code == 0
    from edgecpm.cli import main

    main(["inspect", str(out), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "bundle" and report["quantization"]["scheme"] == "int4"
    assert report["architecture"] == "llama"
    assert report["quality"]["tokens"] == 15 and report["weight_bytes"] > 0
    assert report["kv_bytes_per_token"] > 0 and report["max_context"] == 32
    code, _ = _cli("run", str(out), "--prompt", "hi", "--max-new-tokens", "4", capsys=capsys)
    assert code == 0
