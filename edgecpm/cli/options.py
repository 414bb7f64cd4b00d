"""Option definitions shared by several commands, declared once."""

from __future__ import annotations

from pathlib import Path

import typer

JSON_OUTPUT = typer.Option(False, "--json", help="Print one JSON object instead of a table.")
CHECKPOINT_OR_BUNDLE = typer.Argument(..., help="An HF checkpoint directory, a GGUF file, or an edgecpm bundle.", show_default=False)


def existing_path(path: Path) -> Path:
    from edgecpm.errors import EdgecpmError

    if not path.exists():
        raise EdgecpmError("no such file or directory", path=path)
    return path
