"""Printing a generation as it happens, and the speed line after it (run, chat, demo)."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgecpm.generate import GenerationEvent, GenerationResult


def print_stream(events: Iterable[GenerationEvent], *, echo: bool = True) -> GenerationResult:
    """Writes each event's text to stdout as it arrives (when `echo`); returns the final result."""
    result = None
    for event in events:
        if echo and event.text:
            sys.stdout.write(event.text)
            sys.stdout.flush()
        if event.result is not None:
            result = event.result
    assert result is not None, "a generation stream always ends with its result"
    return result


def speed_line(result: GenerationResult) -> str:
    cached = len(result.prompt_token_ids) - result.prefill_tokens
    reused = f" (+{cached} cached)" if cached else ""
    return (f"prefill {result.prefill_tokens} tokens{reused} at {result.prefill_tokens_per_second:.1f} tok/s, "
            f"decode {result.new_tokens} tokens at {result.decode_tokens_per_second:.1f} tok/s ({result.finish_reason})")
