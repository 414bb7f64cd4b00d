"""GPTQ calibration beats round-to-nearest on the layer outputs it is driven by; quality metrics are exact."""

import math

import numpy as np

from edgecpm.checkpoint import open_checkpoint
from edgecpm.models import reference_model
from edgecpm.quant.calibrate import accumulate_hessians, calibration_sequences, calibration_text, gptq_quantize
from edgecpm.quant.formats import quantize_rtn
from edgecpm.quant.quality import compare, evaluation_text
from tiny_models import write_hf_checkpoint


def relative_output_error(inputs, weight, quantized):
    return np.linalg.norm(inputs @ (weight - quantized.dequantize()).T) / np.linalg.norm(inputs @ weight.T)


def test_gptq_lowers_output_error_on_correlated_inputs():
    rng = np.random.default_rng(0)
    # Activations of real layers live near a low-dimensional subspace; that is what GPTQ exploits.
    basis = rng.standard_normal((16, 128))
    inputs = (rng.standard_normal((512, 16)) @ basis + 0.05 * rng.standard_normal((512, 128))).astype(np.float32)
    weight = rng.standard_normal((64, 128)).astype(np.float32)
    hessian = inputs.T @ inputs
    for symmetric in (True, False):
        rtn = quantize_rtn(weight, 4, 32, symmetric=symmetric)
        # GPTQ keeps RTN's layout, with block scales chosen by the input channels' importance (its diagonal)
        static = quantize_rtn(weight, 4, 32, symmetric=symmetric, importance=np.diag(hessian))
        for act_order in (True, False):
            gptq = gptq_quantize(weight, hessian, 4, 32, symmetric=symmetric, act_order=act_order)
            assert np.array_equal(gptq.scales, static.scales) and np.array_equal(gptq.zero_points, static.zero_points)
            assert relative_output_error(inputs, weight, gptq) < 0.8 * relative_output_error(inputs, weight, rtn)


def test_hessians_are_the_weighted_layer_input_moments(tmp_path):
    import torch

    checkpoint = open_checkpoint(write_hf_checkpoint(tmp_path / "m", ("minicpm", "dense")))
    model = reference_model(checkpoint)
    sequences = calibration_sequences(np.arange(5, 70), length=16)
    assert [len(s) for s in sequences] == [16] * 4 and sequences[1][0] == 21
    names = [n for n in checkpoint.tensors if n.endswith("proj.weight")]
    kv = checkpoint.architecture.kv_projections
    assert checkpoint.config.tie_word_embeddings  # the head is no Linear module: read from the final norm
    hessians = accumulate_hessians(model, sequences, [*names, "lm_head.weight"], kv, head_input="model.norm")
    assert set(hessians) == {*names, "lm_head.weight"}

    # Independently: every linear's input rows per sequence, from pre-hooks.
    inputs = {name: [] for name in names}
    handles = [model.get_submodule(name.removesuffix(".weight")).register_forward_pre_hook(
        lambda module, args, name=name: inputs[name].append(args[0].reshape(-1, args[0].shape[-1]).numpy().copy()))
        for name in names]
    inputs["lm_head.weight"] = []
    handles.append(model.model.norm.register_forward_hook(
        lambda module, args, out: inputs["lm_head.weight"].append(out.reshape(-1, out.shape[-1]).numpy().copy())))
    with torch.no_grad():
        for ids in sequences:
            model(torch.from_numpy(ids)[None], model.new_cache())
    for handle in handles:
        handle.remove()
    for name in [*names, "lm_head.weight"]:
        sink_weight = 8.0 if name.removesuffix(".weight").endswith(kv) else 1.0  # half of the 16-token sequence
        weights = np.concatenate([[sink_weight] + [1.0] * 15 for _ in sequences])
        x = np.concatenate(inputs[name]).astype(np.float64)
        expected = (x * weights[:, None]).T @ x / weights.sum()
        assert hessians[name].rows == 64
        assert np.allclose(hessians[name].matrix, expected, rtol=1e-4, atol=1e-6), name
    layer = "model.layers.0.self_attn."
    # k and v read one activation with one weighting: one matrix; q reads it unweighted.
    assert hessians[layer + "k_proj.weight"] is hessians[layer + "v_proj.weight"]
    assert hessians[layer + "q_proj.weight"] is not hessians[layer + "k_proj.weight"]


def test_quality_metrics_match_their_definitions():
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 50, size=33)
    reference = rng.standard_normal((32, 50)).astype(np.float32)
    same = compare(reference, reference, ids)
    assert same.mean_kl == 0.0 and same.top1_agreement == 1.0 and same.perplexity_increase == 0.0
    noisy = reference + 0.5 * rng.standard_normal(reference.shape).astype(np.float32)
    report = compare(reference, noisy, ids)
    nll = 0.0
    kl = 0.0
    for row, target in enumerate(ids[1:]):
        p = np.exp(reference[row] - reference[row].max()); p /= p.sum()
        q = np.exp(noisy[row] - noisy[row].max()); q /= q.sum()
        nll -= math.log(q[target])
        kl += float(np.sum(p * np.log(p / q)))
    assert math.isclose(report.perplexity, math.exp(nll / 32), rel_tol=1e-6)
    assert math.isclose(report.mean_kl, kl / 32, rel_tol=1e-6)
    assert report.mean_kl > 0


def test_shipped_texts_are_distinct_and_substantial():
    calibration, evaluation = calibration_text(), evaluation_text()
    assert len(calibration) > 15000 and len(evaluation) > 8000
    assert not set(calibration.split("\n\n")) & set(evaluation.split("\n\n"))
