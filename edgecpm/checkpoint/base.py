"""The lazy checkpoint: a typed config, tensors that load one at a time, and the tokenizer files."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgecpm.arch.base import Architecture, DecoderConfig
from edgecpm.errors import CheckpointError

# Buffers some exporters saved next to the weights; they carry no information the config lacks.
IGNORED_TENSOR = re.compile(r".*rotary_emb\.(inv_freq|cos_cached|sin_cached)$")


@dataclass(frozen=True)
class TensorRef:
    """A tensor not yet read: its name, shape and stored dtype, and how to read it as numpy."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    file: Path
    read: Callable[[], np.ndarray] = field(repr=False, compare=False)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def numpy(self, dtype: Any = np.float32) -> np.ndarray:
        array = self.read()
        if tuple(array.shape) != self.shape:
            raise CheckpointError(f"read shape {tuple(array.shape)}, header says {self.shape}", path=self.file, field=self.name)
        return array.astype(dtype, copy=False)

    def renamed(self, name: str, transform: Callable[[np.ndarray], np.ndarray] | None = None) -> TensorRef:
        read = self.read if transform is None else (lambda: transform(self.read()))
        return TensorRef(name, self.shape, self.dtype, self.file, read)


@dataclass(frozen=True)
class TokenizerFiles:
    """Everything needed to tokenize and render chats, as plain data that a bundle can store."""

    tokenizer_json: str
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    add_bos_token: bool = False
    add_eos_token: bool = False
    source: str = ""


@dataclass
class Checkpoint:
    path: Path
    format: str
    architecture: Architecture
    config: DecoderConfig
    tensors: dict[str, TensorRef]
    files: list[Path]
    load_tokenizer: Callable[[], TokenizerFiles | None] = field(repr=False)
    has_tokenizer: bool = False
    has_chat_template: bool = False
    generation: dict[str, Any] = field(default_factory=dict)
    quantization: dict[str, Any] | None = None
    # Weight name -> loader of already-quantized codes (GPTQ), exported as they are, never re-quantized.
    prequantized: dict[str, Callable[[], Any]] = field(default_factory=dict)

    @functools.cached_property
    def tokenizer(self) -> TokenizerFiles | None:
        """Built on first use: converting a GGUF vocabulary needs transformers, inspecting does not."""
        return self.load_tokenizer()

    def __iter__(self) -> Iterator[tuple[str, TensorRef]]:
        return iter(self.tensors.items())

    def stored_dtypes(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for ref in self.tensors.values():
            counts[ref.dtype] = counts.get(ref.dtype, 0) + 1
        return counts

    def parameter_count(self) -> int:
        return sum(ref.numel for ref in self.tensors.values())


def select_tensors(
    architecture: Architecture, config: DecoderConfig, found: Mapping[str, TensorRef], source: Path
) -> dict[str, TensorRef]:
    """The strict check between what the config implies and what the files hold.

    Returns the expected tensors in canonical order; a missing tensor, an unexpected extra tensor or a
    shape mismatch is an error naming that tensor and its file.
    """
    expected = architecture.tensor_shapes(config)
    extra = [name for name in found if name not in expected and not IGNORED_TENSOR.match(name)]
    if extra:
        ref = found[extra[0]]
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise CheckpointError(f"unexpected tensor for architecture {architecture.name}{more}", path=ref.file, field=extra[0])
    selected = {}
    for name, shape in expected.items():
        ref = found.get(name)
        if ref is None:
            raise CheckpointError("missing tensor", path=source, field=name)
        if ref.shape != shape:
            raise CheckpointError(f"shape {list(ref.shape)} does not match the config, expected {list(shape)}", path=ref.file, field=name)
        selected[name] = ref
    return selected
