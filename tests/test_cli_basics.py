import json
import subprocess
import sys

import pytest

from edgecpm.resources import default_model_path

EDGECPM = [sys.executable, "-m", "edgecpm"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*EDGECPM, *args], capture_output=True, text=True, timeout=300)


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("edgecpm ")


def test_missing_path_is_one_line_error():
    result = run_cli("inspect", "/definitely/not/here")
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0
    assert "/definitely/not/here" in result.stderr
    assert "Traceback" not in result.stderr


def test_inspect_smollm2_gguf_json():
    result = run_cli("inspect", str(default_model_path()), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["architecture"] == "llama"
    assert report["format"] == "gguf"
    assert report["layers"] == 30 and report["hidden_size"] == 576
    assert report["attention_heads"] == 9 and report["kv_heads"] == 3
    assert report["vocab_size"] == 49152
    assert report["tied_embeddings"] is True
    assert report["rope_theta"] == pytest.approx(100000.0)
    assert report["context_length"] == 8192
    assert report["tokenizer"] and report["chat_template"]
    # 2 (K,V) x 30 layers x 3 kv heads x 64 dims x 2 bytes
    assert report["kv_bytes_per_token"]["fp16"] == 2 * 30 * 3 * 64 * 2
    assert 134_000_000 < report["parameters"] < 135_000_000
    assert "Q4_1" in report["quantization"]
