"""Every packed format against its numpy reference, and onnxruntime reading it bit for bit."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgecpm.errors import CheckpointError, UnsupportedError
from edgecpm.quant.formats import (
    default_zero_point,
    dequantize_linear_reference,
    pack_int4_bytes,
    pack_matmul_nbits,
    quantize_rtn,
    quantize_ternary,
    to_dequantize_linear,
    unpack_matmul_nbits,
    widened,
)
from edgecpm.quant.gptq import convert_gptq, dequantize_gptq
from edgecpm.quant.spec import QuantSpec
from edgecpm.quant.ternary import detect_ternary, pack_ternary_exact
from gptq_writer import pack_gptq_v1
from tiny_models import bitcpm_fake_quantized

ONNX_FLOAT = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}


def _session(nodes, inputs, outputs, initializers) -> ort.InferenceSession:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)], ir_version=10)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def matmul_nbits_weight(quantized, dtype=np.float32) -> np.ndarray:
    """Runs MatMulNBits on an identity matrix: the output is exactly the kernel's dequantized W^T."""
    packed = pack_matmul_nbits(quantized)
    k, n = packed.in_features, packed.out_features
    inits = [numpy_helper.from_array(packed.packed, "B"), numpy_helper.from_array(packed.scales.astype(dtype), "S")]
    names = ["A", "B", "S"]
    if packed.zero_points is not None:
        zeros = packed.zero_points
        if np.issubdtype(zeros.dtype, np.floating):  # float zero points: [N, blocks] in the scales' type
            zeros = zeros.reshape(n, -1).astype(dtype)
        inits.append(numpy_helper.from_array(zeros, "Z"))
        names.append("Z")
    node = helper.make_node("MatMulNBits", names, ["Y"], domain="com.microsoft", K=k, N=n, bits=packed.bits,
                            block_size=packed.block_size, accuracy_level=0)
    session = _session([node], [helper.make_tensor_value_info("A", ONNX_FLOAT[dtype], [None, k])],
                       [helper.make_tensor_value_info("Y", ONNX_FLOAT[dtype], [None, n])], inits)
    return session.run(None, {"A": np.eye(k, dtype=dtype)})[0]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("block_size", [16, 32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False])
def test_matmul_nbits_reads_reference_packing_bit_exactly(bits, block_size, symmetric):
    weight = np.random.default_rng(bits * 1000 + block_size).standard_normal((40, 256)).astype(np.float32)
    quantized = quantize_rtn(weight, bits, block_size, symmetric=symmetric)
    assert np.array_equal(matmul_nbits_weight(quantized), quantized.dequantize().T)
    roundtrip = unpack_matmul_nbits(pack_matmul_nbits(quantized))
    assert np.array_equal(roundtrip.codes, quantized.codes)
    assert np.array_equal(roundtrip.zero_points, quantized.zero_points)
    assert np.array_equal(roundtrip.scales, quantized.scales)


@pytest.mark.parametrize("symmetric", [True, False])
def test_six_bit_values_in_eight_bit_codes_read_bit_exactly(symmetric):
    """int6 (tables): 6-bit values carried by 8-bit codes, which MatMulNBits and DequantizeLinear read as they are."""
    weight = np.random.default_rng(6).standard_normal((40, 256)).astype(np.float32)
    six = quantize_rtn(weight, 6, 32, symmetric=symmetric, scale_dtype=np.float16)
    carried = widened(six)
    assert (carried.bits, carried.value_bits) == (8, 6) and widened(quantize_rtn(weight, 4, 32)).value_bits is None
    assert np.array_equal(carried.dequantize(), six.dequantize())
    assert carried.codes.min() >= 96 and carried.codes.max() <= 159  # 128 - 32 ... 128 + 31
    assert np.array_equal(matmul_nbits_weight(carried, np.float16), six.dequantize().T)
    if symmetric:
        assert np.array_equal(dequantize_linear_reference(to_dequantize_linear(carried)), six.dequantize().T)
    # a quarter of int4's error: between int4 and int8
    errors = [np.abs(quantize_rtn(weight, bits, 32).dequantize() - weight).mean() for bits in (4, 6, 8)]
    assert errors[0] > 3.5 * errors[1] > 3.5 * 3.5 * errors[2]


def test_matmul_nbits_fp16_scales_and_unaligned_k():
    weight = np.random.default_rng(7).standard_normal((24, 200)).astype(np.float32)  # 200 is not a multiple of 32
    quantized = quantize_rtn(weight, 4, 32, scale_dtype=np.float16)
    assert quantized.scales.dtype == np.float16
    assert np.array_equal(matmul_nbits_weight(quantized, np.float16), quantized.dequantize().T)


def test_rtn_error_bounds():
    weight = np.random.default_rng(3).standard_normal((16, 128)).astype(np.float32)
    # Asymmetric blocks cover [min, max]: every weight rounds to within half a step.
    asymmetric = quantize_rtn(weight, 4, 32, symmetric=False)
    step = np.repeat(asymmetric.scales, 32, axis=1)
    assert np.all(np.abs(asymmetric.dequantize() - weight) <= step / 2 + 1e-6)
    # Symmetric (Q4_0 rule): the extreme maps exactly to code 0; the opposite side clips at +7 steps.
    symmetric = quantize_rtn(weight, 4, 32, symmetric=True)
    step = np.repeat(np.abs(symmetric.scales), 32, axis=1)
    error = np.abs(symmetric.dequantize() - weight)
    assert np.all(error <= step + 1e-6)
    blocks = np.abs(weight.reshape(16, 4, 32))
    extremes = np.take_along_axis(symmetric.dequantize().reshape(16, 4, 32), blocks.argmax(-1)[..., None], -1)
    assert np.allclose(np.abs(extremes[..., 0]), blocks.max(-1), rtol=1e-6)


def test_importance_weighted_scales_never_lose_to_the_rule():
    rng = np.random.default_rng(5)
    weight = rng.standard_normal((64, 256)).astype(np.float32)
    importance = rng.gamma(0.5, size=256).astype(np.float32)  # a few channels carry most of the input energy
    rule = quantize_rtn(weight, 4, 32, scale_dtype=np.float16)
    searched = quantize_rtn(weight, 4, 32, scale_dtype=np.float16, importance=importance)

    def weighted_block_error(quantized):
        return (np.square(quantized.dequantize().astype(np.float32) - weight) * importance).reshape(64, 8, 32).sum(-1)

    assert searched.scales.dtype == np.float16 and np.array_equal(searched.zero_points, rule.zero_points)
    assert np.all(weighted_block_error(searched) <= weighted_block_error(rule) * (1 + 1e-6))
    assert weighted_block_error(searched).sum() < 0.8 * weighted_block_error(rule).sum()
    assert np.array_equal(matmul_nbits_weight(searched, np.float16), searched.dequantize().T)
    # 8-bit blocks keep the rule: its error is already small next to the activations' int8 rounding
    assert np.array_equal(quantize_rtn(weight, 8, 32, importance=importance).scales, quantize_rtn(weight, 8, 32).scales)


def test_ternary_rtn_uses_only_three_levels_with_zero_point_two():
    quantized = quantize_ternary(np.random.default_rng(0).standard_normal((8, 64)), 32)
    assert set(np.unique(quantized.codes)) <= {1, 2, 3}
    assert np.array_equal(matmul_nbits_weight(quantized), quantized.dequantize().T)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("block_size", [16, 32, 128])
def test_blocked_dequantize_linear_reads_reference_bit_exactly(bits, block_size):
    weight = np.random.default_rng(bits + block_size).standard_normal((48, 256)).astype(np.float32)
    dq = to_dequantize_linear(quantize_rtn(weight, bits, block_size))
    k, n = dq.data.shape
    if bits == 4:
        data = helper.make_tensor("W", TensorProto.INT4, [k, n], pack_int4_bytes(dq.data), raw=True)
    else:
        data = numpy_helper.from_array(dq.data, "W")
    node = helper.make_node("DequantizeLinear", ["W", "S"], ["Y"], axis=0, block_size=block_size)
    session = _session([node], [], [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [k, n])],
                       [data, numpy_helper.from_array(dq.scales, "S")])
    assert np.array_equal(session.run(None, {})[0], dequantize_linear_reference(dq))
    assert np.array_equal(dequantize_linear_reference(dq), quantize_rtn(weight, bits, block_size).dequantize().T)


def test_asymmetric_weights_cannot_become_dequantize_linear():
    with pytest.raises(UnsupportedError):
        to_dequantize_linear(quantize_rtn(np.random.default_rng(0).standard_normal((4, 64)), 4, 32, symmetric=False))


# --- BitCPM ternary -------------------------------------------------------------------------------


@pytest.mark.parametrize("group", [None, 128, 64, 32])
def test_bitcpm_ternary_detection_finds_group_and_packs_losslessly(group):
    weight = bitcpm_fake_quantized((32, 256), group)
    layout = detect_ternary(weight)
    assert layout is not None
    assert layout.group_size == (256 if group is None else group)
    packed = pack_ternary_exact(weight, layout, block_size=32)
    assert np.array_equal(packed.dequantize(), weight)  # bit for bit
    assert np.array_equal(matmul_nbits_weight(packed), weight.T)


def test_dense_weights_are_not_ternary():
    assert detect_ternary(np.random.default_rng(1).standard_normal((8, 128)).astype(np.float32)) is None


# --- GPTQ ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group_size,symmetric,act_order", [(128, True, False), (32, False, False), (32, False, True), (64, True, True)])
def test_gptq_converts_without_requantizing(group_size, symmetric, act_order):
    weight = np.random.default_rng(5).standard_normal((32, 256)).astype(np.float32) * 0.1
    qweight, qzeros, scales, g_idx, original = pack_gptq_v1(weight, group_size, symmetric=symmetric, act_order=act_order)
    assert np.array_equal(dequantize_gptq(qweight, qzeros, scales, g_idx), original)
    layer = convert_gptq("proj", qweight, qzeros, scales, g_idx, group_size=group_size)
    assert (layer.input_order is not None) == act_order
    order = np.arange(256) if layer.input_order is None else layer.input_order
    assert np.array_equal(layer.quantized.dequantize(), original[:, order])
    assert np.array_equal(matmul_nbits_weight(layer.quantized), original[:, order].T)
    if symmetric and not act_order:
        assert np.all(layer.quantized.zero_points == default_zero_point(4))


def test_gptq_inconsistent_shapes_name_the_tensor():
    weight = np.random.default_rng(0).standard_normal((16, 128)).astype(np.float32)
    qweight, qzeros, scales, g_idx, _ = pack_gptq_v1(weight, 32, symmetric=True, act_order=False)
    with pytest.raises(CheckpointError, match=r"layer\.scales"):
        convert_gptq("layer", qweight, qzeros, scales[:-1], g_idx, group_size=32)
    with pytest.raises(CheckpointError, match=r"layer\.qzeros"):
        convert_gptq("layer", qweight, qzeros[:, :1], scales, g_idx, group_size=32)
    with pytest.raises(CheckpointError, match=r"layer\.g_idx"):
        convert_gptq("layer", qweight, qzeros, scales, np.zeros(128, np.int32), group_size=32)
    with pytest.raises(CheckpointError, match=r"layer\.qweight"):
        convert_gptq("layer", qweight.astype(np.int64), qzeros, scales, g_idx, group_size=32)


# --- QuantSpec ---------------------------------------------------------------------------------------


def test_quant_spec_selects_tensors_and_roundtrips():
    spec = QuantSpec(scheme="int4", block_size=64, overrides={"model.layers.0.*": "int8"})
    assert spec.for_tensor("model.layers.1.self_attn.q_proj.weight").bits == 4
    assert spec.for_tensor("model.layers.0.mlp.down_proj.weight").bits == 8
    assert spec.for_tensor("model.layers.1.input_layernorm.weight") is None
    assert spec.for_tensor("lm_head.weight").scheme == "int6"  # auto: int6 tables under int4 weights
    assert QuantSpec("int8").for_tensor("lm_head.weight").scheme == "int8"
    assert QuantSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize("spec,flavour,field", [
    (QuantSpec(scheme="int4", symmetric=False), "standard", "--asymmetric"),
    (QuantSpec(scheme="ternary"), "standard", "--quant"),
    (QuantSpec(scheme="int3"), "ort", "--quant"),
    (QuantSpec(scheme="int4", block_size=48), "ort", "--block-size"),
])
def test_quant_spec_rejects_what_a_flavour_cannot_hold(spec, flavour, field):
    with pytest.raises(UnsupportedError) as error:
        spec.validate(flavour)
    assert error.value.field == field


def test_reference_model_is_valid_onnx():
    # The test graphs above follow the ONNX checker, so a format bug cannot hide behind a lenient runtime.
    dq = to_dequantize_linear(quantize_rtn(np.ones((4, 32), np.float32), 4, 32))
    tensor = helper.make_tensor("W", TensorProto.INT4, list(dq.data.shape), pack_int4_bytes(dq.data), raw=True)
    node = helper.make_node("DequantizeLinear", ["W", "S"], ["Y"], axis=0, block_size=32)
    graph = helper.make_graph([node], "g", [], [helper.make_tensor_value_info("Y", TensorProto.FLOAT, list(dq.data.shape))],
                              [tensor, numpy_helper.from_array(dq.scales, "S")])
    onnx.checker.check_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10))


# --- positive scales and per-channel codes (the standard flavour's `tensorrt` layout) ----------------


def _extremes(weight: np.ndarray, block_size: int) -> np.ndarray:
    blocks = weight.reshape(weight.shape[0], -1, block_size)
    return np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)[..., 0]


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_signed_rule_is_kept_without_positive(bits):
    """The blocked layout (ort) keeps the Q4_0 rule exactly: scale = signed extreme / -2^(bits-1)."""
    weight = np.random.default_rng(bits).standard_normal((16, 128)).astype(np.float32)
    quantized = quantize_rtn(weight, bits, 32, scale_dtype=np.float16)
    expected = (_extremes(weight, 32) / -default_zero_point(bits)).astype(np.float16)
    assert np.array_equal(quantized.scales, expected) and (quantized.scales < 0).any()


@pytest.mark.parametrize("bits", [4, 6, 8])
@pytest.mark.parametrize("block_size", [32, 128])
def test_positive_rule_maps_the_extreme_to_the_end_of_its_sign(bits, block_size):
    rng = np.random.default_rng(bits + block_size)
    weight = rng.standard_normal((16, 128)).astype(np.float32)
    weight[0, :block_size] = 0.0  # an all-zero block: scale 1, codes at the zero point
    weight[1, :block_size] = 1e-9  # its scale underflows fp16: scale 1, every code rounds to 0
    quantized = quantize_rtn(weight, bits, block_size, scale_dtype=np.float16, positive=True)
    middle = default_zero_point(bits)
    extremes = _extremes(weight, block_size)
    assert (quantized.scales > 0).all()
    assert quantized.scales[0, 0] == 1 and quantized.scales[1, 0] == 1
    assert (quantized.codes[:2, :block_size] == middle).all()
    live = np.abs(extremes) > 1e-6
    negative, positive = live & (extremes < 0), live & (extremes > 0)
    assert negative.any() and positive.any()
    signed = quantize_rtn(weight, bits, block_size, scale_dtype=np.float16)
    assert np.array_equal(quantized.scales[negative], signed.scales[negative])  # as Q4_0 where the extreme is negative
    assert np.array_equal(quantized.scales[positive], (extremes[positive] / (middle - 1)).astype(np.float16))
    step = np.repeat(quantized.scales.astype(np.float32), block_size, axis=1)
    assert np.all(np.abs(quantized.dequantize() - weight) <= step + 1e-6)
    # a positive extreme is exactly its top code; nothing clips on its side
    top = quantized.codes.reshape(16, -1, block_size).max(-1)
    assert np.all(top[positive] == 2 * middle - 1)


def test_positive_importance_search_never_loses_to_the_positive_rule():
    rng = np.random.default_rng(11)
    weight = rng.standard_normal((64, 256)).astype(np.float32)
    importance = rng.gamma(0.5, size=256).astype(np.float32)
    rule = quantize_rtn(weight, 4, 32, scale_dtype=np.float16, positive=True)
    searched = quantize_rtn(weight, 4, 32, scale_dtype=np.float16, importance=importance, positive=True)

    def weighted_block_error(quantized):
        return (np.square(quantized.dequantize().astype(np.float32) - weight) * importance).reshape(64, 8, 32).sum(-1)

    assert (searched.scales > 0).all()
    assert np.all(weighted_block_error(searched) <= weighted_block_error(rule) * (1 + 1e-6))
    assert weighted_block_error(searched).sum() < 0.8 * weighted_block_error(rule).sum()


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("bits", [8, 6])
def test_per_channel_dequantize_linear_reads_reference_bit_exactly(dtype, bits):
    """8-bit codes one scale per output channel (int6 values carried in int8 codes): per-axis DequantizeLinear."""
    weight = np.random.default_rng(bits).standard_normal((48, 96)).astype(np.float32)
    quantized = widened(quantize_rtn(weight, bits, 96, scale_dtype=dtype, positive=True))  # one block spans K
    dq = to_dequantize_linear(quantized)
    assert dq.per_channel and dq.scales.shape == (1, 48) and (dq.scales > 0).all()
    assert not to_dequantize_linear(quantize_rtn(weight, 8, 32)).per_channel
    k, n = dq.data.shape
    node = helper.make_node("DequantizeLinear", ["W", "S"], ["Y"], axis=1)
    session = _session([node], [], [helper.make_tensor_value_info("Y", ONNX_FLOAT[dtype], [k, n])],
                       [numpy_helper.from_array(dq.data, "W"), numpy_helper.from_array(dq.scales[0], "S")])
    assert np.array_equal(session.run(None, {})[0], dequantize_linear_reference(dq))
    assert np.array_equal(dequantize_linear_reference(dq), quantized.dequantize().T)


def test_the_tensorrt_layout_is_recorded_and_chosen_by_the_flavour():
    spec = QuantSpec("int4")
    assert spec.layout == "auto" and spec.for_tensor("model.layers.0.mlp.up_proj.weight").positive_scales is False
    standard, ort = spec.validate("standard"), spec.validate("ort")
    assert (standard.layout, ort.layout, spec.validate(None).layout) == ("tensorrt", "blocked", "auto")
    layer, table = (standard.for_tensor(n) for n in ("model.layers.0.mlp.up_proj.weight", "model.embed_tokens.weight"))
    assert (layer.per_channel, layer.positive_scales, table.scheme, table.per_channel) == (False, True, "int6", True)
    assert ort.for_tensor("model.embed_tokens.weight") == spec.for_tensor("model.embed_tokens.weight")  # as before
    assert QuantSpec.from_dict(standard.to_dict()) == standard
    assert QuantSpec.from_dict({"scheme": "int4"}).layout == "auto"  # a manifest from before the field: blocked
    with pytest.raises(UnsupportedError, match="stores the tensorrt layout"):
        ort.validate("standard")
