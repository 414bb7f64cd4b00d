/* edgecpm native decode step and prefill: one whole token (ec_decode), or up to EC_TILE prompt tokens
 * (ec_prefill), of a pre-norm GQA decoder in one OpenMP region.
 *
 * It reads an `ort`-flavour bundle's weights (MatMulNBits / GatherBlockQuantized layouts, fp32 MatMul / Gemm
 * tables; the vectorised path from a copy interleaved by 8 rows, see groups_avx2) and the runtime's KV
 * buffers ([kv_heads, max_context, head_dim] per layer, the layout GroupQueryAttention writes), so onnxruntime
 * can run the steps the kernels do not (an fp32 bundle's prefill) over the same cache.
 *
 * Why a kernel of our own: a decode step is ~300 tiny onnxruntime ops, each paying a dispatch and a thread
 * pool round trip; here a layer costs five barriers. Linears quantize their input to int8 per weight block
 * (what MatMulNBits' accuracy level 4 does) and run integer dot products (AVX2 maddubs, VNNI dpbusd; on aarch64
 * NEON widening multiplies, SDOT with dotprod, SMMLA with i8mm; portable C elsewhere). Codes keep their stored bit
 * order: the activations are permuted once per linear into the bit-plane order in which the codes come out of a
 * 4-byte word, so no code is ever shuffled.
 *
 * Bit-exactness: the integer sums are exact on every path. The AVX2 build keeps float orders of its own (x86 results
 * never change); every other build (aarch64, and the portable build, -DEC_PORTABLE) sums floats in the order the
 * portable C spells out (dot_lanes, the unfused expressions under -ffp-contract=off), which the NEON paths reproduce
 * instruction for instruction, so their logits equal the portable build's bit for bit.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#else
#define omp_get_thread_num() 0
#define omp_get_num_threads() 1
#endif
#if defined(__AVX2__) && defined(__FMA__) && !defined(EC_PORTABLE)
#include <immintrin.h>
#define EC_AVX2 1
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
/* u8 x s8 products summed by four into int32 lanes in one instruction (AVX-VNNI, AVX512-VNNI), where AVX2 needs a
 * maddubs into int16 and a widening madd */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define EC_VNNI 1
#define dpbusd(acc, u, s) _mm256_dpbusd_epi32(acc, u, s)
#elif defined(__AVXVNNI__)
#define EC_VNNI 1
#define dpbusd(acc, u, s) _mm256_dpbusd_avx_epi32(acc, u, s)
#endif
/* AVX-512: two consecutive words of a group (64 contiguous bytes) per load, which streams from memory faster */
#if defined(EC_VNNI) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define EC_VNNI512 1
#endif
#endif
/* aarch64: NEON is part of the base ISA; SDOT (4 s8 x s8 products per int32 lane) with dotprod (Armv8.2+: Cortex-A76,
 * A78AE, Neoverse N1), SMMLA (a 2x8 by 8x2 s8 block product) with i8mm (Armv8.6: Neoverse V1/V2). Chosen at compile
 * time like the x86 paths (-mcpu=native on the device); ec_cpu_supported checks the CPU's HWCAPs before anything runs. */
#if defined(__aarch64__) && defined(__ARM_NEON) && !defined(EC_PORTABLE)
#include <arm_neon.h>
#define EC_NEON 1
#if defined(__ARM_FEATURE_DOTPROD)
#define EC_DOTPROD 1
#if defined(__ARM_FEATURE_MATMUL_INT8)
#define EC_I8MM 1
#endif
#endif
#endif
#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#endif
#if defined(EC_AVX2) || defined(EC_NEON)
#define EC_VECTOR 1 /* the kernels read linears from their interleaved copies */
#endif

/* Opt-in per-phase timers (a separate build with -DEC_PHASE_TIMERS, for `edgecpm profile`): thread 0 adds the wall
 * time since its previous mark to a phase at each mark of ec_decode; marks sit after the team's barriers where there
 * are any, so the phases of a step sum to the step's parallel region. Without the flag the marks are empty. */
#define EC_PHASE_EMBED 0
#define EC_PHASE_NORM 1 /* RMSNorm and the residual adds before it */
#define EC_PHASE_ATTENTION 2
#define EC_PHASE_LINEAR 3 /* the layers' projections, their input quantization and the gated activation */
#define EC_PHASE_HEAD 4
#define EC_PHASES 5
#ifdef EC_PHASE_TIMERS
#include <time.h>
static double ec_phase_total[EC_PHASES], ec_phase_last;
static double ec_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}
#define EC_PHASE_BEGIN() do { if (omp_get_thread_num() == 0) ec_phase_last = ec_now(); } while (0)
#define EC_PHASE(p)                                                                                                    \
    do {                                                                                                               \
        if (omp_get_thread_num() == 0) {                                                                               \
            const double now_ = ec_now();                                                                              \
            ec_phase_total[p] += now_ - ec_phase_last;                                                                 \
            ec_phase_last = now_;                                                                                      \
        }                                                                                                              \
    } while (0)
#else
#define EC_PHASE_BEGIN() ((void)0)
#define EC_PHASE(p) ((void)0)
#endif

/* Seconds per EC_PHASE_* summed over ec_decode calls since the last reset (reset: zero them after reading). Returns
 * how many phases it wrote: EC_PHASES in the timed build, 0 in the default one. */
int ec_phase_seconds(double *out, int reset) {
#ifdef EC_PHASE_TIMERS
    for (int p = 0; p < EC_PHASES; p++) {
        out[p] = ec_phase_total[p];
        if (reset) ec_phase_total[p] = 0.0;
    }
    return EC_PHASES;
#else
    (void)out; (void)reset;
    return 0;
#endif
}

#define EC_WORD 4 /* bytes of one row's codes per 32-bit lane */
/* How the interleaved copy holds the block scales: fp32 per block, fp16 per block (where that is exact: the
 * exporter computes scales at fp16 precision), or one fp32 scale per row (BitCPM ternary: all blocks alike). */
#define EC_SCALES_FP32 0
#define EC_SCALES_FP16 1
#define EC_SCALES_PER_ROW 2
/* What the interleaved copy holds after the scales: nothing, or per block and row a constant multiplied by a per-block
 * input sum and added: scale * (middle code - zero point) by the quantized sum (integer zero points), or the
 * float offset by the exact sum (float zero points, GGUF Q4_1). */
#define EC_OFFSETS_NONE 0
#define EC_OFFSETS_ZERO_POINTS 1
#define EC_OFFSETS_FLOAT 2
#define EC_PREFETCH_BLOCKS 64 /* how far ahead each group's stream is prefetched (8-16 KiB measured best) */
#define EC_TILE 16 /* prompt tokens per pass over the weights (ec_prefill) */
#define EC_TOKENS 4 /* tokens one kernel call computes per row group (accumulators kept in registers) */
#define EC_MAX_BLOCK 1024 /* the widest weight block (decoder.py MAX_BLOCK): quantize's scratch */

typedef struct {
    /* block-quantized [n, k]: codes [n, blocks, block*bits/8] low bits first, scales [n, blocks] */
    const uint8_t *codes;
    const float *scales;
    const uint8_t *zero_points; /* [n, ceil(blocks*bits/8)] low bits first, or NULL: the middle code */
    const float *zero_terms;    /* [n, blocks] scale * (middle code - zero point), from zero_points, or NULL */
    const float *offsets;       /* [n, blocks] added times each block's input sum (float zero points), or NULL */
    /* the same codes and scales interleaved by eight rows (see groups_avx2; rows padded to a multiple of 8), or NULL */
    const uint8_t *packed;
    int32_t scale_format; /* of `packed`: EC_SCALES_FP32, EC_SCALES_FP16 (lossless) or EC_SCALES_PER_ROW */
    /* or float: dense [k, n] (MatMul) when dense_nk == 0, [n, k] (Gemm transB / table) when 1 */
    const float *dense;
    const int32_t *input_order; /* [k]: the input is gathered first (act-order GPTQ; quantized only), or NULL */
    int32_t n, k, bits, block, dense_nk;
    int32_t offset_kind; /* of `packed`: EC_OFFSETS_* */
    /* of `packed`: `bits`, or 6 for 8-bit codes holding 6-bit values (per block: their low 4 bits as a 4-bit
     * block, then their high 2 bits, see groups_avx2) */
    int32_t stream_bits;
    /* 1: the input stays float and meets the codes dequantized (exact activations, see exact_input), 0: int8 */
    int32_t exact;
} ec_linear;

/* InfLLM v2 sparse attention's configuration (spec §6.1; infllmv2.c), enabled = 0 for dense attention */
typedef struct {
    int32_t enabled, kernel_size, kernel_stride, block_size, init_blocks, local_blocks, topk, dense_len, use_nope, exact_lse;
} ec_sparse;

typedef struct {
    const float *input_norm, *post_norm;
    ec_linear qkv, o, gate_up, down;
    void *k_cache, *v_cache; /* [kv_heads, max_context, head_dim], fp32 or fp16 (ec_model.kv_half) */
    /* InfLLM v2 state (infllmv2.c), where the model runs sparse: compressed keys Kc1 [kv_heads, kernels, head_dim] and
     * Kc2 (fp32), and under use_nope the keys before RoPE [kv_heads, max_context, head_dim] (as the cache); else NULL */
    float *kc1, *kc2;
    void *k_nope;
} ec_layer;

typedef struct {
    int32_t hidden, layers, heads, kv_heads, head_dim, rotary_dim, intermediate, vocab, max_context, threads;
    int32_t activation; /* 0 silu, 1 fatrelu */
    int32_t kv_half;    /* 1: the KV cache holds IEEE half floats (half its memory), 0: fp32 */
    float activation_param, eps, attention_scale, embedding_scale;
    const float *rope_cos, *rope_sin; /* [max_context, rotary_dim/2] */
    ec_linear table;                  /* embedding rows: [vocab, hidden] */
    ec_linear head;                   /* logits = final_norm(x) @ head^T */
    const float *final_norm;
    const ec_layer *layer;
    ec_sparse sparse;
} ec_model;

/* ---- activations quantized per weight block, in the codes' bit-plane order ------------------------------ */

typedef struct {
    int8_t *q;    /* blocks * block values */
    float *scale; /* per block */
    float *sum;   /* per block: scale * sum(q), the input sum as the integer dot sees it */
    float *exact; /* per block: the float input sum (for float zero points) */
    int32_t *correction; /* per block: -(middle code) * sum(q) (2/4 bits; the kernels centre 8-bit codes themselves) */
    float *xf;           /* exact activations: the input itself, gathered, padded with zeros to whole blocks */
} ec_act;

static int bytes_per_block(const ec_linear *w) { return w->block * w->bits / 8; }
static int chunk_bytes(int block, int bits) { int b = block * bits / 8; return b < EC_WORD ? b : EC_WORD; }

/* The bits of the codes the kernels read: the interleaved copy's where the vectorised kernels read it, else the stored. */
static int read_bits(const ec_linear *w) {
#ifdef EC_VECTOR
    if (w->packed) return w->stream_bits;
#endif
    return w->bits;
}

/* Activations follow the codes' bit-plane order; a 6-bit stream's is that of its 4-bit low plane. */
static int plane_bits(int bits) { return bits == 6 ? 4 : bits; }

/* sum of a[i] * b[i] in the one order of every build but AVX2's (which keeps its own): 16 lanes, lane j fusing the
 * products of i = j mod 16 into its sum; lanes j, j+4, j+8, j+12 added as (j + j+4) + (j+8 + j+12), those four as
 * (0 + 1) + (2 + 3); then the tail in order, fused. NEON holds the lanes in four vectors and adds them the same way. */
#ifndef EC_AVX2
static float dot_lanes(const float *a, const float *b, int n) {
    int i = 0;
    float total;
#ifdef EC_NEON
    float32x4_t acc[4] = {vdupq_n_f32(0.f), vdupq_n_f32(0.f), vdupq_n_f32(0.f), vdupq_n_f32(0.f)};
    for (; i + 16 <= n; i += 16)
        for (int v = 0; v < 4; v++) acc[v] = vfmaq_f32(acc[v], vld1q_f32(a + i + 4 * v), vld1q_f32(b + i + 4 * v));
    const float32x4_t four = vaddq_f32(vaddq_f32(acc[0], acc[1]), vaddq_f32(acc[2], acc[3]));
    const float32x4_t pairs = vpaddq_f32(four, four); /* (0 + 1, 2 + 3, ...) */
    total = vgetq_lane_f32(pairs, 0) + vgetq_lane_f32(pairs, 1);
#else
    float lane[16] = {0.f};
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) lane[j] = fmaf(a[i + j], b[i + j], lane[j]);
    float four[4];
    for (int j = 0; j < 4; j++) four[j] = (lane[j] + lane[j + 4]) + (lane[j + 8] + lane[j + 12]);
    total = (four[0] + four[1]) + (four[2] + four[3]);
#endif
    for (; i < n; i++) total = fmaf(a[i], b[i], total);
    return total;
}
#endif

#ifdef EC_VECTOR
/* per 16 values (one 128-bit lane): natural order -> bit-plane order of 2-, 4- and 8-bit words */
static const int8_t plane_order[3][16] = {{0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15},
                                          {0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15},
                                          {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}};

/* Bytes of a group's scales, padded to whole 32-byte lines. */
static int scale_header_bytes(int scale_format, int blocks) {
    if (scale_format == EC_SCALES_PER_ROW) return 32;
    const int bytes = blocks * 8 * (scale_format == EC_SCALES_FP16 ? 2 : 4);
    return (bytes + 31) / 32 * 32;
}

/* Bytes before a group's codes: its scales, then its offsets ([blocks, 8] fp32) if it has them. */
static int group_header_bytes(const ec_linear *w, int blocks) {
    return scale_header_bytes(w->scale_format, blocks) + (w->offset_kind ? blocks * 8 * 4 : 0);
}
#endif

#ifdef EC_AVX2

/* One whole block of a multiple of 32 values: returns sum(q) and writes amax / the float sum. */
static int32_t quantize_block_avx2(const float *x, int block, int bits, int8_t *q, float *amax_out, float *exact_out) {
    const __m256 sign = _mm256_set1_ps(-0.f);
    __m256 amax = _mm256_setzero_ps(), exact = _mm256_setzero_ps();
    for (int j = 0; j < block; j += 8) {
        const __m256 v = _mm256_loadu_ps(x + j);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v));
        exact = _mm256_add_ps(exact, v);
    }
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    const float top = _mm_cvtss_f32(m), inv = top > 0.f ? 127.f / top : 0.f;
    const __m256 scale = _mm256_set1_ps(inv);
    const __m256i order = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)plane_order[bits == 2 ? 0 : bits == 4 ? 1 : 2]));
    const __m256i natural = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    __m256i total = _mm256_setzero_si256();
    for (int j = 0; j < block; j += 32) {
        __m256i v[4];
        for (int c = 0; c < 4; c++) {
            v[c] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + j + 8 * c), scale)); /* nearest, ties to even */
            total = _mm256_add_epi32(total, v[c]);
        }
        __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
        bytes = _mm256_shuffle_epi8(_mm256_permutevar8x32_epi32(bytes, natural), order);
        _mm256_storeu_si256((__m256i *)(q + j), bytes);
    }
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
    *amax_out = top;
    *exact_out = hsum(exact);
    return _mm_cvtsi128_si32(t);
}
#endif

#ifdef EC_NEON
/* One whole block of a multiple of 16 values: returns sum(q) and writes amax. The portable loop's values exactly:
 * max is order-free, x * inv is one rounding, FCVTNS rounds to nearest with ties to even as nearbyintf does. */
static int32_t quantize_block_neon(const float *x, int block, int bits, int8_t *q, float *amax_out) {
    float32x4_t amax = vdupq_n_f32(0.f);
    for (int j = 0; j < block; j += 4) amax = vmaxq_f32(amax, vabsq_f32(vld1q_f32(x + j)));
    const float top = vmaxvq_f32(amax), inv = top > 0.f ? 127.f / top : 0.f;
    const float32x4_t scale = vdupq_n_f32(inv);
    const int8x16_t order = vld1q_s8(plane_order[bits == 2 ? 0 : bits == 4 ? 1 : 2]);
    int32x4_t total = vdupq_n_s32(0);
    for (int j = 0; j < block; j += 16) {
        int32x4_t v[4];
        for (int c = 0; c < 4; c++) {
            v[c] = vcvtnq_s32_f32(vmulq_f32(vld1q_f32(x + j + 4 * c), scale));
            total = vaddq_s32(total, v[c]);
        }
        const int16x8_t low = vcombine_s16(vmovn_s32(v[0]), vmovn_s32(v[1]));
        const int16x8_t high = vcombine_s16(vmovn_s32(v[2]), vmovn_s32(v[3]));
        const int8x16_t bytes = vcombine_s8(vmovn_s16(low), vmovn_s16(high)); /* |v| <= 127: narrowing is exact */
        vst1q_s8(q + j, vqtbl1q_s8(bytes, vreinterpretq_u8_s8(order)));
    }
    *amax_out = top;
    return vaddvq_s32(total);
}
#endif

/* Exact activations (ec_linear.exact): no int8 rounding of the input, which int8 activations cost (docs/QUANTIZATION.md,
 * "Activation precision"). The input is kept as it is (gathered where the linear has an input order), zeros padding
 * the last block, with its per-block sums in plain order for the zero points and offsets. */
static void exact_input(const ec_linear *w, const float *x, ec_act *a) {
    const int block = w->block, blocks = (w->k + block - 1) / block;
    for (int i = 0; i < w->k; i++) a->xf[i] = w->input_order ? x[w->input_order[i]] : x[i];
    for (int i = w->k; i < blocks * block; i++) a->xf[i] = 0.f;
    for (int b = 0; b < blocks; b++) {
        float total = 0.f;
        for (int j = 0; j < block; j++) total += a->xf[b * block + j];
        a->exact[b] = a->sum[b] = total; /* integer zero points' terms multiply it too: no quantized sum exists */
    }
}

static void quantize(const ec_linear *w, const float *x_in, float *gathered, ec_act *a) {
    if (w->exact) {
        exact_input(w, x_in, a);
        return;
    }
    const float *x = x_in;
    if (w->input_order) {
        for (int i = 0; i < w->k; i++) gathered[i] = x_in[w->input_order[i]];
        x = gathered;
    }
    const int block = w->block, blocks = (w->k + block - 1) / block;
    const int bits = read_bits(w), planes = plane_bits(bits);
    const int per = 8 / planes, chunk = chunk_bytes(block, planes), span = chunk * per;
    float natural[EC_MAX_BLOCK];
    for (int b = 0; b < blocks; b++) {
        const int base = b * block, valid = w->k - base < block ? w->k - base : block;
        float amax = 0.f, exact = 0.f;
        int8_t *q = a->q + base;
        int32_t total = 0;
#if defined(EC_AVX2)
        if (valid == block && block % 32 == 0) {
            total = quantize_block_avx2(x + base, block, planes, q, &amax, &exact);
        } else
#elif defined(EC_NEON)
        if (valid == block && block % 16 == 0) {
            total = quantize_block_neon(x + base, block, planes, q, &amax);
            if (w->offsets) /* the float input sum, in the portable order, only where float zero points read it */
                for (int j = 0; j < block; j++) exact += x[base + j];
        } else
#endif
        {
            for (int j = 0; j < valid; j++) {
                exact += x[base + j];
                amax = fmaxf(amax, fabsf(x[base + j]));
            }
            const float inv = amax > 0.f ? 127.f / amax : 0.f;
            /* bit-plane order within each word: element (i * per + p) of the word goes to p * chunk + i */
            for (int j = 0; j < block; j++) natural[j] = j < valid ? nearbyintf(x[base + j] * inv) : 0.f;
            for (int c = 0; c < block; c += span)
                for (int p = 0; p < per; p++)
                    for (int i = 0; i < chunk; i++) {
                        int v = (int)natural[c + i * per + p];
                        q[c + p * chunk + i] = (int8_t)v;
                        total += v;
                    }
        }
        const float d = amax / 127.f;
        a->scale[b] = d;
        a->correction[b] = bits == 8 ? 0 : -(1 << (bits - 1)) * total;
        a->sum[b] = d * (float)total;
        a->exact[b] = exact;
    }
}

/* ---- one output row: sum over blocks of scale * (integer dot) ------------------------------------------ */

/* Integer dot of one block: codes as the kernel reads them (unsigned for 2/4 bits, code-128 for 8 bits). */
static int32_t block_dot_portable(const ec_linear *w, const uint8_t *codes, const int8_t *q) {
    const int per = 8 / w->bits, chunk = chunk_bytes(w->block, w->bits), chunks = bytes_per_block(w) / chunk;
    const int mask = (1 << w->bits) - 1, base = w->bits == 8 ? 128 : 0;
    int32_t total = 0, idx = 0;
    for (int c = 0; c < chunks; c++)
        for (int p = 0; p < per; p++)
            for (int i = 0; i < chunk; i++) total += (((codes[c * chunk + i] >> (p * w->bits)) & mask) - base) * q[idx++];
    return total;
}

#ifdef EC_AVX2

static inline __m256i broadcast_word(const int8_t *q) {
    int32_t word;
    memcpy(&word, q, sizeof(word));
    return _mm256_set1_epi32(word);
}

/* int16 pair sums of one 32-byte load of the interleaved copy (8 rows x one 4-byte word, one row per 32-bit
 * lane) against the word's activations, broadcast to every lane; each bit plane is one maddubs. */
static inline __attribute__((always_inline)) __m256i word_dot(const int bits, __m256i raw, const __m256i *x) {
    if (bits == 8) {
        __m256i codes = _mm256_xor_si256(raw, _mm256_set1_epi8((char)0x80)); /* code - 128 */
        return _mm256_maddubs_epi16(_mm256_sign_epi8(codes, codes), _mm256_sign_epi8(x[0], codes));
    }
    if (bits == 2) { /* one shift: planes 1 and 3 are masked in place (four times their value), summed apart */
        const __m256i low = _mm256_set1_epi8(0x03), high = _mm256_set1_epi8(0x0C), shifted = _mm256_srli_epi16(raw, 4);
        const __m256i even = _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(raw, low), x[0]),
                                              _mm256_maddubs_epi16(_mm256_and_si256(shifted, low), x[2]));
        const __m256i odd4 = _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(raw, high), x[1]),
                                              _mm256_maddubs_epi16(_mm256_and_si256(shifted, high), x[3]));
        return _mm256_add_epi16(even, _mm256_srai_epi16(odd4, 2)); /* odd4 <= 2*2*12*127: exact, no overflow */
    }
    const __m256i mask = _mm256_set1_epi8(0x0F);
    return _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(raw, mask), x[0]),
                            _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(raw, 4), mask), x[1]));
}

#ifdef EC_VNNI
/* The 2- or 4-bit planes of one load times their activations, added straight into int32 lanes; one body for 256-bit
 * vectors (one word per load) and 512-bit ones (two words: lanes 0-7 the first word's rows, 8-15 the second's).
 * Planes of 2-bit words are moved to bits 0-1, or to bits 4-5 for a 6-bit stream's high plane (`high`: worth 16
 * of the low plane's units). */
#define EC_PLANE_DOT(name, V, set1_epi8, and_v, srli_epi16, slli_epi16, dot_u8s8)                                      \
    static inline __attribute__((always_inline)) V name(const int bits, const int high, V raw, const V *x, V acc) {    \
        if (bits == 4) {                                                                                                \
            const V mask = set1_epi8(0x0F);                                                                             \
            acc = dot_u8s8(acc, and_v(raw, mask), x[0]);                                                                \
            return dot_u8s8(acc, and_v(srli_epi16(raw, 4), mask), x[1]);                                                \
        }                                                                                                               \
        if (high) {                                                                                                     \
            const V mask = set1_epi8(0x30);                                                                             \
            acc = dot_u8s8(acc, and_v(slli_epi16(raw, 4), mask), x[0]);                                                 \
            acc = dot_u8s8(acc, and_v(slli_epi16(raw, 2), mask), x[1]);                                                 \
            acc = dot_u8s8(acc, and_v(raw, mask), x[2]);                                                                \
            return dot_u8s8(acc, and_v(srli_epi16(raw, 2), mask), x[3]);                                                \
        }                                                                                                               \
        const V mask = set1_epi8(0x03);                                                                                 \
        acc = dot_u8s8(acc, and_v(raw, mask), x[0]);                                                                    \
        acc = dot_u8s8(acc, and_v(srli_epi16(raw, 2), mask), x[1]);                                                     \
        acc = dot_u8s8(acc, and_v(srli_epi16(raw, 4), mask), x[2]);                                                     \
        return dot_u8s8(acc, and_v(srli_epi16(raw, 6), mask), x[3]);                                                    \
    }
EC_PLANE_DOT(plane_dot, __m256i, _mm256_set1_epi8, _mm256_and_si256, _mm256_srli_epi16, _mm256_slli_epi16, dpbusd)

/* word_dot's integer sums, added straight into int32 lanes */
static inline __attribute__((always_inline)) __m256i word_dot_vnni(const int bits, const int high, __m256i raw,
                                                                   const __m256i *x, __m256i acc) {
    if (bits != 8) return plane_dot(bits, high, raw, x, acc);
    const __m256i codes = _mm256_xor_si256(raw, _mm256_set1_epi8((char)0x80)); /* code - 128 */
    return dpbusd(acc, _mm256_abs_epi8(codes), _mm256_sign_epi8(x[0], codes));
}
#endif

#ifdef EC_VNNI512
EC_PLANE_DOT(word_pair_dot, __m512i, _mm512_set1_epi8, _mm512_and_si512, _mm512_srli_epi16, _mm512_slli_epi16,
             _mm512_dpbusd_epi32)

/* dot += the two words' int32 sums (a 512-bit accumulator's halves) */
static inline __m256i add_halves(__m256i dot, __m512i pair) {
    return _mm256_add_epi32(dot, _mm256_add_epi32(_mm512_castsi512_si256(pair), _mm512_extracti64x4_epi64(pair, 1)));
}

static inline __m512i broadcast_word_pair(const int8_t *first, const int8_t *second) {
    int32_t a, b;
    memcpy(&a, first, sizeof(a));
    memcpy(&b, second, sizeof(b));
    return _mm512_inserti64x4(_mm512_set1_epi32(a), _mm256_set1_epi32(b), 1);
}
#endif

/* The per-block input sums the offsets multiply. */
static const float *offset_inputs(const ec_linear *w, const ec_act *a) {
    return w->offset_kind == EC_OFFSETS_ZERO_POINTS ? a->sum : a->exact;
}

/* Adds `words` 32-byte loads of `bits`-bit words (8 rows x one 4-byte word; from *codes, which moves past them) times
 * their activations, from value `first` of each token's q on, into dot[group][token], the 2-bit words times 16
 * for a 6-bit stream's high plane (`high`). With VNNI straight into int32; with AVX2 as int16 pair sums, widened
 * before they can overflow: a word adds at most 2*15*127 per plane pair at 4 bits (widened every 4 words),
 * 2*762 + 2*762 at 2 bits (every 8); 8-bit pairs reach 32512 and are widened every word. */
static inline __attribute__((always_inline)) void add_words(const int bits, const int pairs, const int tokens,
                                                            const uint8_t **codes, size_t group_bytes, const ec_act *acts,
                                                            int first, int words, const int high,
                                                            __m256i dot[2][EC_TOKENS]) {
    const int per = 8 / bits;
#ifdef EC_VNNI
    int word = 0;
#ifdef EC_VNNI512
    if (bits == 2 && !high && tokens == 1) {
        /* Decode: each plane masked in place (worth 1, 4, 16, 64 times its value) into its own accumulator, divided
         * back (exactly: every product carries the factor) when the words end: three shifts fewer per load. (With
         * several tokens the accumulators no longer fit in registers: prefill shifts.) */
        __m512i plane[4][2][EC_TOKENS];
        for (int p = 0; p < 4; p++)
            for (int g = 0; g < pairs; g++)
                for (int t = 0; t < tokens; t++) plane[p][g][t] = _mm512_setzero_si512();
        for (; word + 2 <= words; word += 2, *codes += 64) {
            __m512i raw[2];
            for (int g = 0; g < pairs; g++) raw[g] = _mm512_loadu_si512((const void *)(*codes + g * group_bytes));
            for (int t = 0; t < tokens; t++) {
                const int8_t *q = acts[t].q + first + word * EC_WORD * per;
                for (int p = 0; p < 4; p++) {
                    const __m512i x = broadcast_word_pair(q + EC_WORD * p, q + EC_WORD * (per + p));
                    const __m512i mask = _mm512_set1_epi8((char)(3 << (2 * p)));
                    for (int g = 0; g < pairs; g++)
                        plane[p][g][t] = _mm512_dpbusd_epi32(plane[p][g][t], _mm512_and_si512(raw[g], mask), x);
                }
            }
        }
        for (int g = 0; g < pairs; g++)
            for (int t = 0; t < tokens; t++) {
                const __m512i sum = _mm512_add_epi32(
                    _mm512_add_epi32(plane[0][g][t], _mm512_srai_epi32(plane[1][g][t], 2)),
                    _mm512_add_epi32(_mm512_srai_epi32(plane[2][g][t], 4), _mm512_srai_epi32(plane[3][g][t], 6)));
                dot[g][t] = add_halves(dot[g][t], sum);
            }
    } else if (bits != 8) {
        __m512i wide[2][EC_TOKENS];
        for (int g = 0; g < pairs; g++)
            for (int t = 0; t < tokens; t++) wide[g][t] = _mm512_setzero_si512();
        for (; word + 2 <= words; word += 2, *codes += 64) {
            __m512i raw[2];
            for (int g = 0; g < pairs; g++) raw[g] = _mm512_loadu_si512((const void *)(*codes + g * group_bytes));
            for (int t = 0; t < tokens; t++) {
                const int8_t *q = acts[t].q + first + word * EC_WORD * per;
                __m512i x[4];
                for (int p = 0; p < per; p++) x[p] = broadcast_word_pair(q + EC_WORD * p, q + EC_WORD * (per + p));
                for (int g = 0; g < pairs; g++) wide[g][t] = word_pair_dot(bits, high, raw[g], x, wide[g][t]);
            }
        }
        for (int g = 0; g < pairs; g++)
            for (int t = 0; t < tokens; t++) dot[g][t] = add_halves(dot[g][t], wide[g][t]);
    }
#endif
    for (; word < words; word++, *codes += 32) {
        __m256i raw[2];
        for (int g = 0; g < pairs; g++) raw[g] = _mm256_loadu_si256((const __m256i *)(*codes + g * group_bytes));
        for (int t = 0; t < tokens; t++) {
            const int8_t *q = acts[t].q + first + word * EC_WORD * per;
            __m256i x[4];
            for (int p = 0; p < per; p++) x[p] = broadcast_word(q + EC_WORD * p);
            for (int g = 0; g < pairs; g++) dot[g][t] = word_dot_vnni(bits, high, raw[g], x, dot[g][t]);
        }
    }
#else
    const int widen_every = bits == 4 ? 4 : bits == 2 ? 8 : 1;
    const __m256i weight = _mm256_set1_epi16(high ? 16 : 1);
    for (int start = 0; start < words; start += widen_every) {
        const int stop = start + widen_every < words ? start + widen_every : words;
        __m256i sums[2][EC_TOKENS];
        for (int g = 0; g < pairs; g++)
            for (int t = 0; t < tokens; t++) sums[g][t] = _mm256_setzero_si256();
        for (int word = start; word < stop; word++, *codes += 32) {
            __m256i raw[2];
            for (int g = 0; g < pairs; g++) raw[g] = _mm256_loadu_si256((const __m256i *)(*codes + g * group_bytes));
            for (int t = 0; t < tokens; t++) {
                const int8_t *q = acts[t].q + first + word * EC_WORD * per;
                __m256i x[4];
                for (int p = 0; p < per; p++) x[p] = broadcast_word(q + EC_WORD * p);
                for (int g = 0; g < pairs; g++) sums[g][t] = _mm256_add_epi16(sums[g][t], word_dot(bits, raw[g], x));
            }
        }
        for (int g = 0; g < pairs; g++)
            for (int t = 0; t < tokens; t++) dot[g][t] = _mm256_add_epi32(dot[g][t], _mm256_madd_epi16(sums[g][t], weight));
    }
#endif
}

/* `pairs` row groups of 8 rows from the interleaved copy against `tokens` tokens' activations (acts[t]; outputs
 * out + t * stride). A group is one sequential stream (prefetched EC_PREFETCH_BLOCKS ahead): its 8 rows' scales
 * and offsets (group_header_bytes), then per block its words (add_words), one row per 32-bit lane. Lanes are rows,
 * so a block ends with one convert and one fma per 8 rows; every load of codes serves all tokens and every
 * activation broadcast all groups. A decode step runs two groups for one token; a prefill pass one group for up
 * to EC_TOKENS tokens, with the same arithmetic per token, so its rows equal the decode step's bit for bit.
 * A 6-bit block is its codes' low 4 bits as a 4-bit block (block/8 words, activations in that order) and then
 * their high 2 bits as block/16 2-bit words, whose byte i of word h holds, from bit 0 up, those of values
 * 16h+2i, 16h+2i+1, 16h+8+2i and 16h+8+2i+1: the planes of 4-bit words 2h and 2h+1, so the same activations
 * serve both. */
static inline __attribute__((always_inline)) void groups_avx2(const int bits, const int pairs, const int tokens,
                                                              const int scale_format, const ec_linear *w, int group,
                                                              const ec_act *acts, float *out, int stride, int count) {
    const int blocks = (w->k + w->block - 1) / w->block, words = w->block * bits / 8 / EC_WORD;
    const int header = group_header_bytes(w, blocks);
    const size_t group_bytes = header + (size_t)blocks * words * 32;
    const uint8_t *scales = w->packed + group * group_bytes, *codes = scales + header;
    const float *offsets = (const float *)(scales + scale_header_bytes(scale_format, blocks));
    const size_t ahead = (size_t)EC_PREFETCH_BLOCKS * words * 32;
    __m256 acc[2][EC_TOKENS];
    for (int g = 0; g < pairs; g++)
        for (int t = 0; t < tokens; t++) acc[g][t] = _mm256_setzero_ps();
    for (int b = 0; b < blocks; b++) {
        for (int g = 0; g < pairs; g++)
            for (int line = 0; line < words * 32; line += 64)
                _mm_prefetch((const char *)(codes + g * group_bytes + ahead + line), _MM_HINT_T0);
        __m256i dot[2][EC_TOKENS];
        for (int g = 0; g < pairs; g++)
            for (int t = 0; t < tokens; t++) dot[g][t] = _mm256_setzero_si256();
        if (bits == 6) {
            add_words(4, pairs, tokens, &codes, group_bytes, acts, b * w->block, w->block / 8, 0, dot);
            add_words(2, pairs, tokens, &codes, group_bytes, acts, b * w->block, w->block / 16, 1, dot);
        } else {
            add_words(bits, pairs, tokens, &codes, group_bytes, acts, b * w->block, words, 0, dot);
        }
        for (int g = 0; g < pairs; g++) {
            const uint8_t *own = scales + g * group_bytes;
            __m256 row_scale = _mm256_set1_ps(1.f); /* EC_SCALES_PER_ROW: applied once at the end */
            if (scale_format == EC_SCALES_FP16) row_scale = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)own + b));
            if (scale_format == EC_SCALES_FP32) row_scale = _mm256_loadu_ps((const float *)own + 8 * b);
            for (int t = 0; t < tokens; t++) {
                const __m256 dot_f = _mm256_cvtepi32_ps(_mm256_add_epi32(dot[g][t], _mm256_set1_epi32(acts[t].correction[b])));
                acc[g][t] = _mm256_fmadd_ps(dot_f, _mm256_mul_ps(row_scale, _mm256_set1_ps(acts[t].scale[b])), acc[g][t]);
                if (w->offset_kind) /* never with EC_SCALES_PER_ROW, whose row scale multiplies acc at the end */
                    acc[g][t] = _mm256_fmadd_ps(_mm256_loadu_ps(offsets + g * group_bytes / 4 + 8 * b),
                                                _mm256_set1_ps(offset_inputs(w, &acts[t])[b]), acc[g][t]);
            }
        }
    }
    for (int g = 0; g < pairs; g++)
        for (int t = 0; t < tokens; t++) {
            float rows[8];
            if (scale_format == EC_SCALES_PER_ROW)
                acc[g][t] = _mm256_mul_ps(acc[g][t], _mm256_loadu_ps((const float *)(scales + g * group_bytes)));
            _mm256_storeu_ps(rows, acc[g][t]);
            for (int r = 0; r < 8 && 8 * g + r < count; r++) out[(size_t)t * stride + 8 * g + r] = rows[r];
        }
}

#define EC_GROUPS groups_avx2
#endif

#ifdef EC_NEON
/* Plane p of one 16-byte load (4 rows x one 4-byte word, a row per 32-bit lane) as signed bytes: 2- and 4-bit values
 * at bits 0-1 / 0-3, or at bits 4-5 for a 6-bit stream's high plane (`high`: worth 16 of the low plane's units, as
 * on x86), 8-bit codes centred (code - 128). NEON shifts bytes, so no mask follows a right shift to the top. */
static inline __attribute__((always_inline)) int8x16_t neon_plane(const int bits, const int high, uint8x16_t raw, const int p) {
    if (bits == 8) return vreinterpretq_s8_u8(veorq_u8(raw, vdupq_n_u8(0x80)));
    if (bits == 4) return vreinterpretq_s8_u8(p == 0 ? vandq_u8(raw, vdupq_n_u8(0x0F)) : vshrq_n_u8(raw, 4));
    if (high) {
        const uint8x16_t mask = vdupq_n_u8(0x30);
        const uint8x16_t v = p == 0 ? vshlq_n_u8(raw, 4) : p == 1 ? vshlq_n_u8(raw, 2) : p == 2 ? raw : vshrq_n_u8(raw, 2);
        return vreinterpretq_s8_u8(vandq_u8(v, mask));
    }
    if (p == 3) return vreinterpretq_s8_u8(vshrq_n_u8(raw, 6));
    const uint8x16_t v = p == 0 ? raw : p == 1 ? vshrq_n_u8(raw, 2) : vshrq_n_u8(raw, 4);
    return vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(0x03)));
}

/* The 4 activation bytes of one plane of a word, in every lane. */
static inline int8x16_t neon_broadcast(const int8_t *q) {
    int32_t word;
    memcpy(&word, q, sizeof(word));
    return vreinterpretq_s8_s32(vdupq_n_s32(word));
}

/* Integer sums of one block, per token, group and half (rows 0-3, 4-7): with dotprod one int32 per row
 * ([..][0]); without, pair sums (vpadal of s16 products) of rows 0-1 in [..][0] and 2-3 in [..][1], added pairwise
 * when the block ends (neon_row_sums). */
typedef int32x4_t ec_neon_sums[2][2][2];
typedef ec_neon_sums ec_neon_dot[EC_TOKENS];

static inline __attribute__((always_inline)) int32x4_t neon_row_sums(int32x4_t *sums) {
#ifdef EC_DOTPROD
    return sums[0];
#else
    return vpaddq_s32(sums[0], sums[1]);
#endif
}

/* Adds `words` 32-byte loads of `bits`-bit words (two 16-byte halves of 8 rows x one word; from *codes, which moves
 * past them) times their activations, from value `first` of each token's q on, into dot (see groups_avx2's add_words:
 * the same products, summed exactly). Without dotprod a word's planes are multiplied into s16 (at most
 * 4 x 48 x 127 < 2^15 per lane, the 6-bit high plane) and widened once per word. */
static inline __attribute__((always_inline)) void add_words_neon(const int bits, const int pairs, const int tokens,
                                                                 const uint8_t **codes, size_t group_bytes,
                                                                 const ec_act *acts, int first, int words,
                                                                 const int high, ec_neon_sums *dot) {
    const int per = 8 / bits;
    for (int word = 0; word < words; word++, *codes += 32) {
        int8x16_t planes[2][2][4];
        for (int g = 0; g < pairs; g++)
            for (int h = 0; h < 2; h++) {
                const uint8x16_t raw = vld1q_u8(*codes + g * group_bytes + 16 * h);
                for (int p = 0; p < per; p++) planes[g][h][p] = neon_plane(bits, high, raw, p);
            }
        for (int t = 0; t < tokens; t++) {
            const int8_t *q = acts[t].q + first + word * EC_WORD * per;
            int8x16_t x[4];
            for (int p = 0; p < per; p++) x[p] = neon_broadcast(q + EC_WORD * p);
            for (int g = 0; g < pairs; g++)
                for (int h = 0; h < 2; h++) {
#ifdef EC_DOTPROD
                    for (int p = 0; p < per; p++) dot[t][g][h][0] = vdotq_s32(dot[t][g][h][0], planes[g][h][p], x[p]);
#else
                    int16x8_t low = vmull_s8(vget_low_s8(planes[g][h][0]), vget_low_s8(x[0]));
                    int16x8_t top = vmull_high_s8(planes[g][h][0], x[0]);
                    for (int p = 1; p < per; p++) {
                        low = vmlal_s8(low, vget_low_s8(planes[g][h][p]), vget_low_s8(x[p]));
                        top = vmlal_high_s8(top, planes[g][h][p], x[p]);
                    }
                    dot[t][g][h][0] = vpadalq_s16(dot[t][g][h][0], low);
                    dot[t][g][h][1] = vpadalq_s16(dot[t][g][h][1], top);
#endif
                }
        }
    }
}

#ifdef EC_I8MM
/* Prefill with i8mm: SMMLA multiplies 2 rows x 8 codes by 8 activations x 2 tokens into a 2x2 int32 block, twice
 * SDOT's products per instruction. A row's 8 codes are two of its 4-byte planes zipped side by side (planes 2k and
 * 2k+1 of a word, whose activations are 8 consecutive bytes; for 8-bit codes two consecutive words), so the
 * interleaved layout serves as it is. Adds the integer sums of token pairs (0, 1) and (2, 3) into dot; the same
 * products as add_words_neon, so the same integers. */
static inline __attribute__((always_inline)) void add_words_i8mm(const int bits, const int token_pairs,
                                                                 const uint8_t **codes, const ec_act *acts, int first,
                                                                 int words, const int high, ec_neon_sums *dot) {
    const int per = 8 / bits, step = bits == 8 ? 2 : 1; /* words per round */
    int32x4_t block[2][2][2]; /* [token pair][half][rows 0-1 | rows 2-3]: lanes (row r, token t) as r0t0 r0t1 r1t0 r1t1 */
    for (int k = 0; k < token_pairs; k++)
        for (int h = 0; h < 2; h++) block[k][h][0] = block[k][h][1] = vdupq_n_s32(0);
    for (int word = 0; word < words; word += step, *codes += 32 * step) {
        int32x4_t rows[2][2][2]; /* [half][plane pair][rows 0-1 | 2-3] */
        const int plane_pairs = bits == 8 ? 1 : per / 2;
        for (int h = 0; h < 2; h++) {
            const uint8x16_t raw = vld1q_u8(*codes + 16 * h);
            for (int k = 0; k < plane_pairs; k++) {
                const int32x4_t a = vreinterpretq_s32_s8(neon_plane(bits, high, raw, bits == 8 ? 0 : 2 * k));
                const int32x4_t b = vreinterpretq_s32_s8(bits == 8 ? neon_plane(8, 0, vld1q_u8(*codes + 32 + 16 * h), 0)
                                                                   : neon_plane(bits, high, raw, 2 * k + 1));
                rows[h][k][0] = vzip1q_s32(a, b);
                rows[h][k][1] = vzip2q_s32(a, b);
            }
        }
        for (int k = 0; k < token_pairs; k++)
            for (int pp = 0; pp < plane_pairs; pp++) {
                const int offset = first + word * EC_WORD * per + 8 * pp;
                const int8x16_t x = vcombine_s8(vld1_s8(acts[2 * k].q + offset), vld1_s8(acts[2 * k + 1].q + offset));
                for (int h = 0; h < 2; h++)
                    for (int r = 0; r < 2; r++)
                        block[k][h][r] = vmmlaq_s32(block[k][h][r], vreinterpretq_s8_s32(rows[h][pp][r]), x);
            }
    }
    for (int k = 0; k < token_pairs; k++)
        for (int h = 0; h < 2; h++) {
            dot[2 * k][0][h][0] = vaddq_s32(dot[2 * k][0][h][0], vuzp1q_s32(block[k][h][0], block[k][h][1]));
            dot[2 * k + 1][0][h][0] = vaddq_s32(dot[2 * k + 1][0][h][0], vuzp2q_s32(block[k][h][0], block[k][h][1]));
        }
}
#endif

/* The integer sums of one block of `bits`-bit words (see groups_avx2 for 6-bit blocks). */
static inline __attribute__((always_inline)) void block_dots_neon(const int bits, const int pairs, const int tokens,
                                                                  const uint8_t **codes, size_t group_bytes,
                                                                  const ec_act *acts, int first, int words,
                                                                  const int high, ec_neon_sums *dot) {
#ifdef EC_I8MM
    if (tokens >= 2 && pairs == 1 && (bits != 8 || words % 2 == 0)) {
        const uint8_t *start = *codes;
        add_words_i8mm(bits, tokens / 2, codes, acts, first, words, high, dot);
        if (tokens % 2) { /* the odd token with SDOT, over the same words */
            add_words_neon(bits, 1, 1, &start, group_bytes, acts + tokens - 1, first, words, high, dot + tokens - 1);
        }
        return;
    }
#endif
    add_words_neon(bits, pairs, tokens, codes, group_bytes, acts, first, words, high, dot);
}

/* groups_avx2 on NEON: `pairs` row groups of 8 rows (two 4-row halves) against `tokens` tokens, with the portable
 * path's float arithmetic per row: per block, total + (row scale * input scale) * (float)(dot + correction),
 * unfused; offsets, where a linear has them, are added afterwards from their loose copy (zero_point_term), as the
 * portable path does. */
static inline __attribute__((always_inline)) void groups_neon(const int bits, const int pairs, const int tokens,
                                                              const int scale_format, const ec_linear *w, int group,
                                                              const ec_act *acts, float *out, int stride, int count) {
    const int blocks = (w->k + w->block - 1) / w->block, words = w->block * bits / 8 / EC_WORD;
    const int header = group_header_bytes(w, blocks);
    const size_t group_bytes = header + (size_t)blocks * words * 32;
    const uint8_t *scales = w->packed + group * group_bytes, *codes = scales + header;
    const size_t ahead = (size_t)EC_PREFETCH_BLOCKS * words * 32;
    float32x4_t acc[EC_TOKENS][2][2];
    for (int t = 0; t < tokens; t++)
        for (int g = 0; g < pairs; g++) acc[t][g][0] = acc[t][g][1] = vdupq_n_f32(0.f);
    for (int b = 0; b < blocks; b++) {
        for (int g = 0; g < pairs; g++)
            for (int line = 0; line < words * 32; line += 64) __builtin_prefetch(codes + g * group_bytes + ahead + line);
        ec_neon_dot dot;
        for (int t = 0; t < tokens; t++)
            for (int g = 0; g < pairs; g++)
                for (int h = 0; h < 2; h++) dot[t][g][h][0] = dot[t][g][h][1] = vdupq_n_s32(0);
        if (bits == 6) {
            block_dots_neon(4, pairs, tokens, &codes, group_bytes, acts, b * w->block, w->block / 8, 0, dot);
            block_dots_neon(2, pairs, tokens, &codes, group_bytes, acts, b * w->block, w->block / 16, 1, dot);
        } else {
            block_dots_neon(bits, pairs, tokens, &codes, group_bytes, acts, b * w->block, words, 0, dot);
        }
        for (int g = 0; g < pairs; g++) {
            const uint8_t *own = scales + g * group_bytes;
            for (int h = 0; h < 2; h++) {
                float32x4_t row_scale; /* rows 4h..4h+3 of the group */
                if (scale_format == EC_SCALES_FP16) row_scale = vcvt_f32_f16(vld1_f16((const float16_t *)own + 8 * b + 4 * h));
                else if (scale_format == EC_SCALES_FP32) row_scale = vld1q_f32((const float *)own + 8 * b + 4 * h);
                else row_scale = vld1q_f32((const float *)own + 4 * h); /* EC_SCALES_PER_ROW: every block's scale */
                for (int t = 0; t < tokens; t++) {
                    const int32x4_t sums = vaddq_s32(neon_row_sums(dot[t][g][h]), vdupq_n_s32(acts[t].correction[b]));
                    const float32x4_t product = vmulq_f32(vmulq_f32(row_scale, vdupq_n_f32(acts[t].scale[b])), vcvtq_f32_s32(sums));
                    acc[t][g][h] = vaddq_f32(acc[t][g][h], product);
                }
            }
        }
    }
    for (int t = 0; t < tokens; t++)
        for (int g = 0; g < pairs; g++) {
            float rows[8];
            vst1q_f32(rows, acc[t][g][0]);
            vst1q_f32(rows + 4, acc[t][g][1]);
            for (int r = 0; r < 8 && 8 * g + r < count; r++) out[(size_t)t * stride + 8 * g + r] = rows[r];
        }
}
#define EC_GROUPS groups_neon
#endif

#ifdef EC_VECTOR
/* Decode: one token, two groups at a time. */
#define EC_ROW_KERNELS(bits, format)                                                                                     \
    static void rows_##bits##_##format(const ec_linear *w, int row, int count, const ec_act *a, float *out) {           \
        int r = 0;                                                                                                        \
        for (; r + 16 <= count; r += 16) EC_GROUPS(bits, 2, 1, format, w, (row + r) / 8, a, out + r, 0, 16);           \
        for (; r < count; r += 8) EC_GROUPS(bits, 1, 1, format, w, (row + r) / 8, a, out + r, 0, count - r);             \
    }
#define EC_ROW_KERNELS_ALL_BITS(format) \
    EC_ROW_KERNELS(2, format) EC_ROW_KERNELS(4, format) EC_ROW_KERNELS(6, format) EC_ROW_KERNELS(8, format)
EC_ROW_KERNELS_ALL_BITS(0) /* EC_SCALES_FP32 */
EC_ROW_KERNELS_ALL_BITS(1) /* EC_SCALES_FP16 */
EC_ROW_KERNELS_ALL_BITS(2) /* EC_SCALES_PER_ROW */

typedef void (*ec_rows_kernel)(const ec_linear *, int, int, const ec_act *, float *);
static ec_rows_kernel rows_kernel(const ec_linear *w) {
    static const ec_rows_kernel kernels[3][4] = {{rows_2_0, rows_4_0, rows_6_0, rows_8_0},
                                                 {rows_2_1, rows_4_1, rows_6_1, rows_8_1},
                                                 {rows_2_2, rows_4_2, rows_6_2, rows_8_2}};
    return kernels[w->scale_format][w->stream_bits / 2 - 1];
}

/* Prefill: one group, up to EC_TOKENS tokens at a time. */
#define EC_TOKEN_KERNELS(bits, format)                                                                                    \
    static void tokens_##bits##_##format(const ec_linear *w, int group, const ec_act *acts, int tokens, float *out,       \
                                         int stride, int count) {                                                         \
        switch (tokens) {                                                                                                 \
        case 1: EC_GROUPS(bits, 1, 1, format, w, group, acts, out, stride, count); break;                             \
        case 2: EC_GROUPS(bits, 1, 2, format, w, group, acts, out, stride, count); break;                             \
        case 3: EC_GROUPS(bits, 1, 3, format, w, group, acts, out, stride, count); break;                             \
        default: EC_GROUPS(bits, 1, 4, format, w, group, acts, out, stride, count); break;                            \
        }                                                                                                                 \
    }
#define EC_TOKEN_KERNELS_ALL_BITS(format) \
    EC_TOKEN_KERNELS(2, format) EC_TOKEN_KERNELS(4, format) EC_TOKEN_KERNELS(6, format) EC_TOKEN_KERNELS(8, format)
EC_TOKEN_KERNELS_ALL_BITS(0)
EC_TOKEN_KERNELS_ALL_BITS(1)
EC_TOKEN_KERNELS_ALL_BITS(2)

typedef void (*ec_tokens_kernel)(const ec_linear *, int, const ec_act *, int, float *, int, int);
static ec_tokens_kernel tokens_kernel(const ec_linear *w) {
    static const ec_tokens_kernel kernels[3][4] = {{tokens_2_0, tokens_4_0, tokens_6_0, tokens_8_0},
                                                   {tokens_2_1, tokens_4_1, tokens_6_1, tokens_8_1},
                                                   {tokens_2_2, tokens_4_2, tokens_6_2, tokens_8_2}};
    return kernels[w->scale_format][w->stream_bits / 2 - 1];
}

/* Rows the vectorised kernels compute; others take the portable path over the stored codes, with activations in the
 * same order (2/4/8-bit streams keep the stored words' order; 6-bit streams are made only for linears split in whole
 * 16-row items, so every row is covered). */
static int packed_covers(const ec_linear *w, int row) {
    return w->packed && row % 8 == 0 && w->block * w->stream_bits / 8 % EC_WORD == 0;
}
#endif

/* The integer zero point of one block: stored (packed like the codes, per row) or the middle code. */
static int zero_point(const ec_linear *w, int row, int b) {
    if (!w->zero_points) return 1 << (w->bits - 1);
    const int blocks = (w->k + w->block - 1) / w->block, per = 8 / w->bits, stride = (blocks * w->bits + 7) / 8;
    return (w->zero_points[(size_t)row * stride + b / per] >> ((b % per) * w->bits)) & ((1 << w->bits) - 1);
}

/* What the middle-code dot misses: explicit zero points ((middle - z) * sum(x) per block) and float zero
 * points (offset * exact block sum). */
static float zero_point_term(const ec_linear *w, int row, const ec_act *a) {
    const int blocks = (w->k + w->block - 1) / w->block;
    float total = 0.f;
#ifdef EC_AVX2
    if (w->zero_terms) {
        const float *terms = w->zero_terms + (size_t)row * blocks;
#pragma omp simd reduction(+ : total)
        for (int b = 0; b < blocks; b++) total += terms[b] * a->sum[b];
    }
    if (w->offsets) {
        const float *off = w->offsets + (size_t)row * blocks;
#pragma omp simd reduction(+ : total)
        for (int b = 0; b < blocks; b++) total += off[b] * a->exact[b];
    }
#else
    if (w->zero_terms) total += dot_lanes(w->zero_terms + (size_t)row * blocks, a->sum, blocks);
    if (w->offsets) total += dot_lanes(w->offsets + (size_t)row * blocks, a->exact, blocks);
#endif
    return total;
}

/* ---- exact activations: the float input times the dequantized codes ------------------------------------ */

/* One float order on every build, so the vectorised paths' rows equal the portable C's bit for bit: per row and
 * block, value j's (code - middle) times input j fused into partial sum j mod 4 in increasing j, the partials added as
 * (0 + 1) + (2 + 3), the block's scale times that fused into the row's total block by block; the zero-point or offset
 * terms times the exact block sums fused into a second total the same way (exact_offset_term), added last. The
 * vectorised kernels hold a group's 8 rows in the lanes of a vector, each lane running that loop. */
#define EC_EXACT_PARTIALS 4

/* A row's zero-point terms or float offsets (one kind per linear) against the exact block sums. */
static float exact_offset_term(const ec_linear *w, int row, const ec_act *a) {
    const int blocks = (w->k + w->block - 1) / w->block;
    const float *terms = w->zero_terms ? w->zero_terms : w->offsets;
    size_t step = 1;
#ifdef EC_VECTOR
    if (w->packed && w->offset_kind) { /* in the interleaved copy: [blocks, 8] after the group's scales */
        const size_t group_bytes = group_header_bytes(w, blocks) + (size_t)blocks * w->block * w->stream_bits;
        terms = (const float *)(w->packed + (size_t)(row / 8) * group_bytes + scale_header_bytes(w->scale_format, blocks)) + row % 8;
        step = 8;
    } else
#endif
    if (terms) terms += (size_t)row * blocks;
    float total = 0.f;
    for (int b = 0; terms && b < blocks; b++) total = fmaf(terms[b * step], a->exact[b], total);
    return total;
}

/* One block of the stored layout against its inputs x. */
static float exact_block_portable(const ec_linear *w, const uint8_t *codes, const float *x) {
    const int per = 8 / w->bits, mask = (1 << w->bits) - 1, middle = 1 << (w->bits - 1);
    float partial[EC_EXACT_PARTIALS] = {0.f, 0.f, 0.f, 0.f};
    for (int j = 0; j < w->block; j++) {
        const int value = ((codes[j / per] >> ((j % per) * w->bits)) & mask) - middle;
        partial[j % EC_EXACT_PARTIALS] = fmaf(x[j], (float)value, partial[j % EC_EXACT_PARTIALS]);
    }
    return (partial[0] + partial[1]) + (partial[2] + partial[3]);
}

static void exact_rows_portable(const ec_linear *w, int row, int count, const ec_act *a, float *out) {
    const int blocks = (w->k + w->block - 1) / w->block, bpb = bytes_per_block(w);
    for (int r = 0; r < count; r++) {
        float total = 0.f;
        for (int b = 0; b < blocks; b++) {
            const size_t at = (size_t)(row + r) * blocks + b;
            total = fmaf(w->scales[at], exact_block_portable(w, w->codes + at * bpb, a->xf + b * w->block), total);
        }
        out[r] = total + exact_offset_term(w, row + r, a);
    }
}

#ifdef EC_VECTOR
/* 8 rows' floats (a group's, one per lane) and 8 rows' 32-bit code words. */
#ifdef EC_AVX2
typedef __m256 ec_rows8;
typedef __m256i ec_words8;
static inline ec_rows8 rows8_zero(void) { return _mm256_setzero_ps(); }
static inline ec_rows8 rows8_load(const float *p) { return _mm256_loadu_ps(p); }
static inline void rows8_store(float *p, ec_rows8 v) { _mm256_storeu_ps(p, v); }
static inline ec_rows8 rows8_add(ec_rows8 a, ec_rows8 b) { return _mm256_add_ps(a, b); }
static inline ec_rows8 rows8_fma(ec_rows8 a, ec_rows8 b, ec_rows8 c) { return _mm256_fmadd_ps(a, b, c); }
static inline ec_rows8 rows8_fma1(float a, ec_rows8 b, ec_rows8 c) { return _mm256_fmadd_ps(_mm256_set1_ps(a), b, c); }
static inline ec_rows8 rows8_half(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
static inline ec_words8 words8_load(const uint8_t *p) { return _mm256_loadu_si256((const __m256i *)p); }
static inline ec_words8 words8_field(ec_words8 raw, int shift, int mask) {
    return _mm256_and_si256(_mm256_srli_epi32(raw, shift), _mm256_set1_epi32(mask));
}
static inline ec_words8 words8_add_high(ec_words8 low, ec_words8 high) { return _mm256_add_epi32(low, _mm256_slli_epi32(high, 4)); }
static inline ec_rows8 words8_values(ec_words8 codes, int middle) {
    return _mm256_cvtepi32_ps(_mm256_sub_epi32(codes, _mm256_set1_epi32(middle)));
}
#else
typedef struct { float32x4_t half[2]; } ec_rows8;
typedef struct { uint32x4_t half[2]; } ec_words8;
static inline ec_rows8 rows8_zero(void) { return (ec_rows8){{vdupq_n_f32(0.f), vdupq_n_f32(0.f)}}; }
static inline ec_rows8 rows8_load(const float *p) { return (ec_rows8){{vld1q_f32(p), vld1q_f32(p + 4)}}; }
static inline void rows8_store(float *p, ec_rows8 v) { vst1q_f32(p, v.half[0]); vst1q_f32(p + 4, v.half[1]); }
static inline ec_rows8 rows8_add(ec_rows8 a, ec_rows8 b) {
    return (ec_rows8){{vaddq_f32(a.half[0], b.half[0]), vaddq_f32(a.half[1], b.half[1])}};
}
static inline ec_rows8 rows8_fma(ec_rows8 a, ec_rows8 b, ec_rows8 c) { /* a * b + c, one rounding, as fmaf */
    return (ec_rows8){{vfmaq_f32(c.half[0], a.half[0], b.half[0]), vfmaq_f32(c.half[1], a.half[1], b.half[1])}};
}
static inline ec_rows8 rows8_fma1(float a, ec_rows8 b, ec_rows8 c) {
    return (ec_rows8){{vfmaq_n_f32(c.half[0], b.half[0], a), vfmaq_n_f32(c.half[1], b.half[1], a)}};
}
static inline ec_rows8 rows8_half(const uint16_t *p) {
    return (ec_rows8){{vcvt_f32_f16(vld1_f16((const float16_t *)p)), vcvt_f32_f16(vld1_f16((const float16_t *)p + 4))}};
}
static inline ec_words8 words8_load(const uint8_t *p) { return (ec_words8){{vld1q_u32((const uint32_t *)p), vld1q_u32((const uint32_t *)p + 4)}}; }
static inline ec_words8 words8_field(ec_words8 raw, int shift, int mask) {
    const int32x4_t right = vdupq_n_s32(-shift);
    return (ec_words8){{vandq_u32(vshlq_u32(raw.half[0], right), vdupq_n_u32(mask)),
                        vandq_u32(vshlq_u32(raw.half[1], right), vdupq_n_u32(mask))}};
}
static inline ec_words8 words8_add_high(ec_words8 low, ec_words8 high) {
    return (ec_words8){{vaddq_u32(low.half[0], vshlq_n_u32(high.half[0], 4)), vaddq_u32(low.half[1], vshlq_n_u32(high.half[1], 4))}};
}
static inline ec_rows8 words8_values(ec_words8 codes, int middle) {
    const int32x4_t m = vdupq_n_s32(middle);
    return (ec_rows8){{vcvtq_f32_s32(vsubq_s32(vreinterpretq_s32_u32(codes.half[0]), m)),
                       vcvtq_f32_s32(vsubq_s32(vreinterpretq_s32_u32(codes.half[1]), m))}};
}
#endif

/* Values first .. first + span - 1 (exact_span) of one block of a group's interleaved codes as floats (code - middle),
 * value first + u of the 8 rows in vals[u]. A word's 32-bit lane holds `bits`-bit values in natural order from bit 0
 * up; a 6-bit block is a 4-bit block of the low bits, then 2-bit words of the high bits of values 16h+2i, 16h+2i+1,
 * 16h+8+2i, 16h+8+2i+1 in byte i of word h (groups_avx2). */
static inline int exact_span(const int bits) { return bits == 6 ? 16 : 32 / bits; }

static inline __attribute__((always_inline)) void exact_values(const int bits, const uint8_t *codes, int block, int first,
                                                               ec_rows8 *vals) {
    if (bits == 6) {
        const int h = first / 16;
        const ec_words8 low[2] = {words8_load(codes + 64 * h), words8_load(codes + 64 * h + 32)};
        const ec_words8 high = words8_load(codes + (size_t)block / 8 * 32 + 32 * h);
        for (int u = 0; u < 16; u++) { /* its high bits: byte (u % 8) / 2, pair 2 (u / 8) + u % 2 of the byte */
            const int field = 4 * ((u % 8) / 2) + 2 * (u / 8) + u % 2;
            vals[u] = words8_values(words8_add_high(words8_field(low[u / 8], 4 * (u % 8), 15), words8_field(high, 2 * field, 3)), 32);
        }
        return;
    }
    const int per_word = 32 / bits, mask = (1 << bits) - 1, middle = 1 << (bits - 1);
    const ec_words8 raw = words8_load(codes + 32 * (first / per_word));
    for (int v = 0; v < per_word; v++) vals[v] = words8_values(words8_field(raw, bits * v, mask), middle);
}

/* The block scales of a group's 8 rows (a row scale is every block's). */
static inline ec_rows8 exact_scales(const ec_linear *w, const uint8_t *header, int b) {
    if (w->scale_format == EC_SCALES_FP16) return rows8_half((const uint16_t *)header + 8 * b);
    return rows8_load((const float *)header + (w->scale_format == EC_SCALES_FP32 ? 8 * b : 0));
}

/* Rows 8 group .. 8 group + count of the interleaved copy for `tokens` tokens (outputs out + t * stride): each span of
 * values is decoded once (into registers), then met by every token's inputs. */
static inline __attribute__((always_inline)) void exact_group_bits(const int bits, const ec_linear *w, int group,
                                                                   const ec_act *acts, const int tokens, float *out,
                                                                   int stride, int count) {
    const int block = w->block, blocks = (w->k + block - 1) / block, span = exact_span(bits);
    const size_t block_bytes = (size_t)block * bits, group_bytes = group_header_bytes(w, blocks) + blocks * block_bytes;
    const uint8_t *header = w->packed + group * group_bytes, *codes = header + group_header_bytes(w, blocks);
    ec_rows8 acc[EC_TILE];
    for (int t = 0; t < tokens; t++) acc[t] = rows8_zero();
    for (int b = 0; b < blocks; b++) {
        ec_rows8 partial[EC_TILE][EC_EXACT_PARTIALS];
        for (int t = 0; t < tokens; t++)
            for (int p = 0; p < EC_EXACT_PARTIALS; p++) partial[t][p] = rows8_zero();
        for (int first = 0; first < block; first += span) { /* span is a multiple of EC_EXACT_PARTIALS */
            ec_rows8 vals[16];
            exact_values(bits, codes + b * block_bytes, block, first, vals);
            for (int t = 0; t < tokens; t++) {
                const float *x = acts[t].xf + b * block + first;
                for (int u = 0; u < span; u++)
                    partial[t][u % EC_EXACT_PARTIALS] = rows8_fma1(x[u], vals[u], partial[t][u % EC_EXACT_PARTIALS]);
            }
        }
        const ec_rows8 scale = exact_scales(w, header, b);
        for (int t = 0; t < tokens; t++)
            acc[t] = rows8_fma(scale, rows8_add(rows8_add(partial[t][0], partial[t][1]), rows8_add(partial[t][2], partial[t][3])), acc[t]);
    }
    for (int t = 0; t < tokens; t++) {
        float rows[8];
        rows8_store(rows, acc[t]);
        for (int r = 0; r < count; r++) out[(size_t)t * stride + r] = rows[r] + exact_offset_term(w, 8 * group + r, &acts[t]);
    }
}

/* A decode step's one token as its own copy, whose partial sums stay in registers. */
#define EC_EXACT_GROUP(bits)                                                                                           \
    do {                                                                                                               \
        if (tokens == 1) exact_group_bits(bits, w, group, acts, 1, out, stride, count);                               \
        else exact_group_bits(bits, w, group, acts, tokens, out, stride, count);                                      \
    } while (0)

static void exact_group(const ec_linear *w, int group, const ec_act *acts, int tokens, float *out, int stride, int count) {
    switch (w->stream_bits) {
    case 2: EC_EXACT_GROUP(2); break;
    case 4: EC_EXACT_GROUP(4); break;
    case 6: EC_EXACT_GROUP(6); break;
    default: EC_EXACT_GROUP(8); break;
    }
}
#endif

/* Rows [row, row + count) of an exact-activation linear for `tokens` tokens (outputs out + t * stride). */
static void exact_rows(const ec_linear *w, int row, int count, const ec_act *acts, int tokens, float *out, int stride) {
#ifdef EC_VECTOR
    if (packed_covers(w, row)) {
        for (int r = 0; r < count; r += 8) exact_group(w, (row + r) / 8, acts, tokens, out + r, stride, count - r < 8 ? count - r : 8);
        return;
    }
#endif
    for (int t = 0; t < tokens; t++) exact_rows_portable(w, row, count, &acts[t], out + (size_t)t * stride);
}

static void quantized_rows(const ec_linear *w, int row, int count, const ec_act *a, float *out) {
    if (w->exact) {
        exact_rows(w, row, count, a, 1, out, 0);
        return;
    }
    const int blocks = (w->k + w->block - 1) / w->block, bpb = bytes_per_block(w);
    const int explicit_zero = w->zero_terms || w->offsets;
#ifdef EC_VECTOR
    if (packed_covers(w, row)) {
        rows_kernel(w)(w, row, count, a, out);
        if (explicit_zero && !w->offset_kind)
            for (int r = 0; r < count; r++) out[r] += zero_point_term(w, row + r, a);
        return;
    }
#endif
    for (int r = 0; r < count; r++) {
        float total = 0.f;
        for (int b = 0; b < blocks; b++) {
            const uint8_t *codes = w->codes + ((size_t)(row + r) * blocks + b) * bpb;
            total += w->scales[(size_t)(row + r) * blocks + b] * a->scale[b] *
                     (float)(block_dot_portable(w, codes, a->q + b * w->block) + a->correction[b]);
        }
        out[r] = total + (explicit_zero ? zero_point_term(w, row + r, a) : 0.f);
    }
}

/* Rows [row, row + count) for `tokens` tokens (activations acts[t], outputs out + t * stride): each row group's
 * codes are read from memory once for all of them, then from cache. */
static void quantized_rows_tokens(const ec_linear *w, int row, int count, const ec_act *acts, int tokens, float *out,
                                  int stride) {
    if (w->exact) {
        exact_rows(w, row, count, acts, tokens, out, stride);
        return;
    }
#ifdef EC_VECTOR
    if (packed_covers(w, row)) {
        const ec_tokens_kernel kernel = tokens_kernel(w);
        for (int r = 0; r < count; r += 8)
            for (int t = 0; t < tokens; t += EC_TOKENS)
                kernel(w, (row + r) / 8, acts + t, tokens - t < EC_TOKENS ? tokens - t : EC_TOKENS, out + (size_t)t * stride + r,
                       stride, count - r < 8 ? count - r : 8);
        if ((w->zero_terms || w->offsets) && !w->offset_kind)
            for (int t = 0; t < tokens; t++)
                for (int r = 0; r < count; r++) out[(size_t)t * stride + r] += zero_point_term(w, row + r, &acts[t]);
        return;
    }
#endif
    for (int t = 0; t < tokens; t++) quantized_rows(w, row, count, &acts[t], out + (size_t)t * stride);
}

/* float [n, k] rows (Gemm transB, the embedding table as a tied head): one dot product per row */
static void dense_rows(const ec_linear *w, int row, int count, const float *x, float *out) {
    for (int r = 0; r < count; r++) {
        const float *wr = w->dense + (size_t)(row + r) * w->k;
        int i = 0;
        float total = 0.f;
#ifdef EC_AVX2
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        for (; i + 16 <= w->k; i += 16) {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + i), _mm256_loadu_ps(x + i), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + i + 8), _mm256_loadu_ps(x + i + 8), acc1);
        }
        total = hsum(_mm256_add_ps(acc0, acc1));
        for (; i < w->k; i++) total += wr[i] * x[i];
#else
        (void)i;
        total = dot_lanes(wr, x, w->k);
#endif
        out[r] = total;
    }
}

/* Input rows [i, end) of a float [k, n] (MatMul layout) weight, added into n partial sums: whole rows, four at
 * a time, so the read is one sequential stream. */
static void dense_kn_rows(const ec_linear *w, int i, int end, const float *x, float *partial) {
    const int n = w->n;
    for (; i + 4 <= end; i += 4) {
        const float *w0 = w->dense + (size_t)i * n, *w1 = w0 + n, *w2 = w1 + n, *w3 = w2 + n;
        int j = 0;
#ifdef EC_AVX2
        const __m256 x0 = _mm256_set1_ps(x[i]), x1 = _mm256_set1_ps(x[i + 1]), x2 = _mm256_set1_ps(x[i + 2]),
                     x3 = _mm256_set1_ps(x[i + 3]);
        for (; j + 8 <= n; j += 8) {
            __m256 acc = _mm256_fmadd_ps(x0, _mm256_loadu_ps(w0 + j), _mm256_loadu_ps(partial + j));
            acc = _mm256_fmadd_ps(x1, _mm256_loadu_ps(w1 + j), acc);
            acc = _mm256_fmadd_ps(x2, _mm256_loadu_ps(w2 + j), acc);
            _mm256_storeu_ps(partial + j, _mm256_fmadd_ps(x3, _mm256_loadu_ps(w3 + j), acc));
        }
#elif defined(EC_NEON)
        /* the portable line below, lane for lane: ((x0 w0 + x1 w1) + x2 w2) + x3 w3, then added, unfused */
        const float32x4_t x0 = vdupq_n_f32(x[i]), x1 = vdupq_n_f32(x[i + 1]), x2 = vdupq_n_f32(x[i + 2]),
                          x3 = vdupq_n_f32(x[i + 3]);
        for (; j + 4 <= n; j += 4) {
            float32x4_t sum = vmulq_f32(x0, vld1q_f32(w0 + j));
            sum = vaddq_f32(sum, vmulq_f32(x1, vld1q_f32(w1 + j)));
            sum = vaddq_f32(sum, vmulq_f32(x2, vld1q_f32(w2 + j)));
            sum = vaddq_f32(sum, vmulq_f32(x3, vld1q_f32(w3 + j)));
            vst1q_f32(partial + j, vaddq_f32(vld1q_f32(partial + j), sum));
        }
#endif
        for (; j < n; j++) partial[j] += x[i] * w0[j] + x[i + 1] * w1[j] + x[i + 2] * w2[j] + x[i + 3] * w3[j];
    }
    for (; i < end; i++)
        for (int j = 0; j < n; j++) partial[j] += x[i] * w->dense[(size_t)i * n + j];
}

/* ---- per-step pieces --------------------------------------------------------------------------------- */

typedef struct {
    float *gathered; /* input_order scratch */
    ec_act act[EC_TILE]; /* per token of a prefill pass; a decode step uses the first */
    float *partial;            /* this thread's sums of a float [k, n] linear (dense_kn_rows) */
    float *const *partials;    /* every thread's, by thread number */
} ec_scratch;

static int row_chunk(int n, int threads);

/* Every thread calls it before the team computes rows of `w` (linear_rows). Quantized: each thread quantizes the
 * input for itself (no barrier). Float [k, n]: the team splits k instead of n, because a split of n would read
 * every weight row in short strided pieces; each thread streams whole rows into its own partial sums, which
 * linear_rows then adds. */
static void prepare_input(const ec_linear *w, const float *x, ec_scratch *s) {
    if (!w->dense) {
        quantize(w, x, s->gathered, &s->act[0]);
        return;
    }
    if (w->dense_nk) return;
    memset(s->partial, 0, sizeof(float) * w->n);
    const int chunk = row_chunk(w->k, omp_get_num_threads()), chunks = (w->k + chunk - 1) / chunk;
    /* chunk c always to thread c mod threads: which chunks a thread's partial sums hold, and so the float sums, are
     * the same every step and on every path. With dynamic items they vary from run to run, and so would a row's
     * result for the same input at two positions: InfLLM v2's block scores would then split ties (identical
     * compressed keys) that the reference keeps exact. */
#pragma omp for schedule(static, 1)
    for (int c = 0; c < chunks; c++)
        dense_kn_rows(w, c * chunk, (c + 1) * chunk < w->k ? (c + 1) * chunk : w->k, x, s->partial);
}

static void linear_rows(const ec_linear *w, int row, int count, const float *x, const ec_scratch *s, float *out) {
    if (!w->dense) {
        quantized_rows(w, row, count, &s->act[0], out);
    } else if (w->dense_nk) {
        dense_rows(w, row, count, x, out);
    } else {
        const int threads = omp_get_num_threads();
        for (int r = 0; r < count; r++) {
            float total = 0.f;
            for (int t = 0; t < threads; t++) total += s->partials[t][row + r];
            out[r] = total;
        }
    }
}

/* Rows per work item: about four items per thread, in whole pairs of 8-row groups. Long items keep each
 * thread's reads one sequential stream (what the prefetchers need); several per thread let a thread that
 * a busy VM neighbour slows down take fewer. */
static int row_chunk(int n, int threads) {
    const int rows = (n + 4 * threads - 1) / (4 * threads);
    return (rows + 15) / 16 * 16;
}

static void linear_team(const ec_linear *w, const float *x, const ec_scratch *s, int threads, float *out) {
    const int chunk = row_chunk(w->n, threads), chunks = (w->n + chunk - 1) / chunk;
#pragma omp for schedule(dynamic, 1)
    for (int c = 0; c < chunks; c++) {
        const int row = c * chunk, count = w->n - row < chunk ? w->n - row : chunk;
        linear_rows(w, row, count, x, s, out + row);
    }
}

/* Prefill: each thread quantizes every token's input for itself, then the team splits the rows (quantized weights
 * only, see ec_can_prefill). */
static void quantize_tokens(const ec_linear *w, const float *x, size_t stride, int tokens, ec_scratch *s) {
    for (int t = 0; t < tokens; t++) quantize(w, x + t * stride, s->gathered, &s->act[t]);
}

static void linear_team_tokens(const ec_linear *w, const ec_scratch *s, int tokens, int threads, float *out, int stride) {
    const int chunk = row_chunk(w->n, threads), chunks = (w->n + chunk - 1) / chunk;
#pragma omp for schedule(dynamic, 1)
    for (int c = 0; c < chunks; c++) {
        const int row = c * chunk, count = w->n - row < chunk ? w->n - row : chunk;
        quantized_rows_tokens(w, row, count, s->act, tokens, out + row, stride);
    }
}

static void rms_norm(const float *x, const float *weight, int n, float eps, float *out) {
    float ss = 0.f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    const float inv = 1.f / sqrtf(ss / (float)n + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * inv * weight[i];
}

static void rotate(float *v, const float *cos, const float *sin, int rotary_dim) {
    const int half = rotary_dim / 2;
    for (int i = 0; i < half; i++) {
        float a = v[i], b = v[i + half];
        v[i] = a * cos[i] - b * sin[i];
        v[i + half] = b * cos[i] + a * sin[i];
    }
}

static void embed(const ec_model *m, int token, float *out) {
    const ec_linear *t = &m->table;
    if (t->dense) {
        for (int i = 0; i < m->hidden; i++) out[i] = t->dense[(size_t)token * m->hidden + i] * m->embedding_scale;
        return;
    }
    const int blocks = (t->k + t->block - 1) / t->block, bpb = bytes_per_block(t), per = 8 / t->bits;
    const int mask = (1 << t->bits) - 1;
    for (int b = 0; b < blocks; b++) {
        const uint8_t *codes = t->codes + ((size_t)token * blocks + b) * bpb;
        const float scale = t->scales[(size_t)token * blocks + b] * m->embedding_scale;
        const int z = zero_point(t, token, b);
        for (int j = 0; j < t->block && b * t->block + j < t->k; j++) {
            int code = (codes[j / per] >> ((j % per) * t->bits)) & mask;
            out[b * t->block + j] = (float)(code - z) * scale;
        }
    }
}

#ifdef EC_AVX2
/* e^x for x <= 0 ... 88: 2^n * e^r with |r| <= ln2/2 and Cephes' degree-6 polynomial (about 1 ulp) */
static inline __m256 exp_avx2(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-87.3365447504f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    const __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(exponent));
}
#endif

/* gate[i] = act(gate[i]) * up[i] */
static void gated_activation(const ec_model *m, float *gate, const float *up, int n) {
    int i = 0;
    if (m->activation == 1) {
        for (; i < n; i++) gate[i] = (gate[i] > m->activation_param ? gate[i] : 0.f) * up[i];
        return;
    }
#ifdef EC_AVX2
    const __m256 one = _mm256_set1_ps(1.f);
    for (; i + 8 <= n; i += 8) {
        const __m256 g = _mm256_loadu_ps(gate + i);
        const __m256 silu = _mm256_div_ps(g, _mm256_add_ps(one, exp_avx2(_mm256_sub_ps(_mm256_setzero_ps(), g))));
        _mm256_storeu_ps(gate + i, _mm256_mul_ps(silu, _mm256_loadu_ps(up + i)));
    }
#endif
    for (; i < n; i++) gate[i] = gate[i] / (1.f + expf(-gate[i])) * up[i];
}

/* scores[t] = scale * q . keys[t] for t < count (rows of d floats) */
static void key_scores(const float *q, const float *keys, int count, int d, float scale, float *scores) {
    int t = 0;
#ifdef EC_AVX2
    for (; t + 8 <= count; t += 8) {
        __m256 acc[8];
        for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
        for (int i = 0; i < d; i += 8) {
            const __m256 qi = _mm256_loadu_ps(q + i);
            for (int j = 0; j < 8; j++) acc[j] = _mm256_fmadd_ps(qi, _mm256_loadu_ps(keys + (size_t)(t + j) * d + i), acc[j]);
        }
        /* eight horizontal sums at once: lane j of the result is row t + j */
        const __m256 s01 = _mm256_hadd_ps(acc[0], acc[1]), s23 = _mm256_hadd_ps(acc[2], acc[3]);
        const __m256 s45 = _mm256_hadd_ps(acc[4], acc[5]), s67 = _mm256_hadd_ps(acc[6], acc[7]);
        const __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
        const __m256 sums = _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
        _mm256_storeu_ps(scores + t, _mm256_mul_ps(sums, _mm256_set1_ps(scale)));
    }
    /* the last rows summed as a group's rows are (lane by lane, then the same tree over the lanes), so that equal
     * keys score equally wherever they sit: InfLLM v2's selection ranks compressed keys, and must see their ties */
    for (; t < count; t++) {
        __m256 acc = _mm256_setzero_ps();
        for (int i = 0; i < d; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(keys + (size_t)t * d + i), acc);
        float l[8];
        _mm256_storeu_ps(l, acc);
        scores[t] = (((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]))) * scale;
    }
#else
    for (; t < count; t++) scores[t] = dot_lanes(q, keys + (size_t)t * d, d) * scale;
#endif
}

/* The largest of x[0..n): a max is exact in any order, so lanes give what a scalar scan gives (a serial scan is a
 * chain of dependent compares, four cycles a score). */
static float row_max(const float *x, int n) {
    float top = -INFINITY;
    int t = 0;
#ifdef EC_AVX2
    __m256 lanes = _mm256_set1_ps(-INFINITY);
    for (; t + 8 <= n; t += 8) lanes = _mm256_max_ps(lanes, _mm256_loadu_ps(x + t));
    __m128 half = _mm_max_ps(_mm256_castps256_ps128(lanes), _mm256_extractf128_ps(lanes, 1));
    half = _mm_max_ps(half, _mm_movehl_ps(half, half));
    top = _mm_cvtss_f32(_mm_max_ss(half, _mm_movehdup_ps(half)));
#elif defined(EC_NEON)
    float32x4_t lanes = vdupq_n_f32(-INFINITY);
    for (; t + 4 <= n; t += 4) lanes = vmaxq_f32(lanes, vld1q_f32(x + t));
    top = vmaxvq_f32(lanes);
#endif
    for (; t < n; t++) top = x[t] > top ? x[t] : top;
    return top;
}

/* scores[t] = exp(scores[t] - top); returns their sum */
static float exp_shifted(float *scores, int count, float top) {
    float total = 0.f;
    int t = 0;
#ifdef EC_AVX2
    __m256 sum = _mm256_setzero_ps();
    for (; t + 8 <= count; t += 8) {
        const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(scores + t), _mm256_set1_ps(top)));
        _mm256_storeu_ps(scores + t, e);
        sum = _mm256_add_ps(sum, e);
    }
    total = hsum(sum);
    if (t < count) { /* the last scores through the same exp as the rest: equal scores stay equal (see key_scores) */
        float lanes[8];
        for (int j = 0; j < 8; j++) lanes[j] = t + j < count ? scores[t + j] : top;
        _mm256_storeu_ps(lanes, exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(lanes), _mm256_set1_ps(top))));
        for (int j = 0; t < count; j++, t++) total += scores[t] = lanes[j];
    }
#endif
    for (; t < count; t++) total += scores[t] = expf(scores[t] - top);
    return total;
}

/* out = sum over t < count of p[t] * values[t] (rows of d floats), accumulated into out */
static void weighted_values(const float *p, const float *values, int count, int d, float *out) {
    int i = 0;
#ifdef EC_AVX2
    /* Accumulators stay in registers across all positions, eight where the head is that wide: eight independent
     * chains of one fused multiply-add per position keep both FMA units busy (four leave them half idle). Each
     * output lane still sums its positions in order, so the width changes no result. */
    for (; i + 64 <= d; i += 64) {
        __m256 a[8];
        for (int j = 0; j < 8; j++) a[j] = _mm256_loadu_ps(out + i + 8 * j);
        for (int t = 0; t < count; t++) {
            const float *v = values + (size_t)t * d + i;
            const __m256 pt = _mm256_set1_ps(p[t]);
            for (int j = 0; j < 8; j++) a[j] = _mm256_fmadd_ps(pt, _mm256_loadu_ps(v + 8 * j), a[j]);
        }
        for (int j = 0; j < 8; j++) _mm256_storeu_ps(out + i + 8 * j, a[j]);
    }
    for (; i + 32 <= d; i += 32) {
        __m256 a0 = _mm256_loadu_ps(out + i), a1 = _mm256_loadu_ps(out + i + 8);
        __m256 a2 = _mm256_loadu_ps(out + i + 16), a3 = _mm256_loadu_ps(out + i + 24);
        for (int t = 0; t < count; t++) {
            const float *v = values + (size_t)t * d + i;
            const __m256 pt = _mm256_set1_ps(p[t]);
            a0 = _mm256_fmadd_ps(pt, _mm256_loadu_ps(v), a0);
            a1 = _mm256_fmadd_ps(pt, _mm256_loadu_ps(v + 8), a1);
            a2 = _mm256_fmadd_ps(pt, _mm256_loadu_ps(v + 16), a2);
            a3 = _mm256_fmadd_ps(pt, _mm256_loadu_ps(v + 24), a3);
        }
        _mm256_storeu_ps(out + i, a0); _mm256_storeu_ps(out + i + 8, a1);
        _mm256_storeu_ps(out + i + 16, a2); _mm256_storeu_ps(out + i + 24, a3);
    }
    for (int t = 0; t < count; t++)
#pragma omp simd
        for (int j = i; j < d; j++) out[j] += p[t] * values[(size_t)t * d + j];
#else
    /* every other build: one fused multiply-add per value and position, positions in order */
#ifdef EC_NEON
    for (; i + 16 <= d; i += 16) { /* four accumulators stay in registers across all positions */
        float32x4_t a[4];
        for (int v = 0; v < 4; v++) a[v] = vld1q_f32(out + i + 4 * v);
        for (int t = 0; t < count; t++) {
            const float32x4_t pt = vdupq_n_f32(p[t]);
            for (int v = 0; v < 4; v++) a[v] = vfmaq_f32(a[v], pt, vld1q_f32(values + (size_t)t * d + i + 4 * v));
        }
        for (int v = 0; v < 4; v++) vst1q_f32(out + i + 4 * v, a[v]);
    }
#endif
    for (int t = 0; t < count; t++)
        for (int j = i; j < d; j++) out[j] = fmaf(p[t], values[(size_t)t * d + j], out[j]);
#endif
}

#ifdef EC_AVX2
/* key_scores for two query heads at once: each key row is loaded once for both (four rows by two heads fill the eight
 * accumulators), and every sum is reduced as key_scores reduces it, so the scores are key_scores' bit for bit. */
static void key_scores_pair(const float *q0, const float *q1, const float *keys, int count, int d, float scale,
                            float *s0, float *s1) {
    const int whole = count / 8 * 8; /* the rows key_scores vectorises: whole groups of eight; the rest are its tail */
    for (int t = 0; t < whole; t += 4) {
        __m256 acc[8]; /* head 0's rows t..t+3, then head 1's */
        for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
        for (int i = 0; i < d; i += 8) {
            const __m256 a = _mm256_loadu_ps(q0 + i), b = _mm256_loadu_ps(q1 + i);
            for (int j = 0; j < 4; j++) {
                const __m256 k = _mm256_loadu_ps(keys + (size_t)(t + j) * d + i);
                acc[j] = _mm256_fmadd_ps(a, k, acc[j]);
                acc[4 + j] = _mm256_fmadd_ps(b, k, acc[4 + j]);
            }
        }
        const __m256 s01 = _mm256_hadd_ps(acc[0], acc[1]), s23 = _mm256_hadd_ps(acc[2], acc[3]);
        const __m256 s45 = _mm256_hadd_ps(acc[4], acc[5]), s67 = _mm256_hadd_ps(acc[6], acc[7]);
        const __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
        const __m256 sums = _mm256_mul_ps(_mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20),
                                                        _mm256_permute2f128_ps(s0123, s4567, 0x31)),
                                          _mm256_set1_ps(scale));
        _mm_storeu_ps(s0 + t, _mm256_castps256_ps128(sums));
        _mm_storeu_ps(s1 + t, _mm256_extractf128_ps(sums, 1));
    }
    if (whole < count) {
        key_scores(q0, keys + (size_t)whole * d, count - whole, d, scale, s0 + whole);
        key_scores(q1, keys + (size_t)whole * d, count - whole, d, scale, s1 + whole);
    }
}

/* weighted_values for two heads' weights over the same values, each value row loaded once for both; every lane sums
 * its positions in order as weighted_values does, so the results are its own bit for bit. */
static void weighted_values_pair(const float *p0, const float *p1, const float *values, int count, int d, float *out0,
                                 float *out1) {
    if (d % 32) {
        weighted_values(p0, values, count, d, out0);
        weighted_values(p1, values, count, d, out1);
        return;
    }
    for (int i = 0; i < d; i += 32) {
        __m256 a[4], b[4];
        for (int j = 0; j < 4; j++) a[j] = _mm256_loadu_ps(out0 + i + 8 * j), b[j] = _mm256_loadu_ps(out1 + i + 8 * j);
        for (int t = 0; t < count; t++) {
            const float *v = values + (size_t)t * d + i;
            const __m256 w0 = _mm256_set1_ps(p0[t]), w1 = _mm256_set1_ps(p1[t]);
            for (int j = 0; j < 4; j++) {
                const __m256 x = _mm256_loadu_ps(v + 8 * j);
                a[j] = _mm256_fmadd_ps(w0, x, a[j]);
                b[j] = _mm256_fmadd_ps(w1, x, b[j]);
            }
        }
        for (int j = 0; j < 4; j++) _mm256_storeu_ps(out0 + i + 8 * j, a[j]), _mm256_storeu_ps(out1 + i + 8 * j, b[j]);
    }
}
#endif

/* ---- the KV cache: fp32 or IEEE half (binary16) rows ---------------------------------------------------------- */

/* Half to float is exact, so a half cache's rows meet the float kernels as the very floats every build reads; float
 * to half rounds to nearest even, as F16C's and NEON's conversions do (under the default rounding mode). */
static float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
    uint32_t bits;
    if (exponent == 0x1f) bits = sign | 0x7f800000 | (mantissa << 13); /* inf, nan */
    else if (exponent) bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
    else if (!mantissa) bits = sign;
    else { /* subnormal: normalise */
        int shift = 0;
        uint32_t m = mantissa;
        while (!(m & 0x400)) m <<= 1, shift++;
        bits = sign | ((uint32_t)(113 - shift) << 23) | ((m & 0x3ff) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof(f));
    return f;
}

static uint16_t float_to_half(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof(bits));
    const uint16_t sign = (uint16_t)((bits >> 16) & 0x8000);
    const uint32_t magnitude = bits & 0x7fffffff;
    if (magnitude >= 0x7f800000) return sign | 0x7c00 | (magnitude > 0x7f800000 ? 0x200 : 0); /* inf, nan */
    if (magnitude >= 0x477ff000) return sign | 0x7c00; /* rounds past 65504: inf */
    if (magnitude < 0x38800000) { /* a half subnormal (or zero): round the value in units of 2^-24 */
        if (magnitude < 0x33000000) return sign; /* at most half of the smallest subnormal: ties to even, zero */
        const uint32_t m = (magnitude & 0x7fffff) | 0x800000;
        const int shift = 126 - (int)(magnitude >> 23);
        const uint32_t kept = m >> shift, rest = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        return sign | (uint16_t)(kept + (rest > half || (rest == half && (kept & 1))));
    }
    const uint32_t rebased = magnitude - (112u << 23); /* exponent from float's bias to half's */
    const uint32_t kept = rebased >> 13, rest = rebased & 0x1fff;
    return sign | (uint16_t)(kept + (rest > 0x1000 || (rest == 0x1000 && (kept & 1)))); /* a carry moves the exponent */
}

static void halves_to_floats(const uint16_t *h, float *f, size_t n) {
    size_t i = 0;
#if defined(EC_AVX2) && defined(__F16C__)
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(f + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
#elif defined(EC_NEON)
    for (; i + 4 <= n; i += 4) vst1q_f32(f + i, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(h + i))));
#endif
    for (; i < n; i++) f[i] = half_to_float(h[i]);
}

static void floats_to_halves(const float *f, uint16_t *h, size_t n) {
    size_t i = 0;
#if defined(EC_AVX2) && defined(__F16C__)
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(h + i), _mm256_cvtps_ph(_mm256_loadu_ps(f + i), _MM_FROUND_TO_NEAREST_INT));
#elif defined(EC_NEON)
    for (; i + 4 <= n; i += 4) vst1_u16(h + i, vreinterpret_u16_f16(vcvt_f16_f32(vld1q_f32(f + i))));
#endif
    for (; i < n; i++) h[i] = float_to_half(f[i]);
}

/* Head g's row at `position` of a cache (fp32 or half) */
static void *cache_row(const ec_model *m, void *cache, int g, int position) {
    return (char *)cache + ((size_t)g * m->max_context + position) * m->head_dim * (m->kv_half ? 2 : 4);
}

/* `n` rows of `d` values from `rows` as floats: the rows themselves (fp32) or converted into `buffer` (half) */
static const float *rows_as_floats(const void *rows, int half, int n, int d, float *buffer) {
    if (!half) return rows;
    halves_to_floats(rows, buffer, (size_t)n * d);
    return buffer;
}

static void cache_store(const ec_model *m, void *row, const float *values) {
    if (m->kv_half) floats_to_halves(values, row, m->head_dim);
    else memcpy(row, values, sizeof(float) * m->head_dim);
}

static void store_kv(const ec_model *m, const ec_layer *l, int g, int position, const float *qkv) {
    const int d = m->head_dim;
    float k[512]; /* MAX_HEAD_DIM */
    memcpy(k, qkv + (m->heads + g) * d, sizeof(float) * d);
    if (l->k_nope) cache_store(m, cache_row(m, l->k_nope, g, position), k);
    rotate(k, m->rope_cos + (size_t)position * (m->rotary_dim / 2), m->rope_sin + (size_t)position * (m->rotary_dim / 2),
           m->rotary_dim);
    cache_store(m, cache_row(m, l->k_cache, g, position), k);
    cache_store(m, cache_row(m, l->v_cache, g, position), qkv + (m->heads + m->kv_heads + g) * d);
}

/* Attention runs as work items of (KV group, range of positions), flash-decoding style: an item reads its
 * range of the group's keys and values once for all of the group's query heads (from L2 after the first
 * head) and leaves per head the range's max score, sum of exponentials and unnormalised weighted values;
 * combine_attention merges the ranges. The item whose range ends at `position` first writes the new key
 * and value into the cache, so no item needs them from anywhere else. */
typedef struct {
    float *values; /* [splits, heads, head_dim] */
    float *top;    /* [splits, heads] */
    float *total;  /* [splits, heads] */
} ec_attention;

#define EC_MAX_SPLITS 64

static int attention_splits(const ec_model *m, int position) {
    int splits = (2 * m->threads + m->kv_heads - 1) / m->kv_heads; /* at least two items per thread */
    if (splits > EC_MAX_SPLITS) splits = EC_MAX_SPLITS;
    if (splits > (position + 1) / 32) splits = (position + 1) / 32; /* ranges of at least 32 positions */
    return splits < 1 ? 1 : splits;
}

/* One token's slots of the attention buffers, which hold EC_TILE tokens' (ec_prefill). */
static ec_attention token_attention(const ec_model *m, const ec_attention *at, int t) {
    const size_t slots = (size_t)t * EC_MAX_SPLITS * m->heads;
    return (ec_attention){at->values + slots * m->head_dim, at->top + slots, at->total + slots};
}

/* A thread's attention scratch: `scores` [group, score_stride(max_context)], a row per query head of one KV group,
 * `queries` [group, head_dim], their rotated queries, and `rows` [EC_KV_CHUNK, head_dim], a chunk of a half cache as
 * floats. */
typedef struct {
    float *scores, *queries, *rows;
} ec_attend_scratch;

/* The group's query heads are served together: keys and values are read in chunks of EC_KV_CHUNK positions, each
 * chunk once for all of the group's heads while it is in L1, where a head after head would bring the whole range
 * back from L3 or memory once per head (what bounded long-context decode). 64 rows of 64 floats (16 KiB) stay in a
 * 32 KiB L1 beside the scores; 128 did not (measured: dense 32K decode 12.3 -> 14.3 tok/s). A multiple of 8:
 * key_scores groups rows by eight from a call's start, so every score and every sum comes out as one call over the
 * whole range gives. */
#define EC_KV_CHUNK 64

/* The stride of the group's score rows for `count` positions: one cache line past it, so that rows of a power of two
 * (a history split in halves) do not all fall on the same L1 sets and alias one another's stores. */
#define EC_SCORE_PAD 16
static size_t score_stride(int count) { return (size_t)count + EC_SCORE_PAD; }

/* queries [group, d] = the group's query heads from the qkv row, rotated to `position` where `rotated` */
static void group_queries(const ec_model *m, int g, int position, const float *qkv, int rotated, float *queries) {
    const int d = m->head_dim, group = m->heads / m->kv_heads;
    memcpy(queries, qkv + (size_t)g * group * d, sizeof(float) * group * d);
    for (int h = 0; rotated && h < group; h++)
        rotate(queries + (size_t)h * d, m->rope_cos + (size_t)position * (m->rotary_dim / 2),
               m->rope_sin + (size_t)position * (m->rotary_dim / 2), m->rotary_dim);
}

/* scores[h * stride + t] = scale * queries[h] . keys[t] for the group's heads h and t < count; `keys`: rows of d
 * floats, or of halves where `half` (converted a chunk at a time into `buffer`) */
static void group_key_scores(const ec_model *m, const float *queries, const void *keys, int half, int count,
                             float *scores, size_t stride, float *buffer) {
    const int d = m->head_dim, group = m->heads / m->kv_heads;
    for (int c = 0; c < count; c += EC_KV_CHUNK) {
        const int n = count - c < EC_KV_CHUNK ? count - c : EC_KV_CHUNK;
        const float *rows = rows_as_floats((const char *)keys + (size_t)c * d * (half ? 2 : 4), half, n, d, buffer);
        int h = 0;
#ifdef EC_AVX2
        for (; h + 2 <= group; h += 2)
            key_scores_pair(queries + (size_t)h * d, queries + (size_t)(h + 1) * d, rows, n, d, m->attention_scale,
                            scores + h * stride + c, scores + (h + 1) * stride + c);
#endif
        for (; h < group; h++)
            key_scores(queries + (size_t)h * d, rows, n, d, m->attention_scale, scores + h * stride + c);
    }
}

/* out[h] += sum over t < count of p[h * stride + t] * values[t], for the group's heads h; `values`: rows of the
 * cache (fp32 or half) */
static void group_weighted_values(const ec_model *m, const float *p, size_t stride, const void *values, int count,
                                  float *out, float *buffer) {
    const int d = m->head_dim, group = m->heads / m->kv_heads;
    for (int c = 0; c < count; c += EC_KV_CHUNK) {
        const int n = count - c < EC_KV_CHUNK ? count - c : EC_KV_CHUNK;
        const float *rows = rows_as_floats((const char *)values + (size_t)c * d * (m->kv_half ? 2 : 4), m->kv_half, n, d,
                                           buffer);
        int h = 0;
#ifdef EC_AVX2
        for (; h + 2 <= group; h += 2)
            weighted_values_pair(p + h * stride + c, p + (h + 1) * stride + c, rows, n, d, out + (size_t)h * d,
                                 out + (size_t)(h + 1) * d);
#endif
        for (; h < group; h++) weighted_values(p + h * stride + c, rows, n, d, out + (size_t)h * d);
    }
}

/* The group's softmax statistics over `count` scores per head (rows of `stride`): each row becomes exp(score - top),
 * and the slots of the range `split` get its top and total. */
static void group_softmax(const ec_model *m, int g, int split, float *scores, size_t stride, int count,
                          const ec_attention *at) {
    const int group = m->heads / m->kv_heads;
    for (int h = 0; h < group; h++) {
        float *row = scores + h * stride;
        const float top = row_max(row, count);
        const size_t slot = (size_t)split * m->heads + g * group + h;
        at->top[slot] = top;
        at->total[slot] = count ? exp_shifted(row, count, top) : 0.f;
    }
}

/* `store`: write the token's key and value first (decode; a prefill pass stores all of its tokens' before any
 * attends). */
static void attend_range(const ec_model *m, const ec_layer *l, int g, int split, int splits, int position,
                         const float *qkv, const ec_attention *at, const ec_attend_scratch *scratch, int store) {
    const int d = m->head_dim, group = m->heads / m->kv_heads, length = position + 1;
    const int begin = (int)((long)length * split / splits), end = (int)((long)length * (split + 1) / splits);
    if (store && end == length) store_kv(m, l, g, position, qkv);
    float *out = at->values + ((size_t)split * m->heads + g * group) * d;
    group_queries(m, g, position, qkv, 1, scratch->queries);
    const size_t stride = score_stride(end - begin);
    group_key_scores(m, scratch->queries, cache_row(m, l->k_cache, g, begin), m->kv_half, end - begin, scratch->scores,
                     stride, scratch->rows);
    group_softmax(m, g, split, scratch->scores, stride, end - begin, at);
    memset(out, 0, sizeof(float) * group * d);
    group_weighted_values(m, scratch->scores, stride, cache_row(m, l->v_cache, g, begin), end - begin, out,
                          scratch->rows);
}

/* out [heads, head_dim] = softmax-weighted values, merged over the position ranges */
static void combine_attention(const ec_model *m, const ec_attention *at, int splits, float *out) {
    const int d = m->head_dim;
    for (int head = 0; head < m->heads; head++) {
        float top = -INFINITY, total = 0.f, weight[EC_MAX_SPLITS];
        for (int s = 0; s < splits; s++) top = at->top[s * m->heads + head] > top ? at->top[s * m->heads + head] : top;
        for (int s = 0; s < splits; s++) {
            weight[s] = expf(at->top[s * m->heads + head] - top);
            total += weight[s] * at->total[s * m->heads + head];
        }
        float *o = out + head * d;
        memset(o, 0, sizeof(float) * d);
        for (int s = 0; s < splits; s++) {
            const float w = weight[s] / total, *v = at->values + ((size_t)s * m->heads + head) * d;
#pragma omp simd
            for (int i = 0; i < d; i++) o[i] += w * v[i];
        }
    }
}

#include "infllmv2.c"

/* Within the team's parallel region: dense attention of `n` prompt tokens at positions [first, first + n) of layer l,
 * whose keys and values are stored; each token's attention into `out` rows of `stride` floats. */
static void dense_prefill_attention(const ec_model *m, const ec_layer *l, const ec_attention *buffers, const float *qkv,
                                    size_t qkv_stride, int first, int n, const ec_attend_scratch *scratch, float *out,
                                    size_t stride) {
    /* Each token split as its decode step would be, so a prompt leaves the cache and logits that
     * decoding it token by token does, bit for bit. An item is one (KV group, range index) for every
     * token of the pass: the tokens' ranges nearly coincide, so the keys and values one token reads
     * are in cache for the next (long prompts would otherwise read the whole prefix once per token). */
    const int most_splits = attention_splits(m, first + n - 1);
#pragma omp for schedule(dynamic, 1)
    for (int item = 0; item < m->kv_heads * most_splits; item++)
        for (int t = 0; t < n; t++) {
            const int splits = attention_splits(m, first + t);
            if (item % most_splits >= splits) continue;
            const ec_attention at = token_attention(m, buffers, t);
            attend_range(m, l, item / most_splits, item % most_splits, splits, first + t, qkv + (size_t)t * qkv_stride,
                         &at, scratch, 0);
        }
    for (int t = 0; t < n; t++) {
        const ec_attention at = token_attention(m, buffers, t);
        combine_attention(m, &at, attention_splits(m, first + t), out + t * stride);
    }
}

/* ---- the step ------------------------------------------------------------------------------------------ */

static size_t widest_input(const ec_model *m) {
    size_t k = (size_t)m->hidden;
    if ((size_t)m->intermediate > k) k = m->intermediate;
    if ((size_t)(m->heads * m->head_dim) > k) k = m->heads * m->head_dim;
    return k + 512; /* room for padding to whole blocks */
}

/* Buffers of one decoder, allocated once (ec_state_new): shared between threads, then one scratch per thread. */
typedef struct {
    float *residual, *normed; /* [EC_TILE, hidden], [EC_TILE, widest_input] */
    ec_attend_scratch attend;
    ec_scratch s;
} ec_thread;

typedef struct {
    float *qkv, *branch, *gated;
    ec_attention attention;
    int threads;
    ec_thread *thread;
    float **partials; /* each thread's ec_scratch.partial */
    ec_sparse_state *sparse; /* where the model runs sparse attention, else NULL */
} ec_state;

void ec_state_free(ec_state *st) {
    if (!st) return;
    for (int t = 0; st->thread && t < st->threads; t++) {
        ec_thread *own = &st->thread[t];
        free(own->residual); free(own->normed); free(own->s.gathered); free(own->s.partial);
        free(own->attend.scores); free(own->attend.queries); free(own->attend.rows);
        for (int i = 0; i < EC_TILE; i++) {
            free(own->s.act[i].q); free(own->s.act[i].scale); free(own->s.act[i].sum); free(own->s.act[i].exact);
            free(own->s.act[i].correction); free(own->s.act[i].xf);
        }
    }
    free(st->partials); free(st->thread); free(st->qkv); free(st->branch); free(st->gated);
    free(st->attention.values); free(st->attention.top); free(st->attention.total);
    sparse_state_free(st->sparse);
    free(st);
}

ec_state *ec_state_new(const ec_model *m) {
    const size_t wide = widest_input(m), blocks = wide / 16 + 1; /* blocks hold at least 16 values */
    const size_t slots = (size_t)EC_TILE * EC_MAX_SPLITS * m->heads;
    ec_state *st = calloc(1, sizeof(ec_state));
    if (!st) return NULL;
    st->threads = m->threads;
    st->qkv = malloc(sizeof(float) * EC_TILE * (m->heads + 2 * m->kv_heads) * m->head_dim);
    st->attention.values = malloc(sizeof(float) * slots * m->head_dim);
    st->attention.top = malloc(sizeof(float) * slots);
    st->attention.total = malloc(sizeof(float) * slots);
    st->branch = malloc(sizeof(float) * EC_TILE * m->hidden);
    st->gated = malloc(sizeof(float) * EC_TILE * 2 * wide); /* gate and up */
    st->thread = calloc((size_t)m->threads, sizeof(*st->thread));
    st->partials = calloc((size_t)m->threads, sizeof(float *));
    const size_t widest_output = (size_t)m->vocab > 2 * wide ? (size_t)m->vocab : 2 * wide;
    if (m->sparse.enabled) st->sparse = sparse_state_new(m);
    int ok = st->partials && st->qkv && st->attention.values && st->attention.top && st->attention.total && st->branch &&
             st->gated && st->thread && (st->sparse || !m->sparse.enabled);
    for (int t = 0; ok && t < m->threads; t++) {
        ec_thread *own = &st->thread[t];
        own->residual = malloc(sizeof(float) * EC_TILE * m->hidden);
        own->normed = malloc(sizeof(float) * EC_TILE * wide);
        own->attend.scores = malloc(sizeof(float) * (m->heads / m->kv_heads) * score_stride(m->max_context));
        own->attend.queries = malloc(sizeof(float) * m->heads * m->head_dim);
        own->attend.rows = malloc(sizeof(float) * EC_KV_CHUNK * m->head_dim);
        own->s.gathered = malloc(sizeof(float) * wide);
        own->s.partial = st->partials[t] = malloc(sizeof(float) * widest_output);
        own->s.partials = st->partials;
        ok = own->residual && own->normed && own->attend.scores && own->attend.queries && own->attend.rows &&
             own->s.gathered && own->s.partial;
        for (int i = 0; ok && i < EC_TILE; i++) {
            ec_act *a = &own->s.act[i];
            a->q = malloc(wide);
            a->scale = malloc(sizeof(float) * blocks);
            a->sum = malloc(sizeof(float) * blocks);
            a->exact = malloc(sizeof(float) * blocks);
            a->correction = malloc(sizeof(int32_t) * blocks);
            a->xf = malloc(sizeof(float) * wide);
            ok = a->q && a->scale && a->sum && a->exact && a->correction && a->xf;
        }
    }
    if (!ok) {
        ec_state_free(st);
        return NULL;
    }
    return st;
}

/* 1 when the vectorised kernels were compiled in (AVX2 + FMA); the portable C path alone is slower than
 * onnxruntime's own kernels, so `auto` does not pick it. */
/* 0: portable C; 1: AVX2; 2: AVX2 with VNNI dot products; 3: and 512-bit loads for 2-, 4- and 6-bit codes.
 * aarch64 likewise: 1 NEON, 2 with SDOT (dotprod), 3 and SMMLA (i8mm) for prompts (ec_isa names it). */
int ec_vectorised(void) {
#if defined(EC_VNNI512) || defined(EC_I8MM)
    return 3;
#elif defined(EC_VNNI) || defined(EC_DOTPROD)
    return 2;
#elif defined(EC_AVX2) || defined(EC_NEON)
    return 1;
#else
    return 0;
#endif
}

/* The instruction set the kernels were compiled for. */
const char *ec_isa(void) {
#if defined(EC_VNNI512)
    return "avx512-vnni";
#elif defined(EC_VNNI)
    return "avx-vnni";
#elif defined(EC_AVX2)
    return "avx2";
#elif defined(EC_I8MM)
    return "neon-dotprod-i8mm";
#elif defined(EC_DOTPROD)
    return "neon-dotprod";
#elif defined(EC_NEON)
    return "neon";
#else
    return "portable";
#endif
}

/* 1 where the interleaved copy carries the per-block offsets of zero points and the kernels add them per block
 * (AVX2: its own float order, kept); 0 where the offsets stay a loose [n, blocks] copy added after each row, the
 * portable path's order (NEON, so its logits equal the portable build's). The decoder lays out weights by it. */
int ec_stream_offsets(void) {
#ifdef EC_AVX2
    return 1;
#else
    return 0;
#endif
}

/* 1 when this CPU has every instruction the library was compiled for (aarch64 Linux: the kernel's HWCAP bits), so a
 * library built for a wider ISA (a cross build, a cache shared between boards) is refused, never run into SIGILL.
 * Elsewhere the build is for this CPU (-march=native) and 1 is the answer. */
int ec_cpu_supported(void) {
#if defined(EC_NEON) && defined(__linux__)
    const unsigned long hwcap = getauxval(AT_HWCAP), hwcap2 = getauxval(AT_HWCAP2);
    int ok = (hwcap & (1UL << 1)) != 0; /* HWCAP_ASIMD */
#ifdef EC_DOTPROD
    ok = ok && (hwcap & (1UL << 20)); /* HWCAP_ASIMDDP */
#endif
#ifdef EC_I8MM
    ok = ok && (hwcap2 & (1UL << 13)); /* HWCAP2_I8MM */
#endif
    (void)hwcap2;
    return ok;
#else
    return 1;
#endif
}

/* The attention primitives, exported so that tests hold each equal input to an equal output wherever it sits */
void ec_key_scores(const float *q, const float *keys, int count, int d, float scale, float *scores) {
    key_scores(q, keys, count, d, scale, scores);
}
float ec_exp_shifted(float *scores, int count, float top) { return exp_shifted(scores, count, top); }

/* The half cache's conversions, exported so that tests hold them to an independent one (numpy's) */
void ec_floats_to_halves(const float *f, uint16_t *h, size_t n) { floats_to_halves(f, h, n); }
void ec_halves_to_floats(const uint16_t *h, float *f, size_t n) { halves_to_floats(h, f, n); }

/* The cache was cut back to `position` tokens (prompt-prefix reuse, reset): compressed keys past it are stale. */
void ec_forget(ec_state *st, int position) {
    if (st->sparse && st->sparse->summarized > position) st->sparse->summarized = position;
}

/* Decode steps that run one prompt (bundles ec_prefill cannot run) attend as the prompt's one call would: sparse
 * when the prompt's total length `length` reaches dense_len (0: each step by its own length). */
void ec_call_length(ec_state *st, int length) {
    if (st->sparse) st->sparse->call_length = length;
}

int ec_decode(const ec_model *m, ec_state *st, int token, int position, float *logits) {
    if (token < 0 || token >= m->vocab || position < 0 || position >= m->max_context) return 1;
    const int H = m->hidden, I = m->intermediate;
    const int sparse = sparse_call(m, st->sparse && st->sparse->call_length > position ? st->sparse->call_length : position + 1);
    const int compressed = sparse ? st->sparse->summarized : 0;
#pragma omp parallel num_threads(st->threads)
    {
        /* every thread holds the residual stream: a few hundred floats, no barrier to share it */
        ec_thread *own = &st->thread[omp_get_thread_num()];
        float *x = own->residual, *h = own->normed;
        ec_scratch *s = &own->s;
        EC_PHASE_BEGIN();
        embed(m, token, x);
        EC_PHASE(EC_PHASE_EMBED);
        for (int li = 0; li < m->layers; li++) {
            const ec_layer *l = &m->layer[li];
            rms_norm(x, l->input_norm, H, m->eps, h);
            EC_PHASE(EC_PHASE_NORM);
            prepare_input(&l->qkv, h, s);
            linear_team(&l->qkv, h, s, st->threads, st->qkv);
            EC_PHASE(EC_PHASE_LINEAR);
            if (sparse) {
#pragma omp for schedule(static)
                for (int g = 0; g < m->kv_heads; g++) store_kv(m, l, g, position, st->qkv);
                sparse_attention(m, l, st->sparse, &st->attention, st->qkv, 0, position, 1, compressed, &own->attend, h, 0);
            } else {
                ec_attention *at = &st->attention;
                const int splits = attention_splits(m, position);
#pragma omp for schedule(dynamic, 1)
                for (int item = 0; item < m->kv_heads * splits; item++)
                    attend_range(m, l, item / splits, item % splits, splits, position, st->qkv, at, &own->attend, 1);
                combine_attention(m, at, splits, h); /* every thread, into its own buffer: no barrier */
            }
            EC_PHASE(EC_PHASE_ATTENTION);
            prepare_input(&l->o, h, s);
            linear_team(&l->o, h, s, st->threads, st->branch);
            EC_PHASE(EC_PHASE_LINEAR);
            for (int i = 0; i < H; i++) x[i] += st->branch[i];
            rms_norm(x, l->post_norm, H, m->eps, h);
            EC_PHASE(EC_PHASE_NORM);
            prepare_input(&l->gate_up, h, s);
            {
                /* gate rows [0, I) and up rows [I, 2I) of the same chunk, then gated = act(gate) * up in place */
                const int chunk = row_chunk(I, st->threads), chunks = (I + chunk - 1) / chunk;
#pragma omp for schedule(dynamic, 1)
                for (int c = 0; c < chunks; c++) {
                    const int row = c * chunk, count = I - row < chunk ? I - row : chunk;
                    linear_rows(&l->gate_up, row, count, h, s, st->gated + row);
                    linear_rows(&l->gate_up, I + row, count, h, s, st->gated + I + row);
                    gated_activation(m, st->gated + row, st->gated + I + row, count);
                }
            }
            prepare_input(&l->down, st->gated, s);
            linear_team(&l->down, st->gated, s, st->threads, st->branch);
            EC_PHASE(EC_PHASE_LINEAR);
            for (int i = 0; i < H; i++) x[i] += st->branch[i];
        }
        rms_norm(x, m->final_norm, H, m->eps, h);
        EC_PHASE(EC_PHASE_NORM);
        prepare_input(&m->head, h, s);
        linear_team(&m->head, h, s, st->threads, logits);
        EC_PHASE(EC_PHASE_HEAD);
    }
    if (sparse) st->sparse->summarized = position + 1;
    return 0;
}

/* 1 when ec_prefill can run the bundle: every linear of the layers and the head block-quantized (float linears
 * are read k-split per token, which a pass over several tokens does not do). */
int ec_can_prefill(const ec_model *m) {
    if (m->head.dense) return 0;
    for (int li = 0; li < m->layers; li++) {
        const ec_layer *l = &m->layer[li];
        if (l->qkv.dense || l->o.dense || l->gate_up.dense || l->down.dense) return 0;
    }
    return 1;
}

/* `count` prompt tokens at positions [position, position + count): their keys and values into the cache and the
 * logits of the last one. Passes of up to EC_TILE tokens, each reading every weight once (a decode step reads
 * them once per token); within a pass the tokens attend causally: all keys and values are stored first. */
int ec_prefill(const ec_model *m, ec_state *st, const int32_t *tokens, int count, int position, float *logits) {
    if (count < 1 || position < 0 || position + count > m->max_context) return 1;
    for (int i = 0; i < count; i++)
        if (tokens[i] < 0 || tokens[i] >= m->vocab) return 2;
    if (!ec_can_prefill(m)) return 3;
    const int H = m->hidden, I = m->intermediate, Q = (m->heads + 2 * m->kv_heads) * m->head_dim;
    const int sparse = sparse_call(m, position + count);
    const size_t wide = widest_input(m);
    for (int start = 0; start < count; start += EC_TILE) {
        const int n = count - start < EC_TILE ? count - start : EC_TILE, first = position + start;
#pragma omp parallel num_threads(st->threads)
        {
            ec_thread *own = &st->thread[omp_get_thread_num()];
            float *x = own->residual, *h = own->normed;
            ec_scratch *s = &own->s;
            for (int t = 0; t < n; t++) embed(m, tokens[start + t], x + (size_t)t * H);
            for (int li = 0; li < m->layers; li++) {
                const ec_layer *l = &m->layer[li];
                for (int t = 0; t < n; t++) rms_norm(x + (size_t)t * H, l->input_norm, H, m->eps, h + t * wide);
                quantize_tokens(&l->qkv, h, wide, n, s);
                linear_team_tokens(&l->qkv, s, n, st->threads, st->qkv, Q);
#pragma omp for schedule(static)
                for (int item = 0; item < n * m->kv_heads; item++)
                    store_kv(m, l, item % m->kv_heads, first + item / m->kv_heads, st->qkv + (size_t)(item / m->kv_heads) * Q);
                if (sparse)
                    sparse_attention(m, l, st->sparse, &st->attention, st->qkv, Q, first, n,
                                     start ? first : st->sparse->summarized, &own->attend, h, wide);
                else
                    dense_prefill_attention(m, l, &st->attention, st->qkv, Q, first, n, &own->attend, h, wide);
                quantize_tokens(&l->o, h, wide, n, s);
                linear_team_tokens(&l->o, s, n, st->threads, st->branch, H);
                for (int t = 0; t < n; t++) {
                    float *xt = x + (size_t)t * H;
                    for (int i = 0; i < H; i++) xt[i] += st->branch[(size_t)t * H + i];
                    rms_norm(xt, l->post_norm, H, m->eps, h + t * wide);
                }
                quantize_tokens(&l->gate_up, h, wide, n, s);
                {
                    const int chunk = row_chunk(I, st->threads), chunks = (I + chunk - 1) / chunk;
#pragma omp for schedule(dynamic, 1)
                    for (int c = 0; c < chunks; c++) {
                        const int row = c * chunk, rows = I - row < chunk ? I - row : chunk;
                        quantized_rows_tokens(&l->gate_up, row, rows, s->act, n, st->gated + row, 2 * I);
                        quantized_rows_tokens(&l->gate_up, I + row, rows, s->act, n, st->gated + I + row, 2 * I);
                        for (int t = 0; t < n; t++)
                            gated_activation(m, st->gated + (size_t)t * 2 * I + row, st->gated + (size_t)t * 2 * I + I + row, rows);
                    }
                }
                quantize_tokens(&l->down, st->gated, 2 * (size_t)I, n, s);
                linear_team_tokens(&l->down, s, n, st->threads, st->branch, H);
                for (int t = 0; t < n; t++)
                    for (int i = 0; i < H; i++) x[(size_t)t * H + i] += st->branch[(size_t)t * H + i];
            }
            if (start + n == count) {
                rms_norm(x + (size_t)(n - 1) * H, m->final_norm, H, m->eps, h);
                prepare_input(&m->head, h, s);
                linear_team(&m->head, h, s, st->threads, logits);
            }
        }
    }
    if (sparse) st->sparse->summarized = position + count;
    return 0;
}
