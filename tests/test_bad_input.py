"""Every bad input is one line on stderr naming the file and the field or tensor, exit code 1, no traceback;
`--debug` shows the traceback instead. The CLI runs as users run it, in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy_safetensors

from edgecpm.cli import main
from edgecpm.errors import EdgecpmError
from gguf_writer import Q, write_gguf
from tiny_models import TINY_CONFIGS, random_tensors, write_hf_checkpoint

KEY = ("minicpm", "dense")
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


def hf_dir(tmp_path: Path) -> Path:
    return write_hf_checkpoint(tmp_path / "ckpt", KEY)


DELETE = object()  # a config value that means "leave the field out"


def with_config(tmp_path: Path, **changes) -> Path:
    directory = hf_dir(tmp_path)
    config = {**TINY_CONFIGS[KEY], **changes}
    (directory / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not DELETE}))
    return directory


def with_tensors(tmp_path: Path, change: Callable[[dict], None]) -> Path:
    directory = hf_dir(tmp_path)
    tensors = random_tensors(KEY)
    change(tensors)
    save_numpy_safetensors(tensors, str(directory / "model.safetensors"))
    return directory


def truncated(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def sharded(tmp_path: Path, shard_name: str) -> Path:
    directory = hf_dir(tmp_path)
    (directory / "model.safetensors").rename(directory / "model-00001-of-00002.safetensors")
    weight_map = {name: "model-00001-of-00002.safetensors" for name in random_tensors(KEY)}
    weight_map[Q_PROJ] = shard_name
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return directory


def missing_config(tmp_path):
    directory = hf_dir(tmp_path)
    (directory / "config.json").unlink()
    return directory, [str(directory), "config.json"]


def malformed_config(tmp_path):
    directory = hf_dir(tmp_path)
    (directory / "config.json").write_text('{"model_type": "minicpm", "hidden_size": 64,,}')
    return directory, ["config.json", "invalid JSON", "line 1"]


def missing_field(tmp_path):
    return with_config(tmp_path, hidden_size=DELETE), ["config.json", "hidden_size", "missing"]


def wrong_type(tmp_path):
    return with_config(tmp_path, num_hidden_layers="abc"), ["config.json", "num_hidden_layers", "expected int", "abc"]


def unknown_model_type(tmp_path):
    return with_config(tmp_path, model_type="gpt_neox"), ["config.json", "model_type", "gpt_neox"]


def unsupported_rope(tmp_path):
    directory = with_config(tmp_path, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    return directory, ["config.json", "rope_scaling", "rope_type", "yarn"]


def quantization_config(tmp_path):
    directory = with_config(tmp_path, quantization_config={"quant_method": "awq", "bits": 4})
    return directory, ["config.json", "quantization_config", "awq"]


def shape_mismatch(tmp_path):
    def change(tensors):
        tensors[Q_PROJ] = tensors[Q_PROJ][:, :32].copy()

    return with_tensors(tmp_path, change), ["model.safetensors", Q_PROJ, "[64, 32]", "[64, 64]"]


def missing_tensor(tmp_path):
    return with_tensors(tmp_path, lambda tensors: tensors.pop(Q_PROJ)), [str(tmp_path / "ckpt"), Q_PROJ, "missing"]


def extra_tensor(tmp_path):
    def change(tensors):
        tensors["model.layers.0.self_attn.q_norm.weight"] = np.ones(16, np.float32)

    return with_tensors(tmp_path, change), ["model.safetensors", "model.layers.0.self_attn.q_norm.weight", "unexpected"]


def truncated_safetensors(tmp_path):
    directory = hf_dir(tmp_path)
    truncated(directory / "model.safetensors")
    return directory, ["model.safetensors", "truncated", ".weight"]


def garbage_safetensors(tmp_path):
    directory = hf_dir(tmp_path)
    (directory / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
    return directory, ["model.safetensors", "header"]


def garbage_safetensors_header(tmp_path):
    directory = hf_dir(tmp_path)
    path = directory / "model.safetensors"
    data = path.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    path.write_bytes(data[:8] + np.random.default_rng(1).bytes(header_len) + data[8 + header_len :])
    return directory, ["model.safetensors", "header is not valid JSON"]


def missing_shard(tmp_path):
    directory = sharded(tmp_path, "model-00002-of-00002.safetensors")
    return directory, ["model.safetensors.index.json", "weight_map", "model-00002-of-00002.safetensors", "missing"]


def shard_outside_directory(tmp_path):
    directory = sharded(tmp_path, "../../etc/passwd")
    return directory, ["model.safetensors.index.json", "weight_map", "../../etc/passwd", "outside"]


class WritesMarker:
    """Unpickling this calls open(marker, "w"), creating the file: code execution if it ever runs."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def pickle_with_code(tmp_path):
    directory = hf_dir(tmp_path)
    (directory / "model.safetensors").unlink()
    state = {name: torch.from_numpy(array) for name, array in random_tensors(KEY).items()}
    state["model.layers.0.self_attn.q_proj.weight"] = WritesMarker(tmp_path / "marker")
    torch.save(state, directory / "pytorch_model.bin")
    return directory, ["pytorch_model.bin", "weights_only"]


def gguf_unknown_architecture(tmp_path):
    return write_gguf(tmp_path / "m.gguf", KEY, architecture="falcon").path, ["m.gguf", "general.architecture", "falcon"]


def gguf_unsupported_quant(tmp_path):
    # Q8_1 is llama.cpp's activation format: gguf-py reads its layout but cannot dequantize it.
    block_size, type_size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
    data = np.zeros((96, 64 // block_size * type_size), dtype=np.uint8)
    path = write_gguf(tmp_path / "m.gguf", KEY, raw_tensors={"blk.0.ffn_up.weight": (data, Q.Q8_1)}).path
    return path, ["m.gguf", "blk.0.ffn_up.weight", "Q8_1"]


def gguf_truncated(tmp_path):
    return truncated(write_gguf(tmp_path / "m.gguf", KEY).path), ["m.gguf", "truncated"]


def gguf_garbage_after_magic(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + np.random.default_rng(2).bytes(4096))
    return path, ["m.gguf", "GGUF"]


CASES = [missing_config, malformed_config, missing_field, wrong_type, unknown_model_type, unsupported_rope, quantization_config,
         shape_mismatch, missing_tensor, extra_tensor, truncated_safetensors, garbage_safetensors, garbage_safetensors_header,
         missing_shard, shard_outside_directory, pickle_with_code, gguf_unknown_architecture, gguf_unsupported_quant,
         gguf_truncated, gguf_garbage_after_magic]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "edgecpm", *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_bad_input_is_one_line_error(tmp_path: Path, case):
    path, expected = case(tmp_path)
    result = run_cli("inspect", str(path))

    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr
    for text in expected:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"
    assert not (tmp_path / "marker").exists(), "unpickling ran code from the checkpoint"

    # `--debug` lets the same error propagate (in-process here; the subprocess test below shows the traceback).
    with pytest.raises(EdgecpmError) as raised:
        main(["--debug", "inspect", str(path)])
    assert f"error: {raised.value}" == lines[0]
    assert not (tmp_path / "marker").exists()


def test_debug_prints_the_traceback(tmp_path: Path):
    path, _ = unknown_model_type(tmp_path)
    result = run_cli("--debug", "inspect", str(path))
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("edgecpm.errors.UnsupportedError: ")
