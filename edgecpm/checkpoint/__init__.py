"""Checkpoint import: HF directories and GGUF files, read lazily one tensor at a time."""

from __future__ import annotations

from pathlib import Path

from edgecpm.checkpoint.base import Checkpoint, TensorRef, TokenizerFiles
from edgecpm.errors import CheckpointError

GGUF_MAGIC = b"GGUF"


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Opens an HF checkpoint directory or a GGUF file; nothing is executed from it, nothing loaded yet."""
    from edgecpm.checkpoint.gguf_file import open_gguf
    from edgecpm.checkpoint.hf import open_hf_directory

    path = Path(path)
    if path.is_dir():
        return open_hf_directory(path)
    if not path.exists():
        raise CheckpointError("no such file or directory", path=path)
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic == GGUF_MAGIC:
        return open_gguf(path)
    raise CheckpointError("not a checkpoint: expected an HF directory (config.json) or a GGUF file", path=path)


__all__ = ["Checkpoint", "TensorRef", "TokenizerFiles", "open_checkpoint"]
