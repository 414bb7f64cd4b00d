"""A tiny checkpoint exported to a bundle, with the reference model next to it (shared by the e2e tests)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tiny_models import write_hf_checkpoint

TINY_KEY = ("minicpm", "untied")  # untied: the tied tiny model only repeats its last token under greedy
TINY_MAX_CONTEXT = 128


@dataclass
class TinyBundle:
    checkpoint_dir: Path
    bundle: Path

    def reference_model(self):
        from edgecpm.checkpoint import open_checkpoint
        from edgecpm.models import reference_model

        return reference_model(open_checkpoint(self.checkpoint_dir))


def export_tiny_bundle(directory: Path) -> TinyBundle:
    from edgecpm.export import export_checkpoint

    checkpoint_dir = write_hf_checkpoint(directory / "checkpoint", TINY_KEY)
    bundle = export_checkpoint(checkpoint_dir, directory / "bundle", flavour="ort", dtype="fp32", max_context=TINY_MAX_CONTEXT)
    return TinyBundle(checkpoint_dir, bundle)
