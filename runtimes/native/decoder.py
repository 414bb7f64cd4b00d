"""The native decode step and prefill over an exported `ort` bundle: weights mapped from model.onnx.data.

`native_decoder` checks that the bundle is one the kernels implement exactly (a pre-norm GQA decoder,
fp32 activations, and for quantized linears the int8-activation compute that the bundle records as
MatMulNBits' accuracy level 4, or with exact activations everywhere also level 0's) and raises KernelsUnavailable
with the reason otherwise; the backend then runs the bundle with onnxruntime. Float weights are read in place;
quantized ones from a copy interleaved for the vectorised kernels, after which the map's pages are dropped. Weights
are found through the manifest's tensor index (written by the exporter), never by parsing the graph.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from edgecpm.arch.base import SparseAttentionConfig
from edgecpm.bundle import Manifest
from edgecpm.errors import GenerationError
from edgecpm.quant.formats import unpack_low_first
from edgecpm.runtimes.kv import KV_CACHES
from edgecpm.runtimes.native.build import PHASE_TIMER_FLAGS, PORTABLE_FLAGS, KernelsUnavailable, load_library
from edgecpm.sparse.infllmv2 import SparseGeometry, kernel_count

INT8_ACTIVATIONS = 4  # MatMulNBits accuracy level whose arithmetic the kernels reproduce
MAX_HEAD_DIM = 512
MAX_BLOCK = 1024  # kernels.c quantize()'s scratch
ACTIVATIONS = {"silu": 0, "fatrelu": 1}
# "1": decoders load the kernels built with per-phase timers (kernels.c, EC_PHASE_TIMERS; `edgecpm profile` sets it
# in its own measuring process only). Read once, when a decoder is made.
PHASE_TIMERS_ENV = "EDGECPM_NATIVE_PHASE_TIMERS"
# "1": decoders load the portable C build (no vector intrinsics), the reference every non-x86 vectorised path equals
# bit for bit: what the emulated ISA tests, and anyone checking a board, compare against. Read when a decoder is made.
PORTABLE_ENV = "EDGECPM_NATIVE_PORTABLE"
PHASES = ("embedding", "norm", "attention", "linear", "lm_head")  # kernels.c's EC_PHASE_*, in order
# The quantized linears by role. Each computes with int8 activations (MatMulNBits accuracy level 4) or with exact
# ones: the float input times the dequantized codes (kernels.c exact_input), what accuracy level 0 computes.
LINEAR_ROLES = ("qkv", "o", "gate_up", "down", "head")
EXACT_ALL = frozenset(LINEAR_ROLES)  # `--kernels native-exact`
# The default: none. Measured (benchmarks/precision_native.py --attribute, docs/QUANTIZATION.md) the int8 error is
# spread over qkv, gate_up and down in every layer; no few linears buy a share of it worth their speed.
EXACT_DEFAULT: frozenset[str] = frozenset()


TABLE = "embed_tokens"
ROW_GROUP, WORD_BYTES = 8, 4  # the kernels' interleaved layout (kernels.c, groups_avx2)
SCALES_FP32, SCALES_FP16, SCALES_PER_ROW = 0, 1, 2  # kernels.c's EC_SCALES_*
OFFSETS_NONE, OFFSETS_ZERO_POINTS, OFFSETS_FLOAT = 0, 1, 2  # kernels.c's EC_OFFSETS_*


class Linear(ctypes.Structure):
    _fields_ = [("codes", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("zero_points", ctypes.c_void_p),
                ("zero_terms", ctypes.c_void_p), ("offsets", ctypes.c_void_p), ("packed", ctypes.c_void_p), ("scale_format", ctypes.c_int32),
                ("dense", ctypes.c_void_p), ("input_order", ctypes.c_void_p),
                ("n", ctypes.c_int32), ("k", ctypes.c_int32), ("bits", ctypes.c_int32), ("block", ctypes.c_int32),
                ("dense_nk", ctypes.c_int32), ("offset_kind", ctypes.c_int32), ("stream_bits", ctypes.c_int32),
                ("exact", ctypes.c_int32)]


class Layer(ctypes.Structure):
    _fields_ = [("input_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p), ("qkv", Linear), ("o", Linear),
                ("gate_up", Linear), ("down", Linear), ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p),
                ("kc1", ctypes.c_void_p), ("kc2", ctypes.c_void_p), ("k_nope", ctypes.c_void_p)]


class Sparse(ctypes.Structure):
    """kernels.c's ec_sparse: InfLLM v2's geometry (edgecpm.sparse.SparseGeometry), enabled 0 for dense attention."""

    _fields_ = [(name, ctypes.c_int32) for name in ("enabled", "kernel_size", "kernel_stride", "block_size", "init_blocks",
                                                    "local_blocks", "topk", "dense_len", "use_nope", "exact_lse")]


class Model(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int32) for name in ("hidden", "layers", "heads", "kv_heads", "head_dim", "rotary_dim",
                                                    "intermediate", "vocab", "max_context", "threads", "activation",
                                                    "kv_half")]
    _fields_ += [(name, ctypes.c_float) for name in ("activation_param", "eps", "attention_scale", "embedding_scale")]
    _fields_ += [("rope_cos", ctypes.c_void_p), ("rope_sin", ctypes.c_void_p), ("table", Linear), ("head", Linear),
                 ("final_norm", ctypes.c_void_p), ("layer", ctypes.POINTER(Layer)), ("sparse", Sparse)]


SIX_BIT_OFFSET = 128 - 32  # an 8-bit code minus the 6-bit code of the same value (their middle codes)
CONVERT_ROWS = 4096  # rows per pass of six_bit_blocks: bounds its temporaries


def six_bit_blocks(codes: np.ndarray, name: str) -> np.ndarray:
    """8-bit codes [n, blocks, block] holding 6-bit values -> the kernels' 6-bit blocks [n, blocks, 3 * block / 4]:
    the values' low 4 bits as a 4-bit block, then their high 2 bits, byte i of each 4 for 16 values holding, from
    bit 0 up, those of values 2i, 2i+1, 8+2i and 8+2i+1 (kernels.c, groups_avx2)."""
    n, blocks, block = codes.shape
    out = np.empty((n, blocks, block * 3 // 4), np.uint8)
    for start in range(0, n, CONVERT_ROWS):
        part = codes[start:start + CONVERT_ROWS]
        if part.size and (part.min() < SIX_BIT_OFFSET or part.max() > SIX_BIT_OFFSET + 63):
            raise KernelsUnavailable(f"{name} is recorded as 6-bit values but holds codes outside "
                                     f"{SIX_BIT_OFFSET}..{SIX_BIT_OFFSET + 63}")
        values = part - np.uint8(SIX_BIT_OFFSET)
        low, high = values & 15, values >> 4
        rows = out[start:start + CONVERT_ROWS]
        rows[..., :block // 2] = low[..., 0::2] | (low[..., 1::2] << 4)
        h = high.reshape(len(part), blocks, block // 16, 2, 4, 2)  # value 16*pair + 8*word + 2*i + p
        rows[..., block // 2:] = (h[..., 0, :, 0] | (h[..., 0, :, 1] << 2) | (h[..., 1, :, 0] << 4)
                                  | (h[..., 1, :, 1] << 6)).reshape(len(part), blocks, block // 4)
    return out


class _Weights:
    """Tensors of the data file by name, as read-only views of one memory map."""

    def __init__(self, data_file: Path, index: dict, vectorised: bool, stream_offsets: bool = True):
        with open(data_file, "rb") as handle:
            self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        self.data = np.frombuffer(self._map, dtype=np.uint8)
        self.index = index
        self.vectorised = vectorised  # the kernels read quantized linears only from their interleaved copies
        # the interleaved copy carries zero points' per-block offsets (kernels.c ec_stream_offsets: AVX2), else they stay
        # a loose [n, blocks] copy the kernels add after each row (NEON: the portable order). A layout per load.
        self.stream_offsets = stream_offsets
        self.keep: list[np.ndarray] = []  # arrays made here (transposes, casts) that C points into
        self.streamed_bytes = 0  # what one decode step reads of the linears' weights

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def array(self, name: str) -> np.ndarray:
        entry = self.index[name]
        raw = self.data[entry["offset"]: entry["offset"] + entry["length"]]
        return raw.view(np.dtype(entry["dtype"])).reshape(entry["shape"])

    def pointer(self, name: str, dtype=None) -> int:
        array = self.array(name)
        if dtype is not None and array.dtype != dtype:
            array = np.ascontiguousarray(array, dtype=dtype)
            self.keep.append(array)
        return array.ctypes.data

    def linear(self, name: str, k: int, n: int, *, dense_nk: bool = False, whole_items: bool = False) -> Linear:
        """`name` as the exporter wrote it: `{name}.qweight` etc. (MatMulNBits) or `{name}` (float). `whole_items`:
        the kernels split its rows only in whole 16-row items (the table, the head), the condition for streaming
        8-bit codes that hold 6-bit values (`value_bits` 6) at 6 bits."""
        if name in self:
            shape = self.array(name).shape
            expected = (n, k) if dense_nk else (k, n)
            if tuple(shape) != expected:
                raise KernelsUnavailable(f"{name} has shape {list(shape)}, expected {list(expected)}")
            self.streamed_bytes += n * k * 4
            return Linear(dense=self.pointer(name, np.float32), n=n, k=k, dense_nk=int(dense_nk))
        codes = f"{name}.qweight"
        if f"{name}.0.qweight" in self:
            raise KernelsUnavailable(f"{name} is stored as separate MatMuls (their act-order channel orders differ)")
        if codes not in self:
            raise KernelsUnavailable(f"no weight {name!r} in the bundle's tensor index")
        entry = self.index[codes]
        if "bits" not in entry or (entry["k"], entry["n"]) != (k, n):
            raise KernelsUnavailable(f"{codes} is not a [{n}, {k}] MatMulNBits weight")
        if entry["block_size"] > MAX_BLOCK:
            raise KernelsUnavailable(f"{codes} has blocks of {entry['block_size']} (at most {MAX_BLOCK})")
        blocks = -(-k // entry["block_size"])
        order = 0
        if f"{name}.input_order" in self:
            gathered = np.ascontiguousarray(self.array(f"{name}.input_order"), dtype=np.int32)
            self.keep.append(gathered)
            order = gathered.ctypes.data
        if self.array(f"{name}.scales").size != n * blocks:
            raise KernelsUnavailable(f"{name}.scales does not hold one scale per block")
        scales = self.array(f"{name}.scales").reshape(n, blocks)
        # What the middle-code dot misses, per block and row, times a per-block input sum (kernels.c EC_OFFSETS_*)
        terms, offset_kind = None, OFFSETS_NONE
        if f"{name}.block_offsets" in self:  # float zero points: the offset, times the exact input sum
            terms, offset_kind = self.array(f"{name}.block_offsets").T.astype(np.float32), OFFSETS_FLOAT
        elif f"{name}.qzeros" in self:  # integer zero points: scale * (middle - zero), times the quantized sum
            zeros = unpack_low_first(self.array(f"{name}.qzeros").reshape(n, -1), entry["bits"], blocks)
            terms = (scales * ((1 << (entry["bits"] - 1)) - zeros.astype(np.float32))).astype(np.float32)
            offset_kind = OFFSETS_ZERO_POINTS
        stored, stream_bits = self.array(codes), entry["bits"]
        if entry.get("value_bits") == 6 and entry["bits"] == 8 and whole_items and self.vectorised:
            stored, stream_bits = six_bit_blocks(stored, codes), 6
        packed, scale_format = self._interleaved(stored, scales, terms if self.stream_offsets else None)
        if packed is not None and name != TABLE:
            self.release_pages(codes)  # read once: dropping them as we go bounds the peak at one copy plus a tensor
        self.streamed_bytes += packed.nbytes if packed is not None else self.array(codes).nbytes + scales.nbytes
        portable = packed is None or not self.vectorised  # the portable C path reads the stored layout
        loose_terms = 0
        if (portable or not self.stream_offsets) and terms is not None:
            loose = np.ascontiguousarray(terms)
            self.keep.append(loose)
            loose_terms = loose.ctypes.data
        return Linear(codes=self.pointer(codes),
                      scales=self.pointer(f"{name}.scales", np.float32) if portable or name == TABLE else 0,
                      packed=0 if packed is None else packed.ctypes.data, scale_format=scale_format,
                      offset_kind=offset_kind if packed is not None and self.stream_offsets else OFFSETS_NONE,
                      zero_points=self.pointer(f"{name}.qzeros") if f"{name}.qzeros" in self else 0,
                      zero_terms=loose_terms if offset_kind == OFFSETS_ZERO_POINTS else 0,
                      offsets=loose_terms if offset_kind == OFFSETS_FLOAT else 0,
                      input_order=order, n=n, k=k, bits=entry["bits"], block=entry["block_size"], stream_bits=stream_bits)

    @staticmethod
    def scale_format(scales: np.ndarray, per_row_allowed: bool = True) -> int:
        """kernels.c's EC_SCALES_*: one scale per row where every block of a row has the same one (BitCPM
        ternary), fp16 where that is exact (the exporter computes scales at fp16 precision), else fp32."""
        if per_row_allowed and (scales == scales[:, :1]).all():
            return SCALES_PER_ROW
        return SCALES_FP16 if np.array_equal(scales.astype(np.float16).astype(scales.dtype), scales) else SCALES_FP32

    def _interleaved(self, codes: np.ndarray, scales: np.ndarray, terms: np.ndarray | None) -> tuple[np.ndarray | None, int]:
        """Codes [n, blocks, bytes], scales and terms [n, blocks] -> per 8-row group: the rows' scales (per block,
        or one per row) padded to whole 32-byte lines, the rows' terms as [blocks, 8] fp32 if any, then per block
        the codes as [words, 8 rows, 4 bytes] (kernels.c, groups_avx2)."""
        n, blocks, block_bytes = codes.shape
        if block_bytes % WORD_BYTES:
            return None, SCALES_FP32  # the portable kernel reads such blocks from the stored layout
        pad = (-n) % ROW_GROUP
        codes = np.pad(codes, ((0, pad), (0, 0), (0, 0))) if pad else codes
        scales = np.pad(scales, ((0, pad), (0, 0))) if pad else scales
        groups, word_count = (n + pad) // ROW_GROUP, block_bytes // WORD_BYTES
        scale_format = self.scale_format(scales, per_row_allowed=terms is None)  # a row scale would multiply the terms
        group_scales = scales.reshape(groups, ROW_GROUP, blocks).transpose(0, 2, 1)  # [groups, blocks, 8]
        if scale_format == SCALES_PER_ROW:
            header = group_scales[:, :1].astype(np.float32)
        else:
            header = group_scales.astype(np.float16 if scale_format == SCALES_FP16 else np.float32)
        scale_bytes = -(-header[0].nbytes // 32) * 32
        if terms is not None:
            terms = np.pad(terms, ((0, pad), (0, 0))) if pad else terms
            group_terms = terms.reshape(groups, ROW_GROUP, blocks).transpose(0, 2, 1).astype(np.float32)
        header_bytes = scale_bytes + (0 if terms is None else group_terms[0].nbytes)
        packed = np.zeros((groups, header_bytes + blocks * block_bytes * ROW_GROUP), dtype=np.uint8)
        packed[:, :header[0].nbytes] = header.reshape(groups, -1).view(np.uint8)
        if terms is not None:
            packed[:, scale_bytes:header_bytes] = group_terms.reshape(groups, -1).view(np.uint8)
        # written in place through a strided view: no intermediate copy of the codes
        into_words = np.lib.stride_tricks.as_strided(
            packed[:, header_bytes:], shape=(groups, blocks, word_count, ROW_GROUP, WORD_BYTES),
            strides=(packed.shape[1], block_bytes * ROW_GROUP, ROW_GROUP * WORD_BYTES, WORD_BYTES, 1), writeable=True)
        into_words[...] = codes.reshape(groups, ROW_GROUP, blocks, word_count, WORD_BYTES).transpose(0, 2, 3, 1, 4)
        self.keep.append(packed)
        return packed, scale_format

    def release_pages(self, name: str | None = None) -> None:
        """Drops the resident pages of tensor `name` (whole pages inside it), or of the whole map, once the kernels'
        copies are made; the file stays mapped, so whatever is read later (the embedding table's rows) faults
        back in."""
        if not hasattr(mmap, "MADV_DONTNEED"):  # not on every OS; there the pages merely stay until evicted
            return
        if name is None:
            self._map.madvise(mmap.MADV_DONTNEED)
            return
        entry = self.index[name]
        start = -(-entry["offset"] // mmap.PAGESIZE) * mmap.PAGESIZE
        stop = (entry["offset"] + entry["length"]) // mmap.PAGESIZE * mmap.PAGESIZE
        if stop > start:
            self._map.madvise(mmap.MADV_DONTNEED, start, stop - start)

    def every_tensor(self) -> dict[str, np.ndarray]:
        return {name: self.array(name) for name in self.index}

    def quantized_with_float_activations(self) -> list[str]:
        return [name for name, entry in self.index.items() if entry.get("accuracy_level", INT8_ACTIVATIONS) != INT8_ACTIVATIONS]


def _check(manifest: Manifest) -> None:
    arch = manifest.architecture
    checks = [  # in order: later checks may assume the earlier ones passed
        (lambda: manifest.flavour != "ort", f"flavour {manifest.flavour} (native decode reads ort bundles)"),
        (lambda: manifest.precision != "fp32", f"precision {manifest.precision} (native decode computes in fp32)"),
        (lambda: manifest.kv_layout.get("mode") != "shared_buffer", "KV layout is not a shared buffer"),
        (lambda: not manifest.tensors, "the bundle has no tensor index (exported by an older edgecpm)"),
        (lambda: arch.get("architecture") not in DECODER_FAMILY, f"architecture {arch.get('architecture')!r}"),
        (lambda: bool(arch.get("num_experts")), "mixture-of-experts feed-forward"),
        (lambda: arch.get("hidden_act") not in ACTIVATIONS, f"activation {arch.get('hidden_act')!r}"),
        (lambda: int(arch["head_dim"]) > MAX_HEAD_DIM, f"head_dim above {MAX_HEAD_DIM}"),
        (lambda: any(t["dim"] != arch["head_dim"] for t in manifest.kv_layout["tensors"]), "padded attention heads"),
    ]
    for failed, reason in checks:
        if failed():
            raise KernelsUnavailable(reason)


def _layers(weights: _Weights, arch: dict) -> ctypes.Array:
    h, inter, d = arch["hidden_size"], arch["intermediate_size"], arch["head_dim"]
    heads, kv_heads = arch["num_attention_heads"], arch["num_key_value_heads"]
    layers = (Layer * arch["num_hidden_layers"])()
    for i, layer in enumerate(layers):
        p = f"model.layers.{i}."
        layer.input_norm = weights.pointer(f"{p}input_layernorm.weight", np.float32)
        layer.post_norm = weights.pointer(f"{p}post_attention_layernorm.weight", np.float32)
        layer.qkv = weights.linear(f"{p}self_attn.qkv", h, (heads + 2 * kv_heads) * d)
        layer.o = weights.linear(f"{p}self_attn.o", heads * d, h)
        layer.gate_up = weights.linear(f"{p}mlp.gate_up", h, 2 * inter)
        layer.down = weights.linear(f"{p}mlp.down", inter, h)
    return layers


# Architectures whose bundles are the pre-norm GQA decoder the kernels implement (exporters/onnx/models/decoder.py).
DECODER_FAMILY: dict[str, Callable] = {"llama": _layers, "minicpm": _layers}


class NativeDecoder:
    """decode(token, position, logits) writes the logits [1, V] of one new token and its K/V rows; where
    `prefills` (every linear quantized), prefill(tokens, position, logits) does the same for a prompt, reading
    the weights once per 16 tokens. `streamed_bytes`: the weight bytes one decode step reads (for rooflines)."""

    def __init__(self, library: ctypes.CDLL, model: Model, weights: _Weights, keep: list):
        self._library, self._model, self._weights, self._keep = library, model, weights, keep
        self.streamed_bytes = weights.streamed_bytes
        self.prefills = bool(library.ec_can_prefill(ctypes.byref(model)))
        self.isa = library.ec_isa().decode()
        self.activations = "float"  # of the quantized linears (activations_label), set by native_decoder
        self._state = library.ec_state_new(ctypes.byref(model))  # buffers for every step, allocated once
        if not self._state:
            raise KernelsUnavailable("could not allocate the decode buffers")

    sparse_bytes = 0  # the InfLLM v2 state's buffers (compressed keys, no-rope keys), allocated at max context

    def decode_prompt(self, tokens: np.ndarray, position: int, logits: np.ndarray) -> None:
        """A prompt as decode steps (where `prefills` is False), attending as one prefill call would."""
        self._library.ec_call_length(self._state, int(position + len(tokens)))
        try:
            for offset, token in enumerate(tokens):
                self.decode(int(token), position + offset, logits)
        finally:
            self._library.ec_call_length(self._state, 0)

    def forget(self, position: int) -> None:
        """The KV cache was cut back to `position` tokens: the sparse state past it is stale."""
        self._library.ec_forget(self._state, int(position))

    def decode(self, token: int, position: int, logits: np.ndarray) -> None:
        status = self._library.ec_decode(ctypes.byref(self._model), self._state, int(token), int(position),
                                         logits.ctypes.data)
        if status:
            raise GenerationError(f"native decode refused token {token} at position {position} (status {status})")

    def prefill(self, tokens: np.ndarray, position: int, logits: np.ndarray) -> None:
        ids = np.ascontiguousarray(tokens, dtype=np.int32).reshape(-1)
        status = self._library.ec_prefill(ctypes.byref(self._model), self._state, ids.ctypes.data, len(ids),
                                          int(position), logits.ctypes.data)
        if status:
            raise GenerationError(f"native prefill refused {len(ids)} tokens at position {position} (status {status})")

    def phase_seconds(self, reset: bool = False) -> dict[str, float] | None:
        """Seconds per phase (PHASES) of the decode steps since the last reset, in the timed build (PHASE_TIMERS_ENV);
        None in the default build. The counters are the library's, shared by every decoder of this process."""
        out = (ctypes.c_double * len(PHASES))()
        if self._library.ec_phase_seconds(out, int(reset)) != len(PHASES):
            return None
        return dict(zip(PHASES, out))

    def in_place_tensors(self) -> dict[str, np.ndarray]:
        """Every tensor of the bundle as a view of the memory map, when the kernels compute on them as stored
        (float bundles; quantized ones decode from an interleaved copy): what onnxruntime can share."""
        return {} if self._weights.keep else self._weights.every_tensor()

    def __del__(self):
        if getattr(self, "_state", None):
            self._library.ec_state_free(self._state)


def activations_label(exact: frozenset[str]) -> str:
    if exact == EXACT_ALL:
        return "exact activations"
    return "int8 activations" + (f" (exact: {', '.join(r for r in LINEAR_ROLES if r in exact)})" if exact else "")


def _check_faster(manifest: Manifest, library: ctypes.CDLL) -> None:
    """Where the kernels decode slower than onnxruntime (docs/BENCHMARKS.md), `auto` leaves the bundle to it."""
    if not library.ec_vectorised():
        raise KernelsUnavailable("no vectorised kernels for this CPU (the portable C path is slower than onnxruntime)")


def sparse_state(arch: dict, max_context: int, sparse: SparseAttentionConfig | None,
                 kv_dtype: type = np.float32) -> tuple[Sparse, list[list[np.ndarray]]]:
    """kernels.c's ec_sparse and per layer the buffers of its InfLLM v2 state (Kc1, Kc2 and under use_nope the keys
    before RoPE, as the KV cache stores keys: `kv_dtype`), allocated at max context; dense attention: ec_sparse
    disabled, no buffers."""
    if sparse is None:
        return Sparse(enabled=0), []
    g = SparseGeometry.of(sparse)
    kv_heads, d = arch["num_key_value_heads"], arch["head_dim"]

    def zeros(rows: int, dtype: type = np.float32) -> np.ndarray:
        return np.zeros((kv_heads, max(rows, 1), d), dtype)

    buffers = [[zeros(kernel_count(max_context, g.kernel_size, g.kernel_stride)),
                zeros(kernel_count(max_context, g.kernel_size2, g.kernel_stride2))]
               + ([zeros(max_context, kv_dtype)] if g.use_nope else []) for _ in range(arch["num_hidden_layers"])]
    config = Sparse(enabled=1, kernel_size=g.kernel_size, kernel_stride=g.kernel_stride, block_size=g.block_size,
                    init_blocks=g.init_blocks, local_blocks=g.local_blocks, topk=g.topk, dense_len=g.dense_len,
                    use_nope=int(g.use_nope), exact_lse=0)
    return config, buffers


def native_decoder(bundle_dir: Path, manifest: Manifest, kv_pointers: Callable[[type], Sequence[int]], threads: int, *,
                   only_if_faster: bool = False, sparse: SparseAttentionConfig | None = None,
                   exact: frozenset[str] = EXACT_DEFAULT, kv_cache: str = "float32") -> NativeDecoder:
    """kv_pointers(dtype) gives the runtime's [1, kv_heads, max_context, head_dim] buffers of that dtype, key then
    value per layer (asked once the bundle passed the checks). `only_if_faster`: also refuse bundles the kernels
    implement but decode slower than onnxruntime. `sparse`: run InfLLM v2 sparse attention (infllmv2.c) with this
    config (dense below its dense_len). `exact`: the LINEAR_ROLES whose quantized linears take exact (float)
    activations; the others quantize theirs to int8. `kv_cache` (runtimes.kv.KV_CACHES): what the cache stores."""
    if kv_cache not in KV_CACHES:
        raise ValueError(f"unknown KV cache {kv_cache!r} (choose from {', '.join(KV_CACHES)})")
    if unknown := sorted(set(exact) - EXACT_ALL):
        raise ValueError(f"unknown linear roles {unknown} (choose from {', '.join(LINEAR_ROLES)})")
    _check(manifest)
    flags = (PHASE_TIMER_FLAGS if os.environ.get(PHASE_TIMERS_ENV) == "1" else ()) + \
        (PORTABLE_FLAGS if os.environ.get(PORTABLE_ENV) == "1" else ())
    library = load_library(flags) if flags else load_library()
    if only_if_faster:
        _check_faster(manifest, library)
    arch = manifest.architecture
    weights = _Weights(bundle_dir / manifest.data_files[0], manifest.tensors, bool(library.ec_vectorised()),
                       bool(library.ec_stream_offsets()))
    if (float_activations := weights.quantized_with_float_activations()) and exact != EXACT_ALL:
        raise KernelsUnavailable(f"{float_activations[0]} computes with float activations (accuracy level 0; "
                                 "--kernels native-exact runs it)")
    h, vocab, tied = arch["hidden_size"], arch["vocab_size"], arch["tie_word_embeddings"]
    layers = DECODER_FAMILY[arch["architecture"]](weights, arch)
    for layer in layers:
        for role in exact - {"head"}:
            getattr(layer, role).exact = 1
    if f"{TABLE}.block_offsets" in weights:
        raise KernelsUnavailable("an embedding table with float zero points")
    before_table = weights.streamed_bytes
    table = weights.linear(TABLE, h, vocab, dense_nk=True) if TABLE in weights else weights.linear(TABLE, h, vocab, whole_items=True)
    if "lm_head" in weights or "lm_head.qweight" in weights:
        weights.streamed_bytes = before_table  # a step reads one row of a table that is not the head
        head = weights.linear("lm_head", h, vocab, whole_items=True)
    else:
        head = table  # a tied head reading the table itself
    head.exact = int("head" in exact)  # a tied table's too: its embedding lookup reads the codes and ignores it
    model = Model(
        hidden=h, layers=arch["num_hidden_layers"], heads=arch["num_attention_heads"], kv_heads=arch["num_key_value_heads"],
        head_dim=arch["head_dim"], rotary_dim=arch["rope"]["rotary_dim"], intermediate=arch["intermediate_size"],
        vocab=vocab, max_context=manifest.max_context, threads=threads, activation=ACTIVATIONS[arch["hidden_act"]],
        activation_param=arch.get("hidden_act_param") or 0.0, eps=arch["rms_norm_eps"],
        attention_scale=1.0 / math.sqrt(arch["head_dim"]),
        embedding_scale=arch["scale_emb"] if tied else 1.0,  # an untied table has scale_emb folded in
        rope_cos=weights.pointer("rope_cos", np.float32), rope_sin=weights.pointer("rope_sin", np.float32),
        table=table, head=head, final_norm=weights.pointer("final_norm", np.float32),
        layer=ctypes.cast(layers, ctypes.POINTER(Layer)))
    kv_dtype = np.dtype(kv_cache).type
    model.kv_half = int(kv_dtype == np.float16)
    model.sparse, sparse_buffers = sparse_state(arch, manifest.max_context, sparse, kv_dtype)
    kv = kv_pointers(kv_dtype)
    for i, layer in enumerate(layers):
        layer.k_cache, layer.v_cache = kv[2 * i], kv[2 * i + 1]
        if sparse_buffers:
            layer.kc1, layer.kc2 = sparse_buffers[i][0].ctypes.data, sparse_buffers[i][1].ctypes.data
            layer.k_nope = sparse_buffers[i][2].ctypes.data if len(sparse_buffers[i]) > 2 else None
    if weights.keep:
        weights.release_pages()
    decoder = NativeDecoder(library, model, weights, [layers, sparse_buffers])
    if any(linear.codes for linear in (head, layers[0].qkv, layers[0].down)):
        decoder.activations = activations_label(exact)
    decoder.sparse_bytes = sum(array.nbytes for buffers in sparse_buffers for array in buffers)
    return decoder
