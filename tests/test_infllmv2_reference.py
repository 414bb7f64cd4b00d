"""The vectorised InfLLM v2 reference (edgecpm/sparse) against a naive loop-by-loop transcription of spec §6
(tests/infllmv2_transcription.py) at tiny sizes, over every branch: n < kernel_size, exactly kernel_size, the
dense_len crossing in decode and in prefill, GQA ratios 1-16, blocks at the window edge, several init blocks,
use_nope, Kc2 vs exact LSE, incremental vs batch compression, and a budget that covers every block (= dense)."""

from __future__ import annotations

import numpy as np
import pytest
from infllmv2_transcription import compressed, transcribe

from edgecpm.arch.base import SparseAttentionConfig
from edgecpm.sparse import CompressedKeys, compress_keys, dense_attention, kernel_count, sparse_attention, state_bytes

CONFIGS = {
    # kernel 4/2, block 8 (r = 4), local 2 blocks
    "k4s2b8": SparseAttentionConfig(kernel_size=4, kernel_stride=2, block_size=8, window_size=16, topk=4, init_blocks=1, dense_len=-1),
    # kernel 8/4, block 16, two init blocks, one local block
    "k8s4b16": SparseAttentionConfig(kernel_size=8, kernel_stride=4, block_size=16, window_size=16, topk=4, init_blocks=2, dense_len=-1),
    # window not a multiple of the block (20 // 12 = 1 local block)
    "k6s3b12": SparseAttentionConfig(kernel_size=6, kernel_stride=3, block_size=12, window_size=20, topk=4, init_blocks=1, dense_len=-1),
    # non-overlapping kernels (size == stride), r = 2
    "k4s4b8": SparseAttentionConfig(kernel_size=4, kernel_stride=4, block_size=8, window_size=8, topk=3, init_blocks=1, dense_len=-1),
    # no local window, no init block, wide kernels
    "k8s2b8": SparseAttentionConfig(kernel_size=8, kernel_stride=2, block_size=8, window_size=0, topk=3, init_blocks=0, dense_len=-1),
    # kernels far wider than a block (r = 2): past blocks whose window holds no visible kernel score -inf
    "wide": SparseAttentionConfig(kernel_size=8, kernel_stride=2, block_size=4, window_size=0, topk=2, init_blocks=0, dense_len=-1),
    # three init blocks
    "init3": SparseAttentionConfig(kernel_size=4, kernel_stride=2, block_size=8, window_size=8, topk=5, init_blocks=3, dense_len=-1),
}


def random_config(rng: np.random.Generator, strides=(1, 2, 3, 4, 8), max_dense_len: int = 60) -> SparseAttentionConfig:
    """Any valid sparse_config at tiny sizes: kernels 1-4 strides wide, blocks 1-4 strides, windows and budgets from 0,
    dense_len -1 (always sparse), 0 or a crossing."""
    stride = int(rng.choice(strides))
    return SparseAttentionConfig(kernel_size=stride * int(rng.integers(1, 5)), kernel_stride=stride,
                                 block_size=stride * int(rng.integers(1, 5)), window_size=int(rng.integers(0, 4 * stride + 3)),
                                 topk=int(rng.integers(0, 8)), init_blocks=int(rng.integers(0, 4)),
                                 use_nope=bool(rng.integers(0, 2)),
                                 dense_len=int(rng.choice([-1, 0, int(rng.integers(1, max_dense_len))])))


def _config(name: str, **changes) -> SparseAttentionConfig:
    fields = {f: getattr(CONFIGS[name], f) for f in ("kernel_size", "kernel_stride", "block_size", "window_size", "topk",
                                                      "init_blocks", "use_nope", "dense_len")}
    fields.update(changes)
    return SparseAttentionConfig(**fields)


def _rope(x: np.ndarray, offset: int = 0) -> np.ndarray:
    """Rotate-half RoPE (spec §1.6) on [heads, T, d], theta 10000: turns pre-RoPE q/k into roped ones."""
    d = x.shape[-1]
    inv = 1.0 / 10000.0 ** (np.arange(0, d, 2) / d)
    angle = np.arange(offset, offset + x.shape[1])[:, None] * inv[None, :]
    cos, sin = np.cos(np.concatenate([angle, angle], -1)), np.sin(np.concatenate([angle, angle], -1))
    half = d // 2
    return x * cos + np.concatenate([-x[..., half:], x[..., :half]], -1) * sin


def _data(seed: int, nh: int, nkv: int, n: int, d: int, dtype=np.float64):
    """q_nope [nh, n, d], k_nope, k (roped), q (roped), v; keys get a per-position bias so blocks differ."""
    rng = np.random.default_rng(seed)
    q_nope = rng.standard_normal((nh, n, d)) * 1.5
    k_nope = rng.standard_normal((nkv, n, d)) + rng.standard_normal((nkv, 1, d)) * np.sin(np.arange(n) / 5.0)[None, :, None]
    v = rng.standard_normal((nkv, n, d))
    arrays = q_nope, k_nope, _rope(q_nope), _rope(k_nope), v
    return tuple(a.astype(dtype) for a in arrays)


def _check(config, nh, nkv, n, d, *, seed=0, start=0, exact_lse=False, dtype=np.float64, atol=1e-10):
    """One sparse/dense call for positions start..n-1 (a state already holding keys[:start] when start > 0) against
    the transcription; returns (output, indices)."""
    q_nope, k_nope, q, k, v = _data(seed, nh, nkv, n, d, dtype)
    nope = config.use_nope
    state = CompressedKeys(config, nkv, d, dtype)
    if start:
        state.extend((k_nope if nope else k)[:, :start])
    out, idx = sparse_attention(q[:, start:], k, v, state, config, np.arange(start, n), exact_lse=exact_lse,
                                q_nope=q_nope[:, start:] if nope else None, k_nope_cache=k_nope if nope else None,
                                return_selection=True)
    def as64(a):
        return a.astype(np.float64)

    want, selection = transcribe(as64(q[:, start:]), as64(k), as64(v), config, range(start, n), exact_lse=exact_lse,
                                 q_sel=as64(q_nope[:, start:]) if nope else None, k_sel=as64(k_nope) if nope else None)
    np.testing.assert_allclose(out, np.array(want), rtol=0, atol=atol)
    if selection is None:
        assert idx is None
    else:
        got = {(g, i): sorted(int(b) for b in idx[g, i] if b >= 0) for g in range(nkv) for i in range(n - start)}
        assert got == selection
    return out, idx


# --------------------------------------------------------------------------------------------- compression


@pytest.mark.parametrize("name", list(CONFIGS))
def test_incremental_compression_equals_batch(name):
    config = CONFIGS[name]
    rng = np.random.default_rng(1)
    for dtype in (np.float64, np.float32):
        keys = rng.standard_normal((2, 150, 4)).astype(dtype)
        state = CompressedKeys(config, 2, 4, dtype)
        position = 0
        for step in [1, 3, 1, 7, 2, 1, 40, 1, 1, 5, 0, 13, 1, 30, 1, 43]:
            state.extend(keys[:, position:position + step])
            position += step
            batch = CompressedKeys.from_keys(keys[:, :position], config)
            for a, b in ((state.kc1, batch.kc1), (state.kc2, batch.kc2), (state.tail1, batch.tail1), (state.tail2, batch.tail2)):
                assert a.dtype == b.dtype and np.array_equal(a, b)  # bit for bit
            assert state.length == position
    # against the spec formula, transcribed (fp64 sums in the same order: exactly equal)
    keys = rng.standard_normal((1, 97, 4))
    state = CompressedKeys(config, 1, 4, np.float64)
    for position in range(97):
        state.extend(keys[:, position:position + 1])
    for size, stride, kc in ((config.kernel_size, config.kernel_stride, state.kc1), (4 * config.kernel_size, 4 * config.kernel_stride, state.kc2)):
        assert np.array_equal(kc[0], np.array(compressed(keys[0].tolist(), 97, size, stride)).reshape(-1, 4))


def test_kernel_counts_at_the_edges():
    config = CONFIGS["k4s2b8"]
    keys = np.arange(3 * 1 * 2, dtype=np.float64).reshape(1, 3, 2)
    assert compress_keys(keys, 4, 2).shape == (1, 0, 2)  # n < kernel_size: none
    keys = np.arange(4 * 2, dtype=np.float64).reshape(1, 4, 2)
    assert np.array_equal(compress_keys(keys, 4, 2), keys.mean(axis=1, keepdims=True))  # exactly one kernel
    assert [kernel_count(n, 4, 2) for n in (0, 3, 4, 5, 6, 7, 8)] == [0, 0, 1, 1, 2, 2, 3]
    state = CompressedKeys(config, 1, 2, np.float64)
    state.extend(keys[:, :3])
    assert state.kc1.shape[1] == 0 and state.tail1.shape[1] == 3
    state.extend(keys[:, 3:])
    assert state.kc1.shape[1] == 1 and state.tail1.shape[1] == 2  # first stride dropped


def test_crop_then_extend_equals_batch():
    config = CONFIGS["k6s3b12"]
    keys = np.random.default_rng(2).standard_normal((2, 120, 4))
    state = CompressedKeys.from_keys(keys[:, :100], config)
    for length in (99, 70, 45, 23, 5, 0):
        state.crop(length, keys)
        batch = CompressedKeys.from_keys(keys[:, :length], config)
        for a, b in ((state.kc1, batch.kc1), (state.kc2, batch.kc2), (state.tail1, batch.tail1), (state.tail2, batch.tail2)):
            assert np.array_equal(a, b)
    state.extend(keys[:, :120])
    batch = CompressedKeys.from_keys(keys, config)
    assert np.array_equal(state.kc1, batch.kc1) and np.array_equal(state.kc2, batch.kc2)


def test_state_bytes_counts_the_state():
    config = _config("k4s2b8", dense_len=40)
    keys = np.random.default_rng(3).standard_normal((2, 130, 8)).astype(np.float32)
    assert state_bytes(config, 2, 8, 39, "fp32") == 0  # below dense_len nothing is built
    for n in (40, 41, 57, 64, 130):
        state = CompressedKeys.from_keys(keys[:, :n], config)
        assert state_bytes(config, 2, 8, n, np.float32) == state.nbytes
        assert state_bytes(config, 2, 8, n, "fp16") * 2 == state.nbytes
    nope = _config("k4s2b8", dense_len=40, use_nope=True)
    assert state_bytes(nope, 2, 8, 30, "fp32") == 2 * 30 * 8 * 4  # the no-rope key copy, kept from token 0
    assert state_bytes(nope, 2, 8, 64, "fp32", include_nope_keys=False) == state_bytes(config, 2, 8, 64, "fp32")
    # n = 64 by hand: Kc1 31 kernels + tail 2; Kc2 (16/8) 7 kernels + tail 8 -> 48 rows per KV head
    assert state_bytes(config, 1, 1, 64, "fp32") == 48 * 4


# ------------------------------------------------------------------------------------ against the transcription


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("exact_lse", [False, True])
def test_prefill_matches_transcription(name, exact_lse):
    config = CONFIGS[name]
    _, idx = _check(config, nh=4, nkv=2, n=120, d=4, seed=list(CONFIGS).index(name), exact_lse=exact_lse)
    candidates = np.arange(120) // config.block_size + 1
    assert ((idx >= 0).sum(axis=-1) < candidates).any()  # some queries really are sparse


def test_random_configs_match_transcription():
    """300 random sparse_configs, shapes, GQA ratios, normalizers and prefill chunks (a state already holding a
    prefix), each against the transcription."""
    rng = np.random.default_rng(2026)
    for case in range(300):
        config, nkv = random_config(rng), int(rng.integers(1, 3))
        n = int(rng.integers(1, 70))
        _check(config, nh=nkv * int(rng.choice([1, 2, 3, 4, 8, 16])), nkv=nkv, n=n, d=int(rng.choice([4, 8, 16])),
               seed=case, start=int(rng.integers(0, n)) if rng.integers(0, 2) else 0, exact_lse=bool(rng.integers(0, 2)))


@pytest.mark.parametrize("ratio", [1, 2, 4, 8, 16])
def test_gqa_ratios(ratio):
    nkv = 2 if ratio <= 4 else 1
    for exact_lse in (False, True):
        _check(CONFIGS["k4s2b8"], nh=ratio * nkv, nkv=nkv, n=56 if ratio < 16 else 44, d=4, seed=ratio, exact_lse=exact_lse)


@pytest.mark.parametrize("use_nope", [False, True])
def test_use_nope(use_nope):
    _out, idx = _check(_config("k8s4b16", use_nope=use_nope), nh=4, nkv=2, n=128, d=8, seed=5)
    _out_other, idx_other = _check(_config("k8s4b16", use_nope=not use_nope), nh=4, nkv=2, n=128, d=8, seed=5)
    assert not np.array_equal(idx, idx_other)  # the rotation changes what stage 1 selects


def test_head_dim_16_chunked_prefill():
    config = CONFIGS["k6s3b12"]
    _check(config, nh=2, nkv=1, n=70, d=16, seed=7, start=31)  # a second prefill chunk on a state of 31 tokens


@pytest.mark.parametrize("n", [1, 3, 4, 5])
def test_short_sequences(n):
    """n < kernel_size (no kernel at all: only forced blocks score), exactly kernel_size, one past it."""
    _check(CONFIGS["k4s2b8"], nh=2, nkv=1, n=n, d=4, seed=n)
    _check(CONFIGS["init3"], nh=2, nkv=1, n=n, d=4, seed=n, exact_lse=True)
    _check(CONFIGS["wide"], nh=2, nkv=1, n=n + 3, d=4, seed=n)  # several blocks before the first kernel


def test_ties_go_to_the_lower_block():
    """Identical keys: every visible kernel scores the same, so the non-forced budget goes to the oldest blocks."""
    config = _config("k4s2b8", topk=4, window_size=8)  # budget 5: init {0}, local 2 blocks, two more by score
    nh, nkv, n, d = 2, 1, 80, 4
    q = np.random.default_rng(47).standard_normal((nh, n, d))
    k = np.ones((nkv, n, d))
    v = np.random.default_rng(48).standard_normal((nkv, n, d))
    out, idx = sparse_attention(q, k, v, CompressedKeys(config, nkv, d, np.float64), config, return_selection=True)
    want, selection = transcribe(q, k, v, config, range(n))
    np.testing.assert_allclose(out, np.array(want), rtol=0, atol=1e-10)
    for t in range(n):
        q_blk = t // 8
        forced = {0} | set(range(max(0, q_blk - 1), q_blk + 1))
        expected = sorted(forced | set([b for b in range(q_blk + 1) if b not in forced][:5 - len(forced)]))
        assert sorted(b for b in idx[0, t] if b >= 0) == expected == selection[(0, t)]


def test_decode_steps_match_transcription_and_one_shot_prefill():
    config = CONFIGS["k4s2b8"]
    nh, nkv, n, d = 4, 2, 70, 4
    _q_nope, _k_nope, q, k, v = _data(11, nh, nkv, n, d)
    full_state = CompressedKeys(config, nkv, d, np.float64)
    full, full_idx = sparse_attention(q, k, v, full_state, config, return_selection=True)
    state = CompressedKeys(config, nkv, d, np.float64)
    prefill = 29
    out, idx = sparse_attention(q[:, :prefill], k[:, :prefill], v[:, :prefill], state, config, return_selection=True)
    np.testing.assert_allclose(out, full[:, :prefill], rtol=0, atol=1e-12)
    assert np.array_equal(idx, full_idx[:, :prefill])
    for t in range(prefill, n):
        step, step_idx = sparse_attention(q[:, t:t + 1], k[:, :t + 1], v[:, :t + 1], state, config, [t], return_selection=True)
        np.testing.assert_allclose(step[:, 0], full[:, t], rtol=0, atol=1e-12)
        got = [sorted(b for b in step_idx[g, 0] if b >= 0) for g in range(nkv)]
        assert got == [sorted(b for b in full_idx[g, t] if b >= 0) for g in range(nkv)]
        if t % 7 == 0:  # the decode branch of the transcription (all existing kernels)
            want, selection = transcribe(q[:, t:t + 1], k[:, :t + 1], v[:, :t + 1], config, [t])
            np.testing.assert_allclose(step, np.array(want), rtol=0, atol=1e-10)
            assert got == [selection[(g, 0)] for g in range(nkv)]
    assert np.array_equal(state.kc1, full_state.kc1) and np.array_equal(state.kc2, full_state.kc2)


def test_dense_len_crossing_in_decode():
    config = _config("k4s2b8", dense_len=48, topk=3, window_size=8)
    nh, nkv, n, d = 4, 2, 60, 4
    _, _, q, k, v = _data(13, nh, nkv, n, d)
    state = CompressedKeys(config, nkv, d, np.float64)
    out, idx = sparse_attention(q[:, :47], k[:, :47], v[:, :47], state, config, return_selection=True)
    assert idx is None and state.length == 0  # dense: no compressed state is built
    np.testing.assert_allclose(out, dense_attention(q[:, :47], k[:, :47], v[:, :47]), rtol=0, atol=0)
    want, selection = transcribe(q[:, :47], k[:, :47], v[:, :47], config, range(47))
    assert selection is None
    np.testing.assert_allclose(out, np.array(want), rtol=0, atol=1e-10)
    for t in range(47, n):  # position 47: total length 48 = dense_len -> sparse, the whole history compressed once
        step, step_idx = sparse_attention(q[:, t:t + 1], k[:, :t + 1], v[:, :t + 1], state, config, [t], return_selection=True)
        assert step_idx is not None and state.length == t + 1
        want, selection = transcribe(q[:, t:t + 1], k[:, :t + 1], v[:, :t + 1], config, [t])
        np.testing.assert_allclose(step, np.array(want), rtol=0, atol=1e-10)
        assert [sorted(b for b in step_idx[g, 0] if b >= 0) for g in range(nkv)] == [selection[(g, 0)] for g in range(nkv)]
        if t == 47:
            assert not np.allclose(step, dense_attention(q[:, t:t + 1], k[:, :t + 1], v[:, :t + 1]))  # it is sparse
    batch = CompressedKeys.from_keys(k, config)
    assert np.array_equal(state.kc1, batch.kc1) and np.array_equal(state.tail2, batch.tail2)


def test_dense_len_crossing_in_prefill():
    config = _config("k8s4b16", dense_len=50)
    _check(config, nh=4, nkv=2, n=49, d=4, seed=17)  # a whole prompt below dense_len: dense
    _check(config, nh=4, nkv=2, n=50, d=4, seed=17)  # reaching dense_len: every query sparse
    # a dense first chunk (no state), then a chunk that crosses: the whole history is compressed at once
    _q_nope, _k_nope, q, k, v = _data(19, 4, 2, 75, 4)
    state = CompressedKeys(config, 2, 4, np.float64)
    sparse_attention(q[:, :40], k[:, :40], v[:, :40], state, config)
    assert state.length == 0
    out, idx = sparse_attention(q[:, 40:], k, v, state, config, np.arange(40, 75), return_selection=True)
    want, selection = transcribe(q[:, 40:], k, v, config, range(40, 75))
    np.testing.assert_allclose(out, np.array(want), rtol=0, atol=1e-10)
    assert {(g, i): sorted(b for b in idx[g, i] if b >= 0) for g in range(2) for i in range(35)} == selection


def test_window_edge_and_forced_blocks():
    """topk 0: exactly the forced blocks, init ∪ [q_blk - local_blocks, q_blk] (each whole), at every query."""
    for name, init in (("k4s2b8", 1), ("k6s3b12", 1), ("init3", 3)):
        config = _config(name, topk=0, init_blocks=init)
        _out, idx = _check(config, nh=2, nkv=1, n=90, d=4, seed=23)
        local = config.window_size // config.block_size
        for t in range(90):
            q_blk = t // config.block_size
            want = sorted(set(range(min(init, q_blk + 1))) | set(range(max(0, q_blk - local), q_blk + 1)))
            assert sorted(b for b in idx[0, t] if b >= 0) == want


def test_budget_covering_every_block_is_dense():
    for name in ("k4s2b8", "k8s2b8", "k4s4b8"):
        config = _config(name, topk=64)
        _q_nope, _k_nope, q, k, v = _data(29, 4, 2, 90, 4)
        out = sparse_attention(q, k, v, CompressedKeys(config, 2, 4, np.float64), config)
        np.testing.assert_allclose(out, dense_attention(q, k, v), rtol=0, atol=1e-12)
        _check(config, nh=4, nkv=2, n=50, d=4, seed=29)


def test_lse_choice_matters_and_falls_back():
    """Kc2 LSE and the exact one select differently somewhere; before the first Kc2 kernel they agree exactly."""
    config = CONFIGS["k4s2b8"]
    _, _, q, k, v = _data(31, 16, 1, 80, 4)
    approx, idx_a = sparse_attention(q, k, v, CompressedKeys(config, 1, 4, np.float64), config, return_selection=True)
    exact, idx_e = sparse_attention(q, k, v, CompressedKeys(config, 1, 4, np.float64), config, exact_lse=True,
                                    return_selection=True)
    first_kc2 = 4 * config.kernel_size - 1  # position 15 is the first to see a coarse kernel
    assert np.array_equal(approx[:, :first_kc2], exact[:, :first_kc2])
    assert not np.array_equal(idx_a, idx_e)


def test_float32_against_fp64_transcription():
    for name in ("k4s2b8", "k8s4b16"):
        _check(CONFIGS[name], nh=8, nkv=2, n=64, d=8, seed=37, dtype=np.float32, atol=1e-5)
        _check(_config(name, use_nope=True), nh=4, nkv=2, n=64, d=8, seed=41, dtype=np.float32, atol=1e-5, exact_lse=True)


def test_rejects_bad_input():
    config = CONFIGS["k4s2b8"]
    _, _, q, k, v = _data(43, 2, 1, 20, 4)
    with pytest.raises(ValueError, match="positions"):
        sparse_attention(q[:, -1:], k, v, CompressedKeys(config, 1, 4), config, [3])
    with pytest.raises(ValueError, match="use_nope"):
        sparse_attention(q, k, v, CompressedKeys(config, 1, 4), _config("k4s2b8", use_nope=True))
    with pytest.raises(ValueError, match="multiple"):
        CompressedKeys(_config("k4s2b8", block_size=7), 1, 4)
    state = CompressedKeys.from_keys(k, config)
    with pytest.raises(ValueError, match="crop"):
        sparse_attention(q[:, :10], k[:, :10], v[:, :10], state, config)
