"""The quality gate: perplexity and mean KL divergence of a quantized bundle against the fp32 reference.

Both are measured on `edgecpm/data/evaluation*.txt` (shipped, never downloaded). The quantized side runs
through the real exported graph on its runtime backend, token by token, so kernel effects (int8
activations at accuracy level 4, fp16 accumulation) are part of the number.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from edgecpm.backend import Backend
from edgecpm.resources import shipped_text

EVALUATION_FILES = ("evaluation.txt", "evaluation_extra.txt")


@dataclass(frozen=True)
class QualityReport:
    tokens: int
    reference_perplexity: float
    perplexity: float
    mean_kl: float
    top1_agreement: float

    @property
    def perplexity_increase(self) -> float:
        """Relative increase, e.g. 0.03 for +3%."""
        return self.perplexity / self.reference_perplexity - 1.0

    def to_dict(self) -> dict:
        return {**asdict(self), "perplexity_increase": self.perplexity_increase}


def evaluation_text() -> str:
    return shipped_text(*EVALUATION_FILES)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def backend_logits(backend: Backend, token_ids: np.ndarray) -> np.ndarray:
    """Logits predicting tokens 1..T-1, one decode step per position: [T-1, V]."""
    backend.reset()
    rows = [backend.prefill(np.asarray(token_ids[:1], dtype=np.int64))]
    for token in token_ids[1:-1]:
        rows.append(backend.decode(int(token)))
    return np.stack(rows).astype(np.float32)


def compare(reference_logits: np.ndarray, logits: np.ndarray, token_ids: np.ndarray) -> QualityReport:
    """Both logits arrays predict token_ids[1:]; KL is KL(reference || quantized), averaged over positions."""
    targets = np.asarray(token_ids[1:], dtype=np.int64)
    reference_lp, lp = log_softmax(reference_logits), log_softmax(logits)
    rows = np.arange(len(targets))
    kl = np.sum(np.exp(reference_lp) * (reference_lp - lp), axis=-1)
    return QualityReport(
        tokens=len(targets),
        reference_perplexity=float(np.exp(-reference_lp[rows, targets].mean())),
        perplexity=float(np.exp(-lp[rows, targets].mean())),
        mean_kl=float(kl.mean()),
        top1_agreement=float(np.mean(reference_logits.argmax(-1) == logits.argmax(-1))),
    )


def reference_logits(checkpoint, token_ids: np.ndarray) -> np.ndarray:
    """fp32 PyTorch reference logits predicting tokens 1..T-1 (one forward over all positions): [T-1, V]."""
    import torch

    from edgecpm.models import reference_model

    with torch.no_grad():
        logits = reference_model(checkpoint)(torch.from_numpy(np.asarray(token_ids, dtype=np.int64))[None])
    return logits[0, :-1].numpy()


def measure_bundle(bundle_dir, checkpoint, max_tokens: int) -> QualityReport:
    """The bundle as it will run (its runtime, its tokenizer) against the unquantized checkpoint's reference."""
    from edgecpm.bundle import TOKENIZER_NAME, read_manifest
    from edgecpm.runtimes.onnxruntime import load_backend
    from edgecpm.text import TextTokenizer

    manifest = read_manifest(bundle_dir)
    tokenizer = TextTokenizer.from_file(bundle_dir / TOKENIZER_NAME, manifest.tokenizer)
    ids = np.asarray(tokenizer.encode(evaluation_text())[: min(max_tokens, manifest.max_context)], dtype=np.int64)
    logits = backend_logits(load_backend(bundle_dir, manifest), ids)
    return compare(reference_logits(checkpoint, ids), logits, ids)
