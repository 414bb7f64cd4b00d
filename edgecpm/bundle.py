"""The bundle: a directory with `edgecpm.json`, the model files and the tokenizer files.

Written into a temporary sibling directory and renamed into place, so an interrupted export never leaves
something that looks like a valid bundle. Readers check the schema version before anything else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

from edgecpm.arch.base import SparseAttentionConfig
from edgecpm.errors import BundleError

GRAPH_ATTENTION = ("dense", "sparse")  # how the bundle's graph attends (Manifest.graph_attention)
SCHEMA_VERSION = 2  # 2: typed data_files/tensors/graph_io/device/engines fields instead of version 1's `extra` dict
MANIFEST_NAME = "edgecpm.json"
TOKENIZER_NAME = "tokenizer.json"
CHAT_TEMPLATE_NAME = "chat_template.jinja"


@dataclass(frozen=True)
class DeviceRecord:
    """The device profile an export was tuned for, and for each setting it decides whether the profile or a flag chose it."""

    name: str
    version: str
    sha256: str
    chosen_by: dict[str, str] = field(default_factory=dict)  # setting -> "flag" | "profile" | "plan" | "default" | "model"
    memory_plan: dict[str, Any] = field(default_factory=dict)  # edgecpm.planner.MemoryPlan.to_dict() on that device

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "sha256": self.sha256, "chosen_by": dict(self.chosen_by),
                "memory_plan": dict(self.memory_plan)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeviceRecord:
        return cls(name=str(data["name"]), version=str(data["version"]), sha256=str(data["sha256"]),
                   chosen_by=dict(data.get("chosen_by", {})), memory_plan=dict(data.get("memory_plan", {})))


@dataclass(frozen=True)
class EngineRecord:
    """A TensorRT engine in the bundle, pinned to what built it: it runs only where all of these match."""

    file: str                      # relative to the bundle
    sha256: str
    device: str                    # the profile it was built for
    tensorrt_version: str
    gpu_name: str
    sm: str                        # compute capability, "8.7"
    l4t_release: str | None        # Jetsons: the L4T release (/etc/nv_tegra_release), else None
    max_context: int
    shape_profiles: dict[str, dict[str, list[list[int]]]]  # optimization profile -> input -> [min, opt, max] shapes
    timing_cache: str | None = None
    built_with: str = ""           # edgecpm version
    plugins: list[str] = field(default_factory=list)  # plugin libraries (relative to the bundle) to load before it runs

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineRecord:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


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
    data_files: list[str] = field(default_factory=list)    # external tensor data beside model_file
    tensors: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> offset/length/dtype/shape in data_files[0]
    graph_io: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # inputs/outputs: name, dtype, shape
    tied_head: str = "duplicate"
    model_bytes: int = 0
    quantization: dict[str, Any] | None = None
    device: DeviceRecord | None = None
    engines: list[EngineRecord] = field(default_factory=list)
    toolchain: dict[str, str] = field(default_factory=dict)
    # InfLLM v2 sparse attention the bundle runs by default (its own dense_len: dense below it); None: dense
    sparse_attention: SparseAttentionConfig | None = None
    # How the graph itself attends: "sparse" = one ai.edgecpm.InfLLMv2Attention node per layer running
    # `sparse_attention` (lowered to standard ops), so onnxruntime and TensorRT run it sparse; "dense" otherwise.
    graph_attention: str = "dense"
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["device"] = None if self.device is None else self.device.to_dict()
        data["engines"] = [engine.to_dict() for engine in self.engines]
        data["sparse_attention"] = None if self.sparse_attention is None else dataclasses.asdict(self.sparse_attention)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

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
        if version < 1:
            raise BundleError(f"bundle schema {version} is too old; re-export it with this edgecpm", path=path, field="schema_version")
        if version == 1:  # version 1 kept these facts in an untyped `extra` dict
            extra = data.get("extra") or {}
            data = {**{k: v for k, v in data.items() if k != "extra"},
                    **{k: extra[k] for k in ("data_files", "tensors", "graph_io", "model_bytes") if k in extra},
                    "tied_head": (extra.get("export_options") or {}).get("tied_head", "duplicate"),
                    "schema_version": SCHEMA_VERSION}
        fields = cls.__dataclass_fields__
        missing = [name for name, spec in fields.items() if name not in data and spec.default is MISSING
                   and spec.default_factory is MISSING]
        if missing:
            raise BundleError("required field is missing; re-export the bundle", path=path, field=missing[0])
        values = {k: v for k, v in data.items() if k in fields}
        try:
            if values.get("device") is not None:
                values["device"] = DeviceRecord.from_dict(values["device"])
            values["engines"] = [EngineRecord.from_dict(engine) for engine in values.get("engines") or []]
        except (KeyError, TypeError, AttributeError) as exc:
            raise BundleError(f"malformed device or engine record ({exc.__class__.__name__}: {exc})", path=path,
                              field="engines" if "engines" in str(exc) else "device") from None
        if values.get("sparse_attention") is not None:
            values["sparse_attention"] = _sparse_record(values["sparse_attention"], path)
        graph_attention = values.get("graph_attention", "dense")
        if graph_attention not in GRAPH_ATTENTION:
            raise BundleError(f"graph_attention {graph_attention!r} is not one of {', '.join(GRAPH_ATTENTION)}", path=path,
                              field="graph_attention")
        if graph_attention == "sparse" and values.get("sparse_attention") is None:
            raise BundleError("a sparse graph needs its sparse_attention record; re-export the bundle", path=path,
                              field="sparse_attention")
        return cls(**values)


def _sparse_record(data: Any, path: Path) -> SparseAttentionConfig:
    from edgecpm.sparse.choice import checked

    try:
        return checked(SparseAttentionConfig(**data), path)
    except TypeError as exc:
        raise BundleError(f"malformed sparse_config record ({exc})", path=path, field="sparse_attention") from None


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
    files = [manifest.model_file, *manifest.data_files, TOKENIZER_NAME]
    template = manifest.tokenizer.get("chat_template_file") if isinstance(manifest.tokenizer, dict) else None
    if template:
        files.append(template)
    return files + [name for engine in manifest.engines for name in (engine.file, *engine.plugins)]


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


def write_manifest(bundle: str | Path, manifest: Manifest) -> None:
    """Replaces a bundle's manifest in one rename (a later step, e.g. `engine build`, adding a record)."""
    path = Path(bundle) / MANIFEST_NAME
    staging = path.with_name(f".{MANIFEST_NAME}.partial")
    staging.write_text(manifest.to_json(), encoding="utf-8")
    os.replace(staging, path)
