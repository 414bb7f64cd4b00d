"""Dense or InfLLM v2 sparse attention: the user's choice (`--attention`, `--sparse-config`) resolved once.

`--attention auto` (default) keeps what the model says: the checkpoint's own `sparse_config` at export, the bundle's
recorded choice at run time; such a config is itself dense below its dense_len (spec §6.2). `dense` never runs
sparse; `sparse` runs the model's config, or InfLLM v2's defaults (spec §6.1) for a model without one. Fields given
with `--sparse-config KEY=VALUE` (or a JSON object file) override either, so a model trained dense (SmolLM2) can run
sparse with a small dense_len; overrides under `auto` on a model without a config mean the same as `sparse`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgecpm.arch.base import SparseAttentionConfig
from edgecpm.arch.fields import ConfigFields
from edgecpm.errors import EdgecpmError, UnsupportedError

ATTENTION_MODES = ("auto", "dense", "sparse")
SPARSE_FIELDS = tuple(f.name for f in dataclasses.fields(SparseAttentionConfig))
OVERRIDES_SOURCE = "--sparse-config"


@dataclass(frozen=True)
class AttentionChoice:
    """`mode` (ATTENTION_MODES) and sparse_config fields to override, as the user gave them."""

    mode: str = "auto"
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def validate(self) -> AttentionChoice:
        if self.mode not in ATTENTION_MODES:
            raise UnsupportedError(f"unknown attention {self.mode!r} (choose from {', '.join(ATTENTION_MODES)})",
                                   field="--attention")
        unknown = sorted(set(self.overrides) - set(SPARSE_FIELDS))
        if unknown:
            raise UnsupportedError(f"unknown sparse_config field (known: {', '.join(SPARSE_FIELDS)})",
                                   path=OVERRIDES_SOURCE, field=unknown[0])
        if self.mode == "dense" and self.overrides:
            raise UnsupportedError("sparse_config fields were given with --attention dense", path=OVERRIDES_SOURCE)
        return self

    def resolve(self, configured: SparseAttentionConfig | None) -> SparseAttentionConfig | None:
        """The sparse config to run (None: dense) given the model's own (`configured`, None for a dense model)."""
        self.validate()
        if self.mode == "dense" or (self.mode == "auto" and configured is None and not self.overrides):
            return None
        base = dataclasses.asdict(configured or SparseAttentionConfig())
        merged = ConfigFields({**base, **self.overrides}, OVERRIDES_SOURCE if self.overrides else "sparse_config")
        return checked(SparseAttentionConfig.from_config(merged), merged.source)

    @property
    def explicit(self) -> bool:
        """Whether the user asked for sparse attention (rather than taking the model's own choice)."""
        return self.mode == "sparse" or bool(self.overrides)

    def for_bundle(self, manifest: Any) -> SparseAttentionConfig | None:
        """The sparse config to run a bundle with (None: dense): `auto` takes the export's recorded choice; `sparse`
        that, else the model's own sparse_config, else the defaults."""
        recorded = manifest.sparse_attention
        own = manifest.architecture.get("sparse")
        if self.mode == "sparse" and recorded is None and own:
            recorded = SparseAttentionConfig(**own)
        return self.resolve(recorded)


def reaches_sparse(config: SparseAttentionConfig | None, max_context: int) -> bool:
    """Whether a session of at most `max_context` tokens can run sparse under `config` (None: dense): below dense_len
    sparse attention is dense attention (spec §6.2), so a context that never reaches it is dense throughout."""
    return config is not None and (config.dense_len < 0 or max_context >= config.dense_len)


def checked(config: SparseAttentionConfig, source: str | Path) -> SparseAttentionConfig:
    """`config` once its geometry is one InfLLM v2 can run (edgecpm.sparse.SparseGeometry's rules)."""
    from edgecpm.sparse.infllmv2 import SparseGeometry

    try:
        SparseGeometry.of(config)
    except ValueError as error:
        raise UnsupportedError(str(error), path=source, field="sparse_config") from None
    return config


def parse_overrides(values: Sequence[str] | None) -> dict[str, Any]:
    """`--sparse-config` values: KEY=VALUE pairs (VALUE read as JSON: 1024, true) or the path of a JSON object file."""
    overrides: dict[str, Any] = {}
    for value in values or ():
        if "=" in value:
            key, _, text = value.partition("=")
            try:
                overrides[key.strip()] = json.loads(text)
            except json.JSONDecodeError:
                raise EdgecpmError(f"value {text!r} is not a number or true/false", path=OVERRIDES_SOURCE,
                                   field=key.strip()) from None
            continue
        path = Path(value)
        if not path.is_file():
            raise EdgecpmError("expected KEY=VALUE or a JSON file", path=value)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise EdgecpmError(f"not valid JSON ({error.__class__.__name__})", path=path) from None
        if not isinstance(data, dict):
            raise EdgecpmError("expected a JSON object of sparse_config fields", path=path)
        fields = data.get("sparse_config", data)  # a config.json's own sparse_config object is taken too
        if not isinstance(fields, dict):
            raise EdgecpmError("sparse_config is not a JSON object", path=path, field="sparse_config")
        overrides.update(fields)
    return overrides
