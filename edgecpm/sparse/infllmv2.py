"""InfLLM v2 block-sparse attention (spec §6): a vectorised, torch-free numpy reference.

Variant: infllmv2_cuda_impl (spec §6.4 step 4, first bullet), the one later HF remote code uses. Per query
token t and KV head g (all query heads of a GQA group share one block list):

1. compressed keys (spec §6.3): ``Kc1_j = mean(K[j*s1 : j*s1 + l1])`` (l1/s1 = kernel_size/kernel_stride) and
   ``Kc2_m = mean(K[m*s2 : m*s2 + l2])`` with l2 = 4*l1, s2 = 4*s1 (``LEVEL2_FACTOR``, hard-coded multiples);
   only kernels fully inside the history exist. They are kept incrementally in a `CompressedKeys` (a tail buffer of
   not-yet-compressed keys per level), bit-for-bit equal to compressing the whole history at once.
2. stage 1: ``p_h(t, j) = exp(q_h(t).Kc1_j / sqrt(d) - LSE_h(t))`` over the kernels visible to t, with LSE_h(t) the
   log-sum-exp of ``q_h(t).Kc2_m / sqrt(d)`` over the visible coarse kernels (default; ``exact_lse=True``: over the
   visible Kc1 row); ``S(t, j) = sum_{h in g} p_h(t, j)``.
3. pooling to blocks of B = block_size tokens: ``score(t, b) = max_{j in [b*r - 1, b*r + r - 1]} S(t, j)`` over
   visible kernels, r = B / s1 (pooling window r + 1, stride r, padding 1).
4. forced blocks: init ``b < init_blocks`` and local ``q_blk - local_blocks <= b <= q_blk`` (q_blk = t // B,
   local_blocks = window_size // B) score +inf; the top ``topk + local_blocks`` blocks are taken, future ones
   (b > q_blk) dropped.
5. stage 2: exact softmax (scale 1/sqrt(d)) of q_h(t) over the selected blocks' tokens at positions <= t (token-level
   causal inside the current block). Below dense_len: plain dense causal attention, exactly.

Choices where the spec leaves room (tests/infllmv2_transcription.py follows the same ones):

- Sparse or dense (§6.2): a call is sparse when ``dense_len == -1`` or its total length n = positions[-1] + 1 is
  >= dense_len, and then *every* query of the call is sparse (also those at positions < dense_len; HF: "later
  code: max(position_ids)+1"). A dense call builds no compressed state; the first sparse call compresses the whole
  key history once (the decode step that crosses dense_len, or a long prefill).
- Visibility (§6.4.1): Kc1 kernel j is visible to t iff its last token ``j*s1 + l1 - 1 <= t``; coarse kernel m is
  visible (for the LSE) iff ``m*s2 + l2 - 1 <= t``. In decode these are exactly the kernels that exist, so a
  decode step equals the same query inside a one-shot prefill (selection and output).
- LSE fallback: when a query sees at least one Kc1 kernel but no Kc2 kernel yet (l1 - 1 <= t < l2 - 1), the Kc2
  normalizer is undefined (log of an empty sum); the exact Kc1 LSE is used for that query.
- Pooling "∩ existing" (§6.4.3) means the kernels visible to t (as in decode); a block whose window holds no
  visible kernel scores -inf (it can still be chosen when the budget exceeds the finite-scored blocks: the top-k
  runs over every past block, as HF's topk over the pooled row does, so a budget covering every block is dense).
- Candidates are the blocks 0 .. q_blk only (future blocks never take budget, as in HF decode; HF prefill ranks
  them too and then sets them to -1, which only differs when kernel_size == kernel_stride lets a future block
  score finitely).
- Local window (§6.4.4, §11 item 6: ±1 block across code revisions): the spec's first bullet literally,
  ``max(0, q_blk - local_blocks) <= b <= q_blk``, i.e. local_blocks + 1 blocks including the current one (33 for
  the defaults), each whole: the oldest local block is forced in full even where window_size tokens back from t
  reach only part of it. local_blocks = window_size // block_size (floor when not divisible).
- Budget: K = topk + local_blocks blocks per (KV head, query), forced blocks included. Forced blocks are always
  kept; when they number more than K (topk < init_blocks + 1) they are all kept and nothing else is added.
- Ties in top-k: higher score first, equal scores by lower block index first (deterministic).
- GQA: query head h belongs to KV head h // (num_heads / num_kv_heads) (HF repeat_kv layout); the group sum is
  over the actual group (HF's repeat-to-16 only rescales the sum, which no selection can see).
- use_nope (§6.1): stage 1 (and the compressed keys) use the caller's pre-RoPE queries/keys; stage 2 the roped ones.

Arrays: q [num_heads, T, d], keys/values [num_kv_heads, n, d|dv] (the cache including this call's tokens). The
arithmetic runs in the inputs' precision (at least fp32); compressed keys keep the keys' dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

LEVEL2_FACTOR = 4  # Kc2: kernel 4*kernel_size, stride 4*kernel_stride (spec §6.1, hard-coded in the reference code)
QUERY_CHUNK = 256  # queries scored at once (bounds the [T, n] temporaries of a long prefill)
_DTYPE_BYTES = {"fp32": 4, "float32": 4, "fp16": 2, "float16": 2, "bf16": 2, "bfloat16": 2, "fp64": 8, "float64": 8}


def kernel_count(length: int, size: int, stride: int) -> int:
    """How many kernels of `size` tokens at `stride` lie fully inside `length` tokens (spec §6.3)."""
    return 0 if length < size else (length - size) // stride + 1


@dataclass(frozen=True)
class SparseGeometry:
    """The integers InfLLM v2 works with, derived from a `SparseAttentionConfig` (spec §6.1) and validated."""

    kernel_size: int
    kernel_stride: int
    kernel_size2: int
    kernel_stride2: int
    block_size: int
    init_blocks: int
    local_blocks: int
    topk: int
    dense_len: int
    use_nope: bool

    @classmethod
    def of(cls, config: Any) -> SparseGeometry:
        """From anything with the sparse_config attributes (a SparseAttentionConfig), or a SparseGeometry."""
        if isinstance(config, SparseGeometry):
            return config
        size, stride, block = int(config.kernel_size), int(config.kernel_stride), int(config.block_size)
        window, topk, init = int(config.window_size), int(config.topk), int(config.init_blocks)
        if size < 1 or stride < 1 or stride > size:
            raise ValueError(f"sparse_config needs 1 <= kernel_stride <= kernel_size (got {stride}, {size})")
        if block < 1 or block % stride:
            raise ValueError(f"sparse_config block_size ({block}) must be a positive multiple of kernel_stride ({stride})")
        if window < 0 or topk < 0 or init < 0:
            raise ValueError("sparse_config window_size, topk and init_blocks must be >= 0")
        return cls(kernel_size=size, kernel_stride=stride, kernel_size2=LEVEL2_FACTOR * size,
                   kernel_stride2=LEVEL2_FACTOR * stride, block_size=block, init_blocks=init,
                   local_blocks=window // block, topk=topk, dense_len=int(config.dense_len), use_nope=bool(config.use_nope))

    @property
    def budget(self) -> int:
        """Blocks chosen per (KV head, query), forced ones included: topk + local_blocks (spec §6.4.4)."""
        return self.topk + self.local_blocks

    @property
    def pool_ratio(self) -> int:
        """Kernels per block step, r = block_size / kernel_stride (pooling window r + 1, padding 1)."""
        return self.block_size // self.kernel_stride


def uses_sparse(config: Any, total_length: int) -> bool:
    """Whether a forward whose total length (past + new) is `total_length` runs sparse (spec §6.2)."""
    dense_len = int(config.dense_len)
    return dense_len < 0 or total_length >= dense_len


# ------------------------------------------------------------------------------------------ compression


def _window_means(keys: np.ndarray, starts: np.ndarray, size: int) -> np.ndarray:
    """Means of keys[..., s : s + size, :] for each start s, summed token by token in float64 and rounded once to the
    keys' dtype. A float64 sum of float32 (or half) keys is exact unless their magnitudes span some 2^24, so kernels
    over the same keys in another order (a repeated token) are equal and tie in the selection, as they do in the
    native kernels, which sum in double too."""
    if len(starts) == 0:
        return np.zeros(keys.shape[:-2] + (0, keys.shape[-1]), dtype=keys.dtype)
    acc = keys[..., starts, :].astype(np.float64)
    for offset in range(1, size):
        acc = acc + keys[..., starts + offset, :]
    return (acc / size).astype(keys.dtype)


def compress_keys(keys: np.ndarray, size: int, stride: int) -> np.ndarray:
    """Batch compression of a whole history: keys [..., n, d] -> [..., kernel_count(n), d] (spec §6.3)."""
    count = kernel_count(keys.shape[-2], size, stride)
    return _window_means(keys, np.arange(count) * stride, size)


class CompressedKeys:
    """One layer's compressed-key state, all KV heads at once (arrays lead with the KV-head axis).

    Holds Kc1 [nkv, n1, d], Kc2 [nkv, n2, d] and per level the tail buffer of keys not yet folded into a kernel
    (the keys from the next kernel's first token on, fewer than the kernel size). `length` is how many tokens it
    summarizes. `extend` appends tokens; whatever the chunking, the result equals `from_keys` on the whole
    history bit for bit. It summarizes the keys stage 1 uses: roped keys, or the pre-RoPE ones under use_nope.
    """

    def __init__(self, config: Any, num_kv_heads: int, head_dim: int, dtype: Any = np.float32):
        self.geometry = SparseGeometry.of(config)
        self.dtype = np.dtype(dtype)
        empty = np.zeros((num_kv_heads, 0, head_dim), dtype=self.dtype)
        self.kc1, self.kc2, self.tail1, self.tail2 = empty, empty.copy(), empty.copy(), empty.copy()
        self.length = 0

    @property
    def num_kv_heads(self) -> int:
        return self.kc1.shape[0]

    @property
    def head_dim(self) -> int:
        return self.kc1.shape[2]

    @classmethod
    def from_keys(cls, keys: np.ndarray, config: Any) -> CompressedKeys:
        """The state for a whole history keys [nkv, n, d], compressed at once."""
        geometry = SparseGeometry.of(config)
        state = cls(geometry, keys.shape[0], keys.shape[2], keys.dtype)
        n = keys.shape[1]
        state.kc1 = compress_keys(keys, geometry.kernel_size, geometry.kernel_stride)
        state.kc2 = compress_keys(keys, geometry.kernel_size2, geometry.kernel_stride2)
        state.tail1 = keys[:, state.kc1.shape[1] * geometry.kernel_stride:].copy()
        state.tail2 = keys[:, state.kc2.shape[1] * geometry.kernel_stride2:].copy()
        state.length = n
        return state

    @staticmethod
    def _fold(tail: np.ndarray, new: np.ndarray, size: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
        """Appends `new` to a tail buffer; returns (the kernels it completes, the remaining tail)."""
        buffer = np.concatenate([tail, new], axis=1)
        count = kernel_count(buffer.shape[1], size, stride)
        emitted = _window_means(buffer, np.arange(count) * stride, size)
        return emitted, buffer[:, count * stride:].copy()

    def extend(self, keys: np.ndarray) -> None:
        """Appends the next tokens' keys [nkv, T, d] (T may be 0), emitting every kernel they complete."""
        keys = np.asarray(keys)
        if keys.ndim != 3 or keys.shape[0] != self.num_kv_heads or keys.shape[2] != self.head_dim:
            raise ValueError(f"keys must be [{self.num_kv_heads}, T, {self.head_dim}], got {keys.shape}")
        keys = keys.astype(self.dtype, copy=False)
        g = self.geometry
        emitted1, self.tail1 = self._fold(self.tail1, keys, g.kernel_size, g.kernel_stride)
        emitted2, self.tail2 = self._fold(self.tail2, keys, g.kernel_size2, g.kernel_stride2)
        self.kc1 = np.concatenate([self.kc1, emitted1], axis=1)
        self.kc2 = np.concatenate([self.kc2, emitted2], axis=1)
        self.length += keys.shape[1]

    def sync(self, keys: np.ndarray) -> None:
        """Brings the state up to a full key history keys [nkv, n, d] (compresses keys[:, length:])."""
        if keys.shape[1] < self.length:
            raise ValueError(f"the compressed state covers {self.length} tokens, the key history only {keys.shape[1]}; crop it")
        self.extend(keys[:, self.length:])

    def crop(self, length: int, keys: np.ndarray) -> None:
        """Keeps the state of the first `length` tokens (prompt-prefix reuse); `keys` [nkv, >= length, d] is the key
        history the tails are rebuilt from."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a state of {self.length} tokens to {length}")
        g = self.geometry
        n1 = kernel_count(length, g.kernel_size, g.kernel_stride)
        n2 = kernel_count(length, g.kernel_size2, g.kernel_stride2)
        self.kc1, self.kc2 = self.kc1[:, :n1].copy(), self.kc2[:, :n2].copy()
        self.tail1 = np.asarray(keys[:, n1 * g.kernel_stride:length], dtype=self.dtype).copy()
        self.tail2 = np.asarray(keys[:, n2 * g.kernel_stride2:length], dtype=self.dtype).copy()
        self.length = length

    def copy(self) -> CompressedKeys:
        clone = CompressedKeys(self.geometry, self.num_kv_heads, self.head_dim, self.dtype)
        clone.kc1, clone.kc2, clone.tail1, clone.tail2 = (a.copy() for a in (self.kc1, self.kc2, self.tail1, self.tail2))
        clone.length = self.length
        return clone

    @property
    def nbytes(self) -> int:
        """Bytes held: Kc1, Kc2 and both tail buffers (equals `state_bytes` without the no-rope key copy)."""
        return sum(a.nbytes for a in (self.kc1, self.kc2, self.tail1, self.tail2))


def state_bytes(config: Any, num_kv_heads: int, head_dim: int, context: int, dtype: Any = "fp32", *,
                include_nope_keys: bool = True) -> int:
    """Bytes of one layer's compressed-key state once `context` tokens are in the session (multiply by layers).

    Kc1 + Kc2 + both tail buffers; zero below dense_len (no state is built there, spec §6.2). With use_nope the
    separate no-rope key cache stage 1 needs (num_kv_heads * context * head_dim, kept from the first token on) is
    included unless include_nope_keys=False. `dtype`: "fp32"/"fp16"/"bf16" or a numpy dtype.
    """
    itemsize = _DTYPE_BYTES[dtype] if isinstance(dtype, str) and dtype in _DTYPE_BYTES else np.dtype(dtype).itemsize
    g = SparseGeometry.of(config)
    rows = 0
    if context > 0 and uses_sparse(g, context):
        n1 = kernel_count(context, g.kernel_size, g.kernel_stride)
        n2 = kernel_count(context, g.kernel_size2, g.kernel_stride2)
        rows += n1 + (context - n1 * g.kernel_stride) + n2 + (context - n2 * g.kernel_stride2)
    if g.use_nope and include_nope_keys:
        rows += context
    return rows * num_kv_heads * head_dim * itemsize


# ------------------------------------------------------------------------------------------- attention


def _logsumexp(x: np.ndarray) -> np.ndarray:
    """Over the last axis; -inf for rows that are all -inf."""
    peak = x.max(axis=-1) if x.shape[-1] else np.full(x.shape[:-1], -np.inf, dtype=x.dtype)
    finite = np.isfinite(peak)
    shift = np.where(finite, peak, 0)
    total = np.exp(x - shift[..., None]).sum(axis=-1) if x.shape[-1] else np.zeros_like(peak)
    return np.where(finite, np.log(np.where(finite, total, 1)) + shift, -np.inf)


def _masked_attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """q [nkv, g, T, d], keys [nkv, n, d], values [nkv, n, dv], allowed [nkv or 1, T, n] -> [nkv, g, T, dv]."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = np.einsum("kgtd,ksd->kgts", q, keys) * scale
    scores = np.where(allowed[:, None], scores, -np.inf)
    peak = scores.max(axis=-1, keepdims=True)
    weights = np.exp(scores - peak)
    weights /= weights.sum(axis=-1, keepdims=True)
    return np.einsum("kgts,ksd->kgtd", weights, values)


def _check_positions(positions: Any, new: int, total: int) -> np.ndarray:
    expected = np.arange(total - new, total)
    if positions is None:
        return expected
    positions = np.asarray(positions, dtype=np.int64).reshape(-1)
    if positions.shape != expected.shape or not np.array_equal(positions, expected):
        raise ValueError(f"positions must be the last {new} cache positions {total - new}..{total - 1}")
    return positions


def dense_attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, positions: Any = None) -> np.ndarray:
    """Plain causal GQA attention (spec §1.5): q [nh, T, d] are the last T positions of k/v [nkv, n, d]."""
    nh, new, d = q.shape
    nkv, total = k_cache.shape[:2]
    positions = _check_positions(positions, new, total)
    dtype = np.result_type(q.dtype, k_cache.dtype, v_cache.dtype, np.float32)
    qg = q.astype(dtype, copy=False).reshape(nkv, nh // nkv, new, d)
    allowed = (np.arange(total)[None, :] <= positions[:, None])[None]
    out = _masked_attention(qg, k_cache.astype(dtype, copy=False), v_cache.astype(dtype, copy=False), allowed)
    return out.reshape(nh, new, -1)


def _scores(q: np.ndarray, keys: np.ndarray, scale: float) -> np.ndarray:
    """Stage-1 logits q [nkv, g, T, d] . keys [nkv, j, d] * scale, in float64 rounded to q's dtype: a matrix product's
    float32 sums depend on where a row falls in its blocking, so equal compressed keys (a repeated token) could score
    an ulp apart and break a tie the selection rule settles by block index; rounded from float64 they score equally."""
    wide = np.einsum("kgtd,kjd->kgtj", q.astype(np.float64), keys.astype(np.float64)) * scale
    return wide.astype(np.result_type(q.dtype, keys.dtype), copy=False)


def _block_scores(q_sel: np.ndarray, state: CompressedKeys, positions: np.ndarray, num_blocks: int,
                  exact_lse: bool, dtype: np.dtype) -> np.ndarray:
    """Stage 1 + pooling: q_sel [nkv, g, T, d] -> pooled block scores [nkv, T, num_blocks] (-inf: no visible kernel)."""
    g = state.geometry
    nkv, _, new, d = q_sel.shape
    scale = 1.0 / math.sqrt(d)
    kc1, kc2 = state.kc1.astype(dtype, copy=False), state.kc2.astype(dtype, copy=False)
    n1, n2 = kc1.shape[1], kc2.shape[1]
    visible1 = (np.arange(n1) * g.kernel_stride + g.kernel_size - 1)[None, :] <= positions[:, None]  # [T, n1]
    logits1 = np.where(visible1, _scores(q_sel, kc1, scale), -np.inf)
    lse = _logsumexp(logits1)  # [nkv, g, T]
    if not exact_lse:
        visible2 = (np.arange(n2) * g.kernel_stride2 + g.kernel_size2 - 1)[None, :] <= positions[:, None]
        logits2 = np.where(visible2, _scores(q_sel, kc2, scale), -np.inf)
        lse = np.where(visible2.any(axis=-1), _logsumexp(logits2), lse)  # no coarse kernel yet: exact LSE
    shift = np.where(np.isfinite(lse), lse, 0)
    probs = np.exp(logits1 - shift[..., None])  # exp(-inf) = 0 for kernels t cannot see
    shared = probs.sum(axis=1)  # [nkv, T, n1]
    shared = np.where(visible1[None], shared, -np.inf)
    r = g.pool_ratio
    window = np.arange(num_blocks)[:, None] * r - 1 + np.arange(r + 1)[None, :]  # [nb, r+1] kernel indices
    valid = (window >= 0) & (window < n1)
    if n1 == 0:
        return np.full((nkv, new, num_blocks), -np.inf, dtype=dtype)
    gathered = np.where(valid, shared[..., np.clip(window, 0, n1 - 1)], -np.inf)  # [nkv, T, nb, r+1]
    return gathered.max(axis=-1)


def _select_blocks(scores: np.ndarray, positions: np.ndarray, geometry: SparseGeometry) -> np.ndarray:
    """Forced blocks, top-(topk + local_blocks), future dropped: scores [nkv, T, nb] -> selected mask [nkv, T, nb]."""
    num_blocks = scores.shape[-1]
    blocks = np.arange(num_blocks)[None, :]
    q_block = (positions // geometry.block_size)[:, None]  # [T, 1]
    candidate = blocks <= q_block
    forced = candidate & ((blocks < geometry.init_blocks) | (blocks >= q_block - geometry.local_blocks))
    # Sort key: forced first, then higher score, equal keys by lower block index (stable sort); future last.
    key = np.where(forced[None], -np.inf, -scores)
    key = np.where(candidate[None], key, np.inf)
    order = np.argsort(key, axis=-1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(num_blocks), order.shape), axis=-1)
    keep = np.maximum(geometry.budget, forced.sum(axis=-1))  # [T]
    return (rank < keep[None, :, None]) & candidate[None]


def _indices(selected: np.ndarray, width: int) -> np.ndarray:
    """Selected mask [nkv, T, nb] -> ascending block indices [nkv, T, width], padded with -1 at the end."""
    num_blocks = selected.shape[-1]
    width = max(width, int(selected.sum(axis=-1).max(initial=0)))
    ordered = np.sort(np.where(selected, np.arange(num_blocks), num_blocks), axis=-1)
    if ordered.shape[-1] < width:
        pad = np.full(ordered.shape[:-1] + (width - ordered.shape[-1],), num_blocks)
        ordered = np.concatenate([ordered, pad], axis=-1)
    ordered = ordered[..., :width]
    return np.where(ordered >= num_blocks, -1, ordered).astype(np.int64)


def sparse_attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, state: CompressedKeys | None,
                     config: Any, positions: Any = None, *, q_nope: np.ndarray | None = None,
                     k_nope_cache: np.ndarray | None = None, exact_lse: bool = False, return_selection: bool = False,
                     query_chunk: int = QUERY_CHUNK) -> Any:
    """InfLLM v2 attention for a prefill chunk (a block list per query token) or a decode step (T = 1).

    q [nh, T, d] (roped) are the queries of positions n-T .. n-1 (`positions`, checked when given); k_cache and
    v_cache [nkv, n, d|dv] the whole cache including this call's tokens. `state` is the layer's CompressedKeys: a
    sparse call brings it up to n tokens (at the dense_len crossing it compresses the whole history once); a dense
    call (n < dense_len) leaves it alone and may pass None. With config.use_nope, q_nope [nh, T, d] and
    k_nope_cache [nkv, n, d] (pre-RoPE) drive stage 1 and the state. `exact_lse`: stage-1 normalizer over Kc1
    instead of Kc2. Returns the output [nh, T, dv]; with return_selection=True, (output, indices) where indices
    [nkv, T, W] are each query's selected blocks ascending, -1-padded at the end (W = topk + local_blocks, more only
    when forced blocks outnumber it), or None for a dense call.
    """
    geometry = SparseGeometry.of(config)
    q, k_cache, v_cache = np.asarray(q), np.asarray(k_cache), np.asarray(v_cache)
    nh, new, d = q.shape
    nkv, total = k_cache.shape[:2]
    if nh % nkv or v_cache.shape[:2] != (nkv, total) or k_cache.shape[2] != d or new > total or new < 1:
        raise ValueError(f"shapes do not fit: q {q.shape}, k {k_cache.shape}, v {v_cache.shape}")
    positions = _check_positions(positions, new, total)
    if not uses_sparse(geometry, total):
        out = dense_attention(q, k_cache, v_cache, positions)
        return (out, None) if return_selection else out
    if state is None:
        raise ValueError("a sparse call needs the layer's CompressedKeys")
    if geometry.use_nope:
        if q_nope is None or k_nope_cache is None:
            raise ValueError("use_nope: pass q_nope and k_nope_cache (the pre-RoPE queries and keys)")
        q_sel, k_sel = np.asarray(q_nope), np.asarray(k_nope_cache)
        if q_sel.shape != q.shape or k_sel.shape[:2] != (nkv, total) or k_sel.shape[2] != d:
            raise ValueError("q_nope / k_nope_cache must have the shapes of q / k_cache")
    else:
        q_sel, k_sel = q, k_cache
    state.sync(k_sel[:, :total])
    dtype = np.result_type(q.dtype, k_cache.dtype, v_cache.dtype, np.float32)
    group = nh // nkv
    qg = q.astype(dtype, copy=False).reshape(nkv, group, new, d)
    qs = q_sel.astype(dtype, copy=False).reshape(nkv, group, new, d)
    keys, values = k_cache.astype(dtype, copy=False), v_cache.astype(dtype, copy=False)
    num_blocks = (total + geometry.block_size - 1) // geometry.block_size
    token_block = np.arange(total) // geometry.block_size
    outputs, masks = [], []
    for start in range(0, new, max(1, query_chunk)):
        stop = min(new, start + max(1, query_chunk))
        pos = positions[start:stop]
        scores = _block_scores(qs[:, :, start:stop], state, pos, num_blocks, exact_lse, dtype)
        selected = _select_blocks(scores, pos, geometry)
        allowed = selected[..., token_block] & (np.arange(total)[None, :] <= pos[:, None])[None]
        outputs.append(_masked_attention(qg[:, :, start:stop], keys, values, allowed))
        masks.append(selected)
    out = np.concatenate(outputs, axis=2).reshape(nh, new, -1)
    if not return_selection:
        return out
    return out, _indices(np.concatenate(masks, axis=1), geometry.budget)
