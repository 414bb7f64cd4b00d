"""`edgecpm demo`: the main job on the embedded default model (SmolLM2-135M-Instruct)."""

from __future__ import annotations

from edgecpm.cli import app


@app.command()
def demo() -> None:
    """Inspect the embedded default model (export and chat arrive with the ONNX runtime)."""
    from edgecpm.cli.inspect_command import inspect
    from edgecpm.resources import default_model_path

    inspect(default_model_path(), json_output=False)
