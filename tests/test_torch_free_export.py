"""A quantized export needs no torch: its quality gate's reference is the fp32 graph on onnxruntime.

The CLI runs in a subprocess where `import torch` (and safetensors, the rest of the `reference` extra) fails
as it does where they are not installed: `sys.modules[name] = None` makes the import raise and
`importlib.util.find_spec` answer None, so nothing (transformers included) believes they are there. The
recorded numbers are then checked against the PyTorch reference computed here, in-process.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from edgecpm.bundle import TOKENIZER_NAME, read_manifest
from edgecpm.checkpoint import open_checkpoint
from edgecpm.quant.quality import REFERENCE, backend_logits, compare, evaluation_text, reference_logits
from edgecpm.runtimes import load_backend
from edgecpm.text import TextTokenizer
from tiny_models import write_hf_checkpoint

pytest.importorskip("torch")  # for the in-process PyTorch reference (and the checkpoint writer)

BLOCKED = ("torch", "safetensors")
KEY = ("llama", "dense")
MAX_CONTEXT = 64
QUALITY_TOKENS = 32


def run_without(blocked, *args: str) -> subprocess.CompletedProcess:
    """`edgecpm ARGS` in a fresh interpreter where the `blocked` modules cannot be imported."""
    wrapper = (f"import sys\nfor name in {tuple(blocked)!r}:\n    sys.modules[name] = None\n"
               "from edgecpm.cli import main\nmain()\n")
    return subprocess.run([sys.executable, "-c", wrapper, *args], capture_output=True, text=True, timeout=600)


def test_the_blocker_blocks():
    probe = ("import importlib.util, sys\nfor name in ('torch', 'safetensors'):\n    sys.modules[name] = None\n"
             "assert importlib.util.find_spec('torch') is None\n"
             "try:\n    import torch\nexcept ImportError:\n    print('blocked')\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "blocked", result.stderr


def test_quantized_export_without_torch_records_the_pytorch_reference_numbers(tmp_path):
    source = write_hf_checkpoint(tmp_path / "m", KEY)
    out = tmp_path / "bundle"
    result = run_without(BLOCKED, "export", str(source), "-o", str(out), "--max-context", str(MAX_CONTEXT),
                         "--quant", "int4", "--quality-tokens", str(QUALITY_TOKENS))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "m"]  # the reference graph is gone

    manifest = read_manifest(out)
    quality = manifest.quantization["quality"]
    assert quality["reference"] == REFERENCE == "fp32 graph on onnxruntime"
    assert quality["tokens"] == QUALITY_TOKENS - 1

    # The same measurement with the PyTorch reference, in this process.
    checkpoint = open_checkpoint(source)
    tokenizer = TextTokenizer.from_file(out / TOKENIZER_NAME, manifest.tokenizer)
    ids = np.asarray(tokenizer.encode(evaluation_text())[:QUALITY_TOKENS], dtype=np.int64)
    expected = compare(reference_logits(checkpoint, ids), backend_logits(load_backend(out, manifest), ids), ids)
    assert quality["reference_perplexity"] == pytest.approx(expected.reference_perplexity, rel=1e-3)
    assert quality["perplexity"] == pytest.approx(expected.perplexity, rel=1e-3)
    assert quality["mean_kl"] == pytest.approx(expected.mean_kl, rel=1e-2, abs=1e-6)

    inspected = run_without(BLOCKED, "inspect", str(out), "--json")
    assert inspected.returncode == 0, inspected.stderr
    assert json.loads(inspected.stdout)["quality"]["reference"] == REFERENCE


def test_gptq_without_torch_names_the_reference_extra(tmp_path):
    source = write_hf_checkpoint(tmp_path / "m", KEY)
    result = run_without(BLOCKED, "export", str(source), "-o", str(tmp_path / "out"), "--max-context", str(MAX_CONTEXT),
                         "--quant", "int4", "--method", "gptq")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "--method gptq" in lines[0] and "pip install 'edgecpm[reference]'" in lines[0]
    assert not (tmp_path / "out").exists()
