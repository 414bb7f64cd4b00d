"""Compiles kernels.c for this CPU on first use and loads it with ctypes (no build step at install time).

The library is built with `-march=native` (edge devices run what their own compiler tunes for them) and
cached per source, compiler flags and CPU feature set under $EDGECPM_CACHE_DIR, else
$XDG_CACHE_HOME/edgecpm, else ~/.cache/edgecpm. Concurrent first uses each compile to a temporary file and
rename it into place, so a half-written library is never loaded.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

SOURCE = Path(__file__).with_name("kernels.c")
INCLUDED = (Path(__file__).with_name("infllmv2.c"),)  # #included by SOURCE: part of what keys the cached build
# The opt-in build with per-phase timers in ec_decode (`edgecpm profile`); its flags key its own cached library.
PHASE_TIMER_FLAGS = ("-DEC_PHASE_TIMERS",)
# Tried in order: -march=native, then -mcpu=native (what some ARM and POWER compilers take instead). Not on x86, where
# -mcpu=native is only a deprecated -mtune: an error in kernels.c would otherwise build, silently, without the vector paths.
FLAG_SETS = (["-O3", "-march=native", "-fopenmp", "-fno-math-errno"], ["-O3", "-mcpu=native", "-fopenmp", "-fno-math-errno"])
X86_MACHINES = ("x86_64", "amd64", "i386", "i686")
# aarch64: the NEON kernels equal the portable C's float order only where the compiler fuses nothing it is not told to.
ARM_FLAGS = ("-ffp-contract=off",)
# The portable C build (no vector intrinsics): the reference the vectorised paths off x86 equal bit for bit.
PORTABLE_FLAGS = ("-DEC_PORTABLE", "-ffp-contract=off")
# A target instead of this CPU's own (e.g. "-march=armv8.2-a+dotprod"): cross builds, and each ISA level under emulation.
TARGET_ENV = "EDGECPM_NATIVE_TARGET"
ARM_MACHINES = ("aarch64", "arm64")
HWCAP_KEYS = (16, 26)  # getauxval's AT_HWCAP, AT_HWCAP2: what an aarch64 CPU (or qemu's model of one) offers


class KernelsUnavailable(RuntimeError):
    """Why the native kernels cannot be used here (no compiler, failed build, unsupported bundle)."""


def cache_dir() -> Path:
    if os.environ.get("EDGECPM_CACHE_DIR"):
        return Path(os.environ["EDGECPM_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "edgecpm"


def _hwcaps() -> str:
    """The aarch64 HWCAP words (emulators report their CPU model's here, not in /proc/cpuinfo); empty elsewhere."""
    if platform.machine().lower() not in ARM_MACHINES:
        return ""
    try:
        getauxval = ctypes.CDLL(None).getauxval
    except (OSError, AttributeError):
        return ""
    getauxval.restype, getauxval.argtypes = ctypes.c_ulong, [ctypes.c_ulong]
    return " hwcaps " + " ".join(hex(getauxval(key)) for key in HWCAP_KEYS)


def _flag_sets() -> list[list[str]]:
    """FLAG_SETS as this machine compiles them (x86: the first alone): with $EDGECPM_NATIVE_TARGET in place of
    -march/-mcpu=native (one set, then), and ARM_FLAGS on aarch64."""
    target = os.environ.get(TARGET_ENV, "").split()
    extra = list(ARM_FLAGS) if platform.machine().lower() in ARM_MACHINES else []
    if target:
        return [[*target, *(f for f in FLAG_SETS[0] if not f.startswith(("-march=", "-mcpu="))), *extra]]
    sets = FLAG_SETS[:1] if platform.machine().lower() in X86_MACHINES else FLAG_SETS
    return [flags + extra for flags in sets]


def _cpu_features() -> str:
    return _cpuinfo_features() + _hwcaps()


def _cpuinfo_features() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    raise KernelsUnavailable("no C compiler found (install gcc, or set CC)")


@cache
def load_library(extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """The kernels for this CPU; `extra_flags` (e.g. ("-mno-avxvnni", "-mno-avx512vnni")) build a variant."""
    try:
        return _build_and_load(list(extra_flags))
    except OSError as error:  # unwritable cache directory, a library the loader refuses
        raise KernelsUnavailable(f"native kernels: {error}") from None


def _build_and_load(extra_flags: list[str]) -> ctypes.CDLL:
    compiler = _compiler()
    source = b"\0".join(path.read_bytes() for path in (SOURCE, *INCLUDED))
    errors = []
    for flags in _flag_sets():
        flags = flags + extra_flags
        key = hashlib.sha256(b"\0".join([source, compiler.encode(), " ".join(flags).encode(), platform.machine().encode(),
                                         _cpu_features().encode()])).hexdigest()[:16]
        target = cache_dir() / f"kernels-{key}.so"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as staging:
                built = Path(staging) / target.name
                result = subprocess.run([compiler, *flags, "-shared", "-fPIC", "-o", str(built), str(SOURCE), "-lm"],
                                        capture_output=True, text=True)
                if result.returncode != 0:
                    errors.append(result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed")
                    continue
                os.replace(built, target)
        library = ctypes.CDLL(str(target))
        library.ec_state_new.restype = ctypes.c_void_p
        library.ec_state_new.argtypes = [ctypes.c_void_p]
        library.ec_state_free.restype = None
        library.ec_state_free.argtypes = [ctypes.c_void_p]
        library.ec_decode.restype = ctypes.c_int
        library.ec_decode.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
        library.ec_prefill.restype = ctypes.c_int
        library.ec_prefill.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                       ctypes.c_void_p]
        for name in ("ec_forget", "ec_call_length"):
            getattr(library, name).restype = None
            getattr(library, name).argtypes = [ctypes.c_void_p, ctypes.c_int]
        for name in ("ec_floats_to_halves", "ec_halves_to_floats"):
            getattr(library, name).restype = None
            getattr(library, name).argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        library.ec_key_scores.restype = None
        library.ec_key_scores.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_float,
                                          ctypes.c_void_p]
        library.ec_exp_shifted.restype = ctypes.c_float
        library.ec_exp_shifted.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_float]
        library.ec_can_prefill.restype = ctypes.c_int
        library.ec_can_prefill.argtypes = [ctypes.c_void_p]
        library.ec_vectorised.restype = ctypes.c_int
        library.ec_vectorised.argtypes = []
        library.ec_isa.restype = ctypes.c_char_p
        library.ec_isa.argtypes = []
        library.ec_stream_offsets.restype = ctypes.c_int
        library.ec_stream_offsets.argtypes = []
        library.ec_cpu_supported.restype = ctypes.c_int
        library.ec_cpu_supported.argtypes = []
        if not library.ec_cpu_supported():  # checked before anything else of it runs
            raise KernelsUnavailable(f"{target.name} was built for {library.ec_isa().decode()}, which this CPU lacks "
                                     f"(HWCAP); unset ${TARGET_ENV} or build on this CPU")
        library.ec_phase_seconds.restype = ctypes.c_int
        library.ec_phase_seconds.argtypes = [ctypes.c_void_p, ctypes.c_int]
        return library
    raise KernelsUnavailable(f"could not compile {SOURCE.name} with {compiler}: {'; '.join(errors)}")
