"""Native decode kernels against onnxruntime running the same bundle (an independent implementation).

fp32 bundles: the kernels and the graph compute the same float math, so decode logits agree to FP32_ATOL.
Quantized bundles (accuracy level 4): both quantize each linear's input to int8 per weight block; the
kernels round and sum in their own order, so they agree with MatMulNBits to INT8_ACTIVATION_RTOL of the
logit range, and greedy tokens match.
"""

from __future__ import annotations

import json
import platform
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from edgecpm.errors import BundleError, GenerationError
from edgecpm.export import export_checkpoint
from edgecpm.quant.plan import QuantizationWarning
from edgecpm.quant.spec import QuantSpec
from edgecpm.runtimes.native import build as native_build
from edgecpm.runtimes.native import load_library
from edgecpm.runtimes.native import decoder as native_decoder_module
from edgecpm.runtimes.native.decoder import OFFSETS_FLOAT, OFFSETS_ZERO_POINTS, SCALES_FP16, SCALES_PER_ROW
from edgecpm.runtimes import load_backend
from edgecpm.runtimes.native.backend import NativeBackend
from gptq_writer import write_gptq_checkpoint
from tiny_models import BITCPM, TINY_CONFIGS, write_bitcpm_checkpoint, write_hf_checkpoint

FP32_ATOL = 1e-4
INT8_ACTIVATION_RTOL = 0.02  # of max |logit|
PROMPT = np.array([5, 9, 11, 40, 7, 100, 3, 60, 61, 62], dtype=np.int64)
DECODE_STEPS = 20
MAX_CONTEXT = 64
LONG_CONTEXT = 200
KEYS = [("llama", "dense"), ("llama", "llama3_rope"), ("minicpm", "dense"), ("minicpm", "untied"), ("minicpm", "longrope"),
        ("minicpm", "fatrelu")]
SCHEMES = {"fp32": None, "int4": QuantSpec("int4"), "int4-asym": QuantSpec("int4", symmetric=False),
           "int4-b64": QuantSpec("int4", block_size=64), "int8": QuantSpec("int8"),
           "int4-tables4": QuantSpec("int4", lm_head="int4", embeddings="int4"),
           "ternary": QuantSpec("ternary", block_size=64)}

try:
    load_library()
    KERNELS_MISSING = None
except Exception as error:  # noqa: BLE001 - the reason is the skip message
    KERNELS_MISSING = str(error)
needs_kernels = pytest.mark.skipif(KERNELS_MISSING is not None, reason=f"native kernels unavailable: {KERNELS_MISSING}")


def kernel_decoder(backend):
    """The native kernels' decoder a backend decodes with, or None where onnxruntime decodes."""
    return getattr(getattr(backend, "steps", backend), "decoder", None)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("native_decode")


def export(source: Path, out: Path, spec: QuantSpec | None) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", QuantizationWarning)  # ternary of dense random weights is lossy on purpose
        return export_checkpoint(source, out, flavour="ort", max_context=MAX_CONTEXT, quant=spec, quality_tokens=16)


def decode_both(bundle: Path, steps: int = DECODE_STEPS, prompt: np.ndarray = PROMPT, threads: int = 2,
                kernels: str = "native") -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(onnxruntime, native) decode logits for the same tokens (onnxruntime's greedy choices)."""
    graph = load_backend(bundle, kernels="onnxruntime", threads=1)
    native = load_backend(bundle, kernels=kernels, threads=threads)
    assert kernel_decoder(native) is not None and kernel_decoder(graph) is None
    tokens = [int(graph.prefill(prompt).argmax())]
    native.prefill(prompt)
    expected, got = [], []
    for _ in range(steps):
        expected.append(graph.decode(tokens[-1]))
        got.append(native.decode(tokens[-1]))
        tokens.append(int(expected[-1].argmax()))
    return expected, got


def checkpoint(workdir: Path, key) -> Path:
    directory = workdir / "-".join(key)
    if not directory.exists():
        write_hf_checkpoint(directory, key)
    return directory


def bundle_of(workdir: Path, key, scheme: str) -> Path:
    out = workdir / f"{'-'.join(key)}-{scheme}"
    return out if out.exists() else export(checkpoint(workdir, key), out, SCHEMES[scheme])


def assert_int8_decode_matches(bundle: Path) -> None:
    """Quantized bundles: native decode logits within the int8-activation tolerance of onnxruntime's, same tokens."""
    expected, got = decode_both(bundle)
    scale = max(float(np.abs(e).max()) for e in expected)
    assert max(float(np.abs(e - g).max()) for e, g in zip(expected, got)) <= INT8_ACTIVATION_RTOL * scale
    assert [int(e.argmax()) for e in expected] == [int(g.argmax()) for g in got]


@needs_kernels
@pytest.mark.parametrize("key", KEYS, ids=["-".join(k) for k in KEYS])
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_native_decode_matches_onnxruntime(workdir, key, scheme):
    bundle = bundle_of(workdir, key, scheme)
    if scheme != "fp32":
        assert_int8_decode_matches(bundle)
        return
    expected, got = decode_both(bundle)
    assert max(float(np.abs(e - g).max()) for e, g in zip(expected, got)) <= FP32_ATOL


def assert_same_logits(a, b, steps: int = DECODE_STEPS) -> None:
    """Two backends give bit-identical prefill logits for PROMPT and then decode logits over `steps` greedy tokens."""
    logits = a.prefill(PROMPT)
    np.testing.assert_array_equal(logits, b.prefill(PROMPT))
    for _ in range(steps):
        token = int(logits.argmax())
        logits = a.decode(token)
        np.testing.assert_array_equal(logits, b.decode(token))


def with_tensor_entries(bundle: Path, copy: Path, change) -> Path:
    """A copy of `bundle` (its files linked) whose manifest has every tensor index entry passed through change()."""
    shutil.copytree(bundle, copy, copy_function=lambda source, target: Path(target).symlink_to(Path(source).resolve()))
    manifest_file = copy / "edgecpm.json"
    manifest = json.loads(manifest_file.read_text())
    for entry in manifest["tensors"].values():
        change(entry)
    manifest_file.unlink()  # a link to the original: replaced, not written through
    manifest_file.write_text(json.dumps(manifest))
    return copy


@needs_kernels
@pytest.mark.parametrize("key", [("llama", "dense"), ("minicpm", "untied")], ids=["tied", "untied"])
def test_six_bit_tables_stream_at_six_bits_with_the_eight_bit_results(workdir, key):
    """int6 tables are 8-bit codes holding 6-bit values (what onnxruntime reads); the kernels stream the head at
    6 bits, and since the integer dots are exact either way, the logits are those of streaming its 8-bit codes,
    bit for bit. A bundle claiming 6-bit values its codes exceed is refused."""
    bundle = bundle_of(workdir, key, "int4")  # "auto" tables: int6 under int4 weights
    eight_bit = with_tensor_entries(bundle, workdir / f"{bundle.name}-as-8-bit", lambda entry: entry.pop("value_bits", None))
    six, eight = (load_backend(b, kernels="native") for b in (bundle, eight_bit))
    assert (kernel_decoder(six)._model.head.stream_bits, kernel_decoder(eight)._model.head.stream_bits) == (6, 8)
    assert kernel_decoder(six).streamed_bytes < kernel_decoder(eight).streamed_bytes
    assert_same_logits(six, eight)
    lying = with_tensor_entries(bundle_of(workdir, key, "int8"), workdir / f"{bundle.name}-lying",
                                lambda entry: entry.update(value_bits=6) if entry.get("bits") == 8 else None)
    assert "holds codes outside 96..159" in load_backend(lying).kernels["native_unavailable"]
    with pytest.raises(BundleError, match="recorded as 6-bit values"):
        load_backend(lying, kernels="native")


@needs_kernels
def test_vnni_and_512_bit_kernels_are_avx2s_bit_for_bit(workdir, monkeypatch):
    """Where the CPU has VNNI the kernels sum u8 x s8 products straight into int32 (with AVX-512, two words per
    64-byte load); builds without those (AVX2 maddubs into int16) give the same logits bit for bit, every bit width
    included (int4 with int6 tables, int8, ternary: 4-, 6-, 8- and 2-bit streams)."""
    level = load_library().ec_vectorised()
    if not load_library().ec_isa().decode().startswith("avx"):
        pytest.skip("x86 kernels only (the aarch64 levels are tested under emulation: test_native_arm_emulated.py)")
    if level < 2:
        pytest.skip("this CPU has no VNNI dot products (the AVX2 path is what every other test runs)")
    # Without AVX-512 VNNI a build falls back to AVX-VNNI only where the CPU has it (Zen 4 has the 512-bit form alone)
    has_avx_vnni = "avx_vnni" in Path("/proc/cpuinfo").read_text().split()
    narrower = [(("-mno-avxvnni", "-mno-avx512vnni"), 1)] + ([(("-mno-avx512vnni",), 2 if has_avx_vnni else 1)] if level == 3 else [])
    for scheme in ("int4", "int8", "ternary"):
        bundle = bundle_of(workdir, ("minicpm", "untied"), scheme)
        for flags, narrower_level in narrower:
            library = load_library(flags)
            assert library.ec_vectorised() == narrower_level
            default_backend = load_backend(bundle, kernels="native")
            with monkeypatch.context() as patch:
                patch.setattr(native_decoder_module, "load_library", lambda library=library: library)
                narrower_backend = load_backend(bundle, kernels="native")
            assert_same_logits(default_backend, narrower_backend, steps=5)


@needs_kernels
def test_a_float_linear_row_depends_on_its_input_alone(tiny):
    """Float linears split k over the threads; each thread always sums the same chunks, so the same input gives the
    same bits at every step (layer 0's value rows of a repeated token here). Summed in whichever order the threads
    happened to take the chunks, they did not, and identical compressed keys that tie exactly in the InfLLM v2
    reference's block selection came out in either order."""
    backend = load_backend(tiny["fp32"], kernels="native", threads=2)
    tokens = [7, 9] * 40
    for token in tokens:
        backend.decode(token)
    (values,) = [array for tensor, array in zip(backend.kv.tensors, backend.kv.arrays)
                 if tensor["layer"] == 0 and tensor["kind"] == "value"]
    rows = values[0, :, :len(tokens), :].view(np.uint32)
    for first in (0, 1):  # every position of a token holds its first position's row, bit for bit
        assert (rows[:, first::2, :] == rows[:, first:first + 1, :]).all()


@needs_kernels
@pytest.mark.parametrize("threads", [2, 4])
def test_long_context_attention_is_split_and_merged_exactly(workdir, threads):
    """Past 32 positions per range the kernels split each KV group's positions over work items (2 and 4
    ranges here) and merge the partial softmaxes; the result is still the graph's to fp32 rounding."""
    bundle = export_checkpoint(checkpoint(workdir, ("minicpm", "longrope")), workdir / f"long-{threads}", flavour="ort",
                               max_context=LONG_CONTEXT)
    prompt = np.random.default_rng(0).integers(5, 200, size=LONG_CONTEXT - DECODE_STEPS - 8)
    expected, got = decode_both(bundle, prompt=prompt, threads=threads)
    assert max(float(np.abs(e - g).max()) for e, g in zip(expected, got)) <= FP32_ATOL


@needs_kernels
def test_bitcpm_rows_with_one_scale_stream_it_once(workdir, monkeypatch):
    """BitCPM-style ternary weights, layers alternating one scale per row and per 64 weights: the kernels keep
    a per-row scale once (no per-block scales in their copy) and still decode as onnxruntime does."""
    source = write_bitcpm_checkpoint(workdir / "bitcpm", monkeypatch)
    bundle = export(source, workdir / "bitcpm-ternary", QuantSpec("ternary", method="lossless"))
    layers = kernel_decoder(load_backend(bundle, kernels="native"))._model.layer
    formats = {linear.scale_format for i in range(TINY_CONFIGS[BITCPM]["num_hidden_layers"])
               for linear in (layers[i].qkv, layers[i].o, layers[i].gate_up, layers[i].down)}
    assert SCALES_PER_ROW in formats and len(formats) > 1  # and per-block scales where layers have them
    assert_int8_decode_matches(bundle)


PREFILL_CASES = [(("llama", "dense"), "int4"), (("minicpm", "untied"), "int8"), (("minicpm", "fatrelu"), "ternary"),
                 (("llama", "llama3_rope"), "int4-asym"), (("minicpm", "longrope"), "int4-tables4")]


def kv_rows(backend, position: int) -> list[np.ndarray]:
    return [np.array(array[:, :, :position]) for array in backend.kv.arrays]


def assert_prefill_is_steps(bundle: Path, threads: int, kernels: str = "native") -> None:
    batched, stepped = (load_backend(bundle, kernels=kernels, threads=threads) for _ in range(2))
    graph = load_backend(bundle, kernels="onnxruntime", threads=1)
    assert isinstance(batched, NativeBackend) and kernel_decoder(batched).prefills  # no onnxruntime graph: the weights are held once
    rng = np.random.default_rng(threads)
    for length in (1, 16, 37):
        first, turn = rng.integers(3, 120, size=length), rng.integers(3, 120, size=5)
        for backend in (batched, stepped, graph):
            backend.reset()
        for tokens in (first, turn):
            got = batched.prefill(tokens)
            expected = stepped.prefill(tokens[:1])
            for token in tokens[1:]:
                expected = stepped.decode(int(token))
            np.testing.assert_array_equal(got, expected)
            graph_logits = graph.prefill(tokens)
            assert np.abs(got - graph_logits).max() <= INT8_ACTIVATION_RTOL * np.abs(graph_logits).max()
            assert int(got.argmax()) == int(graph_logits.argmax())
        for a, b in zip(kv_rows(batched, batched.position), kv_rows(stepped, stepped.position)):
            np.testing.assert_array_equal(a, b)


@needs_kernels
@pytest.mark.parametrize("key, scheme", PREFILL_CASES, ids=["-".join(k) + f"-{s}" for k, s in PREFILL_CASES])
@pytest.mark.parametrize("threads", [2, 3])
def test_native_prefill_is_its_decode_steps_batched(workdir, key, scheme, threads):
    """Prompts of 1 to 3 passes of 16 tokens, at position 0 and after a turn: the kernels' prefill leaves the
    logits and KV rows that decoding the same tokens one by one leaves, bit for bit (each pass reads the weights
    once; per token the arithmetic is a decode step's); and against onnxruntime's graph prefill, the int8-
    activation tolerance and the same next token."""
    assert_prefill_is_steps(bundle_of(workdir, key, scheme), threads)


@needs_kernels
@pytest.mark.parametrize("symmetric", [True, False])
def test_native_prefill_reads_gptq_codes_and_zero_points(workdir, symmetric):
    assert_prefill_is_steps(gptq_bundle(workdir, symmetric, act_order=False), threads=2)


@needs_kernels
def test_zero_points_stream_with_the_codes(workdir):
    """Integer zero points (asymmetric int4) and float ones (a GGUF Q4_1 file's own blocks) become per-block terms
    in the interleaved stream, added inside the kernels; both decode and prefill as onnxruntime does."""
    from gguf_writer import Q, write_gguf

    q4_1 = export(write_gguf(workdir / "q4_1.gguf", ("llama", "dense"), qtype=Q.Q4_1).path, workdir / "q4_1-bundle",
                  QuantSpec("int4"))
    for bundle, kind in ((bundle_of(workdir, ("llama", "dense"), "int4-asym"), OFFSETS_ZERO_POINTS), (q4_1, OFFSETS_FLOAT)):
        layer = kernel_decoder(load_backend(bundle, kernels="native"))._model.layer[0]
        assert {linear.offset_kind for linear in (layer.qkv, layer.o, layer.gate_up, layer.down)} == {kind}
        assert_int8_decode_matches(bundle)
        assert_prefill_is_steps(bundle, threads=2)


EXACT_CASES = [(("minicpm", "untied"), scheme) for scheme in ("int4", "int4-asym", "int8", "int4-tables4", "ternary")]
EXACT_CASES += [(("llama", "dense"), "int4")]  # a tied int6 head: the table streamed at 6 bits


def level0_bundle(workdir: Path, key, scheme: str) -> Path:
    """`scheme` exported at accuracy level 0: onnxruntime's MatMulNBits multiplies the float input by the dequantized
    weights."""
    out = workdir / f"{'-'.join(key)}-{scheme}-level0"
    if out.exists():
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", QuantizationWarning)
        return export_checkpoint(checkpoint(workdir, key), out, flavour="ort", max_context=MAX_CONTEXT,
                                 quant=SCHEMES[scheme], accuracy_level=0, quality_tokens=16)


@needs_kernels
@pytest.mark.parametrize("key, scheme", EXACT_CASES, ids=["-".join(k) + f"-{s}" for k, s in EXACT_CASES])
def test_native_exact_computes_what_accuracy_level_0_does(workdir, key, scheme):
    """`--kernels native-exact`: every quantized linear multiplies its float input by the dequantized codes, which is
    MatMulNBits' accuracy level 0: onnxruntime's logits on the level-0 bundle to fp32 rounding (int8 activations miss
    them by ~1% of the range), for 2-, 4-, 6- (int6 tables) and 8-bit streams, zero points and row scales; prefill
    is its decode steps bit for bit. The int8 kernels refuse such bundles."""
    bundle = level0_bundle(workdir, key, scheme)
    expected, got = decode_both(bundle, kernels="native-exact")
    assert max(float(np.abs(e - g).max()) for e, g in zip(expected, got)) <= FP32_ATOL
    assert load_backend(bundle, kernels="native-exact").kernels["activations"] == "exact activations"
    assert_prefill_is_steps(bundle, threads=2, kernels="native-exact")
    with pytest.raises(BundleError, match="accuracy level 0; --kernels native-exact runs it"):
        load_backend(bundle, kernels="native")


@needs_kernels
def test_native_exact_reads_float_zero_points(workdir):
    """A GGUF Q4_1 file's own blocks (float zero points: per-block offsets times the exact input sums) at level 0."""
    from gguf_writer import Q, write_gguf

    source = write_gguf(workdir / "q4_1-exact.gguf", ("llama", "dense"), qtype=Q.Q4_1).path
    bundle = export_checkpoint(source, workdir / "q4_1-level0", flavour="ort", max_context=MAX_CONTEXT,
                               quant=QuantSpec("int4"), accuracy_level=0, quality_tokens=16)
    expected, got = decode_both(bundle, kernels="native-exact")
    assert max(float(np.abs(e - g).max()) for e, g in zip(expected, got)) <= FP32_ATOL
    assert_prefill_is_steps(bundle, threads=3, kernels="native-exact")


@needs_kernels
def test_native_prefill_over_split_attention(workdir):
    """Past 32 positions per range a token's attention is split over work items; prefill splits each token as its
    decode step does, so a long prompt still equals its steps exactly."""
    bundle = export_checkpoint(checkpoint(workdir, ("llama", "dense")), workdir / "long-prefill", flavour="ort",
                               max_context=LONG_CONTEXT, quant=QuantSpec("int4"), quality_tokens=16)
    prompt = np.random.default_rng(1).integers(3, 120, size=LONG_CONTEXT - 10)
    batched, stepped = (load_backend(bundle, kernels="native", threads=4) for _ in range(2))
    got = batched.prefill(prompt)
    stepped.prefill(prompt[:1])
    for token in prompt[1:]:
        expected = stepped.decode(int(token))
    np.testing.assert_array_equal(got, expected)
    with pytest.raises(GenerationError, match="exceed the bundle's max context"):
        batched.prefill(prompt[:20])
    batched.reset()
    with pytest.raises(GenerationError, match="native prefill refused"):
        kernel_decoder(batched).prefill(np.array([1, 10**6]), 0, np.zeros((1, batched.vocab_size), np.float32))


@needs_kernels
def test_auto_decodes_natively_unless_told_otherwise(workdir, monkeypatch):
    monkeypatch.delenv("EDGECPM_KERNELS", raising=False)
    source = checkpoint(workdir, ("llama", "dense"))
    quantized = load_backend(export(source, workdir / "auto-int4", SCHEMES["int4"]))
    assert kernel_decoder(quantized) is not None and quantized.kernels["native_unavailable"] is None
    assert kernel_decoder(quantized)._model.layer[0].qkv.scale_format == SCALES_FP16  # exported at fp16 precision
    assert quantized.kernels["activations"] == "int8 activations"  # accuracy level 4's arithmetic, as recorded
    assert not any(getattr(kernel_decoder(quantized)._model.layer[0], role).exact for role in ("qkv", "o", "gate_up", "down"))
    dense = load_backend(export(source, workdir / "auto-fp32", None))
    # fp32: the kernels decode, onnxruntime prefills (MLAS's GEMM), both from one memory-mapped copy
    assert dense.kernels == {"prefill": "onnxruntime", "decode": "native", "native_unavailable": None, "attention": "dense",
                             "kv_cache": "float32"}
    assert kernel_decoder(dense).in_place_tensors()
    asymmetric = load_backend(export(source, workdir / "auto-int4-asym", SCHEMES["int4-asym"]))
    assert kernel_decoder(asymmetric) is not None and isinstance(asymmetric, NativeBackend)  # zero points stream with the codes
    monkeypatch.setenv("EDGECPM_KERNELS", "onnxruntime")
    assert kernel_decoder(load_backend(workdir / "auto-int4")) is None


def gptq_bundle(workdir: Path, symmetric: bool, act_order: bool) -> Path:
    source, bundle = workdir / f"gptq-{symmetric}-{act_order}", workdir / f"gptq-bundle-{symmetric}-{act_order}"
    if bundle.exists():
        return bundle
    write_gptq_checkpoint(source, ("minicpm", "dense"), group_size=32, symmetric=symmetric, act_order=act_order)
    return export(source, bundle, None)


@needs_kernels
@pytest.mark.parametrize("symmetric", [True, False])
def test_native_decode_reads_gptq_codes_and_zero_points(workdir, symmetric):
    expected, got = decode_both(gptq_bundle(workdir, symmetric, act_order=False))
    scale = max(float(np.abs(e).max()) for e in expected)
    assert max(float(np.abs(e - g).max()) for e, g in zip(expected, got)) <= INT8_ACTIVATION_RTOL * scale


@needs_kernels
def test_kv_cache_is_shared_with_the_graph(workdir):
    """Native decode steps, then a graph prefill of more tokens over the same cache (a chat turn)."""
    bundle = export(checkpoint(workdir, ("llama", "dense")), workdir / "shared-kv", None)
    native = load_backend(bundle, kernels="native", threads=2)
    graph = load_backend(bundle, kernels="onnxruntime", threads=1)
    turn = np.array([20, 21, 22], dtype=np.int64)
    for backend in (native, graph):
        backend.prefill(PROMPT)
        for token in (30, 31, 32):
            backend.decode(token)
    np.testing.assert_allclose(native.prefill(turn), graph.prefill(turn), atol=FP32_ATOL)


@needs_kernels
def test_float_weights_are_held_once(workdir):
    """Decoding a float bundle natively, onnxruntime's initializers are views of the kernels' memory map (no
    second copy, no prepacked one), and its prefill over them still computes the graph's logits."""
    bundle = export(checkpoint(workdir, ("minicpm", "untied")), workdir / "held-once", None)
    native = load_backend(bundle, kernels="native", threads=2)
    mapped = kernel_decoder(native).in_place_tensors()
    assert set(mapped) == set(kernel_decoder(native)._weights.index) and len(mapped) > 10
    assert all(np.shares_memory(array, kernel_decoder(native)._weights.data) for array in mapped.values())
    assert set(native.prompts._shared_values) == set(mapped)  # onnxruntime prefills over the same arrays
    graph = load_backend(bundle, kernels="onnxruntime", threads=1)
    assert not graph._shared_values
    np.testing.assert_allclose(native.prefill(PROMPT), graph.prefill(PROMPT), atol=FP32_ATOL)
    quantized = load_backend(export(checkpoint(workdir, ("llama", "dense")), workdir / "held-int4", SCHEMES["int4"]),
                             kernels="native")
    assert kernel_decoder(quantized).in_place_tensors() == {}  # the kernels compute from their interleaved copy


def test_bundles_the_kernels_do_not_implement_decode_with_onnxruntime(workdir):
    mla = export(checkpoint(workdir, ("minicpm3", "mla")), workdir / "mla", None)
    assert load_backend(mla, kernels="onnxruntime").kernels["native_unavailable"] == "not requested"
    backend = load_backend(mla)  # the default, "auto"
    assert kernel_decoder(backend) is None and "minicpm3" in backend.kernels["native_unavailable"]
    with pytest.raises(BundleError, match="native kernels unavailable: architecture 'minicpm3'"):
        load_backend(mla, kernels="native")
    exact = export_checkpoint(checkpoint(workdir, ("llama", "dense")), workdir / "level0", max_context=MAX_CONTEXT,
                              quant=QuantSpec("int4"), accuracy_level=0, quality_tokens=16)
    assert "accuracy level 0" in load_backend(exact, kernels="auto").kernels["native_unavailable"]
    # act-order GPTQ: q/k/v keep their own channel orders, so they stay separate MatMuls in the graph
    with pytest.raises(BundleError, match="separate MatMuls"):
        load_backend(gptq_bundle(workdir, False, act_order=True), kernels="native")


@needs_kernels
@pytest.mark.skipif(platform.machine().lower() not in native_build.X86_MACHINES, reason="the x86 flag sets")
def test_a_kernels_source_that_does_not_compile_is_refused_not_built_without_vectors(tmp_path, monkeypatch):
    """On x86 the only flag set is -march=native: -mcpu=native there is a mere -mtune that would compile a broken
    kernels.c's error away into a build without the vector paths."""
    source = tmp_path / "kernels.c"
    source.write_text(native_build.SOURCE.read_text() + "\nstatic int broken(void) { return 0 }\n")  # a syntax error
    monkeypatch.setattr(native_build, "SOURCE", source)
    monkeypatch.setenv("EDGECPM_CACHE_DIR", str(tmp_path / "cache"))
    shutil.copy(native_build.INCLUDED[0], tmp_path / native_build.INCLUDED[0].name)
    with pytest.raises(native_build.KernelsUnavailable, match="could not compile kernels.c"):
        native_build._build_and_load([])
    assert all("-mcpu=native" not in flags for flags in native_build._flag_sets())
