"""`edgecpm inspect PATH`: what a checkpoint or bundle holds."""

from __future__ import annotations

import json
from pathlib import Path

from edgecpm.cli import app
from edgecpm.cli.options import CHECKPOINT_OR_BUNDLE, JSON_OUTPUT, existing_path


def _human_bytes(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{count} B"
        count /= 1024
    return str(count)


def _format(value: object, key: str) -> str:
    if isinstance(value, dict):
        is_bytes = "bytes" in key
        return ", ".join(f"{k} {_human_bytes(v) if is_bytes else v}" for k, v in value.items())
    if isinstance(value, int) and not isinstance(value, bool) and key == "parameters":
        return f"{value:,}"
    if isinstance(value, int) and not isinstance(value, bool) and "bytes" in key:
        return _human_bytes(value)
    return str(value)


@app.command()
def inspect(path: Path = CHECKPOINT_OR_BUNDLE, json_output: bool = JSON_OUTPUT) -> None:
    """Show architecture, sizes, quantization, rope, context, tokenizer and memory estimates."""
    from edgecpm.bundle import MANIFEST_NAME
    from edgecpm.checkpoint import open_checkpoint
    from edgecpm.inspect import describe_bundle, describe_checkpoint

    path = existing_path(path)
    is_bundle = path.is_dir() and (path / MANIFEST_NAME).is_file()
    report = describe_bundle(path) if is_bundle else describe_checkpoint(open_checkpoint(path))
    if json_output:
        print(json.dumps(report, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=str(path), show_header=False)
    for key, value in report.items():
        table.add_row(key.replace("_", " "), _format(value, key))
    Console().print(table)
