"""`edgecpm export SOURCE -o OUT`: a checkpoint (HF directory, GGUF file or cached model id) to a bundle."""

from __future__ import annotations

from pathlib import Path

import typer

from edgecpm.cli import app
from edgecpm.cli.options import (ACCURACY_LEVEL, ASYMMETRIC, ATTENTION, BLOCK_SIZE, DEVICE, EMBEDDINGS, LM_HEAD,
                                 MAX_PPL_INCREASE, METHOD, QUALITY_TOKENS, QUANT, SPARSE_CONFIG, attention_choice)


def export_with_progress(source: str | Path, out_dir: Path, **options) -> Path:
    """Runs the export under a Rich status line that shows each step the exporter reports."""
    from rich.console import Console

    from edgecpm.export import export_checkpoint

    import warnings

    console = Console(stderr=True, log_path=False)
    with warnings.catch_warnings(record=True) as caught, console.status(f"exporting {source}") as status:
        warnings.simplefilter("always")

        def report(message: str) -> None:
            status.update(message)
            console.log(message)

        result = export_checkpoint(source, out_dir, progress=report, **options)
    for warning in caught:
        typer.echo(f"warning: {warning.message}", err=True)
    return result


@app.command()
def export(
    source: str = typer.Argument(..., help="An HF checkpoint directory, a GGUF file, or a model id in the local HF cache.",
                                 show_default=False),
    out: Path = typer.Option(..., "--out", "-o", help="The bundle directory to write.", show_default=False),
    device: str | None = DEVICE,
    flavour: str | None = typer.Option(None, "--flavour", help="ort: onnxruntime contrib ops; standard: standard ONNX ops only "
                                       "(the TensorRT input) [default: the device's, else ort]", show_default=False),
    dtype: str | None = typer.Option(None, "--dtype", help="Weight and activation precision: fp32 or fp16 [default: the "
                                     "device's, else fp32]", show_default=False),
    max_context: int | None = typer.Option(None, "--max-context", min=1, help="Longest sequence (prompt + answer) the bundle "
                                           "holds [default: the largest the device's memory plan fits, else 2048; at most the "
                                           "model's]", show_default=False),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
    download: bool = typer.Option(False, "--download", help="Fetch a model id that is not in the local cache."),
    quant: str = QUANT,
    method: str = METHOD,
    block_size: int = BLOCK_SIZE,
    asymmetric: bool = ASYMMETRIC,
    lm_head: str = LM_HEAD,
    embeddings: str = EMBEDDINGS,
    accuracy_level: int = ACCURACY_LEVEL,
    max_ppl_increase: float = MAX_PPL_INCREASE,
    quality_tokens: int | None = QUALITY_TOKENS,
    attention: str | None = ATTENTION,
    sparse_config: list[str] | None = SPARSE_CONFIG,
) -> None:
    """Export a checkpoint to a bundle for `edgecpm run` and `edgecpm chat`."""
    from edgecpm.errors import UnsupportedError
    from edgecpm.hf_cache import resolve_checkpoint
    from edgecpm.quant.spec import CLI_METHODS, QuantSpec

    if method not in CLI_METHODS:
        raise UnsupportedError(f"unknown method {method!r} (choose from {', '.join(CLI_METHODS)})", field="--method")
    spec = QuantSpec(scheme=quant, method=method, block_size=block_size, symmetric=not asymmetric, lm_head=lm_head,
                     embeddings=embeddings).validate(flavour)
    choice = attention_choice(attention, sparse_config)
    checkpoint = resolve_checkpoint(source, download=download)
    export_with_progress(checkpoint, out, device=device, flavour=flavour, dtype=dtype, max_context=max_context, overwrite=overwrite,
                         quant=spec, max_ppl_increase=max_ppl_increase, accuracy_level=accuracy_level, attention=choice,
                         **({} if quality_tokens is None else {"quality_tokens": quality_tokens}))
    typer.echo(f"wrote {out}")
