/* InfLLM v2 block-sparse attention (spec §6; the variant of edgecpm/sparse/infllmv2.py, the numpy reference whose
 * docstring records every choice the spec leaves open). Included by kernels.c after its attention helpers.
 *
 * Per layer and KV head the state is the compressed keys Kc1 (kernel_size/kernel_stride, 32/16) and Kc2 (four
 * times both), kept in buffers the runtime allocates at max context; kernel j is the mean of keys [j*s, j*s + l),
 * summed token by token in order as the reference does. The key history itself is the tail buffer: kernels are
 * emitted from the cache as the tokens completing them are stored, so nothing else is kept.
 *
 * A step reads, per KV head: Kc1 and Kc2 (stage 1: block scores, max-pooled to blocks), then only the selected
 * blocks' keys and values (stage 2), split into ranges over the threads as dense decode splits the whole history.
 * A prompt token selects and splits exactly as its decode step would, so a prompt leaves the logits and cache
 * that decoding it token by token does, bit for bit. */

typedef struct {
    int32_t *blocks; /* [EC_TILE, kv_heads, num_blocks]: each token's selected blocks per KV head, ascending */
    int32_t *counts; /* [EC_TILE, kv_heads] */
    int32_t *tokens; /* [EC_TILE, kv_heads]: positions the selection covers (<= the token) */
    float *scratch;  /* per thread: stage-1 and coarse logits per query head, their group sum, pooled block scores */
    int32_t *order;  /* per thread: block indices being ranked */
    size_t scratch_floats;
    int num_blocks;
    int summarized;  /* tokens whose completed kernels are in Kc1/Kc2 (every layer alike) */
    int call_length; /* ec_call_length */
} ec_sparse_state;

static int kernel_count(int length, int size, int stride) { return length < size ? 0 : (length - size) / stride + 1; }
static int max_kernels(const ec_model *m, int size, int stride) { return kernel_count(m->max_context, size, stride); }

/* Whether a call whose tokens end at total length `length` runs sparse (spec §6.2: the whole call, when its total
 * length reaches dense_len). */
static int sparse_call(const ec_model *m, int length) {
    return m->sparse.enabled && (m->sparse.dense_len < 0 || length >= m->sparse.dense_len);
}

static void *selection_keys(const ec_model *m, const ec_layer *l) { return m->sparse.use_nope ? l->k_nope : l->k_cache; }

/* Emits head g's kernels of one level completed by the tokens [from, length): means over the cached keys (`row`: one
 * key as floats, for a half cache), summed in double and rounded once, as the reference does: exact, so a kernel over
 * the same keys in another order is the same kernel and ties where the reference's does. */
static void compress_level(const ec_model *m, const ec_layer *l, int g, float *out, int max, int size, int stride,
                           int from, int length, float *row) {
    const int d = m->head_dim;
    double sum[512]; /* MAX_HEAD_DIM */
    for (int j = kernel_count(from, size, stride); j < kernel_count(length, size, stride) && j < max; j++) {
        for (int i = 0; i < d; i++) sum[i] = 0.0;
        for (int o = 0; o < size; o++) {
            const float *key = rows_as_floats(cache_row(m, selection_keys(m, l), g, j * stride + o), m->kv_half, 1, d, row);
            for (int i = 0; i < d; i++) sum[i] += key[i];
        }
        float *kc = out + (size_t)j * d;
        for (int i = 0; i < d; i++) kc[i] = (float)(sum[i] / size);
    }
}

static void compress_head(const ec_model *m, const ec_layer *l, int g, int from, int length, float *row) {
    const ec_sparse *sp = &m->sparse;
    const int max1 = max_kernels(m, sp->kernel_size, sp->kernel_stride);
    const int max2 = max_kernels(m, 4 * sp->kernel_size, 4 * sp->kernel_stride);
    compress_level(m, l, g, l->kc1 + (size_t)g * max1 * m->head_dim, max1, sp->kernel_size, sp->kernel_stride, from,
                   length, row);
    compress_level(m, l, g, l->kc2 + (size_t)g * max2 * m->head_dim, max2, 4 * sp->kernel_size, 4 * sp->kernel_stride,
                   from, length, row);
}

static float log_sum_exp(float *scores, int count) {
    const float top = row_max(scores, count);
    return top + logf(exp_shifted(scores, count, top));
}

/* Whether block x ranks before block y: higher score first, equal scores by lower block index. */
static inline int ranks_before(const float *scores, int32_t x, int32_t y) {
    return scores[x] > scores[y] || (scores[x] == scores[y] && x < y);
}

/* Reorders `order` so its first `take` entries are the `take` best ranked (in any order): quickselect, O(count). */
static void select_best(const float *scores, int32_t *order, int count, int take) {
    int lo = 0, hi = count - 1;
    while (lo < hi) {
        const int32_t pivot = order[lo + (hi - lo) / 2];
        int i = lo, j = hi;
        while (i <= j) {
            while (ranks_before(scores, order[i], pivot)) i++;
            while (ranks_before(scores, pivot, order[j])) j--;
            if (i <= j) {
                const int32_t t = order[i]; order[i] = order[j]; order[j] = t;
                i++, j--;
            }
        }
        if (take - 1 <= j) hi = j;
        else if (take - 1 >= i) lo = i;
        else return;
    }
}

/* Stage 1, pooling and selection for the query token at `position` (its q, k, v row `qkv`) and KV head g: writes
 * the selected blocks ascending to `out` and returns how many. `queries`: the thread's [group, head_dim] scratch. */
static int select_blocks(const ec_model *m, const ec_layer *l, int g, int position, const float *qkv, float *scratch,
                         float *queries, int32_t *order, int32_t *out) {
    const ec_sparse *sp = &m->sparse;
    const int d = m->head_dim, group = m->heads / m->kv_heads, length = position + 1;
    const int n1 = kernel_count(length, sp->kernel_size, sp->kernel_stride);
    const int n2 = kernel_count(length, 4 * sp->kernel_size, 4 * sp->kernel_stride);
    const int max1 = max_kernels(m, sp->kernel_size, sp->kernel_stride);
    const int max2 = max_kernels(m, 4 * sp->kernel_size, 4 * sp->kernel_stride);
    const int q_block = position / sp->block_size, ratio = sp->block_size / sp->kernel_stride;
    /* per query head a row of stage-1 logits and one for its normalizer: the coarse logits, or (exact) a copy of the
     * stage-1 row, so max1 floats each (never fewer fine kernels than coarse); then the group's sum and the pool */
    float *logits = scratch, *coarse = logits + (size_t)group * max1, *shared = coarse + (size_t)group * max1;
    float *pooled = shared + max1;
    const int exact = sp->exact_lse || n2 == 0; /* no coarse kernel visible yet: the exact normalizer */
    for (int j = 0; j < n1; j++) shared[j] = 0.f;
    if (n1) {
        group_queries(m, g, position, qkv, !sp->use_nope, queries);
        group_key_scores(m, queries, l->kc1 + (size_t)g * max1 * d, 0, n1, logits, max1, NULL);
        if (!exact) group_key_scores(m, queries, l->kc2 + (size_t)g * max2 * d, 0, n2, coarse, max1, NULL);
    }
    for (int h = 0; n1 && h < group; h++) {
        float *row = logits + (size_t)h * max1, *normalizer = coarse + (size_t)h * max1;
        if (exact) memcpy(normalizer, row, sizeof(float) * n1);
        exp_shifted(row, n1, log_sum_exp(normalizer, exact ? n1 : n2));
        for (int j = 0; j < n1; j++) shared[j] += row[j];
    }
    /* max over the kernels overlapping each block: [b*ratio - 1, b*ratio + ratio - 1] */
    for (int b = 0; b <= q_block; b++) {
        float best = -INFINITY;
        for (int j = b * ratio - 1; j <= b * ratio + ratio - 1; j++)
            if (j >= 0 && j < n1 && shared[j] > best) best = shared[j];
        pooled[b] = best;
    }
    /* forced (init and local) blocks first, then the best scored up to the budget */
    int count = 0, ranked = 0;
    for (int b = 0; b <= q_block; b++) {
        if (b < sp->init_blocks || b >= q_block - sp->local_blocks) out[count++] = b;
        else order[ranked++] = b;
    }
    const int budget = sp->topk + sp->local_blocks;
    int take = budget - count;
    if (take > ranked) take = ranked;
    if (take > 0) {
        if (take < ranked) select_best(pooled, order, ranked, take);
        /* ascending: the chosen marked among all blocks (the scores are spent), then read off in order, in time linear
         * in the blocks where sorting the ~100 chosen cost more than the pooling */
        for (int b = 0; b <= q_block; b++) pooled[b] = 0.f;
        for (int i = 0; i < count; i++) pooled[out[i]] = 1.f;
        for (int i = 0; i < take; i++) pooled[order[i]] = 1.f;
        count = 0;
        for (int b = 0; b <= q_block; b++)
            if (pooled[b] != 0.f) out[count++] = b;
    }
    return count;
}

/* Positions the selection covers: every selected block up to the token (the current block is causal). */
static int selected_tokens(const ec_model *m, const int32_t *blocks, int count, int position) {
    int total = 0;
    for (int i = 0; i < count; i++) {
        const int begin = blocks[i] * m->sparse.block_size, end = begin + m->sparse.block_size;
        total += (end <= position + 1 ? end : position + 1) - begin;
    }
    return total;
}

/* The run of consecutive selected positions starting at blocks[*i] (adjacent selected blocks are contiguous in the
 * cache, the current block ending at the token): its first position, and *i advanced to its last block. */
static int selected_run(const ec_model *m, const int32_t *blocks, int count, int position, int *i, int *last) {
    const int B = m->sparse.block_size, first = blocks[*i] * B;
    *last = first + B < position + 1 ? first + B : position + 1;
    while (*i + 1 < count && blocks[*i + 1] * B == *last && *last < position + 1) {
        ++*i;
        *last = blocks[*i] * B + B < position + 1 ? blocks[*i] * B + B : position + 1;
    }
    return first;
}

/* attend_range over the selected positions: range `split` of `splits` of the `covered` selected positions, read
 * run by run, each once for all of the group's query heads. */
static void sparse_attend_range(const ec_model *m, const ec_layer *l, int g, int split, int splits, int position,
                                const float *qkv, const ec_attention *at, const ec_attend_scratch *scratch,
                                const int32_t *blocks, int count, int covered) {
    const int d = m->head_dim, group = m->heads / m->kv_heads;
    const int begin = (int)((long)covered * split / splits), end = (int)((long)covered * (split + 1) / splits);
    const size_t stride = score_stride(end - begin);
    float *out = at->values + ((size_t)split * m->heads + g * group) * d;
    group_queries(m, g, position, qkv, 1, scratch->queries);
    /* scores over the runs inside [begin, end) of the selected sequence, then values in the same runs */
    for (int pass = 0; pass < 2; pass++) {
        int seen = 0, filled = 0;
        for (int i = 0; i < count && seen < end; i++) {
            int last;
            const int first = selected_run(m, blocks, count, position, &i, &last), run = last - first;
            const int lo = begin > seen ? begin - seen : 0, hi = end - seen < run ? end - seen : run;
            if (hi > lo && pass == 0)
                group_key_scores(m, scratch->queries, cache_row(m, l->k_cache, g, first + lo), m->kv_half, hi - lo,
                                 scratch->scores + filled, stride, scratch->rows);
            if (hi > lo && pass == 1)
                group_weighted_values(m, scratch->scores + filled, stride, cache_row(m, l->v_cache, g, first + lo), hi - lo,
                                      out, scratch->rows);
            filled += hi > lo ? hi - lo : 0;
            seen += run;
        }
        if (pass == 0) {
            group_softmax(m, g, split, scratch->scores, stride, filled, at);
            memset(out, 0, sizeof(float) * group * d);
        }
    }
}

static int32_t *token_blocks(const ec_model *m, const ec_sparse_state *ss, int t, int g) {
    return ss->blocks + ((size_t)t * m->kv_heads + g) * ss->num_blocks;
}

/* One split for every KV head of a token: from the most positions any head covers, as dense decode splits its
 * history (a head covering fewer positions has empty ranges, which combine_attention weighs 0). */
static int sparse_splits(const ec_model *m, const ec_sparse_state *ss, int t) {
    int most = 1;
    for (int g = 0; g < m->kv_heads; g++)
        if (ss->tokens[t * m->kv_heads + g] > most) most = ss->tokens[t * m->kv_heads + g];
    return attention_splits(m, most - 1);
}

/* Within the team's parallel region: the sparse attention of `n` tokens at positions [first, first + n) of layer
 * l, whose keys and values are stored; `from`: the tokens already compressed. Leaves each token's attention in
 * `out` rows of `stride` floats. */
static void sparse_attention(const ec_model *m, const ec_layer *l, ec_sparse_state *ss, const ec_attention *buffers,
                             const float *qkv, size_t qkv_stride, int first, int n, int from,
                             const ec_attend_scratch *scratch, float *out, size_t stride) {
    const int thread = omp_get_thread_num();
    float *stage1 = ss->scratch + (size_t)thread * ss->scratch_floats;
    int32_t *order = ss->order + (size_t)thread * ss->num_blocks;
#pragma omp for schedule(static)
    for (int g = 0; g < m->kv_heads; g++) compress_head(m, l, g, from, first + n, scratch->rows);
#pragma omp for schedule(dynamic, 1)
    for (int item = 0; item < n * m->kv_heads; item++) {
        const int t = item / m->kv_heads, g = item % m->kv_heads;
        int32_t *blocks = token_blocks(m, ss, t, g);
        const int count = select_blocks(m, l, g, first + t, qkv + (size_t)t * qkv_stride, stage1, scratch->queries, order,
                                          blocks);
        ss->counts[item] = count;
        ss->tokens[item] = selected_tokens(m, blocks, count, first + t);
    }
    int most_splits = 1;
    for (int t = 0; t < n; t++) {
        const int splits = sparse_splits(m, ss, t);
        most_splits = splits > most_splits ? splits : most_splits;
    }
#pragma omp for schedule(dynamic, 1)
    for (int item = 0; item < m->kv_heads * most_splits; item++)
        for (int t = 0; t < n; t++) {
            const int splits = sparse_splits(m, ss, t), g = item / most_splits;
            if (item % most_splits >= splits) continue;
            const ec_attention at = token_attention(m, buffers, t);
            sparse_attend_range(m, l, g, item % most_splits, splits, first + t, qkv + (size_t)t * qkv_stride, &at, scratch,
                                token_blocks(m, ss, t, g), ss->counts[t * m->kv_heads + g], ss->tokens[t * m->kv_heads + g]);
        }
    for (int t = 0; t < n; t++) {
        const ec_attention at = token_attention(m, buffers, t);
        combine_attention(m, &at, sparse_splits(m, ss, t), out + t * stride);
    }
}

static void sparse_state_free(ec_sparse_state *ss) {
    if (!ss) return;
    free(ss->blocks); free(ss->counts); free(ss->tokens); free(ss->scratch); free(ss->order);
    free(ss);
}

static ec_sparse_state *sparse_state_new(const ec_model *m) {
    ec_sparse_state *ss = calloc(1, sizeof(ec_sparse_state));
    if (!ss) return NULL;
    const ec_sparse *sp = &m->sparse;
    ss->num_blocks = (m->max_context + sp->block_size - 1) / sp->block_size;
    const size_t group = m->heads / m->kv_heads; /* select_blocks' layout */
    ss->scratch_floats = (2 * group + 1) * max_kernels(m, sp->kernel_size, sp->kernel_stride) + ss->num_blocks + 16;
    ss->blocks = malloc(sizeof(int32_t) * EC_TILE * m->kv_heads * ss->num_blocks);
    ss->counts = malloc(sizeof(int32_t) * EC_TILE * m->kv_heads);
    ss->tokens = malloc(sizeof(int32_t) * EC_TILE * m->kv_heads);
    ss->scratch = malloc(sizeof(float) * ss->scratch_floats * m->threads);
    ss->order = malloc(sizeof(int32_t) * ss->num_blocks * m->threads);
    if (!ss->blocks || !ss->counts || !ss->tokens || !ss->scratch || !ss->order) {
        sparse_state_free(ss);
        return NULL;
    }
    return ss;
}
