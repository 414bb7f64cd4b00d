"""`edgecpm profile BUNDLE [BUNDLE...] -o REPORT_DIR`: speed, memory, energy, phases and the roofline, measured here."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from edgecpm.cli import app
from edgecpm.cli.options import DEVICE, KERNELS, THREADS, existing_path

BUNDLES = typer.Argument(..., metavar="BUNDLE", help="One or more edgecpm bundle directories; several are measured in alternating rounds.",
                         show_default=False)
PROMPT_LENGTHS = typer.Option("128,1024,4096", "--prompt-lengths", help="Prompt lengths in tokens, comma-separated "
                              "(lengths that do not fit a bundle's max context with --new-tokens are skipped and listed).")
NEW_TOKENS = typer.Option(128, "--new-tokens", min=1, help="Decode steps timed after each prompt's first token.")
RUNS = typer.Option(3, "--runs", min=1, help="Rounds: each runs every bundle once, in a fresh process.")
OUTPUT = typer.Option(..., "--output", "-o", help="Directory for report.json, report.md and report.html.", show_default=False)
COMPARE = typer.Option(False, "--compare", help="Require two or more bundles and print their ratios to the first "
                       "(taken within each round); the report holds them whenever several bundles are given.")
PROBE_GIB = typer.Option(1.0, "--bandwidth-probe-gib", min=0.01, help="Buffer size of the memory-bandwidth probe.")


@app.command()
def profile(
    bundles: list[Path] = BUNDLES,
    output: Path = OUTPUT,
    device: str | None = DEVICE,
    prompt_lengths: str = PROMPT_LENGTHS,
    new_tokens: int = NEW_TOKENS,
    runs: int = RUNS,
    compare: bool = COMPARE,
    threads: int | None = THREADS,
    kernels: str | None = KERNELS,
    bandwidth_probe_gib: float = PROBE_GIB,
) -> None:
    """Profile bundles on this machine: load time, TTFT and prefill speed per prompt length, decode speed and its
    per-token percentiles, peak memory and KV bytes, a decode step's phases, energy where the machine exposes it,
    and the memory roofline (with a projection for the --device profile, default: the detected one)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from edgecpm.report import ProfileSettings, parse_lengths, profile_bundles, summarize, write_report
    from edgecpm.report.runner import total_units

    for bundle in bundles:
        existing_path(bundle)
    settings = ProfileSettings(prompt_lengths=parse_lengths(prompt_lengths), new_tokens=new_tokens, runs=runs,
                               threads=threads, kernels=kernels, device=device, bandwidth_gib=bandwidth_probe_gib,
                               compare=compare, command=["edgecpm", "profile", *sys.argv[2:]]).validate()
    console = Console(stderr=True)
    if not console.is_terminal:  # a log or a pipe: whole tables rather than 80 columns of ellipses
        console.width = 160
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("starting", total=total_units(len(bundles), settings))
        report = profile_bundles(bundles, settings, progress=lambda text, n: bar.update(task, advance=n, description=text),
                                 on_stage=lambda text: bar.update(task, description=text))
        bar.update(task, description="done")
    summarize(report)
    paths = write_report(report, output)
    _print_summary(console, report, compare)
    console.print(f"wrote {', '.join(str(p) for p in paths.values())}")


def _print_summary(console, report: dict, compare: bool) -> None:
    from rich.table import Table

    from edgecpm.report.render import tables

    wanted = {"overview"} | ({"comparison"} if compare or report.get("comparison") else set())
    for spec in tables(report):
        if spec["id"] not in wanted:
            continue
        table = Table(title=spec["title"], caption=spec["note"], caption_justify="left")
        for i, header in enumerate(spec["header"]):
            table.add_column(header, justify="left" if i == 0 else "right")
        for row in spec["rows"]:
            table.add_row(*row)
        console.print(table)
