"""Calibrated int4 on the real SmolLM2-135M: GPTQ beats round-to-nearest against the fp32 model.

Both quantizations go through `quantized_weights`, the exact weights an export writes (the export parity
tests tie those to the bundles); the fp32 reference runs them on the shipped evaluation text, which the
calibration never sees.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgecpm.checkpoint import open_checkpoint
from edgecpm.models import reference_model
from edgecpm.quant.plan import quantized_weights
from edgecpm.quant.quality import compare, evaluation_text
from edgecpm.quant.spec import QuantSpec
from edgecpm.resources import default_model_path
from edgecpm.text import TextTokenizer

pytestmark = pytest.mark.slow

EVAL_TOKENS = 512


def test_gptq_beats_round_to_nearest_on_the_real_model():
    checkpoint = open_checkpoint(default_model_path())
    ids = np.asarray(TextTokenizer.from_checkpoint(checkpoint.tokenizer).encode(evaluation_text())[:EVAL_TOKENS], dtype=np.int64)
    assert len(ids) == EVAL_TOKENS

    def logits(weights=None):
        with torch.no_grad():
            return reference_model(checkpoint, weights)(torch.from_numpy(ids)[None])[0, :-1].numpy()

    reference = logits()
    reports = {method: compare(reference, logits(quantized_weights(checkpoint, QuantSpec("int4", method=method))), ids)
               for method in ("rtn", "gptq")}
    rtn, gptq = reports["rtn"], reports["gptq"]
    assert gptq.perplexity_increase < rtn.perplexity_increase
    assert gptq.mean_kl < 0.7 * rtn.mean_kl
    assert gptq.top1_agreement > rtn.top1_agreement
