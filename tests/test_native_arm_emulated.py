"""The native kernels' aarch64 paths under emulation: qemu-user runs an aarch64 Python (scripts/arm-emulation.sh unpacks
one with numpy into a sysroot) that builds the kernels with the cross compiler, as build.py does on a board, and decodes
tiny bundles of every quantization (tests/emulated_decode.py). Each ISA level is forced in turn: a build for that
level's -march run on a qemu CPU model that has it (Cortex-A53: NEON only; Cortex-A76: dotprod; max: i8mm).

What is proven: every vectorised level's prefill and decode logits and KV rows equal the portable C build's bit for
bit, with int8 activations and with exact ones (`--kernels native-exact`); the aarch64 portable build equals the x86 portable build bit for bit and onnxruntime to the usual tolerances; a
library built for a wider ISA than the CPU's is refused by its HWCAP check instead of running into SIGILL. Emulated
runs say nothing about speed and are never timed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from edgecpm.export import export_checkpoint
from edgecpm.quant.plan import QuantizationWarning
from edgecpm.quant.spec import QuantSpec
from edgecpm.runtimes import load_backend
from edgecpm.runtimes.native.build import TARGET_ENV
from edgecpm.runtimes.native.decoder import PORTABLE_ENV
from emulated_decode import PROMPT
from test_native_kv_half import assert_conversions_are_numpys
from gguf_writer import Q, write_gguf
from tiny_models import write_hf_checkpoint

REPO = Path(__file__).resolve().parent.parent
DRIVER = Path(__file__).with_name("emulated_decode.py")
SYSROOT = Path(os.environ.get("EDGECPM_ARM64_SYSROOT", REPO / ".arm64-sysroot"))
CROSS_CC = "aarch64-linux-gnu-gcc"
FP32_ATOL = 1e-4  # as tests/test_native_decode.py
INT8_ACTIVATION_RTOL = 0.02
# level: (qemu CPU model, cross target, portable build, what ec_isa() reports)
LEVELS = {"portable": ("cortex-a53", "-march=armv8-a", True, "portable"),
          "neon": ("cortex-a53", "-march=armv8-a", False, "neon"),
          "dotprod": ("cortex-a76", "-march=armv8.2-a+dotprod", False, "neon-dotprod"),
          "i8mm": ("max", "-march=armv8.2-a+dotprod+i8mm", False, "neon-dotprod-i8mm")}
# (tiny model, scheme): 4-bit with 6-bit tables, zero points, 8-, 2- and 4-bit tables, float weights, tied and untied
BUNDLES = {("minicpm", "untied"): {"fp32": None, "int4": QuantSpec("int4"), "int4-asym": QuantSpec("int4", symmetric=False),
                                   "int8": QuantSpec("int8"), "ternary": QuantSpec("ternary", block_size=64),
                                   "int4-tables4": QuantSpec("int4", lm_head="int4", embeddings="int4")},
           ("llama", "dense"): {"int4": QuantSpec("int4")}}


def _emulator_missing() -> str | None:
    if not shutil.which("qemu-aarch64"):
        return "qemu-aarch64 not installed (bash scripts/arm-emulation.sh installs qemu-user)"
    if not shutil.which(CROSS_CC):
        return f"{CROSS_CC} not installed (bash scripts/arm-emulation.sh installs gcc-aarch64-linux-gnu)"
    if not _python():
        return f"no aarch64 Python in {SYSROOT} (bash scripts/arm-emulation.sh unpacks one)"
    return None


def _python() -> Path | None:
    found = sorted((SYSROOT / "usr" / "bin").glob("python3.[0-9]*"))
    return found[0] if found else None


pytestmark = pytest.mark.skipif(_emulator_missing() is not None, reason=f"aarch64 emulation: {_emulator_missing()}")


def run_driver(out: Path, bundles: list[Path], *, cache: Path, target: str, portable: bool, cpu: str | None) -> str:
    """tests/emulated_decode.py over `bundles` into `out`: under qemu with CPU model `cpu`, else on this machine's
    Python. Returns the kernels' ec_isa(), or why they were refused."""
    env = {**os.environ, "EDGECPM_CACHE_DIR": str(cache)}
    env.pop(PORTABLE_ENV, None)
    env.pop(TARGET_ENV, None)
    if portable:
        env[PORTABLE_ENV] = "1"
    command = [sys.executable]
    if cpu is not None:
        env.update({"CC": CROSS_CC, TARGET_ENV: target})
        command = ["qemu-aarch64", "-cpu", cpu, "-L", str(SYSROOT), str(_python())]
    subprocess.run([*command, str(DRIVER), str(REPO), str(out), *map(str, bundles)], env=env, check=True, timeout=600,
                   capture_output=True)
    return (out / "isa.txt").read_text()


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("arm_bundles")
    made = []
    for key, schemes in BUNDLES.items():
        source = root / "-".join(key)
        write_hf_checkpoint(source, key)
        for name, spec in schemes.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", QuantizationWarning)  # ternary of dense random weights is lossy on purpose
                made.append(export_checkpoint(source, root / f"{source.name}-{name}", flavour="ort", max_context=64,
                                              quant=spec, quality_tokens=16))
    # float zero points (a GGUF Q4_1 file's own blocks, like the embedded SmolLM2's): per-block offsets
    q4_1 = write_gguf(root / "q4_1.gguf", ("llama", "dense"), qtype=Q.Q4_1).path
    made.append(export_checkpoint(q4_1, root / "llama-dense-gguf-q4_1", flavour="ort", max_context=64,
                                  quant=QuantSpec("int4"), quality_tokens=16))
    return made


@pytest.fixture(scope="module")
def emulated(tmp_path_factory, bundles) -> dict[str, Path]:
    """Each ISA level's outputs (one qemu process per level, all bundles), plus the x86 portable build's."""
    root, cache = tmp_path_factory.mktemp("arm_emulated"), tmp_path_factory.mktemp("arm_kernels")
    outputs = {}
    for level, (cpu, target, portable, isa) in LEVELS.items():
        assert run_driver(root / level, bundles, cache=cache, target=target, portable=portable, cpu=cpu) == isa
        outputs[level] = root / level
    assert run_driver(root / "x86-portable", bundles, cache=cache, target="", portable=True, cpu=None) == "portable"
    outputs["x86-portable"] = root / "x86-portable"
    return outputs


def saved(directory: Path, bundle: Path) -> dict[str, np.ndarray]:
    with np.load(directory / f"{bundle.name}.npz") as data:
        return {name: data[name] for name in data.files}


@pytest.mark.parametrize("level", ["neon", "dotprod", "i8mm"])
def test_each_arm_isa_level_equals_the_portable_path_bit_for_bit(emulated, bundles, level):
    """NEON (widening multiplies), SDOT and SMMLA (prompts of 19 tokens: passes of 16 and 3, so token pairs and an odd
    token) leave the portable build's logits and KV rows exactly, for 2-, 4-, 6- and 8-bit streams, zero points,
    float weights; so do the exact-activation kernels (float inputs times codes decoded in the lanes)."""
    for bundle in bundles:
        reference, got = saved(emulated["portable"], bundle), saved(emulated[level], bundle)
        for name in ("logits", "kv", "exact_logits", "exact_kv", "half_logits", "half_kv"):
            np.testing.assert_array_equal(got[name], reference[name], err_msg=f"{bundle.name} {name}")


def test_half_cache_conversions_on_every_arm_level(emulated):
    """NEON's vcvt (and the portable build's own rounding) are numpy's binary16, ties to even, at every level."""
    for level in LEVELS:
        with np.load(emulated[level] / "conversions.npz") as data:
            assert_conversions_are_numpys({name: data[name] for name in data.files})


def test_arm_portable_path_is_x86s_and_onnxruntimes(emulated, bundles):
    """The aarch64 portable build computes what the x86 portable build does, bit for bit (one float order off
    AVX2, no libm in the linears), and what onnxruntime does to the tolerances of tests/test_native_decode.py."""
    for bundle in bundles:
        arm = saved(emulated["portable"], bundle)
        x86 = saved(emulated["x86-portable"], bundle)
        for name in ("logits", "exact_logits"):
            np.testing.assert_array_equal(arm[name], x86[name], err_msg=f"{bundle.name} {name}")
        graph = load_backend(bundle, kernels="onnxruntime", threads=1)
        expected = [graph.prefill(PROMPT)] + [graph.decode(int(row.argmax())) for row in arm["logits"][:-1]]
        error = max(float(np.abs(e - g).max()) for e, g in zip(expected, arm["logits"]))
        scale = max(float(np.abs(e).max()) for e in expected)
        assert error <= (FP32_ATOL if bundle.name.endswith("fp32") else INT8_ACTIVATION_RTOL * scale), bundle.name
        assert [int(e.argmax()) for e in expected] == [int(g.argmax()) for g in arm["logits"]], bundle.name


@pytest.mark.parametrize("cpu, target", [("cortex-a53", "-march=armv8.2-a+dotprod"),
                                         ("cortex-a76", "-march=armv8.2-a+dotprod+i8mm")])
def test_a_library_built_for_a_wider_isa_is_refused(tmp_path, bundles, cpu, target):
    """A cross build (or a cache shared between boards) for an ISA the CPU lacks: HWCAP says so before any kernel runs."""
    isa = run_driver(tmp_path / "out", bundles[:1], cache=tmp_path / "cache", target=target, portable=False, cpu=cpu)
    assert isa.startswith("refused:") and "which this CPU lacks (HWCAP)" in isa
    assert not (tmp_path / "out" / f"{bundles[0].name}.npz").exists()
