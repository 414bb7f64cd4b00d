"""The bundle: a directory with `edgecpm.json`, the model files and the tokenizer files.

Written into a temporary sibling directory and renamed into place, so an interrupted export never leaves
something that looks like a valid bundle. Readers check the schema version before anything else.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgecpm.errors import BundleError

SCHEMA_VERSION = 1
MANIFEST_NAME = "edgecpm.json"
TOKENIZER_NAME = "tokenizer.json"
CHAT_TEMPLATE_NAME = "chat_template.jinja"


@dataclass
class Manifest:
    """Everything a runtime needs to know about the files next to it; nothing is inferred from names."""

    architecture: dict[str, Any]
    flavour: str
    precision: str
    model_file: str
    graph_inputs: list[str]
    graph_outputs: list[str]
    kv_layout: dict[str, Any]
    max_context: int
    eos_token_ids: list[int]
    source: dict[str, Any]
    tokenizer: dict[str, Any]
    quantization: dict[str, Any] | None = None
    toolchain: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: Path) -> Manifest:
        version = data.get("schema_version")
        if not isinstance(version, int):
            raise BundleError("schema_version is missing; this is not an edgecpm bundle", path=path, field="schema_version")
        if version > SCHEMA_VERSION:
            raise BundleError(
                f"bundle schema {version} is newer than this edgecpm understands ({SCHEMA_VERSION}); upgrade edgecpm",
                path=path,
                field="schema_version",
            )
        if version < SCHEMA_VERSION:
            raise BundleError(f"bundle schema {version} is too old; re-export it with this edgecpm", path=path, field="schema_version")
        known = set(cls.__dataclass_fields__)
        missing = [name for name in known if name not in data and cls.__dataclass_fields__[name].default is not None
                   and name not in ("quantization", "toolchain", "extra", "schema_version")]
        if missing:
            raise BundleError("required field is missing; re-export the bundle", path=path, field=missing[0])
        return cls(**{k: v for k, v in data.items() if k in known})


def read_manifest(bundle: str | Path) -> Manifest:
    bundle = Path(bundle)
    path = bundle / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"not an edgecpm bundle: {MANIFEST_NAME} is missing (export one with `edgecpm export`)", path=bundle)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"manifest is not valid JSON ({exc.__class__.__name__}); re-export the bundle", path=path) from None
    if not isinstance(data, dict):
        raise BundleError("manifest is not a JSON object", path=path)
    manifest = Manifest.from_dict(data, path)
    for name in bundle_files(manifest):
        if not (bundle / name).is_file():
            raise BundleError("file listed in the manifest is missing; re-export the bundle", path=bundle, field=name)
    return manifest


def bundle_files(manifest: Manifest) -> list[str]:
    files = [manifest.model_file, *manifest.extra.get("data_files", []), TOKENIZER_NAME]
    template = manifest.tokenizer.get("chat_template_file") if isinstance(manifest.tokenizer, dict) else None
    if template:
        files.append(template)
    return files


@contextlib.contextmanager
def atomic_bundle_dir(destination: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary directory beside `destination`; renames it into place only on success."""
    destination = Path(destination)
    if destination.exists() and not overwrite:
        raise BundleError("output already exists (pass --overwrite to replace it)", path=destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".partial", dir=destination.parent))
    try:
        yield staging
        if destination.exists():
            backup = destination.with_name(f".{destination.name}.old")
            shutil.rmtree(backup, ignore_errors=True)
            os.replace(destination, backup)
            os.replace(staging, destination)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
