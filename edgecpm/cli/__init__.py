"""The `edgecpm` command: a thin Typer layer over the library. Heavy imports happen inside commands."""

from __future__ import annotations

import sys

import typer

from edgecpm import __version__

app = typer.Typer(
    name="edgecpm",
    help="MiniCPM checkpoints to fast text generation on edge devices.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"edgecpm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
) -> None:
    """Global options; `--debug` is read in `main` before any command runs."""


def main(argv: list[str] | None = None) -> None:
    """Console entry point: the one place that turns exceptions into one-line messages."""
    from edgecpm.cli import commands  # noqa: F401  (registers the commands)
    from edgecpm.errors import EdgecpmError

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        # Without standalone mode Typer returns an Exit's code instead of raising it; that includes the
        # 130 it substitutes for a KeyboardInterrupt, which would otherwise end the process with status 0.
        code = app(args=args, standalone_mode=False)
        if isinstance(code, int) and code:
            raise KeyboardInterrupt if code == 130 else SystemExit(code)
    except (typer.Exit, SystemExit) as exc:
        code = getattr(exc, "exit_code", getattr(exc, "code", 0))
        sys.exit(code or 0)
    except KeyboardInterrupt:
        print("edgecpm: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        if debug:
            raise
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            print("edgecpm: aborted", file=sys.stderr)
            sys.exit(130)
        message = str(exc) if isinstance(exc, EdgecpmError) else f"{exc.__class__.__name__}: {exc}"
        print(f"error: {message.splitlines()[0] if message else exc.__class__.__name__}", file=sys.stderr)
        sys.exit(1)
