// CUDA kernels of the InfLLM v2 TensorRT plugin (see infllmv2Kernels.cuh). Written for correctness first: one thread
// block per (query, KV head) for selection and per (query, head) for attention, fp32 arithmetic throughout.
#include "infllmv2Kernels.cuh"

#include <cuda_fp16.h>
#include <math_constants.h>

namespace edgecpm {
namespace {

constexpr int kThreads = 128;
constexpr int kMaxValuesPerLane = 8; // v_dim <= 256
constexpr size_t kAlign = 256;

__device__ __forceinline__ float load(float const* p, size_t i) { return p[i]; }
__device__ __forceinline__ float load(__half const* p, size_t i) { return __half2float(p[i]); }
__device__ __forceinline__ void store(float* p, size_t i, float x) { p[i] = x; }
__device__ __forceinline__ void store(__half* p, size_t i, float x) { p[i] = __float2half(x); }

__device__ float warpSum(float x) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

__device__ float warpMax(float x) {
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

// Block-wide reductions over kThreads threads (every thread gets the result).
__device__ float blockMax(float x, float* scratch) {
    x = warpMax(x);
    if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = x;
    __syncthreads();
    float r = -CUDART_INF_F;
    for (int w = 0; w < kThreads / 32; w++) r = fmaxf(r, scratch[w]);
    __syncthreads();
    return r;
}

__device__ float blockSum(float x, float* scratch) {
    x = warpSum(x);
    if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = x;
    __syncthreads();
    float r = 0.f;
    for (int w = 0; w < kThreads / 32; w++) r += scratch[w];
    __syncthreads();
    return r;
}

// Kc[g, j, :] = mean(keys[g, j*stride : j*stride + size, :]), summed token by token in order (as the reference).
template <typename T>
__global__ void compressKernel(T const* keys, float* out, int32_t total, int32_t dim, int32_t count, int32_t size,
                               int32_t stride) {
    int32_t const j = blockIdx.x, g = blockIdx.y;
    for (int32_t i = threadIdx.x; i < dim; i += blockDim.x) {
        // in double, rounded once: exact, so kernels over the same keys in another order tie, as in the reference
        double acc = 0.0;
        for (int32_t o = 0; o < size; o++) acc += load(keys, ((size_t)g * total + (size_t)j * stride + o) * dim + i);
        out[((size_t)g * count + j) * dim + i] = static_cast<float>(acc / size);
    }
}

// log-sum-exp over the visible kernels of a level (-inf when none is visible).
template <typename T>
__device__ float levelLse(T const* q, float const* kc, int32_t count, int32_t size, int32_t stride, int32_t position,
                          int32_t dim, float scale, float* scratch) {
    float peak = -CUDART_INF_F;
    for (int32_t j = threadIdx.x; j < count; j += kThreads) {
        if (j * stride + size - 1 > position) continue;
        float dot = 0.f;
        for (int32_t i = 0; i < dim; i++) dot += load(q, i) * kc[(size_t)j * dim + i];
        peak = fmaxf(peak, dot * scale);
    }
    peak = blockMax(peak, scratch);
    if (isinf(peak)) return -CUDART_INF_F;
    float sum = 0.f;
    for (int32_t j = threadIdx.x; j < count; j += kThreads) {
        if (j * stride + size - 1 > position) continue;
        float dot = 0.f;
        for (int32_t i = 0; i < dim; i++) dot += load(q, i) * kc[(size_t)j * dim + i];
        sum += expf(dot * scale - peak);
    }
    return logf(blockSum(sum, scratch)) + peak;
}

// Stage 1, pooling and selection for query row s and KV head g: mask[g, s, b] = 1 for each selected block b.
// Shared memory: logits [n1], group scores [n1], ranked block values [nb].
template <typename T>
__global__ void selectKernel(InfLLMv2Params p, T const* querySel, float const* kc1, float const* kc2, int32_t n1,
                             int32_t n2, int32_t blocks, uint8_t* mask) {
    extern __shared__ float smem[];
    __shared__ float scratch[32];
    float* logits = smem;
    float* shared = logits + n1;
    float* ranked = shared + n1;
    int32_t const s = blockIdx.x, g = blockIdx.y;
    int32_t const position = p.total - p.newTokens + s;
    int32_t const group = p.heads / p.kvHeads;
    int32_t const size2 = 4 * p.kernelSize, stride2 = 4 * p.kernelStride; // LEVEL2_FACTOR
    float const* kc1g = kc1 + (size_t)g * n1 * p.dim;
    float const* kc2g = kc2 + (size_t)g * n2 * p.dim;
    for (int32_t j = threadIdx.x; j < n1; j += kThreads) shared[j] = 0.f;
    for (int32_t member = 0; member < group; member++) {
        T const* q = querySel + ((size_t)(g * group + member) * p.newTokens + s) * p.dim;
        for (int32_t j = threadIdx.x; j < n1; j += kThreads) {
            float logit = -CUDART_INF_F;
            if (j * p.kernelStride + p.kernelSize - 1 <= position) {
                float dot = 0.f;
                for (int32_t i = 0; i < p.dim; i++) dot += load(q, i) * kc1g[(size_t)j * p.dim + i];
                logit = dot * p.scale;
            }
            logits[j] = logit;
        }
        __syncthreads();
        float peak = -CUDART_INF_F;
        for (int32_t j = threadIdx.x; j < n1; j += kThreads) peak = fmaxf(peak, logits[j]);
        peak = blockMax(peak, scratch);
        float sum = 0.f;
        if (!isinf(peak))
            for (int32_t j = threadIdx.x; j < n1; j += kThreads) sum += expf(logits[j] - peak);
        float lse = isinf(peak) ? -CUDART_INF_F : logf(blockSum(sum, scratch)) + peak;
        // the Kc2 normalizer where the query sees a coarse kernel; else the exact Kc1 one (the reference's fallback)
        if (n2 > 0 && size2 - 1 <= position)
            lse = levelLse(q, kc2g, n2, size2, stride2, position, p.dim, p.scale, scratch);
        float const shift = isinf(lse) ? 0.f : lse;
        for (int32_t j = threadIdx.x; j < n1; j += kThreads) shared[j] += expf(logits[j] - shift);
        __syncthreads();
    }
    for (int32_t j = threadIdx.x; j < n1; j += kThreads)
        if (j * p.kernelStride + p.kernelSize - 1 > position) shared[j] = -CUDART_INF_F;
    __syncthreads();
    // pooling (block b: kernels b*r - 1 .. b*r + r - 1), forced blocks, candidates 0 .. q_blk
    int32_t const r = p.blockSize / p.kernelStride;
    int32_t const queryBlock = position / p.blockSize;
    for (int32_t b = threadIdx.x; b < blocks; b += kThreads) {
        float best = -CUDART_INF_F;
        for (int32_t w = b * r - 1; w <= b * r + r - 1; w++)
            if (w >= 0 && w < n1) best = fmaxf(best, shared[w]);
        bool const candidate = b <= queryBlock;
        bool const forced = candidate && (b < p.initBlocks || b >= queryBlock - p.localBlocks);
        ranked[b] = forced ? CUDART_INF_F : (candidate ? best : -CUDART_INF_F);
    }
    __syncthreads();
    int32_t const inits = min(p.initBlocks, queryBlock + 1);
    int32_t const localFirst = max(0, queryBlock - p.localBlocks);
    int32_t const forcedCount = inits + (queryBlock - localFirst + 1) - max(0, inits - localFirst);
    int32_t const keep = max(p.topk + p.localBlocks, forcedCount);
    // rank: blocks with a higher value, or an equal one at a lower index (the reference's stable order)
    for (int32_t b = threadIdx.x; b < blocks; b += kThreads) {
        int32_t rank = 0;
        for (int32_t o = 0; o < blocks; o++)
            rank += (ranked[o] > ranked[b]) || (ranked[o] == ranked[b] && o < b);
        mask[((size_t)g * p.newTokens + s) * blocks + b] = (b <= queryBlock) && rank < keep;
    }
}

// Stage 2 for query row s and head h: softmax over the allowed tokens (selected blocks, positions <= the query's).
// Each warp runs an online softmax over every (warps)th token; the warps' partial results are merged at the end.
template <typename T>
__global__ void attendKernel(InfLLMv2Params p, T const* query, T const* key, T const* value, uint8_t const* mask,
                             int32_t blocks, bool sparse, T* output) {
    extern __shared__ float partial[]; // [warps, vDim] accumulators
    __shared__ float peaks[kThreads / 32], sums[kThreads / 32];
    int32_t const s = blockIdx.x, h = blockIdx.y, g = h / (p.heads / p.kvHeads);
    int32_t const warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = kThreads / 32;
    int32_t const position = p.total - p.newTokens + s;
    T const* q = query + ((size_t)h * p.newTokens + s) * p.dim;
    uint8_t const* row = mask + ((size_t)g * p.newTokens + s) * blocks;
    float peak = -CUDART_INF_F, sum = 0.f, acc[kMaxValuesPerLane] = {};
    for (int32_t t = warp; t <= position; t += warps) {
        if (sparse && !row[t / p.blockSize]) continue;
        float dot = 0.f;
        for (int32_t i = lane; i < p.dim; i += 32) dot += load(q, i) * load(key, ((size_t)g * p.total + t) * p.dim + i);
        dot = warpSum(dot) * p.scale;
        float const next = fmaxf(peak, dot);
        float const decay = isinf(peak) ? 0.f : expf(peak - next);
        float const weight = expf(dot - next);
        sum = sum * decay + weight;
        for (int32_t c = 0; c < kMaxValuesPerLane; c++) {
            int32_t const i = lane + 32 * c;
            float const v = i < p.vDim ? load(value, ((size_t)g * p.total + t) * p.vDim + i) : 0.f;
            acc[c] = acc[c] * decay + weight * v;
        }
        peak = next;
    }
    if (lane == 0) { peaks[warp] = peak; sums[warp] = sum; }
    for (int32_t c = 0; c < kMaxValuesPerLane; c++)
        if (lane + 32 * c < p.vDim) partial[warp * p.vDim + lane + 32 * c] = acc[c];
    __syncthreads();
    float top = -CUDART_INF_F;
    for (int32_t w = 0; w < warps; w++) top = fmaxf(top, peaks[w]);
    float total = 0.f;
    for (int32_t w = 0; w < warps; w++) total += isinf(peaks[w]) ? 0.f : sums[w] * expf(peaks[w] - top);
    for (int32_t i = threadIdx.x; i < p.vDim; i += kThreads) {
        float out = 0.f;
        for (int32_t w = 0; w < warps; w++)
            if (!isinf(peaks[w])) out += partial[w * p.vDim + i] * expf(peaks[w] - top);
        store(output, ((size_t)h * p.newTokens + s) * p.vDim + i, out / total);
    }
}

size_t alignUp(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

struct Layout {
    int32_t n1, n2, blocks;
    size_t kc1Bytes, kc2Bytes, maskBytes;
};

// n1/n2 count every kernel of the history (the visibility tests inside the kernels decide which a query reads).
Layout layoutOf(InfLLMv2Params const& p) {
    Layout l{};
    l.n1 = kernelCount(p.total, p.kernelSize, p.kernelStride);
    l.n2 = kernelCount(p.total, 4 * p.kernelSize, 4 * p.kernelStride);
    l.blocks = (p.total + p.blockSize - 1) / p.blockSize;
    l.kc1Bytes = alignUp((size_t)p.kvHeads * l.n1 * p.dim * sizeof(float));
    l.kc2Bytes = alignUp((size_t)p.kvHeads * l.n2 * p.dim * sizeof(float));
    l.maskBytes = alignUp((size_t)p.kvHeads * p.newTokens * l.blocks);
    return l;
}

template <typename T>
cudaError_t enqueueTyped(InfLLMv2Params const& p, T const* query, T const* key, T const* value, T const* queryNope,
                         T const* keyNope, T* output, void* workspace, cudaStream_t stream) {
    Layout const l = layoutOf(p);
    auto* base = static_cast<uint8_t*>(workspace);
    auto* kc1 = reinterpret_cast<float*>(base);
    auto* kc2 = reinterpret_cast<float*>(base + l.kc1Bytes);
    auto* mask = base + l.kc1Bytes + l.kc2Bytes;
    bool const sparse = infllmv2IsSparse(p);
    if (p.vDim > 32 * kMaxValuesPerLane) return cudaErrorInvalidValue;
    if (sparse) {
        T const* selQuery = p.useNope ? queryNope : query;
        T const* selKey = p.useNope ? keyNope : key;
        if (l.n1 > 0) compressKernel<T><<<dim3(l.n1, p.kvHeads), kThreads, 0, stream>>>(selKey, kc1, p.total, p.dim, l.n1,
                                                                                           p.kernelSize, p.kernelStride);
        if (l.n2 > 0) compressKernel<T><<<dim3(l.n2, p.kvHeads), kThreads, 0, stream>>>(
            selKey, kc2, p.total, p.dim, l.n2, 4 * p.kernelSize, 4 * p.kernelStride);
        size_t const smem = (2 * (size_t)l.n1 + l.blocks) * sizeof(float);
        if (smem > 48 * 1024) return cudaErrorInvalidConfiguration; // beyond the default limit: not supported yet
        selectKernel<T><<<dim3(p.newTokens, p.kvHeads), kThreads, smem, stream>>>(p, selQuery, kc1, kc2, l.n1, l.n2,
                                                                                  l.blocks, mask);
    }
    size_t const smem = (size_t)(kThreads / 32) * p.vDim * sizeof(float);
    attendKernel<T><<<dim3(p.newTokens, p.heads), kThreads, smem, stream>>>(p, query, key, value, mask, l.blocks, sparse,
                                                                           output);
    return cudaGetLastError();
}

} // namespace

size_t infllmv2WorkspaceBytes(InfLLMv2Params const& p) {
    Layout const l = layoutOf(p);
    return l.kc1Bytes + l.kc2Bytes + l.maskBytes;
}

cudaError_t infllmv2Enqueue(InfLLMv2Params const& p, bool half, void const* query, void const* key, void const* value,
                            void const* queryNope, void const* keyNope, void* output, void* workspace,
                            cudaStream_t stream) {
    if (half)
        return enqueueTyped(p, static_cast<__half const*>(query), static_cast<__half const*>(key),
                            static_cast<__half const*>(value), static_cast<__half const*>(queryNope),
                            static_cast<__half const*>(keyNope), static_cast<__half*>(output), workspace, stream);
    return enqueueTyped(p, static_cast<float const*>(query), static_cast<float const*>(key),
                        static_cast<float const*>(value), static_cast<float const*>(queryNope),
                        static_cast<float const*>(keyNope), static_cast<float*>(output), workspace, stream);
}

} // namespace edgecpm
