"""A deliberately naive transcription of InfLLM v2 (spec §6, infllmv2_cuda_impl variant of §6.4 step 4).

Plain Python loops over query, head, block and position on Python floats; nothing shared with edgecpm/sparse.
Every formula is written from the spec text; where the spec leaves a choice open this file makes the choice
documented in edgecpm/sparse/infllmv2.py (listed again next to the code that makes it):

- sparse iff dense_len == -1 or n = last position + 1 >= dense_len; then every query of the call is sparse;
- Kc1 kernel j visible to query t iff j*stride + kernel_size - 1 <= t; Kc2 (4x kernel, 4x stride) likewise;
  a decode query (the last position, T = 1) sees every kernel that exists;
- LSE from the visible Kc2 kernels; none visible yet -> the exact LSE over the visible Kc1 kernels;
- pooled score of block b = max of S(t, j) over j in [b*r - 1, b*r + r - 1] among the kernels t sees, r = B/stride;
  no such kernel -> -inf;
- candidates are blocks 0 .. t // B; forced: b < init_blocks and t//B - local_blocks <= b <= t//B
  (local_blocks = window_size // block_size); forced blocks always kept; the rest ordered by
  (higher score, lower index) fill the budget topk + local_blocks;
- stage 2: softmax over the tokens of the selected blocks at positions <= t, scale 1/sqrt(d).
"""

from __future__ import annotations

import math

NEG_INF = float("-inf")


def _dot(a, b):
    total = 0.0
    for x, y in zip(a, b):
        total += x * y
    return total


def _mean(rows):
    """Mean of a list of vectors, token by token in order."""
    total = [0.0] * len(rows[0])
    for row in rows:
        for i, value in enumerate(row):
            total[i] += value
    return [value / len(rows) for value in total]


def compressed(keys_of_head, length, size, stride):
    """Spec §6.3: [mean(K[j*stride : j*stride + size]) for j = 0 .. floor((length - size) / stride)]."""
    out = []
    j = 0
    while j * stride + size <= length:
        out.append(_mean([keys_of_head[p] for p in range(j * stride, j * stride + size)]))
        j += 1
    return out


def _logsumexp(values):
    if not values:
        return NEG_INF
    peak = max(values)
    total = 0.0
    for v in values:
        total += math.exp(v - peak)
    return peak + math.log(total)


def _as_lists(array):
    return [[[float(x) for x in row] for row in head] for head in array]


def transcribe(q, k, v, config, positions, *, q_sel=None, k_sel=None, exact_lse=False):
    """q [nh][T][d], k/v [nkv][n][d] (the whole cache), positions: the T query positions (the last T of n).

    config: object with kernel_size, kernel_stride, block_size, init_blocks, window_size, topk, use_nope, dense_len.
    q_sel / k_sel: the stage-1 queries/keys (pre-RoPE under use_nope; default q / k).
    Returns (out [nh][T][dv] as nested lists, selection: {(g, i): sorted list of blocks} or None when dense).
    """
    q, k, v = _as_lists(q), _as_lists(k), _as_lists(v)
    q_sel = q if q_sel is None else _as_lists(q_sel)
    k_sel = k if k_sel is None else _as_lists(k_sel)
    positions = [int(p) for p in positions]
    nh, nkv = len(q), len(k)
    n = len(k[0])
    d = len(q[0][0])
    group = nh // nkv
    scale = 1.0 / math.sqrt(d)
    T = len(positions)
    assert positions == list(range(n - T, n))
    decode = T == 1

    ks1, st1 = config.kernel_size, config.kernel_stride
    ks2, st2 = 4 * config.kernel_size, 4 * config.kernel_stride
    B = config.block_size
    local_blocks = config.window_size // config.block_size
    r = B // st1
    budget = config.topk + local_blocks

    sparse = config.dense_len == -1 or n >= config.dense_len

    def attend(h, t, allowed_positions):
        g = h // group
        logits = [(_dot(q[h][t_index(t)], k[g][p]) * scale, p) for p in allowed_positions]
        peak = max(x for x, _ in logits)
        weights = [(math.exp(x - peak), p) for x, p in logits]
        norm = 0.0
        for w, _ in weights:
            norm += w
        dv = len(v[g][0])
        out = [0.0] * dv
        for w, p in weights:
            for i in range(dv):
                out[i] += (w / norm) * v[g][p][i]
        return out

    def t_index(t):
        return t - (n - T)

    out = [[None] * T for _ in range(nh)]
    if not sparse:  # spec §6.2: ordinary causal attention
        for h in range(nh):
            for t in positions:
                out[h][t_index(t)] = attend(h, t, list(range(t + 1)))
        return out, None

    selection = {}
    for g in range(nkv):
        kc1 = compressed(k_sel[g], n, ks1, st1)
        kc2 = compressed(k_sel[g], n, ks2, st2)
        for t in positions:
            # which kernels this query sees
            if decode:
                vis1 = list(range(len(kc1)))  # decode: every existing kernel
                vis2 = list(range(len(kc2)))
            else:
                vis1 = [j for j in range(len(kc1)) if j * st1 + ks1 - 1 <= t]
                vis2 = [m for m in range(len(kc2)) if m * st2 + ks2 - 1 <= t]
            # stage 1: p_h(t, j), summed over the heads of group g
            shared = {j: 0.0 for j in vis1}
            for h in range(g * group, (g + 1) * group):
                qt = q_sel[h][t_index(t)]
                logit1 = {j: _dot(qt, kc1[j]) * scale for j in vis1}
                if exact_lse or not vis2:
                    lse = _logsumexp(list(logit1.values()))
                else:
                    lse = _logsumexp([_dot(qt, kc2[m]) * scale for m in vis2])
                for j in vis1:
                    shared[j] += math.exp(logit1[j] - lse)
            # pooling to blocks, forced blocks, top-k
            q_blk = t // B
            scores = {}
            for b in range(q_blk + 1):
                best = NEG_INF
                for j in range(b * r - 1, b * r + r):
                    if j in shared and shared[j] > best:
                        best = shared[j]
                scores[b] = best
            forced = [b for b in range(q_blk + 1) if b < config.init_blocks or q_blk - local_blocks <= b <= q_blk]
            others = [b for b in range(q_blk + 1) if b not in forced]
            others.sort(key=lambda b: (-scores[b], b))
            chosen = forced + others[: max(0, budget - len(forced))]
            selection[(g, t_index(t))] = sorted(chosen)
            # stage 2: exact softmax over the chosen blocks' tokens, causal
            allowed = [p for p in range(t + 1) if p // B in chosen]
            for h in range(g * group, (g + 1) * group):
                out[h][t_index(t)] = attend(h, t, allowed)
    return out, selection
