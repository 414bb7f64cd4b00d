"""Optional dependencies: a missing one is reported as missing, naming the pip extra that installs it.

    gguf = require("gguf", "export", "reading GGUF files")

raises, when gguf cannot be imported, `MissingDependencyError`:
`reading GGUF files needs the 'gguf' package: pip install 'edgecpm[export]'` (one line, exit code 1 on the CLI).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from edgecpm.errors import MissingDependencyError

# Top-level module -> the extra of pyproject.toml that installs it.
EXTRAS = {
    "gguf": "export", "onnx": "export", "transformers": "export", "sentencepiece": "export",
    "torch": "reference", "safetensors": "reference",
    "tensorrt": "tensorrt", "cuda": "tensorrt",
    "pynvml": "devices",
    "uvicorn": "serve", "starlette": "serve", "sse_starlette": "serve", "llguidance": "serve",
}
# Where the distribution on PyPI is named differently from the module it installs.
PACKAGES = {"pynvml": "nvidia-ml-py", "cuda": "cuda-python", "sse_starlette": "sse-starlette"}


def require(module: str, extra: str | None = None, purpose: str | None = None) -> ModuleType:
    """Imports and returns `module`, or raises MissingDependencyError naming its package and extra.

    `extra` defaults to the one EXTRAS lists for the top-level module; `purpose` says what needs it
    ("reading GGUF files"). Any ImportError counts as missing: a broken install is as unusable as none,
    and when the failure is in another module than the one asked for, the message names that one too.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        root = module.partition(".")[0]
        package = PACKAGES.get(root, root)
        extra = extra or EXTRAS.get(root)
        install = f"pip install 'edgecpm[{extra}]'" if extra else f"pip install {package}"
        failed = getattr(exc, "name", None)
        cause = "" if failed in (None, root, module) else f" (importing it failed: {str(exc).splitlines()[0][:120]})"
        raise MissingDependencyError(f"{purpose or module} needs the '{package}' package: {install}{cause}") from exc
