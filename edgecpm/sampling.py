"""Samplers: small callables over fp32 numpy logits, composed in a fixed order.

A logits transform takes `(logits, history)` and returns new logits; `history` is every token id the
model has seen in this sequence (prompt and generated), which the repetition penalty needs. The order is
the one transformers uses: repetition penalty -> temperature -> top-k -> top-p -> sample. Temperature 0
means greedy: argmax after the repetition penalty, with no randomness at all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

LogitsTransform = Callable[[np.ndarray, Sequence[int]], np.ndarray]


def repetition_penalty(penalty: float) -> LogitsTransform:
    """CTRL-style penalty (as in transformers): positive logits of seen tokens divided, negative multiplied."""

    def apply(logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        if not len(history):
            return logits
        seen = np.unique(np.asarray(history, dtype=np.int64))
        scores = logits[seen]
        logits = logits.copy()
        logits[seen] = np.where(scores > 0, scores / penalty, scores * penalty)
        return logits

    return apply


def temperature(value: float) -> LogitsTransform:
    def apply(logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        return logits / np.float32(value)

    return apply


def top_k(k: int) -> LogitsTransform:
    """Keeps the k largest logits (ties with the k-th are kept too, so k=1 always contains the argmax)."""

    def apply(logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        if k >= logits.shape[-1]:
            return logits
        threshold = np.partition(logits, -k)[-k]
        return np.where(logits >= threshold, logits, -np.inf).astype(np.float32)

    return apply


def top_p(p: float) -> LogitsTransform:
    """Nucleus: keeps the most likely tokens whose probability mass reaches p (always at least one)."""

    def apply(logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        order = np.argsort(-logits, kind="stable")
        probs = softmax(logits[order])
        mass_before = np.cumsum(probs) - probs
        drop = order[mass_before >= p]
        logits = logits.copy()
        logits[drop] = -np.inf
        return logits

    return apply


def softmax(logits: np.ndarray) -> np.ndarray:
    """float64 softmax so the cumulative sums used by top-p and sampling do not drift."""
    shifted = logits.astype(np.float64) - np.max(logits)
    weights = np.exp(shifted)
    return weights / weights.sum()


@dataclass
class Sampler:
    """Applies the transforms in order, then picks a token: argmax when greedy, else a seeded draw."""

    transforms: list[LogitsTransform]
    greedy: bool
    rng: np.random.Generator

    def __call__(self, logits: np.ndarray, history: Sequence[int]) -> int:
        logits = np.asarray(logits, dtype=np.float32).reshape(-1)
        for transform in self.transforms:
            logits = transform(logits, history)
        if self.greedy:
            return int(np.argmax(logits))
        cumulative = np.cumsum(softmax(logits))
        # Inverse-CDF draw: one uniform number per token, so a seed fixes the whole sequence.
        index = int(np.searchsorted(cumulative, self.rng.random() * cumulative[-1], side="right"))
        return min(index, logits.shape[-1] - 1)


def build_sampler(*, temperature_value: float, top_k_value: int, top_p_value: float, repetition: float,
                  seed: int | None) -> Sampler:
    """The sampler for validated settings; transforms that would do nothing are left out."""
    transforms: list[LogitsTransform] = []
    if repetition != 1.0:
        transforms.append(repetition_penalty(repetition))
    greedy = temperature_value == 0
    if not greedy:
        if temperature_value != 1.0:
            transforms.append(temperature(temperature_value))
        if top_k_value > 0:
            transforms.append(top_k(top_k_value))
        if top_p_value < 1.0:
            transforms.append(top_p(top_p_value))
    return Sampler(transforms, greedy, np.random.default_rng(seed))
