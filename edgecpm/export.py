"""checkpoint -> bundle: validate, build the ONNX graph, copy the tokenizer, write the manifest, atomically.

Everything is checked before the staging directory exists, and the staging directory is only renamed
into place after the last file is written, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from edgecpm.bundle import CHAT_TEMPLATE_NAME, MANIFEST_NAME, TOKENIZER_NAME, Manifest, atomic_bundle_dir
from edgecpm.checkpoint import Checkpoint, TokenizerFiles, open_checkpoint
from edgecpm.errors import BundleError, UnsupportedError

PRECISION_ALIASES = {"fp32": "fp32", "float32": "fp32", "fp16": "fp16", "float16": "fp16"}
HASH_CHUNK = 8 << 20


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


def export_checkpoint(source: str | Path | Checkpoint, out_dir: str | Path, *, flavour: str = "ort", dtype: str = "fp32",
                      max_context: int = 2048, overwrite: bool = False, tied_head: str = "duplicate",
                      progress: Callable[[str], None] | None = None) -> Path:
    """Writes an edgecpm bundle (model.onnx + model.onnx.data + tokenizer + edgecpm.json); returns its path."""
    from edgecpm.exporters.onnx import DATA_FILE, MODEL_FILE, ExportOptions, build_onnx
    from edgecpm.exporters.onnx.build import check_options

    say = progress or (lambda message: None)
    checkpoint = source if isinstance(source, Checkpoint) else open_checkpoint(source)
    precision = PRECISION_ALIASES.get(str(dtype).lower())
    if precision is None:
        raise UnsupportedError(f"unknown dtype {dtype!r} (choose fp32 or fp16)", field="dtype")
    options = ExportOptions(flavour=flavour, precision=precision, max_context=max_context, tied_head=tied_head)
    check_options(options)
    check_max_context(checkpoint, max_context)
    tokenizer = checkpoint.tokenizer
    if tokenizer is None:
        raise BundleError("the checkpoint has no tokenizer (tokenizer.json or tokenizer.model); a bundle needs one",
                          path=checkpoint.path)
    out_dir = Path(out_dir)
    say("hashing source files")
    source_record = _source_record(checkpoint)

    with atomic_bundle_dir(out_dir, overwrite=overwrite) as staging:
        say(f"building the {flavour} graph ({precision}, max context {max_context})")
        graph_io = build_onnx(checkpoint, options, staging, progress=say)
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
            quantization=None,
            toolchain=_toolchain(),
            extra={
                "data_files": [DATA_FILE],
                "graph_io": {"inputs": [t.as_dict() for t in graph_io.inputs],
                             "outputs": [t.as_dict() for t in graph_io.outputs]},
                "export_options": {"tied_head": tied_head},
                "rope": "cos/sin baked for max_context positions (exact: max_context <= max_position_embeddings)",
            },
        )
        (staging / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
        say(f"wrote {out_dir}")
    return out_dir
