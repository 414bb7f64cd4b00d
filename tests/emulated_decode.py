"""Run under an aarch64 Python (qemu-user, tests/test_native_arm_emulated.py): decode bundles with the native kernels
and save what they computed, for the x86 side to compare.

    emulated_decode.py REPO OUT BUNDLE...

REPO: the checkout whose `edgecpm` (and `runtimes/`, mapped as `edgecpm.runtimes` like the installed package does)
is imported; numpy is the only other module needed. The kernels are built by runtimes/native/build.py as on a board,
with the compiler in $CC and the target in $EDGECPM_NATIVE_TARGET; $EDGECPM_NATIVE_PORTABLE=1 picks the portable build.
OUT/<bundle name>.npz gets the prefill logits of PROMPT then those of DECODE_STEPS greedy steps ("logits") and the KV
rows written ("kv"), then the same with exact activations in every linear (`--kernels native-exact`: "exact_logits",
"exact_kv") and with a half KV cache (`--kv-cache float16`: "half_logits", "half_kv" as bits); OUT/isa.txt the
kernels' ec_isa(), or the reason they were refused; OUT/conversions.npz the half cache's conversions (conversions()).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

PROMPT = np.array([5, 9, 11, 40, 7, 100, 3, 60, 61, 62, 12, 13, 14, 15, 16, 17, 18, 19, 20], dtype=np.int64)  # > 16: two passes
DECODE_STEPS = 4
THREADS = 2
VARIANTS = {"": {}, "exact_": {"exact": "all"}, "half_": {"kv_cache": "float16"}}  # saved-name prefix: NativeBackend options


def every_half() -> np.ndarray:
    return np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)


def rounding_cases() -> np.ndarray:
    """Every finite half as a float, the midpoints between neighbours (ties), a float either side of each, and the
    ends: overflow to infinity, underflow to zero, subnormals, infinities and NaN."""
    halves = every_half().view(np.float16)
    finite = np.unique(halves[np.isfinite(halves)].astype(np.float32))
    middles = ((finite[:-1].astype(np.float64) + finite[1:]) / 2).astype(np.float32)  # exact: 11 of 24 bits
    ends = np.array([65504, 65519.996, 65520, 65536, 1e6, 3e38, 2.0 ** -24, 2.0 ** -25, 2.0 ** -25 * 1.0001, 2.0 ** -26,
                     1e-30, np.inf, np.nan], np.float32)
    cases = np.concatenate([finite, middles, np.nextafter(middles, np.float32(np.inf)),
                            np.nextafter(middles, np.float32(-np.inf)), ends, -ends])
    return cases.astype(np.float32)


def conversions(library) -> dict[str, np.ndarray]:
    """The library's float -> half of rounding_cases() ("floats": they, as this machine's numpy made them) and
    half -> float of every half."""
    floats, bits = rounding_cases(), every_half()
    to_half, from_half = np.zeros(len(floats), np.uint16), np.zeros(len(bits), np.float32)
    library.ec_floats_to_halves(floats.ctypes.data, to_half.ctypes.data, len(floats))
    library.ec_halves_to_floats(bits.ctypes.data, from_half.ctypes.data, len(bits))
    return {"floats": floats, "to_half": to_half, "from_half": from_half}


def main(repo: Path, out: Path, bundles: list[Path]) -> None:
    sys.path.insert(0, str(repo))
    import edgecpm

    edgecpm.__path__.append(str(repo))  # edgecpm.runtimes -> REPO/runtimes, as pyproject's package-dir maps it
    from edgecpm.bundle import read_manifest
    from edgecpm.runtimes.native import KernelsUnavailable, load_library
    from edgecpm.runtimes.native.backend import NativeBackend
    from edgecpm.runtimes.native.decoder import EXACT_ALL, PORTABLE_ENV, PORTABLE_FLAGS
    import os

    out.mkdir(parents=True, exist_ok=True)
    try:
        library = load_library(PORTABLE_FLAGS) if os.environ.get(PORTABLE_ENV) == "1" else load_library()
    except KernelsUnavailable as error:
        (out / "isa.txt").write_text(f"refused: {error}")
        return
    (out / "isa.txt").write_text(library.ec_isa().decode())
    np.savez(out / "conversions.npz", **conversions(library))
    for bundle in bundles:
        saved = {}
        for prefix, options in VARIANTS.items():
            options = {**options, "exact": EXACT_ALL} if options.get("exact") else options
            backend = NativeBackend(bundle, read_manifest(bundle), threads=THREADS, **options)
            rows = [backend.prefill(PROMPT)]
            for _ in range(DECODE_STEPS):
                rows.append(backend.decode(int(rows[-1].argmax())))
            saved[f"{prefix}logits"] = np.stack(rows)
            saved[f"{prefix}kv"] = np.stack([np.array(array[:, :, :backend.position]).view(f"u{array.itemsize}")
                                             for array in backend.kv.arrays])
        np.savez(out / f"{bundle.name}.npz", **saved)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), [Path(arg) for arg in sys.argv[3:]])
