// InfLLM v2 attention kernels for the TensorRT plugin: the semantics of edgecpm/sparse/infllmv2.py (the numpy reference;
// its docstring records every choice) for one call of the stateless ai.edgecpm.InfLLMv2Attention operator
// (edgecpm/sparse/op.py): the compressed keys are rebuilt from the whole key history on every call.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cuda_runtime.h>

namespace edgecpm {

struct InfLLMv2Params {
    // operator attributes
    int32_t kernelSize, kernelStride, blockSize, initBlocks, localBlocks, topk, denseLen, useNope;
    float scale;
    // shapes of this call: query [1, heads, S, dim], key [1, kvHeads, T, dim], value [1, kvHeads, T, vDim]
    int32_t heads, kvHeads, newTokens, total, dim, vDim;
};

inline int32_t kernelCount(int32_t length, int32_t size, int32_t stride) {
    return length < size ? 0 : (length - size) / stride + 1;
}

// Bytes of scratch one call needs (Kc1, Kc2 in fp32, the block mask), for the largest shapes it may see.
size_t infllmv2WorkspaceBytes(InfLLMv2Params const& p);

// True when the call attends sparsely (spec §6.2: total length >= dense_len, or dense_len < 0).
inline bool infllmv2IsSparse(InfLLMv2Params const& p) { return p.denseLen < 0 || p.total >= p.denseLen; }

// `half`: inputs/outputs are fp16 (else fp32). `queryNope`/`keyNope` are the selection inputs (use_nope), or the roped
// ones. Returns cudaSuccess or the first launch error.
cudaError_t infllmv2Enqueue(InfLLMv2Params const& p, bool half, void const* query, void const* key, void const* value,
                            void const* queryNope, void const* keyNope, void* output, void* workspace,
                            cudaStream_t stream);

} // namespace edgecpm
