"""A missing optional package is reported as missing (with the extra that installs it), never as bad input.

The CLI runs in a subprocess where `gguf` cannot be imported, blocked two ways: a module of that name on
PYTHONPATH that raises ImportError when imported (what a broken or absent install looks like to
`import gguf`), and `sys.modules["gguf"] = None` (what `importlib` reports for a module that is not there).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgecpm.errors import EdgecpmError, MissingDependencyError
from edgecpm.optional import EXTRAS, require

gguf_writer = pytest.importorskip("gguf_writer")  # needs gguf itself to write the file

KEY = ("llama", "dense")
INSTALL_EXPORT = "pip install 'edgecpm[export]'"


def _blocked_by_stub(tmp_path: Path, module: str, args: list[str]) -> subprocess.CompletedProcess:
    stubs = tmp_path / "stubs"
    stubs.mkdir(exist_ok=True)
    (stubs / f"{module}.py").write_text(f"raise ImportError('{module} is not installed (test stub)')\n", encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(stubs), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run([sys.executable, "-m", "edgecpm", *args], capture_output=True, text=True, env=env, timeout=300)


def _blocked_in_sys_modules(tmp_path: Path, module: str, args: list[str]) -> subprocess.CompletedProcess:
    wrapper = f"import sys\nsys.modules[{module!r}] = None\nfrom edgecpm.cli import main\nmain()\n"
    return subprocess.run([sys.executable, "-c", wrapper, *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("block", [_blocked_by_stub, _blocked_in_sys_modules], ids=["stub-module", "sys-modules"])
def test_inspect_gguf_without_gguf_names_the_export_extra(tmp_path, block):
    path = gguf_writer.write_gguf(tmp_path / "m.gguf", KEY).path
    result = block(tmp_path, "gguf", ["inspect", str(path)])
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0] == f"error: reading GGUF files needs the 'gguf' package: {INSTALL_EXPORT}"
    assert "damaged" not in lines[0] and "truncated" not in lines[0]


def test_the_same_file_inspects_with_gguf_installed(tmp_path):
    path = gguf_writer.write_gguf(tmp_path / "m.gguf", KEY).path
    result = subprocess.run([sys.executable, "-m", "edgecpm", "inspect", str(path)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr


def test_require_names_the_package_and_extra():
    assert require("numpy").__name__ == "numpy"
    with pytest.raises(MissingDependencyError) as info:
        require("edgecpm_no_such_module", "export", "testing")
    assert str(info.value) == f"testing needs the 'edgecpm_no_such_module' package: {INSTALL_EXPORT}"
    assert isinstance(info.value, EdgecpmError)  # the CLI prints it as one line, exit code 1
    assert EXTRAS["pynvml"] == "devices" and EXTRAS["tensorrt"] == "tensorrt" and EXTRAS["torch"] == "reference"


def test_require_names_the_pypi_package_where_it_differs(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with pytest.raises(MissingDependencyError, match=r"the 'nvidia-ml-py' package: pip install 'edgecpm\[devices\]'"):
        require("pynvml", purpose="detecting GPUs")


def test_a_broken_dependency_of_the_package_is_named(tmp_path, monkeypatch):
    (tmp_path / "edgecpm_fake_pkg.py").write_text("import edgecpm_fake_missing_dep\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MissingDependencyError, match=r"needs the 'edgecpm_fake_pkg' package: pip install edgecpm_fake_pkg "
                                                     r"\(importing it failed: No module named 'edgecpm_fake_missing_dep'\)"):
        require("edgecpm_fake_pkg", purpose="testing")
