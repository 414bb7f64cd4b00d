"""`edgecpm inspect PATH`: what a checkpoint or bundle holds."""

from __future__ import annotations

import json
from pathlib import Path

from edgecpm.cli import app
from edgecpm.cli.options import CHECKPOINT_OR_BUNDLE, DEVICE, JSON_OUTPUT, existing_path


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
def inspect(path: Path = CHECKPOINT_OR_BUNDLE, device: str | None = DEVICE, json_output: bool = JSON_OUTPUT) -> None:
    """Show architecture, sizes, quantization, rope, context, tokenizer and memory estimates (with --device: the
    memory plan on that device)."""
    from edgecpm.bundle import MANIFEST_NAME
    from edgecpm.checkpoint import open_checkpoint
    from edgecpm.inspect import describe_bundle, describe_checkpoint, describe_plan

    path = existing_path(path)
    is_bundle = path.is_dir() and (path / MANIFEST_NAME).is_file()
    if is_bundle:
        report = describe_bundle(path)
    else:
        checkpoint = open_checkpoint(path)
        report = describe_checkpoint(checkpoint)
        if device is not None:
            report["memory_plan"] = describe_plan(checkpoint, device)
    if json_output:
        print(json.dumps(report, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    plan = report.pop("memory_plan", None)
    table = Table(title=str(path), show_header=False)
    for key, value in report.items():
        table.add_row(key.replace("_", " "), _format(value, key))
    Console().print(table)
    if plan is not None:
        _print_plan(plan)


def _print_plan(plan: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    export = plan["export"]
    table = Table(title=f"memory plan on {plan['device']} (budget {_human_bytes(plan['budget_bytes'])}; runtime "
                        "allowances are estimates)")
    for column in ("storage", "weights", "largest context", "fits"):
        table.add_column(column)
    for storage, row in plan["alternatives"].items():
        table.add_row(storage, _human_bytes(row["weight_bytes"]), str(row["max_context"]), "yes" if row["fits"] else "no")
    console = Console()
    console.print(table)
    if "refused" in export:
        console.print(f"export --device {plan['device']}: refused: {export['refused']}")
    else:
        memory = export["memory"]
        console.print(f"export --device {plan['device']}: {memory['storage']}, {export['flavour']} graph, max context "
                      f"{export['max_context']}, {_human_bytes(memory['total_bytes'])} resident (estimate)")
