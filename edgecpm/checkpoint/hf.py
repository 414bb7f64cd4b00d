"""Hugging Face checkpoint directories: config.json + safetensors (single or sharded) or pytorch .bin."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from edgecpm.arch.base import get_architecture
from edgecpm.arch.fields import ConfigFields
from edgecpm.checkpoint.base import Checkpoint, TensorRef, select_tensors
from edgecpm.checkpoint.gptq import GPTQConfig, split_gptq_tensors
from edgecpm.checkpoint.safetensors_file import read_safetensors
from edgecpm.checkpoint.tokenizer import has_chat_template, read_hf_tokenizer
from edgecpm.errors import CheckpointError, UnsupportedError

MAX_JSON_BYTES = 64 * 1024 * 1024


def read_json(path: Path) -> Any:
    if path.stat().st_size > MAX_JSON_BYTES:
        raise CheckpointError(f"file is larger than {MAX_JSON_BYTES >> 20} MiB", path=path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise CheckpointError("file is not UTF-8 text", path=path) from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}", path=path) from None


def open_hf_directory(directory: Path) -> Checkpoint:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError("not a checkpoint directory: config.json is missing", path=directory)
    fields = ConfigFields(read_json(config_path), config_path)
    model_type = fields.str("model_type")
    architecture = get_architecture(model_type, source=config_path)
    tensors, files = _read_weights(directory)
    gptq = _gptq_config(directory, fields)
    prequantized = {}
    if gptq is not None:
        tensors, prequantized = split_gptq_tensors(tensors, gptq, directory)
    config = architecture.parse_config(fields, frozenset(tensors))
    selected = select_tensors(architecture, config, tensors, directory)
    generation_path = directory / "generation_config.json"
    generation = read_json(generation_path) if generation_path.is_file() else {}
    return Checkpoint(
        path=directory,
        format="hf",
        architecture=architecture,
        config=config,
        tensors=selected,
        files=[config_path, *files],
        load_tokenizer=lambda: read_hf_tokenizer(directory),
        has_tokenizer=any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer.model")),
        has_chat_template=has_chat_template(directory),
        generation=generation if isinstance(generation, dict) else {},
        quantization=gptq.to_dict() if gptq else None,
        prequantized=prequantized,
    )


def _gptq_config(directory: Path, fields: ConfigFields) -> GPTQConfig | None:
    """`quantization_config` in config.json, or AutoGPTQ's separate quantize_config.json."""
    block = fields.sub("quantization_config")
    if block is None and (directory / "quantize_config.json").is_file():
        block = ConfigFields(read_json(directory / "quantize_config.json"), directory / "quantize_config.json")
        block.raw.setdefault("quant_method", "gptq")
    if block is None:
        return None
    method = block.str("quant_method")
    if method != "gptq":
        raise UnsupportedError(f"pre-quantized {method!r:.20} checkpoints are not supported (GPTQ is)", path=block.source, field="quant_method")
    return GPTQConfig.from_config(block)


def _read_weights(directory: Path) -> tuple[dict[str, TensorRef], list[Path]]:
    for index_name, reader in (("model.safetensors.index.json", read_safetensors), ("pytorch_model.bin.index.json", _read_torch_bin)):
        index_path = directory / index_name
        if index_path.is_file():
            return _read_sharded(index_path, reader)
    for single_name, reader in (("model.safetensors", read_safetensors), ("pytorch_model.bin", _read_torch_bin)):
        path = directory / single_name
        if path.is_file():
            return reader(path), [path]
    raise CheckpointError("no weights found (model.safetensors, a sharded index or pytorch_model.bin)", path=directory)


def _read_sharded(index_path: Path, reader) -> tuple[dict[str, TensorRef], list[Path]]:
    index = read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError("weight_map is missing or not an object", path=index_path, field="weight_map")
    tensors: dict[str, TensorRef] = {}
    shards = []
    for shard_name in sorted(set(weight_map.values())):
        shard = (index_path.parent / str(shard_name)).resolve()
        if shard.parent != index_path.parent.resolve():
            raise CheckpointError(f"shard {shard_name!r:.80} is outside the checkpoint directory", path=index_path, field="weight_map")
        if not shard.is_file():
            raise CheckpointError(f"shard {shard_name!r:.80} is missing", path=index_path, field="weight_map")
        shards.append(shard)
        tensors |= reader(shard)
    for name, shard_name in weight_map.items():
        if name not in tensors:
            raise CheckpointError(f"index lists it in {shard_name} but the shard does not contain it", path=index_path, field=name)
    return tensors, [index_path, *shards]


def _read_torch_bin(path: Path) -> dict[str, TensorRef]:
    """Legacy pickled weights: only through torch's weights_only unpickler, memory-mapped."""
    from edgecpm.optional import require

    torch = require("torch", "reference", "reading pytorch_model.bin weights")

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # the unpickler raises many types for hostile or corrupt files
        raise CheckpointError(f"cannot load with weights_only=True: {_torch_load_reason(exc)}", path=path) from None
    if not isinstance(state, dict):
        raise CheckpointError("file does not hold a state dict", path=path)
    refs = {}
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError("entry is not a tensor", path=path, field=str(name))
        dtype = str(tensor.dtype).removeprefix("torch.")
        refs[name] = TensorRef(name, tuple(tensor.shape), dtype, path, lambda t=tensor: t.float().numpy())
    return refs


def _torch_load_reason(exc: Exception) -> str:
    """The informative part of torch.load's error, without its advice to disable weights_only or its ANSI codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    refused = re.search(r"WeightsUnpickler error: (.*?)(?: Please use|\n|$)", text)
    if refused:
        return f"the file holds something other than tensors ({refused.group(1).strip()[:160]})"
    first = next((line.strip() for line in text.splitlines() if line.strip()), exc.__class__.__name__)
    return first[:200]
