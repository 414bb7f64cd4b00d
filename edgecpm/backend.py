"""The Backend protocol: what a runtime must offer the generation loop (torch-free).

A backend owns one sequence's KV state. `prefill` appends prompt tokens (possibly many) and returns the
logits of the last position only; `decode` appends one token and returns its logits; `reset` empties the
state; `position` is how many tokens the state holds. Logits are fp32 numpy arrays of shape [vocab].
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Backend(Protocol):
    max_context: int
    vocab_size: int

    @property
    def position(self) -> int: ...

    def prefill(self, token_ids: np.ndarray) -> np.ndarray: ...

    def decode(self, token_id: int) -> np.ndarray: ...

    def reset(self) -> None: ...

    def truncate(self, position: int) -> None:
        """Forget every cached token at or after `position` (chat turns reuse the common prefix)."""
        ...
