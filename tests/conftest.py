"""Bundles shared by several test modules, exported once per session."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from reference_backend import single_torch_thread
from tiny_models import write_hf_checkpoint

# Long enough for a tool description rendered byte by byte (the tiny tokenizer has one token per byte).
LONG_TINY_CONTEXT = 2048
TINY_MAX_CONTEXT = 256  # the tiny models' max_position_embeddings


@pytest.fixture(scope="session")
def smollm2_bundle(tmp_path_factory):
    """The real SmolLM2-135M-Instruct exported through the CLI, as a user would."""
    from edgecpm.resources import default_model_path

    bundle = tmp_path_factory.mktemp("smollm2") / "bundle"
    exported = subprocess.run([sys.executable, "-m", "edgecpm", "export", str(default_model_path()), "-o", str(bundle),
                               "--max-context", "512"], capture_output=True, text=True, timeout=600)
    assert exported.returncode == 0, exported.stderr
    return bundle


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict:
    """The tiny random MiniCPM's checkpoint and its fp32 and int8 `ort` bundles (native kernels: int8 prefills)."""
    from edgecpm.export import export_checkpoint
    from edgecpm.quant.spec import QuantSpec

    root = tmp_path_factory.mktemp("tiny_minicpm")
    checkpoint = write_hf_checkpoint(root / "checkpoint", ("minicpm", "untied"))
    bundles = {scheme: export_checkpoint(checkpoint, root / scheme, flavour="ort", dtype="fp32",
                                         max_context=TINY_MAX_CONTEXT, quant=None if scheme == "fp32" else QuantSpec(scheme))
               for scheme in ("fp32", "int8")}
    return {"checkpoint": checkpoint, **bundles}


@pytest.fixture(scope="session")
def tiny_long_bundle(tmp_path_factory):
    """The tiny random MiniCPM with a 2048-token context: fast, and a model whose output only the
    constraints can make well-formed."""
    from edgecpm.export import export_checkpoint

    directory = tmp_path_factory.mktemp("tiny_long")
    checkpoint = write_hf_checkpoint(directory / "checkpoint", ("minicpm", "untied"))
    config_path = checkpoint / "config.json"
    config = json.loads(config_path.read_text())
    config["max_position_embeddings"] = LONG_TINY_CONTEXT
    config_path.write_text(json.dumps(config))
    with single_torch_thread():
        return export_checkpoint(checkpoint, directory / "bundle", flavour="ort", dtype="fp32", max_context=LONG_TINY_CONTEXT)
