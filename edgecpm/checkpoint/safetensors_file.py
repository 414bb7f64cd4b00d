"""Memory-mapped safetensors reading with strict header checks.

The `safetensors` package's numpy backend cannot represent bf16 (most MiniCPM releases), and its torch
backend would make export depend on torch; the format itself is an 8-byte length, a JSON header and raw
little-endian data, so a memory map over it is exact and reads one tensor at a time.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from edgecpm.checkpoint.base import TensorRef
from edgecpm.errors import CheckpointError

MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def read_safetensors(path: Path) -> dict[str, TensorRef]:
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CheckpointError("file is shorter than a safetensors header (truncated?)", path=path)
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(f"header length {header_len} exceeds the file size {size} (truncated or not safetensors)", path=path)
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"header is not valid JSON ({exc.__class__.__name__})", path=path) from None
    if not isinstance(header, dict):
        raise CheckpointError("header is not a JSON object", path=path)
    data_start = 8 + header_len
    memmap: list[np.memmap] = []

    def buffer() -> np.memmap:
        if not memmap:
            memmap.append(np.memmap(path, dtype=np.uint8, mode="r"))
        return memmap[0]

    refs = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        refs[name] = _tensor_ref(path, name, info, data_start, size, buffer)
    return refs


def _tensor_ref(path: Path, name: str, info: object, data_start: int, size: int, buffer) -> TensorRef:
    if not isinstance(info, dict):
        raise CheckpointError("header entry is not an object", path=path, field=name)
    dtype_name = info.get("dtype")
    if dtype_name not in DTYPES:
        raise CheckpointError(f"unsupported dtype {dtype_name!r:.20}", path=path, field=name)
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise CheckpointError(f"invalid shape {shape!r:.60}", path=path, field=name)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise CheckpointError(f"invalid data_offsets {offsets!r:.60}", path=path, field=name)
    dtype = DTYPES[dtype_name]
    begin, end = offsets
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if end - begin != expected or begin < 0:
        raise CheckpointError(f"data_offsets span {end - begin} bytes, shape {shape} of {dtype_name} needs {expected}", path=path, field=name)
    if data_start + end > size:
        raise CheckpointError(f"data ends at byte {data_start + end} but the file has {size} bytes (truncated)", path=path, field=name)

    def read() -> np.ndarray:
        raw = buffer()[data_start + begin : data_start + end].view(dtype).reshape(shape)
        return bf16_to_f32(raw) if dtype_name == "BF16" else raw

    return TensorRef(name, tuple(shape), dtype_name, path, read)
