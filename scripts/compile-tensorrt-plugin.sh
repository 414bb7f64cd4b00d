#!/usr/bin/env bash
# Compiles the InfLLM v2 TensorRT plugin (runtimes/tensorrt/plugins/infllmv2) without a GPU, TensorRT or NVIDIA's
# toolkit installer: what scripts/check-tensorrt.sh's cmake build does on a GPU machine, short of linking libnvinfer and
# running it.
#   - the plugin's C++ against the TensorRT headers of each TENSORRT_INCLUDE given (g++ -Wall -Wextra -Werror: every
#     IPluginV3 override must match that release's signatures);
#   - the CUDA kernels with clang (>= 16, e.g. apt install clang-16): host side (the launches against the kernels'
#     signatures), device side to PTX and, with NVIDIA's ptxas, to SASS for Jetson Orin (sm_87) and Ada/RTX 4090
#     (sm_89), printing registers and spills per kernel.
# CUDA's headers, libdevice and ptxas come from NVIDIA's PyPI wheels (nvidia-cuda-{runtime,nvcc,cccl}-cu12,
# nvidia-curand-cu12, which clang's CUDA wrapper includes), unpacked into a CUDA-shaped folder under WORK.
# TensorRT's headers are not on PyPI: point at an install (/usr/include/x86_64-linux-gnu, JetPack's
# /usr/include/aarch64-linux-gnu) or at the include/ folder of github.com/NVIDIA/TensorRT's release/10.x branches.
# Usage: bash scripts/compile-tensorrt-plugin.sh TENSORRT_INCLUDE [TENSORRT_INCLUDE ...]   (WORK=build/plugin-compile)
set -euo pipefail
cd "$(dirname "$0")/.."
(($#)) || { echo "usage: $0 TENSORRT_INCLUDE [TENSORRT_INCLUDE ...]" >&2; exit 2; }
source=runtimes/tensorrt/plugins/infllmv2
work="${WORK:-build/plugin-compile}"
clang="${CLANG:-$(command -v clang++-16 || command -v clang++-17 || command -v clang++-18 || command -v clang++ || true)}"
[[ -n "$clang" ]] || { echo "no clang++ (>= 16 for sm_87/sm_89): apt install clang-16" >&2; exit 2; }
cuda="$work/cuda"
mkdir -p "$work"

if [[ ! -x "$cuda/bin/ptxas" ]]; then
  wheels="$work/wheels"
  python3 -m pip --disable-pip-version-check -q install --target "$wheels" \
    "nvidia-cuda-runtime-cu12" "nvidia-cuda-nvcc-cu12" "nvidia-cuda-cccl-cu12" "nvidia-curand-cu12"
  rm -rf "$cuda" && mkdir -p "$cuda/bin" "$cuda/lib64" "$cuda/nvvm"
  for part in cuda_runtime cuda_nvcc cuda_cccl curand; do cp -rn "$wheels/nvidia/$part/include/." "$cuda/include/"; done
  cp -r "$wheels/nvidia/cuda_runtime/lib/." "$cuda/lib64/"
  cp -r "$wheels/nvidia/cuda_nvcc/nvvm/libdevice" "$cuda/nvvm/"
  cp "$wheels/nvidia/cuda_nvcc/bin/ptxas" "$cuda/bin/"
  # clang reads the toolkit's version from this file; the wheels ship none
  version=$(sed -n "s/^#define CUDART_VERSION *\([0-9]*\).*/\1/p" "$cuda/include/cuda_runtime_api.h")
  echo "CUDA Version $((version / 1000)).$((version % 1000 / 10)).0" >"$cuda/version.txt"
fi
echo "CUDA headers: $(cat "$cuda/version.txt"); $("$clang" --version | head -1)"

for include in "$@"; do
  [[ -f "$include/NvInferRuntime.h" ]] || { echo "$include: no NvInferRuntime.h (not a TensorRT include folder)" >&2; exit 2; }
  trt=$(sed -n 's/^#define \(NV_TENSORRT_MAJOR\|TRT_MAJOR_ENTERPRISE\) \([0-9]*\).*/\2/p;s/^#define \(NV_TENSORRT_MINOR\|TRT_MINOR_ENTERPRISE\) \([0-9]*\).*/\2/p' \
        "$include/NvInferVersion.h" | head -2 | paste -sd.)
  echo "== plugin C++ against TensorRT $trt headers ($include)"
  g++ -std=c++17 -Wall -Wextra -Werror -Wno-deprecated-declarations -fPIC -isystem "$include" -isystem "$cuda/include" \
    -c "$source/InfLLMv2Plugin.cpp" -o "$work/InfLLMv2Plugin-trt$trt.o"
done

echo "== CUDA kernels, host side"
cuda_flags=(-std=c++17 -x cuda --cuda-path="$cuda" -Wall -Wextra -Werror -Wno-unknown-cuda-version)
"$clang" "${cuda_flags[@]}" --cuda-gpu-arch=sm_87 --cuda-host-only -fPIC -c "$source/infllmv2Kernels.cu" \
  -o "$work/infllmv2Kernels-host.o"
for arch in sm_87 sm_89; do
  echo "== CUDA kernels, device side: $arch (PTX by clang, SASS by ptxas)"
  "$clang" "${cuda_flags[@]}" -O3 --cuda-gpu-arch=$arch --cuda-device-only -S "$source/infllmv2Kernels.cu" \
    -o "$work/infllmv2Kernels-$arch.ptx"
  "$cuda/bin/ptxas" -arch=$arch -O3 -v "$work/infllmv2Kernels-$arch.ptx" -o "$work/infllmv2Kernels-$arch.cubin" 2>&1 |
    sed -n "s/^ptxas info *: Compiling entry function '\(.*\)' for.*/\1/p;s/^ptxas info *: \(Used .*\)/    \1/p;s/^ *\([0-9]* bytes stack frame.*\)/    \1/p"
done
echo "compiled: the plugin against $# TensorRT header set(s), the kernels for sm_87 and sm_89 (not linked, not run)"
