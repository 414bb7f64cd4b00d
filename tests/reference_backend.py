"""A Backend over the PyTorch reference model (test-only): the generation loop runs against a real model.

It follows the reference contract (`new_cache()`, `model(ids, cache)`) and nothing more; `truncate` builds
a fresh cache and runs the kept tokens again, which is slow but obviously right.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from edgecpm.models import reference_model


class ReferenceBackend:
    def __init__(self, checkpoint, *, max_context: int | None = None):
        self.model = reference_model(checkpoint)
        self.vocab_size = checkpoint.config.vocab_size
        self.max_context = max_context or checkpoint.config.max_position_embeddings
        self.calls: list[tuple[str, int]] = []  # ("prefill", n) / ("decode", 1) / ("truncate", pos): what ran
        self.reset()

    @property
    def position(self) -> int:
        return len(self._tokens)

    def _run(self, token_ids: list[int]) -> np.ndarray:
        if self.position + len(token_ids) > self.max_context:
            raise RuntimeError(f"context overflow: {self.position} + {len(token_ids)} > {self.max_context}")
        with torch.no_grad():
            logits = self.model(torch.tensor([token_ids], dtype=torch.long), self._cache)
        self._tokens.extend(token_ids)
        return logits[0, -1].numpy().astype(np.float32)

    def prefill(self, token_ids: np.ndarray) -> np.ndarray:
        ids = [int(t) for t in np.asarray(token_ids).reshape(-1)]
        self.calls.append(("prefill", len(ids)))
        return self._run(ids)

    def decode(self, token_id: int) -> np.ndarray:
        self.calls.append(("decode", 1))
        return self._run([int(token_id)])

    def reset(self) -> None:
        self._cache = self.model.new_cache()
        self._tokens: list[int] = []

    def truncate(self, position: int) -> None:
        self.calls.append(("truncate", position))
        kept = self._tokens[:position]
        self.reset()
        if kept:
            self._run(kept)


def full_forward_logits(model, token_ids: list[int]) -> np.ndarray:
    """Last-position logits from one forward over the whole sequence, with no cache at all."""
    with torch.no_grad():
        return model(torch.tensor([token_ids], dtype=torch.long), model.new_cache())[0, -1].numpy()


def greedy_chain(model, prompt_ids: list[int], steps: int) -> list[int]:
    """The greedy continuation computed independently: a full forward per token, no KV cache."""
    ids = list(prompt_ids)
    for _ in range(steps):
        ids.append(int(np.argmax(full_forward_logits(model, ids))))
    return ids[len(prompt_ids):]


def text_tokenizer(files):
    from edgecpm.text import TextTokenizer

    return TextTokenizer.from_checkpoint(files)


@contextlib.contextmanager
def single_torch_thread():
    """Tiny models run ~10x faster on one thread (less scheduling than work); restores the setting after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
