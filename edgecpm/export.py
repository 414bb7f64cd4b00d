"""checkpoint -> bundle: validate, build the ONNX graph, copy the tokenizer, write the manifest, atomically.

Everything is checked before the staging directory exists, and the staging directory is only renamed
into place after the last file is written, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Callable
from pathlib import Path

from edgecpm.bundle import CHAT_TEMPLATE_NAME, MANIFEST_NAME, TOKENIZER_NAME, Manifest, atomic_bundle_dir
from edgecpm.checkpoint import Checkpoint, TokenizerFiles, open_checkpoint
from edgecpm.errors import BundleError, QualityError, UnsupportedError
from edgecpm.quant.spec import QuantSpec

PRECISION_ALIASES = {"fp32": "fp32", "float32": "fp32", "fp16": "fp16", "float16": "fp16"}
HASH_CHUNK = 8 << 20
QUALITY_TOKENS = 1024  # evaluation tokens of the quality gate: at 256, perplexity rankings of int4 methods flipped with the text


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _source_record(checkpoint: Checkpoint) -> dict:
    files = [{"name": str(p.relative_to(checkpoint.path)) if p != checkpoint.path and checkpoint.path.is_dir() else p.name,
              "size": p.stat().st_size, "sha256": sha256_file(p)} for p in checkpoint.files]
    return {"path": str(checkpoint.path.resolve()), "format": checkpoint.format, "files": files}


def _token_id(tokenizer_json: str, token: str | None) -> int | None:
    if token is None:
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json).token_to_id(token)


def _tokenizer_record(tokenizer: TokenizerFiles) -> dict:
    return {
        "file": TOKENIZER_NAME,
        "chat_template_file": CHAT_TEMPLATE_NAME if tokenizer.chat_template else None,
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "bos_token_id": _token_id(tokenizer.tokenizer_json, tokenizer.bos_token),
        "eos_token_id": _token_id(tokenizer.tokenizer_json, tokenizer.eos_token),
        "add_bos_token": tokenizer.add_bos_token,
        "add_eos_token": tokenizer.add_eos_token,
    }


def _toolchain() -> dict[str, str]:
    import numpy
    import onnx
    import onnxruntime

    import edgecpm

    return {"edgecpm": edgecpm.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "numpy": numpy.__version__}


def check_max_context(checkpoint: Checkpoint, max_context: int) -> None:
    limit = checkpoint.config.max_position_embeddings
    if not isinstance(max_context, int) or max_context < 1:
        raise UnsupportedError(f"max_context must be a positive integer, got {max_context!r}", field="max_context")
    if max_context > limit:
        # Beyond max_position_embeddings, dynamic-NTK/LongRoPE would need length-dependent rotary tables.
        raise UnsupportedError(f"max_context {max_context} exceeds the model's max_position_embeddings {limit}",
                               path=checkpoint.path, field="max_context")


def _quantization_record(spec: QuantSpec, quantizer, options, staging: Path) -> dict:
    record = {**spec.to_dict(), "tensor_counts": quantizer.counts(), "tensors": dict(quantizer.written),
              "model_bytes": _model_bytes(staging)}
    if options.flavour == "ort":
        record["accuracy_level"] = options.accuracy_level
    return record


def _model_bytes(bundle: Path) -> int:
    from edgecpm.exporters.onnx import DATA_FILE, MODEL_FILE

    return sum((bundle / name).stat().st_size for name in (MODEL_FILE, DATA_FILE))


def _quality_gate(staging: Path, checkpoint: Checkpoint, manifest: Manifest, max_tokens: int,
                  max_ppl_increase: float | None, say: Callable[[str], None]) -> dict:
    """Measures the staged bundle on its own runtime; raises (so nothing is renamed into place) over the limit."""
    from edgecpm.quant.quality import measure_bundle

    say(f"quality gate: {max_tokens} evaluation tokens against the fp32 reference")
    report = measure_bundle(staging, checkpoint, max_tokens)
    manifest.quantization["quality"] = report.to_dict()
    say(f"perplexity {report.perplexity:.3f} vs {report.reference_perplexity:.3f} ({report.perplexity_increase:+.2%}), "
        f"mean KL {report.mean_kl:.4f}, top-1 agreement {report.top1_agreement:.1%}")
    if max_ppl_increase is not None and report.perplexity_increase > max_ppl_increase:
        raise QualityError(f"perplexity increase {report.perplexity_increase:+.2%} exceeds the limit {max_ppl_increase:+.2%} "
                           f"(mean KL {report.mean_kl:.4f}); no bundle written", field="--max-ppl-increase")
    return report.to_dict()


def export_checkpoint(source: str | Path | Checkpoint, out_dir: str | Path, *, flavour: str = "ort", dtype: str = "fp32",
                      max_context: int = 2048, overwrite: bool = False, tied_head: str = "duplicate",
                      quant: QuantSpec | None = None, max_ppl_increase: float | None = None, accuracy_level: int = 4,
                      quality_tokens: int = QUALITY_TOKENS, progress: Callable[[str], None] | None = None) -> Path:
    """Writes an edgecpm bundle (model.onnx + model.onnx.data + tokenizer + edgecpm.json); returns its path.

    `quant`: what to store quantized (GPTQ checkpoints always export their own codes). Every quantized
    export is measured by the quality gate before it is renamed into place; `max_ppl_increase` (0.05 =
    +5% perplexity) turns the measurement into a hard limit.
    """
    from edgecpm.exporters.onnx import DATA_FILE, MODEL_FILE, ExportOptions, build_onnx
    from edgecpm.exporters.onnx.build import check_options
    from edgecpm.quant.plan import check_flavour, checkpoint_spec, make_quantizer, warn_if_lossy

    say = progress or (lambda message: None)
    checkpoint = source if isinstance(source, Checkpoint) else open_checkpoint(source)
    precision = PRECISION_ALIASES.get(str(dtype).lower())
    if precision is None:
        raise UnsupportedError(f"unknown dtype {dtype!r} (choose fp32 or fp16)", field="dtype")
    options = ExportOptions(flavour=flavour, precision=precision, max_context=max_context, tied_head=tied_head,
                            accuracy_level=accuracy_level)
    check_options(options)
    check_max_context(checkpoint, max_context)
    spec = checkpoint_spec(checkpoint, quant)
    if spec is not None and not spec.enabled:
        spec = None
    if spec is not None:
        spec.validate(flavour)
        check_flavour(checkpoint, spec, flavour)
    if spec is not None and importlib.util.find_spec("torch") is None:
        raise UnsupportedError("a quantized export measures its quality against the PyTorch reference; install torch "
                               "(pip install 'edgecpm[reference]')", field="--quant")
    if max_ppl_increase is not None and spec is None:
        raise UnsupportedError("--max-ppl-increase needs a quantized export (--quant)", field="--max-ppl-increase")
    tokenizer = checkpoint.tokenizer
    if tokenizer is None:
        raise BundleError("the checkpoint has no tokenizer (tokenizer.json or tokenizer.model); a bundle needs one",
                          path=checkpoint.path)
    out_dir = Path(out_dir)
    say("hashing source files")
    source_record = _source_record(checkpoint)
    quantizer = None
    if spec is not None:
        # Checks (lossless ternary) and calibration (GPTQ) happen before the staging directory exists.
        say(f"preparing {spec.scheme} quantization ({spec.method}, block {spec.block_size})")
        quantizer = make_quantizer(checkpoint, spec, options.np_dtype, flavour)

    with atomic_bundle_dir(out_dir, overwrite=overwrite) as staging:
        say(f"building the {flavour} graph ({precision}, max context {max_context})")
        graph_io = build_onnx(checkpoint, options, staging, progress=say, quantizer=quantizer)
        (staging / TOKENIZER_NAME).write_text(tokenizer.tokenizer_json, encoding="utf-8")
        if tokenizer.chat_template:
            (staging / CHAT_TEMPLATE_NAME).write_text(tokenizer.chat_template, encoding="utf-8")
        tokenizer_record = _tokenizer_record(tokenizer)
        eos = set(checkpoint.config.eos_token_ids)
        if tokenizer_record["eos_token_id"] is not None:
            eos.add(tokenizer_record["eos_token_id"])
        kv_layout = graph_io.kv_layout(max_context)
        kv_layout["position_inputs"] = [t.name for t in graph_io.inputs
                                        if t.name not in {"input_ids", *(k.input for k in graph_io.kv)}]
        manifest = Manifest(
            architecture=checkpoint.config.to_dict(),
            flavour=flavour,
            precision=precision,
            model_file=MODEL_FILE,
            graph_inputs=[t.name for t in graph_io.inputs],
            graph_outputs=[t.name for t in graph_io.outputs],
            kv_layout=kv_layout,
            max_context=max_context,
            eos_token_ids=sorted(eos),
            source=source_record,
            tokenizer=tokenizer_record,
            quantization=None if spec is None else _quantization_record(spec, quantizer, options, staging),
            toolchain=_toolchain(),
            extra={
                "data_files": [DATA_FILE],
                "tensors": graph_io.tensors,
                "graph_io": {"inputs": [t.as_dict() for t in graph_io.inputs],
                             "outputs": [t.as_dict() for t in graph_io.outputs]},
                "export_options": {"tied_head": tied_head},
                "model_bytes": _model_bytes(staging),
                "rope": "cos/sin baked for max_context positions (exact: max_context <= max_position_embeddings)",
            },
        )
        (staging / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
        quality = None
        if spec is not None:
            quality = _quality_gate(staging, checkpoint, manifest, quality_tokens, max_ppl_increase, say)
            (staging / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
        say(f"wrote {out_dir}")
    if quantizer is not None:
        warn_if_lossy(quantizer, quality)
    return out_dir
