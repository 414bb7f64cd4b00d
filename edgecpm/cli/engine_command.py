"""`edgecpm engine build BUNDLE`: a TensorRT engine from the bundle's standard graph, built on the target GPU."""

from __future__ import annotations

import threading
from pathlib import Path

import typer

from edgecpm.cli import app
from edgecpm.cli.options import BUNDLE, existing_path

engine_app = typer.Typer(name="engine", help="TensorRT engines for a bundle, built and pinned on the target GPU.",
                         no_args_is_help=True)
app.add_typer(engine_app, name="engine")


class RichBuildMonitor:
    """TensorRT's build phases as Rich progress bars (called from TensorRT's threads)."""

    def __init__(self, progress):
        self.progress = progress
        self.tasks: dict[str, int] = {}
        self.depth: dict[str, int] = {}
        self.lock = threading.Lock()

    def phase_start(self, phase: str, parent: str | None, steps: int) -> None:
        with self.lock:
            depth = self.depth.get(parent, -1) + 1 if parent else 0
            self.depth[phase] = depth
            self.tasks[phase] = self.progress.add_task("  " * depth + phase, total=max(int(steps), 1))

    def step_complete(self, phase: str, step: int) -> bool:
        with self.lock:
            task = self.tasks.get(phase)
        if task is not None:
            self.progress.update(task, completed=int(step) + 1)
        return True

    def phase_finish(self, phase: str) -> None:
        with self.lock:
            task = self.tasks.pop(phase, None)
            self.depth.pop(phase, None)
        if task is not None:
            self.progress.remove_task(task)


@engine_app.command("build")
def build(
    bundle: Path = BUNDLE,
    device: str | None = typer.Option(None, "--device", help="Device profile name (`edgecpm devices`) or .toml file; "
                                      "default: the profile the bundle was exported for, else this GPU with TensorRT's "
                                      "defaults.", show_default=False),
    max_context: int | None = typer.Option(None, "--max-context", help="Longest sequence the engine holds (default: "
                                           "the bundle's).", show_default=False),
    prefill_max: int | None = typer.Option(None, "--prefill-max", help="Most prompt tokens per prefill step (default: "
                                           "512, at most --max-context); longer prompts run in chunks.",
                                           show_default=False),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the bundle's engine for this device."),
    sparse_plugin: Path | None = typer.Option(None, "--sparse-plugin", help="InfLLM v2 plugin library "
                                              "(libedgecpm_infllmv2.so, built from runtimes/tensorrt/plugins/infllmv2) "
                                              "to run a sparse graph's attention instead of its standard-op lowering.",
                                              show_default=False),
) -> None:
    """Build a TensorRT engine from the bundle's standard graph, pinned to this GPU, TensorRT and L4T release."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from edgecpm.exporters.tensorrt.build import plan_build, run_build
    from edgecpm.exporters.tensorrt.plugins import SparsePlugin

    # Every check (bundle, profile, TensorRT, GPU, an existing engine) happens here, before any output or file.
    plan = plan_build(existing_path(bundle), device=device, max_context=max_context, prefill_max=prefill_max,
                      overwrite=overwrite, sparse_plugin=None if sparse_plugin is None else SparsePlugin(sparse_plugin))
    console = Console(stderr=True)
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        overall = progress.add_task(f"engine for {plan.device}", total=None)

        def say(message: str) -> None:
            style = "yellow" if message.startswith("warning:") else "dim"
            progress.console.print(message, style=style, markup=False, highlight=False, soft_wrap=True)

        record = run_build(plan, monitor=RichBuildMonitor(progress), say=say)
        progress.remove_task(overall)
    typer.echo(f"wrote {Path(bundle) / record.file} (device {record.device}, {record.gpu_name}, SM {record.sm}, "
               f"TensorRT {record.tensorrt_version}{', L4T ' + record.l4t_release if record.l4t_release else ''})")
