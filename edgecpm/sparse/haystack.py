"""Long-context probes for sparse attention: a needle in a haystack, and a long evaluation text (torch-free).

The haystack is a fixed filler paragraph repeated (the classic needle test's "the grass is green..." form): it holds
nothing to retrieve but the needle, so a small model can find the needle densely at 6K tokens and any answer that
changes under sparse attention comes from the blocks it did not select.
"""

from __future__ import annotations

from importlib import resources

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
# edgecpm/data's shipped texts in one order: ~6.5K SmolLM2 tokens of prose (calibration_extra.txt is GPTQ's
# calibration text too; here it only compares two attentions on the same model)
LONG_TEXT_PARTS = ("evaluation_extra.txt", "calibration_extra.txt", "evaluation.txt", "calibration.txt")


def haystack_with_needle(tokenizer, tokens: int, needle: str, depth: float) -> str:
    """About `tokens` tokens of filler with `needle` inserted between two sentences at `depth` (0: start, 1: end)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    per_filler = len(tokenizer.encode(FILLER))
    hay = FILLER * max(1, tokens // per_filler)
    cut = hay.rfind(". ", 0, int(len(hay) * depth))
    cut = 0 if cut < 0 else cut + 2
    return hay[:cut] + needle + " " + hay[cut:]


def long_evaluation_text() -> str:
    data = resources.files("edgecpm.data")
    return "\n\n".join(data.joinpath(name).read_text(encoding="utf-8") for name in LONG_TEXT_PARTS)
