"""TensorRT engines: what runs everywhere (pinning, the L4T parser, optimization-profile shapes, engine records in the
manifest, `engine build`'s one-line refusals, engine_for_this_device's reasons, the standard graphs against TensorRT
10.x's ONNX operator table and INT4 weight-only pattern), and, marked `tensorrt`/`gpu`, a real build and greedy
tokens against onnxruntime where TensorRT and a GPU are there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from edgecpm.exporters.tensorrt.build import (
    DEFAULT_PREFILL_MAX,
    TIMING_CACHE,
    check_sizes,
    check_standard_bundle,
    engine_file_name,
    optimization_profiles,
    plan_build,
    with_engine,
)
from edgecpm.exporters.tensorrt.onnx_support import check_model, int4_weight_only_findings, load_table, table_for_version
from edgecpm.exporters.tensorrt.pin import HostFacts, check_pin, parse_l4t_release, pin_mismatch
from edgecpm.runtimes.tensorrt import engine_for_this_device

from edgecpm.bundle import MANIFEST_NAME, EngineRecord, read_manifest, write_manifest
from edgecpm.errors import BundleError, MissingDependencyError, UnsupportedError

REPO = Path(__file__).resolve().parents[1]
DEVICE_DATA = Path(__file__).parent / "data" / "devices"
EDGECPM = REPO / ".venv" / "bin" / "edgecpm"
MAX_CONTEXT = 64
HAS_TENSORRT = __import__("importlib").util.find_spec("tensorrt") is not None

ORIN = HostFacts(tensorrt_version="10.3.0.30", gpu_name="Orin", sm="8.7", l4t_release="36.4.3")
RTX = HostFacts(tensorrt_version="10.13.0.35", gpu_name="NVIDIA GeForce RTX 4090", sm="8.9", l4t_release=None)


def export(source: Path, out: Path, **kwargs) -> Path:
    from edgecpm.export import export_checkpoint

    if not out.exists():
        export_checkpoint(source, out, max_context=kwargs.pop("max_context", MAX_CONTEXT), quality_tokens=16, **kwargs)
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tensorrt")


@pytest.fixture(scope="module")
def tiny_checkpoint(workdir) -> Path:
    from gguf_writer import write_gguf  # numpy + gguf: no torch needed to write it

    path = workdir / "tiny-minicpm-untied.gguf"
    if not path.exists():
        write_gguf(path, ("minicpm", "untied"))
    return path


@pytest.fixture(scope="module")
def standard_bundle(workdir, tiny_checkpoint) -> Path:
    return export(tiny_checkpoint, workdir / "standard-fp16", flavour="standard", dtype="fp16")


def record_for(host: HostFacts, device: str = "jetson-agx-orin-64gb", **changes) -> EngineRecord:
    record = EngineRecord(file=engine_file_name(device, host.sm, host.tensorrt_version), sha256="0" * 64, device=device,
                          tensorrt_version=host.tensorrt_version, gpu_name=host.gpu_name, sm=host.sm,
                          l4t_release=host.l4t_release, max_context=MAX_CONTEXT,
                          shape_profiles={"prefill": {}, "decode": {}}, timing_cache=TIMING_CACHE, built_with="test")
    return replace(record, **changes)


# --- the L4T release ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("board,release", [("jetson-agx-orin-64gb", "36.4.4"), ("jetson-orin-nano-8gb", "36.4.3")])
def test_l4t_release_of_captured_nv_tegra_release_files(board, release):
    assert parse_l4t_release((DEVICE_DATA / board / "etc" / "nv_tegra_release").read_text()) == release


@pytest.mark.parametrize("text,release", [
    ("# R36 (release), REVISION: 3.0, GCID: 36191598, BOARD: generic, EABI: aarch64, DATE: Mon May  6 17:34:21 UTC 2024",
     "36.3.0"),
    ("# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, DATE: Tue Aug  1 19:57:35 UTC 2023",
     "35.4.1"),
    ("# R32 (release), REVISION: 1, GCID: 14005541, BOARD: t186ref, EABI: aarch64", "32.1.0"),
    ("", None),
    ("Ubuntu 22.04.4 LTS", None),
    ("# R36 (release)", None),
])
def test_l4t_release_parser(text, release):
    assert parse_l4t_release(text) == release


# --- pinning --------------------------------------------------------------------------------------------------


def test_an_engine_runs_where_it_was_built():
    assert pin_mismatch(record_for(ORIN), ORIN) is None
    check_pin(record_for(ORIN), ORIN)  # no error


@pytest.mark.parametrize("here,reason", [
    (replace(ORIN, tensorrt_version="10.4.0.26"), "built with TensorRT 10.3.0.30, this machine has TensorRT 10.4.0.26"),
    (replace(ORIN, tensorrt_version=None), "TensorRT is not installed here"),
    (RTX, "TensorRT 10.3.0.30, this machine has TensorRT 10.13.0.35"),
    (replace(ORIN, sm="8.9", gpu_name="NVIDIA GeForce RTX 4090"), "built for SM 8.7 (Orin), this GPU is SM 8.9"),
    (replace(ORIN, gpu_name="NVIDIA A10"), "built on a Orin, this GPU is a NVIDIA A10"),
    (replace(ORIN, l4t_release="36.3.0"), "built on L4T 36.4.3, this machine has L4T 36.3.0"),
    (replace(ORIN, l4t_release=None), "built on L4T 36.4.3, this machine has no L4T"),
    (replace(ORIN, gpu_name=None, sm=None, gpu_problem="cuda-python is not installed"), "no CUDA GPU"),
])
def test_check_pin_refuses_each_mismatch_with_the_rebuild_command(here, reason):
    with pytest.raises(BundleError) as caught:
        check_pin(record_for(ORIN), here, bundle="bundles/m")
    message = str(caught.value)
    assert reason in message
    assert "edgecpm engine build bundles/m --device jetson-agx-orin-64gb" in message
    assert "\n" not in message


def test_an_engine_built_without_l4t_refuses_a_jetson():
    assert "built on a machine without L4T, this machine has L4T 36.4.3" in pin_mismatch(
        record_for(RTX, l4t_release=None, tensorrt_version="10.3.0.30", gpu_name="Orin", sm="8.7"), ORIN)


# --- shapes, names, records (pure) ----------------------------------------------------------------------------


def test_optimization_profiles_from_a_real_standard_manifest(standard_bundle):
    manifest = read_manifest(standard_bundle)
    profiles = optimization_profiles(manifest, MAX_CONTEXT, 16)
    assert list(profiles) == ["prefill", "decode"]
    inputs = [spec["name"] for spec in manifest.graph_io["inputs"]]
    assert manifest.kv_layout["position_inputs"] == []
    for shapes in profiles.values():
        assert list(shapes) == inputs  # input_ids, then the KV inputs in layer order
    assert profiles["prefill"]["input_ids"] == [[1, 1], [1, 8], [1, 16]]
    assert profiles["decode"]["input_ids"] == [[1, 1], [1, 1], [1, 1]]
    for tensor in manifest.kv_layout["tensors"]:
        heads, dim = tensor["heads"], tensor["dim"]
        assert profiles["prefill"][tensor["input"]] == [[1, 0, heads, dim], [1, 0, heads, dim], [1, MAX_CONTEXT - 1, heads, dim]]
        assert profiles["decode"][tensor["input"]] == [[1, 0, heads, dim], [1, MAX_CONTEXT // 2, heads, dim],
                                                       [1, MAX_CONTEXT - 1, heads, dim]]
    assert check_sizes(manifest, None, None) == (MAX_CONTEXT, min(DEFAULT_PREFILL_MAX, MAX_CONTEXT))
    for bad in ({"max_context": MAX_CONTEXT + 1}, {"max_context": 1}, {"prefill_max": MAX_CONTEXT + 1}, {"prefill_max": 0}):
        with pytest.raises(UnsupportedError):
            check_sizes(manifest, bad.get("max_context"), bad.get("prefill_max"))


def test_optimization_profiles_of_an_mla_bundle_and_a_position_input(workdir):
    from gguf_writer import write_gguf

    checkpoint = workdir / "tiny-mla.gguf"
    write_gguf(checkpoint, ("minicpm3", "mla"))
    manifest = read_manifest(export(checkpoint, workdir / "mla-fp32", flavour="standard", dtype="fp32"))
    profiles = optimization_profiles(manifest, 32, 8)
    latent = [t for t in manifest.kv_layout["tensors"] if t["kind"] == "latent"]
    assert latent and all(profiles["decode"][t["input"]][2] == [1, 31, t["heads"], t["dim"]] for t in latent)
    # A position input follows the new tokens' length; a dimension edgecpm cannot size is refused.
    with_positions = replace(manifest, kv_layout={**manifest.kv_layout, "position_inputs": ["position_ids"]},
                             graph_io={**manifest.graph_io, "inputs": [*manifest.graph_io["inputs"],
                                                                        {"name": "position_ids", "dtype": "int64",
                                                                         "shape": [1, "sequence_length"]}]})
    assert optimization_profiles(with_positions, 32, 8)["prefill"]["position_ids"] == [[1, 1], [1, 4], [1, 8]]
    odd = replace(manifest, graph_io={**manifest.graph_io, "inputs": [*manifest.graph_io["inputs"],
                                                                     {"name": "x", "dtype": "int64", "shape": ["batch"]}]})
    with pytest.raises(UnsupportedError, match="dimension 'batch'"):
        optimization_profiles(odd, 32, 8)


def test_only_standard_bundles_make_engines(workdir, tiny_checkpoint):
    ort = read_manifest(export(tiny_checkpoint, workdir / "ort-fp32", flavour="ort", dtype="fp32"))
    with pytest.raises(UnsupportedError, match="export it with --flavour standard"):
        check_standard_bundle(ort, workdir / "ort-fp32")


def test_engine_file_names():
    assert engine_file_name("jetson-agx-orin-64gb", "8.7", "10.3.0.30") == \
        "tensorrt/jetson-agx-orin-64gb-sm87-trt10.3.0.30.engine"
    assert engine_file_name("NVIDIA GeForce RTX 4090", "8.9", "11.4.0.106") == \
        "tensorrt/nvidia-geforce-rtx-4090-sm89-trt11.4.0.106.engine"


def test_engine_records_round_trip_through_the_manifest(workdir, standard_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    for name in os.listdir(standard_bundle):
        (bundle / name).write_bytes((standard_bundle / name).read_bytes())
    manifest = read_manifest(bundle)
    profiles = optimization_profiles(manifest, MAX_CONTEXT, 16)
    first = record_for(ORIN, shape_profiles=profiles)
    second = record_for(RTX, device="rtx-4090", shape_profiles=profiles)
    for record in (first, second):
        (bundle / record.file).parent.mkdir(exist_ok=True)
        (bundle / record.file).write_bytes(b"engine")
    write_manifest(bundle, with_engine(with_engine(manifest, first), second))
    again = read_manifest(bundle)
    assert again.engines == [first, second]
    assert json.loads((bundle / MANIFEST_NAME).read_text())["engines"][0]["shape_profiles"] == profiles
    # A rebuild for the same device replaces its record and keeps the others.
    rebuilt = replace(first, sha256="1" * 64)
    write_manifest(bundle, with_engine(again, rebuilt))
    assert read_manifest(bundle).engines == [second, rebuilt]
    (bundle / first.file).unlink()
    with pytest.raises(BundleError, match="missing"):
        read_manifest(bundle)


# --- engine build's refusals, before anything is written ---------------------------------------------------------


def _listing(bundle: Path) -> dict[str, int]:
    return {str(p.relative_to(bundle)): p.stat().st_mtime_ns for p in sorted(bundle.rglob("*"))}


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_engine_build_without_tensorrt_is_one_line_and_writes_nothing(standard_bundle):
    before = _listing(standard_bundle)
    result = subprocess.run([str(EDGECPM), "engine", "build", str(standard_bundle)], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert "engine build (TensorRT 10.x or 11.x; on a Jetson it ships with JetPack) needs the 'tensorrt' package: " \
           "pip install 'edgecpm[tensorrt]'" in result.stderr
    assert _listing(standard_bundle) == before


def test_engine_build_of_an_ort_bundle_says_to_export_standard(workdir, tiny_checkpoint):
    bundle = export(tiny_checkpoint, workdir / "ort-fp32", flavour="ort", dtype="fp32")
    result = subprocess.run([str(EDGECPM), "engine", "build", str(bundle)], capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "export it with --flavour standard (or --device <a GPU profile>)" in result.stderr


def test_plan_refuses_a_machine_without_tensorrt_or_gpu(standard_bundle):
    with pytest.raises(MissingDependencyError, match=r"needs the 'tensorrt' package: pip install 'edgecpm\[tensorrt\]'"):
        plan_build(standard_bundle, host=replace(ORIN, tensorrt_version=None))
    no_gpu = replace(ORIN, gpu_name=None, sm=None, gpu_problem="cuda-python is not installed; NVML is not installed")
    with pytest.raises(UnsupportedError, match="needs an NVIDIA GPU with CUDA, and none was found \\(cuda-python is not"):
        plan_build(standard_bundle, host=no_gpu)


def test_plan_takes_the_device_profile_and_checks_it_against_this_gpu(standard_bundle):
    plan = plan_build(standard_bundle, device="jetson-agx-orin-64gb", host=ORIN, prefill_max=16)
    assert plan.device == "jetson-agx-orin-64gb"
    assert plan.settings.strongly_typed and plan.settings.optimization_level == 3
    assert plan.settings.workspace_bytes == 4 * 2**30 and plan.settings.source == "profile jetson-agx-orin-64gb"
    assert plan.engine_file == "tensorrt/jetson-agx-orin-64gb-sm87-trt10.3.0.30.engine"
    assert plan.shape_profiles == optimization_profiles(read_manifest(standard_bundle), MAX_CONTEXT, 16)
    with pytest.raises(UnsupportedError, match="is for SM 8.7, this GPU is SM 8.9"):
        plan_build(standard_bundle, device="jetson-agx-orin-64gb", host=RTX)
    with pytest.raises(UnsupportedError, match="has no GPU"):
        plan_build(standard_bundle, device="x86-avx2", host=RTX)
    # Without --device (and no device in the bundle): this GPU's name, TensorRT's defaults.
    plan = plan_build(standard_bundle, host=RTX)
    assert plan.device == "nvidia-geforce-rtx-4090" and plan.settings.source == "TensorRT defaults"


def test_plan_refuses_to_replace_an_engine_without_overwrite(standard_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    for name in os.listdir(standard_bundle):
        (bundle / name).write_bytes((standard_bundle / name).read_bytes())
    record = record_for(ORIN)
    (bundle / "tensorrt").mkdir()
    (bundle / record.file).write_bytes(b"engine")
    write_manifest(bundle, with_engine(read_manifest(bundle), record))
    with pytest.raises(BundleError, match="pass --overwrite to rebuild it"):
        plan_build(bundle, device="jetson-agx-orin-64gb", host=ORIN)
    assert plan_build(bundle, device="jetson-agx-orin-64gb", host=ORIN, overwrite=True).replaces == record


# --- which engine runs here ------------------------------------------------------------------------------------


def test_engine_for_this_device_reasons(standard_bundle):
    manifest = read_manifest(standard_bundle)
    record, reason = engine_for_this_device(standard_bundle, manifest, host=ORIN)
    assert record is None and "the bundle has no TensorRT engine" in reason
    assert f"edgecpm engine build {standard_bundle} --device NAME" in reason

    pinned = replace(manifest, engines=[record_for(ORIN), record_for(RTX, device="rtx-4090")])
    assert engine_for_this_device(standard_bundle, pinned, host=ORIN) == (pinned.engines[0], "")
    assert engine_for_this_device(standard_bundle, pinned, host=RTX) == (pinned.engines[1], "")

    record, reason = engine_for_this_device(standard_bundle, pinned, host=replace(ORIN, tensorrt_version=None))
    assert record is None and "TensorRT is not installed" in reason and "pip install 'edgecpm[tensorrt]'" in reason
    record, reason = engine_for_this_device(standard_bundle, pinned, host=replace(ORIN, gpu_name=None, sm=None,
                                                                                  gpu_problem="cudaErrorNoDevice"))
    assert record is None and reason == "no CUDA GPU found (cudaErrorNoDevice)"

    newer = replace(ORIN, tensorrt_version="10.7.0.23")
    record, reason = engine_for_this_device(standard_bundle, pinned, host=newer)
    assert record is None
    assert "the engine for device jetson-agx-orin-64gb is pinned elsewhere" in reason
    assert "built with TensorRT 10.3.0.30, this machine has TensorRT 10.7.0.23" in reason
    assert reason.endswith(f"edgecpm engine build {standard_bundle} --device jetson-agx-orin-64gb")
    record, reason = engine_for_this_device(standard_bundle, pinned, host=replace(ORIN, l4t_release="36.5.0"))
    assert record is None and "L4T 36.4.3, this machine has L4T 36.5.0" in reason
    other_gpu = HostFacts(tensorrt_version="10.3.0.30", gpu_name="NVIDIA RTX A2000", sm="8.6", l4t_release=None)
    record, reason = engine_for_this_device(standard_bundle, pinned, host=other_gpu)
    assert record is None and "built for SM 8.7 (Orin), this GPU is SM 8.6" in reason


def test_the_runtime_package_imports_nothing_heavy():
    code = ("import sys, edgecpm.runtimes.tensorrt, edgecpm.exporters.tensorrt.build, edgecpm.exporters.tensorrt.pin; "
            "print(sorted(m for m in ('tensorrt', 'cuda', 'pynvml', 'onnx', 'torch') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# --- the standard graphs against TensorRT 10.x ------------------------------------------------------------------

GRAPH_CASES = [(key, dtype, quant) for key in [("minicpm", "dense"), ("minicpm", "untied"), ("minicpm", "longrope"),
                                               ("minicpm", "dynamic"), ("minicpm", "fatrelu"), ("minicpm", "moe"),
                                               ("llama", "dense"), ("llama", "llama3_rope"), ("minicpm3", "mla"),
                                               ("minicpm3", "mla_no_q_lora")]
               for dtype in ("fp32", "fp16") for quant in ("none", "int4", "int8")]
STRUCTURAL_RULES = {"operator", "opset", "type", "constant", "attribute"}


@pytest.fixture(scope="module")
def graphs(workdir):
    """(key, dtype, quant) -> model.onnx of the tiny checkpoint's standard export."""
    from tiny_models import TINY_CONFIGS, write_hf_checkpoint

    from edgecpm.quant.spec import QuantSpec

    assert {key for key, _, _ in GRAPH_CASES} == set(TINY_CONFIGS), "every tiny config is checked"
    pytest.importorskip("safetensors")
    pytest.importorskip("torch")  # write_hf_checkpoint writes safetensors through torch
    paths = {}
    for key, dtype, quant in GRAPH_CASES:
        checkpoint = workdir / "checkpoints" / "-".join(key)
        if not checkpoint.exists():
            write_hf_checkpoint(checkpoint, key)
        bundle = export(checkpoint, workdir / "graphs" / f"{'-'.join(key)}-{dtype}-{quant}", flavour="standard",
                        dtype=dtype, max_context=32, **({} if quant == "none" else {"quant": QuantSpec(quant)}))
        paths[key, dtype, quant] = bundle / "model.onnx"
    return paths


def _case_id(case) -> str:
    key, dtype, quant = case
    return f"{'-'.join(key)}-{dtype}-{quant}"


def test_the_operator_table_names_its_source():
    table = load_table(10)
    assert table.source["repository"] == "https://github.com/onnx/onnx-tensorrt"
    assert table.source["branch"] == "10.1-GA" and len(table.source["commit"]) == 40
    assert table_for_version("10.3.0.30").major == 10
    assert table_for_version("11.4.0.106") is None  # no 11.x matrix in edgecpm yet
    assert table.supports("MatMul") and table.supports("DequantizeLinear") and not table.supports("NonExistent")


@pytest.mark.parametrize("case", GRAPH_CASES, ids=_case_id)
def test_standard_graphs_use_only_operators_tensorrt_10_parses(graphs, case):
    findings = [f for f in check_model(graphs[case], load_table(10)) if f.rule in STRUCTURAL_RULES]
    assert findings == [], "; ".join(map(str, findings[:5]))
    if case[2] == "none":
        assert check_model(graphs[case], load_table(10)) == []


@pytest.mark.parametrize("case", [c for c in GRAPH_CASES if c[2] == "int4"], ids=_case_id)
def test_int4_linears_have_the_layout_of_tensorrt_weight_only_int4_gemm(graphs, case):
    import onnx

    model = onnx.load(str(graphs[case]), load_external_data=False)
    int4 = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT4}
    assert int4, "the int4 export stores INT4 initializers"
    layout = int4_weight_only_findings(graphs[case])
    assert layout == [], "; ".join(map(str, layout[:5]))


# TensorRT 10.x's DequantizeLinear rules (onnx_ops_trt10.toml [quantization], edgecpm.exporters.tensorrt.onnx_support):
# every scale strictly positive (the standard flavour's `tensorrt` layout does not take the Q4_0 rule's signed scales),
# and blocks for INT4 only: int8 linears and the int8/int6 embedding and head tables are per output channel.
@pytest.mark.parametrize("case", [c for c in GRAPH_CASES if c[2] != "none"], ids=_case_id)
def test_quantized_graphs_meet_tensorrt_10_dequantize_rules(graphs, case):
    import onnx

    findings = check_model(graphs[case], load_table(10))
    assert findings == [], "; ".join(map(str, findings[:5]))
    model = onnx.load(str(graphs[case]), load_external_data=False)
    initializers = {t.name: t for t in model.graph.initializer}
    dequantize = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert dequantize, "a quantized export dequantizes its weights"
    kinds = set()
    for node in dequantize:
        data, attributes = initializers[node.input[0]], {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        kinds.add(data.data_type)
        if data.data_type == onnx.TensorProto.INT8:  # per output channel: scales [N] along axis 1, no blocks
            assert "block_size" not in attributes and attributes["axis"] == 1
            assert list(initializers[node.input[1]].dims) == [data.dims[1]]
        else:
            assert data.data_type == onnx.TensorProto.INT4 and attributes["axis"] == 0 and attributes["block_size"] == 32
    # int4 exports: INT4 linears and int6 tables (8-bit codes); int8 exports: INT8 throughout
    assert kinds == ({onnx.TensorProto.INT8} if case[2] == "int8" else {onnx.TensorProto.INT4, onnx.TensorProto.INT8})


# --- on a machine with TensorRT and a GPU ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tensorrt_host():
    pytest.importorskip("tensorrt", reason="needs TensorRT (the 'tensorrt' package, 10.x or 11.x)")
    from edgecpm.exporters.tensorrt.pin import current_host

    host = current_host()
    if not host.has_gpu:
        pytest.skip(f"needs an NVIDIA GPU: {host.gpu_problem}")
    return host


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_engine_build_pins_the_engine_and_matches_onnxruntime(tensorrt_host, standard_bundle, tmp_path):
    from edgecpm.exporters.tensorrt.build import build_engine
    from edgecpm.runtimes import load_backend
    from edgecpm.runtimes.tensorrt.backend import TensorRTBackend

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    for name in os.listdir(standard_bundle):
        (bundle / name).write_bytes((standard_bundle / name).read_bytes())
    record = build_engine(bundle, prefill_max=16)
    manifest = read_manifest(bundle)
    assert manifest.engines == [record] and (bundle / record.file).is_file() and (bundle / TIMING_CACHE).is_file()
    assert (record.tensorrt_version, record.sm, record.gpu_name) == (tensorrt_host.tensorrt_version, tensorrt_host.sm,
                                                                      tensorrt_host.gpu_name)
    assert engine_for_this_device(bundle, manifest) == (record, "")
    reference, engine = load_backend(bundle, manifest, kernels="onnxruntime"), TensorRTBackend(bundle, manifest, record, verify=True)
    assert load_backend(bundle, manifest).kernels["decode"] == "tensorrt"  # auto picks the pinned engine
    prompt = np.array([5, 9, 11, 40, 7, 100, 3] * 4, np.int64)  # 28 tokens: two prefill chunks of at most 16
    ref, got = [reference.prefill(prompt)], [engine.prefill(prompt)]
    for _ in range(20):
        token = int(ref[-1].argmax())
        ref.append(reference.decode(token))
        got.append(engine.decode(token))
    assert engine.position == reference.position == len(prompt) + 20
    assert max(float(np.abs(r - g).max()) for r, g in zip(ref, got)) < 5e-2  # fp16 graph, two fp16 implementations
    engine.truncate(4)  # a chat turn that keeps the first 4 tokens
    reference.truncate(4)
    assert np.abs(engine.prefill(prompt[4:9]) - reference.prefill(prompt[4:9])).max() < 5e-2
    engine.close()
    # A second build for the same device needs --overwrite and replaces the record.
    with pytest.raises(BundleError, match="--overwrite"):
        build_engine(bundle, prefill_max=16)
    assert read_manifest(bundle).engines[0].device == build_engine(bundle, prefill_max=16, overwrite=True).device
