#!/usr/bin/env bash
# What the native kernels' aarch64 tests run under (tests/test_native_arm_emulated.py): an aarch64 cross compiler,
# qemu-user, and an aarch64 Python with numpy unpacked from Debian's arm64 packages into a sysroot (nothing of arm64
# is installed on the host). Idempotent. Needs root (or passwordless sudo) and apt; without them it says what is
# missing and those tests skip, saying why.
set -euo pipefail
cd "$(dirname "$0")/.."
sysroot="${EDGECPM_ARM64_SYSROOT:-.arm64-sysroot}"
# python3.11 and numpy's own shared-library dependencies (Debian 12); libgomp for the kernels' OpenMP
packages=(python3.11-minimal libpython3.11-minimal libpython3.11-stdlib python3-numpy libc6 libffi8 zlib1g libexpat1
          libgomp1 libblas3 liblapack3 libgfortran5 libgcc-s1 libstdc++6)

as_root() {
    if [[ $EUID -eq 0 ]]; then "$@"; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo "$@"; else return 1; fi
}
skip() { echo "arm-emulation: $1; the emulated aarch64 kernel tests will skip" >&2; exit 0; }

command -v apt-get >/dev/null || skip "no apt-get"
if ! command -v qemu-aarch64 >/dev/null || ! command -v aarch64-linux-gnu-gcc >/dev/null; then
    { as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user \
        gcc-aarch64-linux-gnu libgomp1-arm64-cross; } >/dev/null 2>&1 || skip "could not install qemu-user and gcc-aarch64-linux-gnu"
fi
if ! compgen -G "$sysroot/usr/bin/python3.[0-9]*" >/dev/null; then
    if ! dpkg --print-foreign-architectures | grep -qx arm64; then  # lets apt download arm64 packages; installs none
        { as_root dpkg --add-architecture arm64 && as_root apt-get update -qq; } >/dev/null 2>&1 || skip "could not add apt's arm64 lists"
    fi
    staging="$(mktemp -d)"
    trap 'rm -rf "$staging"' EXIT
    (cd "$staging" && apt-get download -qq "${packages[@]/%/:arm64}") >/dev/null 2>&1 || skip "could not download the arm64 packages"
    mkdir -p "$staging/root"
    for deb in "$staging"/*.deb; do dpkg-deb -x "$deb" "$staging/root"; done
    # what update-alternatives would link on an arm64 system
    lib="$staging/root/usr/lib/aarch64-linux-gnu"
    ln -sf blas/libblas.so.3 "$lib/libblas.so.3"
    ln -sf lapack/liblapack.so.3 "$lib/liblapack.so.3"
    rm -rf "$sysroot" && mv "$staging/root" "$sysroot"  # whole or not at all
fi
echo "arm-emulation: qemu-aarch64, aarch64-linux-gnu-gcc and an aarch64 Python in $sysroot"
