"""The native kernels' half-precision KV cache (`kv_cache="float16"`, `--kv-cache float16`; runtimes/native/kernels.c).

Its conversions are held to numpy's (IEEE binary16, round to nearest even) over every half and every rounding
boundary, in the vectorised and the portable build; a prompt still leaves the logits and cache that decoding it
token by token does, bit for bit; the rows it stores are numpy's rounding of the fp32 cache's; and on the real
model it moves the logits by far less than the int8 activations do.
"""

from __future__ import annotations

import numpy as np
import pytest
from edgecpm.runtimes import load_backend
from edgecpm.runtimes.native.build import PORTABLE_FLAGS, load_library
from emulated_decode import conversions, every_half
from test_infllmv2_native import CONFIGS, PROMPT, _fields, assert_prompt_equals_steps
from test_native_decode import needs_kernels

from edgecpm.api import load
from edgecpm.errors import GenerationError
from edgecpm.sparse.choice import AttentionChoice

BUILDS = {"vectorised": (), "portable": PORTABLE_FLAGS}


def assert_conversions_are_numpys(converted: dict[str, np.ndarray]) -> None:
    """emulated_decode.conversions' results against numpy's binary16, round to nearest even (NaN: any NaN)."""
    with np.errstate(over="ignore"):  # the overflow cases
        expected = converted["floats"].astype(np.float16)
    nan = np.isnan(expected)
    assert np.isnan(converted["to_half"].view(np.float16)[nan]).all()
    assert np.array_equal(converted["to_half"][~nan], expected.view(np.uint16)[~nan])
    exact = every_half().view(np.float16).astype(np.float32)
    nan = np.isnan(exact)
    assert np.isnan(converted["from_half"][nan]).all()
    # bit for bit: -0.0 and subnormals included
    assert np.array_equal(converted["from_half"][~nan].view(np.uint32), exact[~nan].view(np.uint32))


@needs_kernels
@pytest.mark.parametrize("build", list(BUILDS))
def test_conversions_are_ieee_round_to_nearest_even(build):
    assert_conversions_are_numpys(conversions(load_library(BUILDS[build])))


def half_backend(bundle, name: str | None, kv_cache: str = "float16"):
    attention = AttentionChoice("dense") if name is None else AttentionChoice("sparse", _fields(CONFIGS[name]))
    return load_backend(bundle, kernels="native", threads=2, attention=attention, kv_cache=kv_cache)


@needs_kernels
@pytest.mark.parametrize("name", [None, "always", "nope"], ids=["dense", "sparse", "sparse-nope"])
def test_half_cache_prompt_equals_decoding_token_by_token(tiny, name):
    whole = assert_prompt_equals_steps(lambda: half_backend(tiny["int8"], name))
    assert whole.kernels["kv_cache"] == "float16"
    assert all(array.dtype == np.float16 for array in whole.kv.arrays)


@needs_kernels
def test_half_cache_stores_the_rounded_fp32_rows(tiny):
    """Layer 0's keys and values depend on the tokens alone, not on attention: the half cache holds exactly numpy's
    rounding of the fp32 cache's rows (RoPE applied before rounding)."""
    half, full = half_backend(tiny["int8"], None), half_backend(tiny["int8"], None, "float32")
    half.prefill(PROMPT[:100])
    full.prefill(PROMPT[:100])
    assert full.kernels["kv_cache"] == "float32" and full.kv.arrays[0].dtype == np.float32
    for layer0_half, layer0_full in zip(half.kv.arrays[:2], full.kv.arrays[:2]):
        assert np.array_equal(layer0_half[..., :100, :].view(np.uint16),
                              layer0_full[..., :100, :].astype(np.float16).view(np.uint16))
    assert half.kv.arrays[0].nbytes * 2 == full.kv.arrays[0].nbytes


@needs_kernels
def test_half_cache_on_the_real_model(smollm2_bundle):
    """SmolLM2-135M: the half cache moves the logits of a real prompt far less than int8 activations do (the native
    kernels' default arithmetic, within 2% of max |logit| of the fp32 bundle's exact logits; test_native_decode)."""
    engine = load(smollm2_bundle)
    ids = np.array(engine.tokenizer.encode("The capital of France is Paris. The capital of Italy is Rome. The capital "
                                           "of Spain is"), np.int64)
    logits = {}
    for kv_cache in ("float32", "float16"):
        backend = load_backend(smollm2_bundle, kernels="native", threads=2, kv_cache=kv_cache)
        assert backend.kernels["kv_cache"] == kv_cache
        logits[kv_cache] = [backend.prefill(ids), *(backend.decode(int(token)) for token in ids[:8])]
    scale = max(float(np.abs(step).max()) for step in logits["float32"])
    moved = max(float(np.abs(a - b).max()) for a, b in zip(logits["float32"], logits["float16"]))
    assert 0 < moved <= 0.002 * scale
    assert [int(step.argmax()) for step in logits["float32"]] == [int(step.argmax()) for step in logits["float16"]]


@needs_kernels
def test_kv_cache_choice_is_checked(tiny):
    with pytest.raises(GenerationError, match="unknown KV cache 'bf16'"):
        load_backend(tiny["int8"], kv_cache="bf16")
    with pytest.raises(GenerationError, match="unknown KV cache 'bf16'"):
        load(tiny["int8"], kv_cache="bf16")  # at load, before any backend starts
    with pytest.raises(GenerationError, match="float16 KV cache is the native kernels'"):
        load_backend(tiny["int8"], kernels="onnxruntime", kv_cache="float16")
    # auto: the half cache is the native kernels', which then run every prompt too (fp32 bundle: no onnxruntime split)
    auto = load_backend(tiny["fp32"], kv_cache="float16")
    assert auto.kernels == {**auto.kernels, "prefill": "native", "decode": "native", "kv_cache": "float16"}
    assert load_backend(tiny["fp32"]).kernels["prefill"] == "onnxruntime"
