"""Errors a user can act on. Each renders as one line naming the file and the field or tensor."""

from __future__ import annotations

from pathlib import Path


class EdgecpmError(Exception):
    """Base for every error the CLI turns into a one-line message (exit code 1)."""

    def __init__(self, message: str, *, path: str | Path | None = None, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.path = str(path) if path is not None else None
        self.field = field

    def __str__(self) -> str:
        where = ": ".join(part for part in (self.path, self.field) if part)
        return f"{where}: {self.message}" if where else self.message


class CheckpointError(EdgecpmError):
    """A checkpoint that cannot be read: bad config field, corrupt file, missing or unexpected tensor."""


class UnsupportedError(EdgecpmError):
    """Well-formed input that edgecpm does not handle (an architecture, quant type or option)."""


class BundleError(EdgecpmError):
    """A bundle that cannot be loaded or written."""


class GenerationError(EdgecpmError):
    """Invalid generation input: empty or too-long prompt, invalid sampling values."""


class QualityError(EdgecpmError):
    """A quantized export whose measured quality is worse than the limit the user set."""


class MissingDependencyError(EdgecpmError):
    """An optional package a step needs is not installed; the message names it and the extra that installs it."""
