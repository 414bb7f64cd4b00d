"""`export --device`: every shipped profile yields a bundle that records the profile and runs here with the
reference's answer; exports that cannot fit are refused in one line before anything is written."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgecpm.bundle import read_manifest
from edgecpm.checkpoint import open_checkpoint
from edgecpm.devices.profile import list_profiles, load_profile
from edgecpm.models import reference_model
from edgecpm.quant.plan import quantized_weights
from edgecpm.quant.spec import QuantSpec
from edgecpm.runtimes import load_backend
from tiny_models import write_hf_checkpoint

PROMPT = np.array([5, 9, 11, 40, 7, 100, 3], dtype=np.int64)
DECODE_STEPS = 8
# Largest |logit| difference against the reference on the bundle's own (dequantized) weights: fp32 graphs
# agree to rounding; fp16 graphs (the GPU profiles' standard flavour) round every activation to fp16.
# The CPU profiles' int4 bundles compute with int8 activations (MatMulNBits accuracy level 4, the kernels' arithmetic):
# within 2% of the largest logit, as tests/test_native_decode.py holds them.
ATOL = {"fp32": 1e-4, "fp16": 3e-2}
INT8_ACTIVATION_RTOL = 0.02
MODEL = ("minicpm", "dense")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "edgecpm", *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("device_export")


@pytest.fixture(scope="module")
def tiny(workdir) -> Path:
    return write_hf_checkpoint(workdir / "tiny", MODEL)


def max_difference(checkpoint, bundle: Path) -> float:
    """The bundle's backend against the reference on the weights the manifest says it stores, greedy steps."""
    manifest = read_manifest(bundle)
    spec = QuantSpec.from_dict(manifest.quantization) if manifest.quantization else None
    weights = quantized_weights(checkpoint, spec, manifest.quantization["tensors"]) if spec else None
    model = reference_model(checkpoint, weights) if weights else reference_model(checkpoint)
    backend, cache = load_backend(bundle, threads=1), model.new_cache()
    with torch.no_grad():
        expected = [model(torch.from_numpy(PROMPT)[None], cache)[0, -1].numpy()]
        got = [backend.prefill(PROMPT)]
        for _ in range(DECODE_STEPS):
            token = int(expected[-1].argmax())
            expected.append(model(torch.tensor([[token]]), cache)[0, -1].numpy())
            got.append(backend.decode(token))
    difference = max(float(np.abs(e - g).max()) for e, g in zip(expected, got))
    if (manifest.quantization or {}).get("accuracy_level") == 4:
        return difference / max(float(np.abs(e).max()) for e in expected) * ATOL[manifest.precision] / INT8_ACTIVATION_RTOL
    return difference


@pytest.mark.parametrize("device", list_profiles())
def test_export_for_each_profile_records_it_and_runs_here(workdir, tiny, device):
    out = workdir / f"bundle-{device}"
    result = run_cli("export", str(tiny), "--device", device, "-o", str(out), "--quality-tokens", "16")
    assert result.returncode == 0, result.stderr
    profile, manifest = load_profile(device), read_manifest(out)
    assert (manifest.device.name, manifest.device.version, manifest.device.sha256) == (profile.name, profile.version, profile.sha256)
    assert manifest.device.chosen_by == {"flavour": "profile", "dtype": "profile", "quant": "profile", "max_context": "plan"}
    assert (manifest.flavour, manifest.precision) == (profile.export.flavour, profile.export.dtype)
    assert manifest.quantization["scheme"] == profile.export.weights
    if profile.export.flavour == "standard":  # TensorRT's INT4 is symmetric and weight-only
        assert manifest.quantization["symmetric"] is True
    assert manifest.max_context == 256  # the tiny model's own limit: the plan fits far more
    assert manifest.device.memory_plan["context"] == 256 and manifest.device.memory_plan["fits"]
    assert max_difference(open_checkpoint(tiny), out) <= ATOL[manifest.precision]
    run = run_cli("run", str(out), "--prompt", "Hi", "--max-new-tokens", "4", "--json")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["new_tokens"] >= 1


def test_explicit_flags_win_over_the_profile_and_are_recorded(workdir, tiny):
    out = workdir / "flags-win"
    result = run_cli("export", str(tiny), "--device", "rtx-4090", "--flavour", "ort", "--dtype", "fp32", "--quant", "int8",
                     "--max-context", "64", "-o", str(out), "--quality-tokens", "16")
    assert result.returncode == 0, result.stderr
    manifest = read_manifest(out)
    assert (manifest.flavour, manifest.precision, manifest.quantization["scheme"], manifest.max_context) == ("ort", "fp32", "int8", 64)
    assert manifest.device.name == "rtx-4090" and set(manifest.device.chosen_by.values()) == {"flag"}


def write_sparse_safetensors(directory: Path, config: dict, shapes: dict[str, tuple[int, ...]]) -> Path:
    """A checkpoint with real headers and sizes whose data is a hole in the file: a multi-GB model on no disk."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config))
    header, offset = {}, 0
    for name, shape in shapes.items():
        length = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + length]}
        offset += length
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = directory / "model.safetensors"
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        handle.truncate(8 + len(raw) + offset)
    return directory


def test_an_8b_fp16_export_for_the_orin_nano_is_refused_in_one_line_naming_int4(workdir):
    from edgecpm.arch import get_architecture
    from edgecpm.arch.fields import ConfigFields
    from test_planner import MINICPM4_8B

    config = {**MINICPM4_8B, "torch_dtype": "bfloat16", "tie_word_embeddings": False}
    parsed = get_architecture("minicpm").parse_config(ConfigFields(config, "config.json"), frozenset({"lm_head.weight"}))
    shapes = get_architecture("minicpm").tensor_shapes(parsed)
    source = write_sparse_safetensors(workdir / "minicpm4-8b", config, shapes)
    out = workdir / "nano-8b"
    result = run_cli("export", str(source), "--device", "jetson-orin-nano-8gb", "--quant", "none", "-o", str(out))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "15.25 GiB" in lines[0] and "jetson-orin-nano-8gb" in lines[0] and "--quant int4 would fit" in lines[0]
    assert not out.exists() and not list(workdir.glob(".nano-8b*"))
    plan = run_cli("inspect", str(source), "--device", "jetson-orin-nano-8gb", "--json")
    assert plan.returncode == 0, plan.stderr
    memory = json.loads(plan.stdout)["memory_plan"]
    assert not memory["alternatives"]["fp16"]["fits"] and memory["alternatives"]["int4 weights, fp16"]["fits"]
    assert memory["export"]["memory"]["storage"] == "int4 weights, fp16"  # the profile's own choice fits


@pytest.mark.parametrize("device, message", [
    ("no-such-board", "no-such-board"),
    ("{bad}", "{bad}"),
])
def test_unknown_profiles_are_one_line_errors(workdir, tiny, device, message):
    result = run_cli("export", str(tiny), "--device", device, "-o", str(workdir / "never"))
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
    assert not (workdir / "never").exists()


def test_a_malformed_user_profile_names_file_and_field(workdir, tiny):
    board = workdir / "my-board.toml"
    text = (Path(load_profile("x86-avx2").path).read_text()).replace("\n[export]\n", "\n[export]\nturbo = true\n")
    board.write_text(text)
    result = run_cli("export", str(tiny), "--device", str(board), "-o", str(workdir / "never"))
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "my-board.toml" in result.stderr and "export.turbo" in result.stderr
    good = workdir / "good-board.toml"
    good.write_text(Path(load_profile("x86-avx2").path).read_text().replace('name = "x86-avx2"', 'name = "good-board"'))
    out = workdir / "user-board"
    assert run_cli("export", str(tiny), "--device", str(good), "-o", str(out), "--quality-tokens", "16").returncode == 0
    assert read_manifest(out).device.name == "good-board"
