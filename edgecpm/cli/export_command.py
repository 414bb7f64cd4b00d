"""`edgecpm export SOURCE -o OUT`: a checkpoint (HF directory, GGUF file or cached model id) to a bundle."""

from __future__ import annotations

from pathlib import Path

import typer

from edgecpm.cli import app


def export_with_progress(source: str | Path, out_dir: Path, **options) -> Path:
    """Runs the export under a Rich status line that shows each step the exporter reports."""
    from rich.console import Console

    from edgecpm.export import export_checkpoint

    console = Console(stderr=True, log_path=False)
    with console.status(f"exporting {source}") as status:
        def report(message: str) -> None:
            status.update(message)
            console.log(message)

        return export_checkpoint(source, out_dir, progress=report, **options)


@app.command()
def export(
    source: str = typer.Argument(..., help="An HF checkpoint directory, a GGUF file, or a model id in the local HF cache.",
                                 show_default=False),
    out: Path = typer.Option(..., "--out", "-o", help="The bundle directory to write.", show_default=False),
    flavour: str = typer.Option("ort", "--flavour", help="ort: onnxruntime contrib ops; standard: standard ONNX ops only."),
    dtype: str = typer.Option("fp32", "--dtype", help="Weight and activation precision: fp32 or fp16."),
    max_context: int = typer.Option(2048, "--max-context", min=1, help="Longest sequence (prompt + answer) the bundle holds."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
    download: bool = typer.Option(False, "--download", help="Fetch a model id that is not in the local cache."),
) -> None:
    """Export a checkpoint to a bundle for `edgecpm run` and `edgecpm chat`."""
    from edgecpm.hf_cache import resolve_checkpoint

    checkpoint = resolve_checkpoint(source, download=download)
    export_with_progress(checkpoint, out, flavour=flavour, dtype=dtype, max_context=max_context, overwrite=overwrite)
    typer.echo(f"wrote {out}")
