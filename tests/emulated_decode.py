"""Run under an aarch64 Python (qemu-user, tests/test_native_arm_emulated.py): decode bundles with the native kernels
and save what they computed, for the x86 side to compare.

    emulated_decode.py REPO OUT BUNDLE...

REPO: the checkout whose `edgecpm` (and `runtimes/`, mapped as `edgecpm.runtimes` like the installed package does)
is imported; numpy is the only other module needed. The kernels are built by runtimes/native/build.py as on a board,
with the compiler in $CC and the target in $EDGECPM_NATIVE_TARGET; $EDGECPM_NATIVE_PORTABLE=1 picks the portable build.
OUT/<bundle name>.npz gets the prefill logits of PROMPT then those of DECODE_STEPS greedy steps ("logits") and the KV
rows written ("kv"), then the same with exact activations in every linear (`--kernels native-exact`: "exact_logits",
"exact_kv"); OUT/isa.txt the kernels' ec_isa(), or the reason they were refused.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

PROMPT = np.array([5, 9, 11, 40, 7, 100, 3, 60, 61, 62, 12, 13, 14, 15, 16, 17, 18, 19, 20], dtype=np.int64)  # > 16: two passes
DECODE_STEPS = 4
THREADS = 2


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
    for bundle in bundles:
        saved = {}
        for prefix, exact in (("", frozenset()), ("exact_", EXACT_ALL)):
            backend = NativeBackend(bundle, read_manifest(bundle), threads=THREADS, exact=exact)
            rows = [backend.prefill(PROMPT)]
            for _ in range(DECODE_STEPS):
                rows.append(backend.decode(int(rows[-1].argmax())))
            saved[f"{prefix}logits"] = np.stack(rows)
            saved[f"{prefix}kv"] = np.stack([np.array(array[:, :, :backend.position]) for array in backend.kv.arrays])
        np.savez(out / f"{bundle.name}.npz", **saved)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), [Path(arg) for arg in sys.argv[3:]])
