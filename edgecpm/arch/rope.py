"""Rotary position embedding variants, as data plus the frequencies they imply (numpy, fp32).

All variants use the rotate-half layout on HF weights (spec §1.6). The frequency table depends on the
sequence length only for `dynamic` (NTK base growth past max_position_embeddings) and `longrope`
(long factors past original_max_position_embeddings).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edgecpm.arch.fields import ConfigFields

ROPE_KINDS = ("default", "linear", "dynamic", "longrope", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    kind: str
    theta: float
    rotary_dim: int
    max_position_embeddings: int
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    attention_factor: float | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0

    @classmethod
    def from_config(cls, fields: ConfigFields, rotary_dim: int, max_position_embeddings: int) -> RopeConfig:
        """Reads the classic `rope_theta` + `rope_scaling` and the transformers v5 `rope_parameters` spellings."""
        block_name = "rope_parameters" if fields.has("rope_parameters") else "rope_scaling"
        block = fields.sub(block_name)
        theta = fields.float("rope_theta", 10000.0, minimum=1e-6)
        if block is None:
            return cls("default", theta, rotary_dim, max_position_embeddings)
        theta = block.float("rope_theta", theta, minimum=1e-6)
        kind = block.raw.get("rope_type") or block.raw.get("type") or "default"
        if kind not in ROPE_KINDS:
            raise block.error("rope_type", f"unsupported RoPE type {kind!r:.40} (supported: {', '.join(ROPE_KINDS)})")
        if block.float("partial_rotary_factor", 1.0) != 1.0:
            raise block.error("partial_rotary_factor", "partial rotary embeddings are not supported")
        original = block.int("original_max_position_embeddings", None)
        if original is None:
            original = fields.int("original_max_position_embeddings", None)
        common = dict(
            theta=theta,
            rotary_dim=rotary_dim,
            max_position_embeddings=max_position_embeddings,
            original_max_position_embeddings=original,
            attention_factor=block.float("attention_factor", None, minimum=0.0),
        )
        if kind == "longrope":
            if original is None:
                original = max_position_embeddings
            common["original_max_position_embeddings"] = original
            half = rotary_dim // 2
            return cls(
                "longrope",
                factor=block.float("factor", max_position_embeddings / original, minimum=0.0),
                short_factor=block.floats("short_factor", half),
                long_factor=block.floats("long_factor", half),
                **common,
            )
        if kind == "llama3":
            if original is None:
                raise block.error("original_max_position_embeddings", "required for llama3 RoPE")
            return cls(
                "llama3",
                factor=block.float("factor", minimum=1.0),
                low_freq_factor=block.float("low_freq_factor", minimum=0.0),
                high_freq_factor=block.float("high_freq_factor", minimum=0.0),
                **common,
            )
        factor = block.float("factor", 1.0, minimum=1e-6) if kind != "default" else 1.0
        return cls(kind, factor=factor, **common)

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, data: dict) -> RopeConfig:
        values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items()}
        return cls(**values)

    @property
    def attention_scaling(self) -> float:
        """Multiplier on cos and sin (LongRoPE "mscale"); 1.0 for every released MiniCPM config."""
        if self.attention_factor is not None:
            return self.attention_factor
        if self.kind == "longrope" and self.factor > 1.0:
            return math.sqrt(1 + math.log(self.factor) / math.log(self.original_max_position_embeddings))
        return 1.0

    def inv_freq(self, seq_len: int = 0) -> np.ndarray:
        """Inverse frequencies (fp32, rotary_dim/2) for a sequence whose total length is `seq_len`."""
        dim = self.rotary_dim
        exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
        theta = self.theta
        if self.kind == "dynamic" and seq_len > self.max_position_embeddings:
            growth = self.factor * seq_len / self.max_position_embeddings - (self.factor - 1)
            theta = theta * growth ** (dim / (dim - 2))
        base = np.float32(theta) ** exponents
        if self.kind == "longrope":
            use_long = seq_len > self.original_max_position_embeddings
            factors = np.asarray(self.long_factor if use_long else self.short_factor, dtype=np.float32)
            return (1.0 / (factors * base)).astype(np.float32)
        inv_freq = (1.0 / base).astype(np.float32)
        if self.kind == "linear":
            return (inv_freq / np.float32(self.factor)).astype(np.float32)
        if self.kind == "llama3":
            return self._llama3_smoothing(inv_freq)
        return inv_freq

    def _llama3_smoothing(self, inv_freq: np.ndarray) -> np.ndarray:
        original = self.original_max_position_embeddings
        low_wavelen = original / self.low_freq_factor
        high_wavelen = original / self.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / self.factor, inv_freq)
        smooth = (original / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
        smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)

    def cos_sin(self, positions: np.ndarray, seq_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """cos/sin tables [len(positions), rotary_dim] in the rotate-half layout, fp32."""
        total = int(positions.max()) + 1 if seq_len is None else seq_len
        angles = positions.astype(np.float32)[:, None] * self.inv_freq(total)[None, :]
        angles = np.concatenate([angles, angles], axis=-1)
        scale = np.float32(self.attention_scaling)
        return (np.cos(angles) * scale).astype(np.float32), (np.sin(angles) * scale).astype(np.float32)
