"""PyTorch reference models: the specification in code that every exported graph is checked against.

Contract (used by exporters' parity tests, calibration and perplexity):

    model = reference_model(checkpoint)               # fp32 torch.nn.Module, weights from the checkpoint
    cache = model.new_cache()
    logits = model(input_ids, cache)                  # input_ids LongTensor [1, T] -> logits [1, T, V] fp32
    logits = model(next_ids, cache)                   # continues after the cached positions

Importing this package imports torch; the runtime never does.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

    from edgecpm.checkpoint import Checkpoint


def reference_class(architecture_name: str):
    from edgecpm.arch import get_architecture

    module_name, class_name = get_architecture(architecture_name).reference_model.split(":")
    return getattr(importlib.import_module(module_name), class_name)


def reference_model(checkpoint: Checkpoint, weights: Mapping[str, np.ndarray] | None = None):
    """Builds the architecture's reference module and loads every checkpoint tensor (fp32), or `weights`
    (e.g. the dequantized weights of a quantized export) in their place."""
    cls = reference_class(checkpoint.architecture.name)
    model = cls(checkpoint.config)
    model.load_tensors(weights if weights is not None else {name: ref.numpy() for name, ref in checkpoint.tensors.items()})
    return model.eval()
