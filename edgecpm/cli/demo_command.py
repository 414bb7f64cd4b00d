"""`edgecpm demo`: the main job on the embedded default model (SmolLM2-135M-Instruct), end to end.

Exports the model to ./bundles/smollm2-135m once (a valid bundle there is reused), then answers one chat
question, streaming, and reports prefill and decode speeds.
"""

from __future__ import annotations

from pathlib import Path

import typer

from edgecpm.cli import app
from edgecpm.cli.options import KERNELS, THREADS

DEMO_BUNDLE = Path("bundles/smollm2-135m")
DEMO_QUESTION = "What is the capital of France?"
DEMO_MAX_CONTEXT = 2048


def ensure_demo_bundle(bundle: Path) -> Path:
    """Reuses a valid bundle; re-exports a broken one, but never overwrites a directory that is no bundle."""
    from edgecpm.bundle import MANIFEST_NAME, read_manifest
    from edgecpm.cli.export_command import export_with_progress
    from edgecpm.errors import BundleError, EdgecpmError
    from edgecpm.resources import default_model_path

    try:
        read_manifest(bundle)
        return bundle
    except BundleError:
        if bundle.exists() and not (bundle / MANIFEST_NAME).is_file():
            raise EdgecpmError("exists and is not an edgecpm bundle; move it away to run the demo", path=bundle) from None
    return export_with_progress(default_model_path(), bundle, flavour="ort", dtype="fp32", max_context=DEMO_MAX_CONTEXT,
                                overwrite=bundle.exists())


@app.command()
def demo(
    question: str = typer.Option(DEMO_QUESTION, "--question", help="The chat message to answer."),
    threads: int | None = THREADS,
    kernels: str | None = KERNELS,
) -> None:
    """Export the embedded SmolLM2-135M-Instruct (once) and answer a chat question, streaming."""
    from rich.console import Console

    from edgecpm.api import load
    from edgecpm.cli.streaming import print_stream, speed_line

    console = Console(stderr=True)
    engine = load(ensure_demo_bundle(DEMO_BUNDLE), threads=threads, kernels=kernels)
    with console.status("loading the model"):
        engine.backend  # noqa: B018  (starts the runtime session before timing starts)
    console.print(f"[bold]user:[/bold] {question}")
    console.print("[bold]assistant:[/bold] ", end="")
    result = print_stream(engine.chat_stream([{"role": "user", "content": question}], max_new_tokens=128))
    print(flush=True)
    console.print(speed_line(result), style="dim")
