"""GPTQ calibration beats round-to-nearest on the layer outputs it is driven by; quality metrics are exact."""

import math

import numpy as np

from edgecpm.checkpoint import open_checkpoint
from edgecpm.models import reference_model
from edgecpm.quant.calibrate import calibration_text, gptq_quantize, record_linear_inputs
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
    for symmetric in (True, False):
        rtn = quantize_rtn(weight, 4, 32, symmetric=symmetric)
        gptq = gptq_quantize(weight, inputs, 4, 32, symmetric=symmetric)
        assert np.array_equal(gptq.scales, rtn.scales) and np.array_equal(gptq.zero_points, rtn.zero_points)
        assert relative_output_error(inputs, weight, gptq) < 0.8 * relative_output_error(inputs, weight, rtn)


def test_recorded_inputs_are_the_layer_inputs(tmp_path):
    import torch

    checkpoint = open_checkpoint(write_hf_checkpoint(tmp_path / "m", ("minicpm", "dense")))
    model = reference_model(checkpoint)
    ids = np.arange(5, 40)
    names = [n for n in checkpoint.tensors if n.endswith("proj.weight")]
    inputs = record_linear_inputs(model, ids, names)
    assert set(inputs) == set(names)
    for name in names:
        module = model.get_submodule(name.removesuffix(".weight"))
        assert inputs[name].shape == (len(ids), module.in_features)
        with torch.no_grad():
            out = module(torch.from_numpy(inputs[name])).numpy()
        assert np.allclose(out, inputs[name] @ checkpoint.tensors[name].numpy().T, atol=1e-5)
    # q/k/v read one activation: one array, not three copies.
    assert inputs[names[0]] is inputs[names[1]]


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
    assert len(calibration) > 2000 and len(evaluation) > 2000
    assert not set(calibration.split("\n\n")) & set(evaluation.split("\n\n"))
