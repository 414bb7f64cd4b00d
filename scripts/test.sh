#!/usr/bin/env bash
# Quickstart 2: set up with the test extras, then run the whole test suite (offline, CPU only).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
.venv/bin/python -m pytest "$@"
