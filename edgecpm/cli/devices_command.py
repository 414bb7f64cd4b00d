"""`edgecpm devices`: the shipped device profiles (list, show) and which one fits this machine (detect)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import typer

from edgecpm.cli import app
from edgecpm.cli.options import JSON_OUTPUT

if TYPE_CHECKING:
    from edgecpm.devices.profile import DeviceProfile

devices_app = typer.Typer(help="Device profiles: list and show them, detect the one that fits this machine.",
                          no_args_is_help=False)
app.add_typer(devices_app, name="devices")

PROFILE = typer.Argument(..., help="A shipped profile name (see `edgecpm devices list`) or a path to a profile .toml.",
                         show_default=False)


def _gib(count: int) -> str:
    return f"{count / 2**30:.1f} GiB"


def _export_summary(profile: DeviceProfile) -> str:
    export = profile.export
    cap = f", ctx {export.max_context}" if export.max_context else ""
    return f"{export.flavour} {export.dtype} {export.weights}{cap}"


def _print_list(json_output: bool) -> None:
    from edgecpm.devices import list_profiles, load_profile

    profiles = [load_profile(name) for name in list_profiles()]
    if json_output:
        print(json.dumps([profile.to_dict() for profile in profiles], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="edgecpm device profiles")
    for column in ("name", "kind", "memory", "bandwidth", "SM", "budget", "default export"):
        table.add_column(column, justify="right" if column in ("memory", "bandwidth", "budget") else "left")
    for profile in profiles:
        hw = profile.hardware
        table.add_row(profile.name, profile.kind, _gib(hw.memory_bytes) + (" shared" if hw.unified_memory else ""),
                      f"{hw.memory_bandwidth_gbps:g} GB/s", hw.gpu.sm if hw.gpu else "-", _gib(profile.budget_bytes),
                      _export_summary(profile))
    Console().print(table)


@devices_app.callback(invoke_without_command=True)
def devices(ctx: typer.Context, json_output: bool = JSON_OUTPUT) -> None:
    """List the shipped device profiles (the same as `edgecpm devices list`)."""
    if ctx.invoked_subcommand is None:
        _print_list(json_output)


@devices_app.command("list")
def list_command(json_output: bool = JSON_OUTPUT) -> None:
    """List the shipped device profiles: memory, bandwidth, compute capability, budget, default export."""
    _print_list(json_output)


@devices_app.command()
def show(name_or_path: str = PROFILE, json_output: bool = JSON_OUTPUT) -> None:
    """Show one profile: hardware facts, memory budget, backends, export and TensorRT defaults."""
    from edgecpm.devices import load_profile

    profile = load_profile(name_or_path)
    report = profile.to_dict()
    if json_output:
        print(json.dumps(report, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{profile.name} {profile.version}", show_header=False)
    table.add_row("description", profile.description)
    for section in ("hardware", "memory", "runtime", "export", "tensorrt"):
        values = report[section]
        if values is None:
            table.add_row(section, "-")
            continue
        for key, value in values.items():
            table.add_row(f"{section}.{key}", _format(key, value))
    table.add_row("path", profile.path)
    table.add_row("sha256", profile.sha256)
    Console().print(table)


def _format(key: str, value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and key.endswith("_bytes"):
        return _gib(value)
    if isinstance(value, dict):
        return ", ".join(f"{k} {' '.join(v) if isinstance(v, list) else v}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(f"{v['name']} {v['watts']:g} W" if isinstance(v, dict) else str(v) for v in value) or "-"
    return "-" if value is None else str(value)


@devices_app.command("detect")
def detect_command(json_output: bool = JSON_OUTPUT) -> None:
    """Detect the profile that fits this machine, and say why."""
    from edgecpm.devices.detect import detect

    detection = detect()
    if json_output:
        print(json.dumps(detection.to_dict(), indent=2))
        return
    typer.echo(detection.profile)
    for reason in detection.reasons:
        typer.echo(f"  - {reason}")
