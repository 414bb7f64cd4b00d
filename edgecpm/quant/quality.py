"""The quality gate: perplexity and mean KL divergence of a quantized bundle against the fp32 reference.

Both are measured on `edgecpm/data/evaluation*.txt` (shipped, never downloaded). The quantized side runs on
the kernels the bundle runs on by default here (`--kernels auto`: edgecpm's native kernels where they implement it,
else onnxruntime; recorded as `kernels`), token by token, so kernel effects (int8 activations at accuracy level 4,
fp16 accumulation) are part of the number.

The reference is the unquantized checkpoint exported as an fp32 `ort` graph and run on onnxruntime's own
kernels (`graph_reference_logits`), so the gate needs no torch: the fp32 parity tests hold that graph to
the PyTorch reference models within 1e-4 in logits. `reference_logits` (PyTorch) stays for calibration
and tests.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from edgecpm.backend import Backend
from edgecpm.resources import shipped_text

EVALUATION_FILES = ("evaluation.txt", "evaluation_extra.txt")
REFERENCE = "fp32 graph on onnxruntime"  # recorded in every quality record
REFERENCE_FLAVOUR = "ort"  # GroupQueryAttention + fp32 MatMul; test_onnx_export holds it to PyTorch within 1e-4


@dataclass(frozen=True)
class QualityReport:
    tokens: int
    reference_perplexity: float
    perplexity: float
    mean_kl: float
    top1_agreement: float
    reference: str = REFERENCE  # what produced reference_perplexity and the KL's reference distribution
    kernels: str = ""  # what computed the bundle's logits (describe_kernels), "" where not recorded

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
    """fp32 PyTorch reference logits predicting tokens 1..T-1 (one forward over all positions): [T-1, V].

    Needs torch (the `reference` extra); the quality gate uses `graph_reference_logits` instead.
    """
    from edgecpm.optional import require

    torch = require("torch", "reference", "the PyTorch reference logits")
    from edgecpm.models import reference_model

    with torch.no_grad():
        logits = reference_model(checkpoint)(torch.from_numpy(np.asarray(token_ids, dtype=np.int64))[None])
    return logits[0, :-1].numpy()


def _reference_manifest(checkpoint, graph_io, max_context: int):
    """The manifest fields the onnxruntime backend reads (kernels="onnxruntime"), for a graph that is never a bundle."""
    from edgecpm.bundle import Manifest
    from edgecpm.exporters.onnx import MODEL_FILE

    return Manifest(architecture=checkpoint.config.to_dict(), flavour=REFERENCE_FLAVOUR, precision="fp32",
                    model_file=MODEL_FILE, graph_inputs=[t.name for t in graph_io.inputs],
                    graph_outputs=[t.name for t in graph_io.outputs], kv_layout=graph_io.kv_layout(max_context),
                    max_context=max_context, eos_token_ids=[], source={}, tokenizer={})


def graph_reference_logits(checkpoint, token_ids: np.ndarray, workdir: str | Path | None = None,
                           threads: int | None = None) -> np.ndarray:
    """fp32 logits of the unquantized checkpoint's own graph on onnxruntime, predicting tokens 1..T-1: [T-1, V].

    No torch: the checkpoint is exported (float, `REFERENCE_FLAVOUR`, max context T) into a temporary
    directory under `workdir` (default: the system's), run token by token like the bundle under test (the
    graph emits last-position logits only), on onnxruntime's kernels (never the native ones, so the
    reference does not share code with what it checks), and the directory is deleted before returning.
    Memory and disk: the graph holds every weight in fp32, as large as the fp32 model; weights are not
    prepacked, so the session holds them once.
    """
    from edgecpm.exporters.onnx import ExportOptions, build_onnx
    from edgecpm.runtimes import load_backend

    ids = np.asarray(token_ids, dtype=np.int64)
    options = ExportOptions(flavour=REFERENCE_FLAVOUR, precision="fp32", max_context=len(ids))
    with tempfile.TemporaryDirectory(prefix=".edgecpm-reference-", dir=workdir) as directory:
        graph_io = build_onnx(checkpoint, options, Path(directory))
        backend = load_backend(directory, _reference_manifest(checkpoint, graph_io, len(ids)), threads=threads,
                               prepack=False, kernels="onnxruntime")
        logits = backend_logits(backend, ids)
        del backend  # closes the session (and its copy of the weights) before the files go
    return logits


def describe_kernels(kernels: dict) -> str:
    """A backend's `kernels` record as the gate reports it, e.g. "native (avx2, int8 activations)"."""
    details = [kernels[key] for key in ("isa", "activations") if kernels.get(key)]
    return kernels["decode"] + (f" ({', '.join(details)})" if details else "")


def measure_bundle(bundle_dir, checkpoint, max_tokens: int) -> QualityReport:
    """The bundle as it will run (its runtime, its tokenizer) against the unquantized checkpoint's fp32 graph."""
    from edgecpm.bundle import TOKENIZER_NAME, read_manifest
    from edgecpm.runtimes import load_backend
    from edgecpm.sparse.choice import AttentionChoice
    from edgecpm.text import TextTokenizer

    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    tokenizer = TextTokenizer.from_file(bundle_dir / TOKENIZER_NAME, manifest.tokenizer)
    ids = np.asarray(tokenizer.encode(evaluation_text())[: min(max_tokens, manifest.max_context)], dtype=np.int64)
    # dense: the gate measures what quantization costs; sparse attention's own cost is measured on long texts.
    # "auto", never $EDGECPM_KERNELS: the kernels the bundle runs on by default, whose arithmetic is part of the cost.
    backend = load_backend(bundle_dir, manifest, kernels="auto", attention=AttentionChoice("dense"))
    kernels = describe_kernels(backend.kernels)
    logits = backend_logits(backend, ids)
    del backend
    # Memory: the fp32 reference graph is as large as the fp32 model. It is built only now, after the
    # quantized bundle is staged and measured (its session closed above), beside the bundle (the output's
    # filesystem, not a possibly RAM-backed /tmp), and deleted before this returns.
    reference = graph_reference_logits(checkpoint, ids, workdir=bundle_dir.parent)
    return replace(compare(reference, logits, ids), kernels=kernels)
