"""InfLLM v2 sparse attention on the native kernels (runtimes/native/infllmv2.c) against the reference.

The reference is the PyTorch model with the numpy InfLLM v2 attention (edgecpm.sparse, itself tested against a
loop-by-loop transcription of spec §6 in test_infllmv2_reference.py) making the same calls: an fp32 bundle's
kernels compute the same float math, so logits agree to FP32_ATOL, while sparse attention moves them far more
than that from dense (the configs are small enough that a tiny prompt has many blocks to choose from).
Quantized bundles: a prompt prefilled in passes equals the same tokens decoded one by one, bit for bit.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_MAX_CONTEXT
from edgecpm.runtimes import load_backend
from edgecpm.runtimes.native.build import PORTABLE_FLAGS, load_library
from test_infllmv2_reference import random_config
from test_native_decode import needs_kernels

from edgecpm.arch.base import SparseAttentionConfig
from edgecpm.checkpoint import open_checkpoint
from edgecpm.errors import BundleError, UnsupportedError
from edgecpm.models import reference_model
from edgecpm.sparse.choice import AttentionChoice, parse_overrides

FP32_ATOL = 2e-4
MAX_CONTEXT = TINY_MAX_CONTEXT  # the `tiny` fixture's bundles (conftest.py)
# 16-token blocks, kernels of 8 at stride 4 (Kc2: 32 at 16), 1 init + 2 local + 3 chosen blocks
SMALL = SparseAttentionConfig(kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1, window_size=32, topk=3,
                              dense_len=-1)
CONFIGS = {
    "always": SMALL,
    "crossing": replace(SMALL, dense_len=150),
    "nope": replace(SMALL, use_nope=True, init_blocks=2),
    "wide-kernels": replace(SMALL, kernel_size=16, kernel_stride=16, block_size=32, window_size=32, topk=2),
    # kernels three blocks wide: no coarse kernel (96 tokens) until position 95, so the exact normalizer spans up to 9
    # kernels where the context holds only 6 coarse ones (select_blocks' normalizer rows were once that short)
    "late-coarse": replace(SMALL, kernel_size=24, kernel_stride=8, block_size=8, window_size=14, topk=6, init_blocks=2),
    # topk 0 and no window: the init blocks and the query's own block, nothing chosen
    "forced-only": replace(SMALL, window_size=0, topk=0, init_blocks=2),
    # one-token kernels of pre-RoPE keys: a token repeated in the prompt has, in layer 0, the same key at both places,
    # so its kernels tie exactly wherever the score rows put them (the rows' last few too) and the lower block wins
    "repeated-keys": replace(SMALL, kernel_size=1, kernel_stride=1, block_size=2, window_size=1, topk=2, init_blocks=0,
                             use_nope=True),
    # kernels of four one apart: two that hold the same tokens in another order tie as the reference's do
    "permuted-kernels": replace(SMALL, kernel_size=4, kernel_stride=1, block_size=1, window_size=3, topk=3, init_blocks=0,
                                use_nope=True),
}
RNG = np.random.default_rng(3)
PROMPT = RNG.integers(5, 260, 240)


def backend(bundle: Path, sparse: SparseAttentionConfig | None):
    choice = AttentionChoice("dense") if sparse is None else AttentionChoice("sparse", _fields(sparse))
    return load_backend(bundle, kernels="native", threads=2, attention=choice)


def _fields(config: SparseAttentionConfig) -> dict:
    return {name: getattr(config, name) for name in config.__dataclass_fields__}


def reference_logits(checkpoint: Path, sparse, calls: list[np.ndarray]) -> list[np.ndarray]:
    model = reference_model(open_checkpoint(checkpoint)).use_sparse_attention(sparse)
    cache = model.new_cache()
    with torch.no_grad():
        return [model(torch.tensor(ids[None], dtype=torch.long), cache)[0, -1].numpy() for ids in calls]


def native_logits(bundle: Path, sparse, calls: list[np.ndarray]) -> list[np.ndarray]:
    native = backend(bundle, sparse)
    assert native.kernels["attention"] == ("dense" if sparse is None else "sparse")
    return [native.prefill(ids) if len(ids) > 1 else native.decode(int(ids[0])) for ids in calls]


def _calls(prompt_length: int, steps: int) -> list[np.ndarray]:
    """A prompt, then single-token decode steps (the crossing config crosses dense_len while decoding)."""
    return [PROMPT[:prompt_length], *(PROMPT[prompt_length + i:prompt_length + i + 1] for i in range(steps))]


@needs_kernels
@pytest.mark.parametrize("name", list(CONFIGS))
def test_native_sparse_matches_the_reference(tiny, name):
    sparse, calls = CONFIGS[name], _calls(140, 20)
    expected = reference_logits(tiny["checkpoint"], sparse, calls)
    got = native_logits(tiny["fp32"], sparse, calls)
    dense = reference_logits(tiny["checkpoint"], None, calls)
    for step, (e, g, d) in enumerate(zip(expected, got, dense)):
        assert np.abs(e - g).max() <= FP32_ATOL, f"step {step}"
    # sparse attention changes the answer well beyond the tolerance once it is on (dense below dense_len)
    moved = [np.abs(e - d).max() for e, d in zip(expected, dense)]
    assert max(moved) > 50 * FP32_ATOL
    if sparse.dense_len > 0:
        first_sparse = sparse.dense_len - 140  # the decode step whose total length reaches dense_len
        assert max(moved[:first_sparse]) < 1e-5 < min(moved[first_sparse:])  # the reference's dense path: float noise


@needs_kernels
@pytest.mark.parametrize("build", [(), PORTABLE_FLAGS], ids=["vectorised", "portable"])
def test_equal_keys_score_equally_wherever_they_sit(build):
    """Block selection ranks kernels by scores the attention primitives compute; equal keys must give equal bits at
    every position of a row (whole vector groups and the last few alike), or ties break by position, not block index."""
    library = load_library(build)
    rng = np.random.default_rng(0)
    d, q = 64, rng.standard_normal(64).astype(np.float32)
    for count in range(1, 21):
        keys = np.repeat(rng.standard_normal((1, d)).astype(np.float32), count, axis=0)
        scores = np.empty(count, np.float32)
        library.ec_key_scores(q.ctypes.data, keys.ctypes.data, count, d, 0.125, scores.ctypes.data)
        assert (scores.view(np.uint32) == scores[0].view(np.uint32)).all(), count
        assert abs(float(scores[0]) - float(q.astype(np.float64) @ keys[0] * 0.125)) < 1e-5
        for value in np.linspace(-12.0, 0.0, 25, dtype=np.float32):
            shifted = np.full(count, value, np.float32)
            total = library.ec_exp_shifted(shifted.ctypes.data, count, 0.0)
            assert (shifted.view(np.uint32) == shifted[0].view(np.uint32)).all(), (count, value)
            assert abs(shifted[0] / np.exp(value) - 1) < 1e-6 and abs(total / (count * np.exp(value)) - 1) < 1e-5


@needs_kernels
def test_random_sparse_configs_match_the_reference(tiny):
    """40 random sparse_configs (test_infllmv2_reference.random_config) over random prompt lengths and decode steps."""
    rng = np.random.default_rng(7)
    for _ in range(40):
        sparse = random_config(rng, strides=(1, 2, 4, 8, 16), max_dense_len=200)
        calls = _calls(int(rng.integers(1, 180)), int(rng.integers(1, 8)))
        expected, got = reference_logits(tiny["checkpoint"], sparse, calls), native_logits(tiny["fp32"], sparse, calls)
        assert max(float(np.abs(e - g).max()) for e, g in zip(expected, got)) <= FP32_ATOL, (sparse, len(calls[0]))


@needs_kernels
def test_a_prompt_crossing_dense_len_is_sparse_as_one_call(tiny):
    """Spec §6.2: a prefill whose total length reaches dense_len runs sparse for every query (later code's
    max(position_ids) + 1), also in the fp32 bundle's decode-step prompts."""
    sparse, calls = CONFIGS["crossing"], [PROMPT[:200]]
    expected = reference_logits(tiny["checkpoint"], sparse, calls)
    assert np.abs(native_logits(tiny["fp32"], sparse, calls)[0] - expected[0]).max() <= FP32_ATOL
    dense = reference_logits(tiny["checkpoint"], None, calls)
    assert np.abs(expected[0] - dense[0]).max() > 50 * FP32_ATOL


@needs_kernels
@pytest.mark.parametrize("name", ["always", "nope", "wide-kernels"])
def test_native_sparse_prefill_equals_decoding_token_by_token(tiny, name):
    assert_prompt_equals_steps(lambda: backend(tiny["int8"], CONFIGS[name]))


def assert_prompt_equals_steps(make_backend, tokens: np.ndarray = PROMPT[:200]):
    """A prompt prefilled in passes leaves the logits and KV rows that decoding it token by token does, bit for bit;
    returns the prefilled backend."""
    whole = make_backend()
    assert whole.prefills
    logits = whole.prefill(tokens)
    stepped = make_backend()
    for token in tokens:
        step_logits = stepped.decode(int(token))
    assert np.array_equal(logits, step_logits)
    for a, b in zip(whole.kv.arrays, stepped.kv.arrays):
        assert np.array_equal(a[..., :len(tokens), :].view(np.uint8), b[..., :len(tokens), :].view(np.uint8))
    return whole


@needs_kernels
def test_sparse_state_follows_prefix_reuse(tiny):
    """Cutting the cache back (chat turns reusing a prefix) drops the compressed keys past the cut: a continuation
    after a cut equals the same tokens run fresh."""
    sparse = CONFIGS["always"]
    reused = backend(tiny["int8"], sparse)
    reused.prefill(PROMPT[:220])
    reused.truncate(90)
    other = RNG.integers(5, 260, 120)
    after_cut = reused.prefill(other)
    fresh = backend(tiny["int8"], sparse)
    fresh.prefill(PROMPT[:90])
    assert np.array_equal(after_cut, fresh.prefill(other))
    reused.reset()
    assert np.array_equal(reused.prefill(PROMPT[:50]), backend(tiny["int8"], sparse).prefill(PROMPT[:50]))


@needs_kernels
def test_attention_choice_reaches_the_backend(tiny):
    bundle = tiny["int8"]
    assert load_backend(bundle, kernels="native").kernels["attention"] == "dense"  # a dense model, auto
    auto_with_fields = AttentionChoice("auto", {"dense_len": 64})  # fields on a dense model: sparse with defaults
    assert load_backend(bundle, kernels="native", attention=auto_with_fields).kernels["attention"] == "sparse"
    # the bundle's context never reaches dense_len: sparse would be dense attention, run as such anywhere
    far = AttentionChoice("sparse", {"dense_len": MAX_CONTEXT + 1})
    assert load_backend(bundle, kernels="onnxruntime", attention=far).kernels["attention"] == "dense"
    with pytest.raises(BundleError, match="sparse attention runs on the native kernels, not onnxruntime"):
        load_backend(bundle, kernels="onnxruntime", attention=AttentionChoice("sparse", {"dense_len": 64}))


def test_attention_choice_is_validated(tmp_path):
    with pytest.raises(UnsupportedError, match="unknown attention"):
        AttentionChoice("sparse-ish").validate()
    with pytest.raises(UnsupportedError, match="--sparse-config: topk_k: unknown sparse_config field"):
        AttentionChoice("sparse", {"topk_k": 3}).validate()
    with pytest.raises(UnsupportedError, match="multiple of kernel_stride"):
        AttentionChoice("sparse", {"block_size": 50}).resolve(None)
    with pytest.raises(Exception, match="--sparse-config: dense_len"):
        AttentionChoice("sparse", {"dense_len": "long"}).resolve(None)
    assert AttentionChoice("dense").resolve(SMALL) is None
    assert AttentionChoice("auto").resolve(None) is None and AttentionChoice("auto").resolve(SMALL) == SMALL
    assert AttentionChoice("sparse").resolve(None) == SparseAttentionConfig()
    assert AttentionChoice("sparse", {"topk": 5}).resolve(SMALL) == replace(SMALL, topk=5)
    config = tmp_path / "config.json"
    config.write_text('{"sparse_config": {"dense_len": 1024, "use_nope": true}, "hidden_size": 8}')
    assert parse_overrides([str(config), "topk=8"]) == {"dense_len": 1024, "use_nope": True, "topk": 8}
    with pytest.raises(Exception, match="--sparse-config: topk: value"):
        parse_overrides(["topk=many"])


@needs_kernels
@pytest.mark.parametrize("name", ["always", "nope"])
def test_planner_counts_the_sparse_state_the_kernels_allocate(tiny, name):
    from edgecpm.planner import Storage, plan_memory

    config = open_checkpoint(tiny["checkpoint"]).config
    native = backend(tiny["int8"], CONFIGS[name])
    plan = plan_memory(config, Storage("fp32", None), sparse=CONFIGS[name])
    assert plan.sparse_bytes(MAX_CONTEXT) == native.decoder.sparse_bytes > 0
    assert plan.total_bytes(MAX_CONTEXT) - plan_memory(config, Storage("fp32", None)).total_bytes(MAX_CONTEXT) == plan.sparse_bytes(MAX_CONTEXT)
