"""checkpoint -> bundle: validate, build the ONNX graph, copy the tokenizer, write the manifest, atomically.

Everything is checked before the staging directory exists, and the staging directory is only renamed
into place after the last file is written, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from edgecpm.bundle import CHAT_TEMPLATE_NAME, MANIFEST_NAME, TOKENIZER_NAME, Manifest, atomic_bundle_dir
from edgecpm.checkpoint import Checkpoint, TokenizerFiles, open_checkpoint
from edgecpm.errors import BundleError, QualityError, UnsupportedError
from edgecpm.export_plan import plan_export
from edgecpm.quant.spec import QuantSpec
from edgecpm.sparse.choice import AttentionChoice

if TYPE_CHECKING:
    from edgecpm.devices.profile import DeviceProfile

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
    import onnxruntime

    import edgecpm
    from edgecpm.optional import require

    onnx = require("onnx", "export", "exporting ONNX graphs")

    return {"edgecpm": edgecpm.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "numpy": numpy.__version__}


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
    """Measures the staged bundle on its own runtime; raises (so nothing is renamed into place) over the limit.

    The reference is the fp32 graph of the same checkpoint on onnxruntime (no torch); it is as large as the fp32
    model, built only now that the quantized bundle is staged, and deleted before this returns.
    """
    from edgecpm.quant.quality import REFERENCE, measure_bundle

    say(f"quality gate: {max_tokens} evaluation tokens against the {REFERENCE} (built, then deleted)")
    report = measure_bundle(staging, checkpoint, max_tokens)
    manifest.quantization["quality"] = report.to_dict()
    say(f"perplexity {report.perplexity:.3f} vs {report.reference_perplexity:.3f} ({report.perplexity_increase:+.2%}), "
        f"mean KL {report.mean_kl:.4f}, top-1 agreement {report.top1_agreement:.1%}")
    if max_ppl_increase is not None and report.perplexity_increase > max_ppl_increase:
        raise QualityError(f"perplexity increase {report.perplexity_increase:+.2%} exceeds the limit {max_ppl_increase:+.2%} "
                           f"(mean KL {report.mean_kl:.4f}); no bundle written", field="--max-ppl-increase")
    return report.to_dict()


def export_checkpoint(source: str | Path | Checkpoint, out_dir: str | Path, *, device: str | Path | DeviceProfile | None = None,
                      flavour: str | None = None, dtype: str | None = None, max_context: int | None = None,
                      overwrite: bool = False, tied_head: str | None = None, quant: QuantSpec | None = None,
                      max_ppl_increase: float | None = None, accuracy_level: int | None = None,
                      quality_tokens: int = QUALITY_TOKENS, attention: AttentionChoice | None = None,
                      progress: Callable[[str], None] | None = None) -> Path:
    """Writes an edgecpm bundle (model.onnx + model.onnx.data + tokenizer + edgecpm.json); returns its path.

    `device`: a profile name, a profile file or a DeviceProfile: flavour, dtype, quantization and max context
    default to its choices (explicit arguments win; both recorded in the manifest) and the export is refused
    before anything is written if it does not fit the device's memory budget. `None` means "not given"
    (edgecpm.export_plan resolves it). `quant`: what to store quantized (GPTQ checkpoints always export their
    own codes). Every quantized export is measured by the quality gate before it is renamed into place;
    `max_ppl_increase` (0.05 = +5% perplexity) turns the measurement into a hard limit. `attention`: dense or InfLLM v2
    sparse (default: the checkpoint's own sparse_config), recorded as the bundle's default.
    """
    from edgecpm.exporters.onnx import DATA_FILE, MODEL_FILE, build_onnx
    from edgecpm.quant.plan import make_quantizer, warn_if_lossy

    say = progress or (lambda message: None)
    checkpoint = source if isinstance(source, Checkpoint) else open_checkpoint(source)
    plan = plan_export(checkpoint, device=device, flavour=flavour, dtype=dtype, max_context=max_context, quant=quant,
                       tied_head=tied_head, accuracy_level=accuracy_level, attention=attention)
    options, spec = plan.options, plan.quant
    flavour, precision, max_context, tied_head = options.flavour, options.precision, options.max_context, options.tied_head
    if plan.device is not None:
        say(f"tuned for {plan.device.name} {plan.device.version}: {flavour} graph, {plan.memory.storage.label}, max context "
            f"{max_context} ({', '.join(f'{k} by {v}' for k, v in plan.chosen_by.items())})")
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
            data_files=[DATA_FILE],
            tensors=graph_io.tensors,
            graph_io={"inputs": [t.as_dict() for t in graph_io.inputs], "outputs": [t.as_dict() for t in graph_io.outputs]},
            tied_head=tied_head,
            model_bytes=_model_bytes(staging),
            device=plan.device,
            sparse_attention=plan.attention,
            graph_attention=graph_io.attention,
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
