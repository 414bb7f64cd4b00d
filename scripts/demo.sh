#!/usr/bin/env bash
# Quickstart 1: set up, then run the main job on the embedded default model (SmolLM2-135M-Instruct).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh export
.venv/bin/edgecpm demo "$@"
