"""One export, validated once into a typed plan before anything is written.

Each setting is resolved in one order: an explicit argument (a CLI flag) wins, then the device profile's
export defaults, then edgecpm's defaults (`ExportOptions`' fields: declared once there). The plan records
who chose each setting, and the memory plan of the result on the device: an export that cannot fit is
refused here, naming the quantization that would.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgecpm.arch.base import SparseAttentionConfig
from edgecpm.bundle import DeviceRecord
from edgecpm.errors import UnsupportedError
from edgecpm.planner import MemoryPlan, Storage, check_fits, plan_memory
from edgecpm.quant.spec import AUTO_SCHEME, QuantSpec
from edgecpm.sparse.choice import AttentionChoice, reaches_sparse

if TYPE_CHECKING:
    from edgecpm.checkpoint import Checkpoint
    from edgecpm.devices.profile import DeviceProfile
    from edgecpm.exporters.onnx import ExportOptions

PRECISION_ALIASES = {"fp32": "fp32", "float32": "fp32", "fp16": "fp16", "float16": "fp16"}


@dataclass(frozen=True)
class ExportPlan:
    """What will be written: graph options, quantization, the device it is tuned for and its memory plan."""

    options: ExportOptions
    quant: QuantSpec | None
    memory: MemoryPlan
    profile: DeviceProfile | None
    device: DeviceRecord | None
    chosen_by: dict[str, str]
    attention: SparseAttentionConfig | None = None  # InfLLM v2 sparse attention the bundle runs; None: dense

    def to_dict(self) -> dict[str, Any]:
        return {"flavour": self.options.flavour, "dtype": self.options.precision, "max_context": self.options.max_context,
                "quant": None if self.quant is None else self.quant.scheme, "chosen_by": dict(self.chosen_by),
                "device": None if self.device is None else self.device.to_dict(),
                "attention": "dense" if self.attention is None else {"sparse": dataclasses.asdict(self.attention)},
                "memory": self.memory.to_dict(self.options.max_context)}


def resolve_profile(device: str | Path | DeviceProfile | None) -> DeviceProfile | None:
    if device is None or not isinstance(device, (str, Path)):
        return device
    from edgecpm.devices.profile import load_profile

    return load_profile(device)


def _pick(name: str, given: Any, from_profile: Any, default: Any, chosen_by: dict[str, str]) -> Any:
    if given is not None:
        chosen_by[name] = "flag"
        return given
    if from_profile is not None:
        chosen_by[name] = "profile"
        return from_profile
    chosen_by[name] = "default"
    return default


def _quant(checkpoint: Checkpoint, quant: QuantSpec | None, profile: DeviceProfile | None, flavour: str,
           chosen_by: dict[str, str]) -> QuantSpec | None:
    from edgecpm.quant.plan import check_flavour, checkpoint_spec

    scheme_given = quant is not None and quant.scheme != AUTO_SCHEME
    profile_scheme = profile.export.weights if profile is not None else None
    if profile_scheme in ("fp32", "fp16") or (checkpoint.prequantized and checkpoint.format != "gguf"):
        profile_scheme = "none"  # a float profile, or a GPTQ checkpoint: exported as its own int4 codes
    scheme = _pick("quant", quant.scheme if scheme_given else None, profile_scheme, "none", chosen_by)
    spec = replace(quant or QuantSpec(), scheme=scheme)
    if profile is not None and not scheme_given and flavour == "standard" and spec.scheme == "int4":
        spec = replace(spec, symmetric=True)  # TensorRT's INT4 is weight-only and symmetric (exporters/onnx/quantized.py)
    spec = checkpoint_spec(checkpoint, spec)
    if spec is None or not spec.enabled:
        return None
    spec = spec.validate(flavour)  # with the flavour's storage layout
    check_flavour(checkpoint, spec, flavour)
    return spec


def plan_export(checkpoint: Checkpoint, *, device: str | Path | DeviceProfile | None = None, flavour: str | None = None,
                dtype: str | None = None, max_context: int | None = None, quant: QuantSpec | None = None,
                tied_head: str | None = None, accuracy_level: int | None = None,
                attention: AttentionChoice | None = None) -> ExportPlan:
    """Resolves every setting (argument, then profile, then default), checks them together and plans memory.

    `None` means "not given". `quant` with scheme "auto" (or None) takes the profile's weights (none without
    a profile); its other fields (method, block size, tables) are kept. `attention`: dense or InfLLM v2 sparse
    (edgecpm.sparse.choice; default: the checkpoint's own sparse_config).
    """
    from edgecpm.exporters.onnx import ExportOptions
    from edgecpm.exporters.onnx.build import check_options

    defaults = ExportOptions()
    profile = resolve_profile(device)
    exports = profile.export if profile is not None else None
    chosen_by: dict[str, str] = {}
    flavour = _pick("flavour", flavour, exports and exports.flavour, defaults.flavour, chosen_by)
    dtype_name = _pick("dtype", dtype, exports and exports.dtype, defaults.precision, chosen_by)
    precision = PRECISION_ALIASES.get(str(dtype_name).lower())
    if precision is None:
        raise UnsupportedError(f"unknown dtype {dtype_name!r} (choose fp32 or fp16)", field="dtype")
    tied_head = tied_head or defaults.tied_head
    spec = _quant(checkpoint, quant, profile, flavour, chosen_by)
    config = checkpoint.config
    sparse = (attention or AttentionChoice()).resolve(config.sparse)
    memory = plan_memory(config, Storage(precision, spec, tied_head), profile, sparse)
    model_limit = config.max_position_embeddings
    if max_context is not None:
        chosen_by["max_context"] = "flag"
        context = max_context
    elif memory.max_context is not None:
        chosen_by["max_context"] = "plan"
        context = memory.max_context
    else:
        chosen_by["max_context"] = "default" if defaults.max_context <= model_limit else "model"
        context = min(defaults.max_context, model_limit)
    if max_context is not None:
        check_max_context(checkpoint, max_context)  # the model's limit is named before the device's
    check_fits(config, memory, requested_context=max_context, profile=profile,
               model_name=Path(str(checkpoint.path)).name or "the model")
    check_max_context(checkpoint, context)
    # The graph attends sparsely where its context can reach dense_len; below it the lowering would only add stage-1
    # work to attention that is dense anyway.
    options = ExportOptions(flavour=flavour, precision=precision, max_context=context, tied_head=tied_head,
                            accuracy_level=defaults.accuracy_level if accuracy_level is None else accuracy_level,
                            sparse=sparse if reaches_sparse(sparse, context) else None)
    check_options(options)
    record = None if profile is None else DeviceRecord(profile.name, profile.version, profile.sha256, dict(chosen_by),
                                                       memory.to_dict(context))
    return ExportPlan(options=options, quant=spec, memory=memory, profile=profile, device=record, chosen_by=chosen_by,
                      attention=sparse)


def check_max_context(checkpoint: Checkpoint, max_context: int) -> None:
    limit = checkpoint.config.max_position_embeddings
    if not isinstance(max_context, int) or isinstance(max_context, bool) or max_context < 1:
        raise UnsupportedError(f"max_context must be a positive integer, got {max_context!r}", field="max_context")
    if max_context > limit:
        # Beyond max_position_embeddings, dynamic-NTK/LongRoPE would need length-dependent rotary tables.
        raise UnsupportedError(f"max_context {max_context} exceeds the model's max_position_embeddings {limit}",
                               path=checkpoint.path, field="max_context")
