"""GGUF files (llama.cpp): metadata -> HF config, tensor names -> HF names, q/k un-permutation, dequant."""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgecpm.arch.base import get_architecture
from edgecpm.arch.fields import ConfigFields
from edgecpm.checkpoint.base import Checkpoint, TensorRef, TokenizerFiles, select_tensors
from edgecpm.checkpoint.tokenizer import pick_chat_template
from edgecpm.errors import CheckpointError, UnsupportedError
from edgecpm.optional import require

GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",
    "attn_q_a": "self_attn.q_a_proj",
    "attn_q_a_norm": "self_attn.q_a_layernorm",
    "attn_q_b": "self_attn.q_b_proj",
    "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa",
    "attn_kv_a_norm": "self_attn.kv_a_layernorm",
    "attn_kv_b": "self_attn.kv_b_proj",
}
EXPERT_NAMES = {"ffn_gate_exps": "w1", "ffn_up_exps": "w3", "ffn_down_exps": "w2"}
ROPE_FACTOR_TENSORS = {"rope_factors_long.weight": "rope_factors_long", "rope_factors_short.weight": "rope_factors_short"}
LAYER_TENSOR = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.weight$")
# A bound on metadata arrays (a vocabulary has ~50k-250k entries); larger counts mean a damaged file.
MAX_METADATA_ITEMS = 4_000_000
# Stored as plain numbers; the GGUF reader already returns them as typed arrays.
PLAIN_TYPE_NAMES = ("F32", "F16", "F64")


def _plain_types() -> tuple:
    import gguf

    return tuple(gguf.GGMLQuantizationType[name] for name in PLAIN_TYPE_NAMES)


class _TruncatedTensor(Exception):
    def __init__(self, name: str, end: int, size: int):
        super().__init__(name)
        self.name, self.end, self.size = name, end, size


@functools.cache
def _reader_class():
    """gguf-py's GGUFReader with two changes, both through its (internal) per-part hooks.

    - Metadata arrays of fixed-size values become one view, and string arrays are walked with `struct`
      instead of two numpy views per string: the stock reader takes ~3 s on a 49k-token vocabulary.
      Byte-swapped files and nested arrays keep the stock path.
    - Tensor data that runs past the end of the file is reported by tensor name before the stock code
      fails on a reshape.
    """
    import struct

    gguf = require("gguf", "export", "reading GGUF files")
    from gguf import GGUFValueType

    class Reader(gguf.GGUFReader):
        def _get_field_parts(self, orig_offs: int, raw_type: int):
            if raw_type != GGUFValueType.ARRAY or self.byte_order != "I":
                return super()._get_field_parts(orig_offs, raw_type)
            raw_itype = self._get(orig_offs, np.uint32)
            alen = self._get(orig_offs + 4, np.uint64)
            item_type, count, offs = GGUFValueType(int(raw_itype[0])), int(alen[0]), orig_offs + 12
            if count > MAX_METADATA_ITEMS:
                raise ValueError(f"metadata array has {count} items (limit {MAX_METADATA_ITEMS})")
            if item_type in self.gguf_scalar_to_np:
                values = self._get(offs, self.gguf_scalar_to_np[item_type], count)
                if len(values) != count:
                    raise ValueError("metadata array runs past the end of the file")
                return 12 + int(values.nbytes), [raw_itype, alen, values], [2], [GGUFValueType.ARRAY, item_type]
            if item_type != GGUFValueType.STRING:
                return super()._get_field_parts(orig_offs, raw_type)
            buffer = memoryview(self.data)
            parts: list[Any] = [raw_itype, alen]
            for _ in range(count):
                (length,) = struct.unpack_from("<Q", buffer, offs)
                if offs + 8 + length > len(buffer):
                    raise ValueError("metadata string runs past the end of the file")
                parts.append(buffer[offs + 8 : offs + 8 + length])  # .tobytes() is all contents() needs
                offs += 8 + length
            return offs - orig_offs, parts, list(range(2, len(parts))), [GGUFValueType.ARRAY, GGUFValueType.STRING]

        def _build_tensors(self, start_offs: int, fields: list) -> None:
            for field in fields:
                _, name, _, dims, raw_dtype, offset = field.parts
                qtype = gguf.GGMLQuantizationType(int(raw_dtype[0]))
                block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
                end = start_offs + int(offset[0]) + int(np.prod(dims, dtype=np.int64)) // block_size * type_size
                if end > len(self.data):
                    raise _TruncatedTensor(bytes(name).decode("utf-8", "replace"), end, len(self.data))
            super()._build_tensors(start_offs, fields)

    return Reader


def open_gguf(path: Path) -> Checkpoint:
    reader_class = _reader_class()  # outside the try: a missing gguf package is not a damaged file
    try:
        reader = reader_class(path)
    except _TruncatedTensor as exc:
        raise CheckpointError(f"tensor data ends at byte {exc.end} but the file has {exc.size} bytes (truncated)", path=path,
                              field=exc.name) from None
    except Exception as exc:  # the reader raises ValueError/IndexError/KeyError/struct errors on damaged files
        raise CheckpointError(f"not a readable GGUF file, damaged or truncated ({exc.__class__.__name__}: {str(exc)[:120]})",
                              path=path) from None
    meta = _metadata(reader, path)
    arch_name = meta.get("general.architecture")
    if not isinstance(arch_name, str):
        raise CheckpointError("required metadata key is missing", path=path, field="general.architecture")
    architecture = get_architecture(arch_name, source=path, field_name="general.architecture")

    raw_tensors: dict[str, Any] = {}
    for tensor in reader.tensors:
        raw_tensors[tensor.name] = tensor
    for gguf_name, meta_key in ROPE_FACTOR_TENSORS.items():
        if gguf_name in raw_tensors:
            meta[meta_key] = [float(v) for v in _dequantize(raw_tensors.pop(gguf_name), path)]
    if "rope_freqs.weight" in raw_tensors:
        raise UnsupportedError("per-frequency rope_freqs (Llama 3 RoPE in GGUF) is not supported", path=path, field="rope_freqs.weight")

    fields = ConfigFields(architecture.gguf_config(meta), f"{path} (metadata)")
    config = architecture.parse_config(fields, frozenset(_hf_name(name, path) for name in raw_tensors))
    found: dict[str, TensorRef] = {}
    _check_dequantizable(raw_tensors.values(), path)
    source: dict[str, GGUFBlocks] = {}
    for name, tensor in raw_tensors.items():
        found |= _tensor_refs(name, tensor, path, config, architecture.gguf_permutes_qk, source)
    tensors = select_tensors(architecture, config, found, path)
    return Checkpoint(
        path=path,
        format="gguf",
        architecture=architecture,
        config=config,
        tensors=tensors,
        files=[path],
        load_tokenizer=lambda: _tokenizer(path, meta),
        has_tokenizer="tokenizer.ggml.tokens" in meta,
        has_chat_template="tokenizer.chat_template" in meta,
        quantization={"gguf_file_type": meta.get("general.file_type")},
        # The file's own Q4_0/Q4_1/Q8_0 blocks: `--quant int4` exports them as stored (edgecpm.quant.plan).
        prequantized={name: blocks for name, blocks in source.items() if name in tensors},
    )


def _metadata(reader: Any, path: Path) -> dict[str, Any]:
    meta = {}
    for key, field in reader.fields.items():
        try:
            meta[key] = field.contents()
        except Exception:
            raise CheckpointError("metadata value cannot be decoded", path=path, field=key) from None
    return meta


def _hf_name(name: str, path: Path) -> str:
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    match = LAYER_TENSOR.match(name)
    if match and match.group(2) in LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{LAYER_NAMES[match.group(2)]}.weight"
    if match and match.group(2) in EXPERT_NAMES:
        return name
    raise CheckpointError("unexpected tensor (no HF equivalent known)", path=path, field=name)


def _check_dequantizable(tensors: Any, path: Path) -> None:
    """Refuses at open time, naming a tensor, any storage type gguf-py cannot turn back into floats."""
    import gguf

    checked = set(_plain_types())
    for tensor in tensors:
        qtype = tensor.tensor_type
        if qtype in checked:
            continue
        _, type_size = gguf.GGML_QUANT_SIZES[qtype]
        try:
            gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)  # one zero block
        except NotImplementedError:
            raise UnsupportedError(f"GGUF tensor type {qtype.name} cannot be dequantized", path=path, field=tensor.name) from None
        checked.add(qtype)


def _dequantize(tensor: Any, path: Path) -> np.ndarray:
    import gguf

    shape = tuple(int(d) for d in reversed(tensor.shape))
    try:
        if tensor.tensor_type.name in PLAIN_TYPE_NAMES:
            array = np.asarray(tensor.data)
        else:
            array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise UnsupportedError(f"GGUF type {tensor.tensor_type.name} cannot be dequantized", path=path, field=tensor.name) from None
    except Exception as exc:
        raise CheckpointError(f"tensor data is damaged ({exc.__class__.__name__})", path=path, field=tensor.name) from None
    return array.reshape(shape)


def _unpermute(array: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k row permutation (HF rotate-half -> interleaved pairs), spec §5.1."""
    rows = array.shape[0]
    return array.reshape(heads, rows // heads // 2, 2, *array.shape[1:]).swapaxes(1, 2).reshape(array.shape)


# GGUF block types that are MatMulNBits blocks as stored (block 32 along the input dimension):
# Q4_0 w = d*(q-8); Q4_1 w = d*q + m = (q - (-m/d))*d (a float zero point); Q8_0 w = d*q = ((q+128) - 128)*d.
SOURCE_BLOCK = 32
SOURCE_TYPES = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}


@dataclass(frozen=True)
class GGUFBlocks:
    """Loader of one GGUF tensor's own blocks as BlockQuantized codes (Checkpoint.prequantized), never re-quantized.

    `label` ("gguf-q4_1") is what the manifest records; `bits` and `float_zero_points` let the quantizer
    decide without reading the data whether a flavour and a tensor's role can hold these blocks.
    """

    tensor: Any = field(repr=False)
    path: Path
    heads: int | None  # llama.cpp q/k row permutation to undo, as `_unpermute` does on the float view

    @property
    def qtype(self) -> str:
        return self.tensor.tensor_type.name

    @property
    def label(self) -> str:
        return f"gguf-{self.qtype.lower()}"

    @property
    def bits(self) -> int:
        return SOURCE_TYPES[self.qtype]

    @property
    def float_zero_points(self) -> bool:
        return self.qtype == "Q4_1"

    def __call__(self) -> Any:
        from edgecpm.quant.gptq import GPTQLinear

        quantized = decode_blocks(self.tensor, self.path)
        if self.heads is not None:
            quantized = replace(quantized, codes=_unpermute(quantized.codes, self.heads),
                                scales=_unpermute(quantized.scales, self.heads),
                                zero_points=_unpermute(quantized.zero_points, self.heads))
        return GPTQLinear(quantized, None)


def decode_blocks(tensor: Any, path: Path) -> Any:
    """A Q4_0 / Q4_1 / Q8_0 tensor's blocks (gguf-py quants.py layouts) as MatMulNBits codes, scales, zero points."""
    from edgecpm.quant.formats import BlockQuantized, default_zero_point

    qtype = tensor.tensor_type.name
    rows, cols = (int(d) for d in reversed(tensor.shape))
    try:
        blocks = np.asarray(tensor.data, dtype=np.uint8).reshape(rows, cols // SOURCE_BLOCK, -1)
    except ValueError:
        raise CheckpointError(f"{qtype} tensor data does not hold {rows}x{cols} weights", path=path, field=tensor.name) from None
    scales = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0].astype(np.float32)
    if qtype == "Q8_0":
        codes = (np.ascontiguousarray(blocks[..., 2:]).view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        zeros = np.full(scales.shape, default_zero_point(8), dtype=np.uint8)
    else:
        packed = blocks[..., 4:] if qtype == "Q4_1" else blocks[..., 2:]
        codes = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).astype(np.uint8)  # low nibbles: elements 0..15
        if qtype == "Q4_0":
            zeros = np.full(scales.shape, default_zero_point(4), dtype=np.uint8)
        else:
            minimum = np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0].astype(np.float32)
            empty = scales == 0  # w = m for the whole block: one code over zero point 0 at scale m
            safe = np.where(empty, 1, scales)
            zeros = np.where(empty, 0, -minimum / safe).astype(np.float32)
            codes = np.where(empty[..., None], np.uint8(1), codes).astype(np.uint8)
            scales = np.where(empty, minimum, scales).astype(np.float32)
    return BlockQuantized(codes.reshape(rows, cols), scales, zeros, SOURCE_TYPES[qtype], SOURCE_BLOCK, cols)


def _source_blocks(tensor: Any, path: Path, heads: int | None) -> GGUFBlocks | None:
    shape = tuple(int(d) for d in reversed(tensor.shape))
    if tensor.tensor_type.name not in SOURCE_TYPES or len(shape) != 2 or shape[1] % SOURCE_BLOCK:
        return None
    return GGUFBlocks(tensor, path, heads)


def _tensor_refs(name: str, tensor: Any, path: Path, config: Any, permuted: bool,
                 source: dict[str, GGUFBlocks]) -> dict[str, TensorRef]:
    """The float views of one GGUF tensor; Q4_0/Q4_1/Q8_0 weights also add their blocks to `source`."""
    shape = tuple(int(d) for d in reversed(tensor.shape))
    dtype = tensor.tensor_type.name
    base = TensorRef(name, shape, dtype, path, lambda: _dequantize(tensor, path))
    match = LAYER_TENSOR.match(name)
    if match and match.group(2) in EXPERT_NAMES:
        layer, kind = match.group(1), EXPERT_NAMES[match.group(2)]
        return {
            f"model.layers.{layer}.mlp.experts.{e}.{kind}.weight": TensorRef(
                name, shape[1:], dtype, path, lambda e=e: _dequantize(tensor, path)[e]
            )
            for e in range(shape[0])
        }
    hf_name = _hf_name(name, path)
    transform = heads = None
    if permuted and hf_name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
        heads = config.num_attention_heads if hf_name.endswith("q_proj.weight") else config.num_key_value_heads
        transform = lambda array, heads=heads: _unpermute(array, heads)  # noqa: E731
    blocks = _source_blocks(tensor, path, heads)
    if blocks is not None:
        source[hf_name] = blocks
    return {hf_name: base.renamed(hf_name, transform)}


def _tokenizer_fields(meta: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """transformers' GGUF tokenizer inputs, taken from the metadata this module already read.

    (transformers' own `get_gguf_tokenizer` re-reads the file with a reader that imports torch; export
    must work without torch.)
    """
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING

    grouped = {
        group: {name: meta[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in meta}
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tokenizer_dict, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
    if tokenizer_dict.get("tokenizer_type") == "llama":
        # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise (spec §8).
        tokenizer_config.setdefault("add_bos_token", True)
    if tokenizer_dict.get("tokenizer_type") == "gpt2":
        # gguf-py writes no key for an empty merge list; a byte-level vocabulary has no scores to derive one from.
        tokenizer_dict.setdefault("merges", [])
    tokens = tokenizer_dict.get("tokens", [])
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id")):
        token_id = meta.get(f"tokenizer.ggml.{key}")
        tokenizer_config[name] = tokens[token_id] if isinstance(token_id, int) and 0 <= token_id < len(tokens) else None
    return tokenizer_dict, tokenizer_config


def _tokenizer(path: Path, meta: dict[str, Any]) -> TokenizerFiles | None:
    if "tokenizer.ggml.tokens" not in meta:
        return None
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # its "PyTorch was not found" notice is noise here
    require("transformers", "export", "converting a GGUF vocabulary to tokenizer.json")
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    try:
        tokenizer_dict, tokenizer_config = _tokenizer_fields(meta)
        tokenizer, _ = convert_gguf_tokenizer(meta["general.architecture"], tokenizer_dict)
    except Exception as exc:
        raise CheckpointError(f"cannot build a tokenizer from the metadata: {str(exc)[:160]}", path=path, field="tokenizer.ggml.model") from None
    return TokenizerFiles(
        tokenizer_json=tokenizer.to_str(),
        chat_template=pick_chat_template(meta.get("tokenizer.chat_template"), path),
        bos_token=tokenizer_config.get("bos_token"),
        eos_token=tokenizer_config.get("eos_token"),
        add_bos_token=bool(tokenizer_config.get("add_bos_token", False)),
        add_eos_token=bool(tokenizer_config.get("add_eos_token", False)),
        source=str(path),
    )
