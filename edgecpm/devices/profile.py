"""Device profiles: versioned TOML data about one device, and edgecpm's defaults for it, validated once.

A profile has two halves. `[hardware]` holds facts (each with its public source in a comment in the
file); `[memory]`, `[runtime]`, `[export]` and `[tensorrt]` hold edgecpm's policy for the device.

Units, the same in every file: sizes are binary gibibytes in keys ending `_gib` (1 GiB = 2**30 bytes;
DRAM is sold in binary sizes, so a "64GB" module is 64 GiB); bandwidth is decimal gigabytes per second in
keys ending `_gbps` (10**9 bytes/s, as vendors quote it); power in watts.

Every check lives in this module: an unknown key at any level, a missing or mistyped key, a value out of
range, malformed TOML or a schema newer than this reader raises `DeviceProfileError`, one line naming the
file and the dotted field.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from edgecpm.errors import EdgecpmError
from edgecpm.resources import tomllib

SCHEMA_VERSION = 1
BACKENDS = ("tensorrt", "onnxruntime", "native")
FLAVOURS = ("ort", "standard")
DTYPES = ("fp32", "fp16")
WEIGHTS = ("fp32", "fp16", "int8", "int4", "ternary")
PRECISION_FLAGS = ("fp16", "bf16", "int8", "int4", "fp8")
ISA_FEATURES = ("armv8.2-a", "neon", "dotprod", "i8mm", "sve", "avx2", "fma", "avx512f", "avx512bw", "avx512vl",
                "avx512_vnni", "avx_vnni")
KINDS = ("jetson", "gpu", "cpu")

GIB = 2**30
PACKAGE = "edgecpm.device_profiles"
MAX_FILE_BYTES = 1 << 20
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_VERSION = re.compile(r"^\d+\.\d+\.\d+$")
_SM = re.compile(r"^\d{1,2}\.\d$")
_MISSING = object()


class DeviceProfileError(EdgecpmError):
    """A device profile that cannot be found, read or validated."""


@dataclass(frozen=True)
class GpuFacts:
    name: str
    sm: str  # CUDA compute capability, "8.7"
    sm_count: int
    cuda_cores: int

    @property
    def sm_tuple(self) -> tuple[int, int]:
        major, minor = self.sm.split(".")
        return int(major), int(minor)


@dataclass(frozen=True)
class CpuFacts:
    name: str
    cores: int
    isa: tuple[str, ...]  # ("armv8.2-a", "neon", "dotprod") or ("avx2", "fma")


@dataclass(frozen=True)
class PowerMode:
    name: str
    watts: float


@dataclass(frozen=True)
class HardwareFacts:
    memory_bytes: int
    unified_memory: bool  # CPU and GPU share the DRAM (Jetson), so the OS's share comes out of the model's
    memory_bandwidth_gbps: float
    gpu: GpuFacts | None
    cpu: CpuFacts
    power_modes: tuple[PowerMode, ...]
    jetson_model: str | None  # the /proc/device-tree/model prefix that identifies it, Jetsons only


@dataclass(frozen=True)
class ExportDefaults:
    flavour: str
    dtype: str
    weights: str
    kv_dtype: str
    max_context: int | None


@dataclass(frozen=True)
class TensorRTSettings:
    optimization_level: int  # the builder optimization level, 0..5
    workspace_bytes: int  # memory-pool limit of the builder's workspace
    precision_flags: tuple[str, ...]  # builder flags; they apply to weakly typed networks only
    strongly_typed: bool  # precision comes from the graph's types


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    version: str
    description: str
    schema_version: int
    hardware: HardwareFacts
    reserved_bytes: int  # left to the OS and the robot's own software
    backends: tuple[str, ...]
    threads: int  # 0 = all physical cores
    export: ExportDefaults
    tensorrt: TensorRTSettings | None
    path: str  # where it was read from
    sha256: str  # of the file's bytes
    max_model_fraction: float | None = None  # of what is left after reserved_bytes

    @property
    def budget_bytes(self) -> int:
        """Memory the model may use: memory minus the reserve, times max_model_fraction where given."""
        free = self.hardware.memory_bytes - self.reserved_bytes
        return int(free * self.max_model_fraction) if self.max_model_fraction is not None else free

    @property
    def kind(self) -> str:
        if self.hardware.jetson_model is not None:
            return "jetson"
        return "gpu" if self.hardware.gpu is not None else "cpu"

    def manifest_record(self) -> dict[str, str]:
        """What an export writes into a bundle to say which profile it was made for."""
        return {"name": self.name, "version": self.version, "sha256": self.sha256}

    def to_dict(self) -> dict[str, Any]:
        hw = self.hardware
        gpu = hw.gpu
        trt = self.tensorrt
        return {
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "schema_version": self.schema_version,
            "kind": self.kind,
            "hardware": {
                "memory_bytes": hw.memory_bytes,
                "unified_memory": hw.unified_memory,
                "memory_bandwidth_gbps": hw.memory_bandwidth_gbps,
                "gpu": None if gpu is None else {"name": gpu.name, "sm": gpu.sm, "sm_count": gpu.sm_count,
                                                 "cuda_cores": gpu.cuda_cores},
                "cpu": {"name": hw.cpu.name, "cores": hw.cpu.cores, "isa": list(hw.cpu.isa)},
                "power_modes": [{"name": mode.name, "watts": mode.watts} for mode in hw.power_modes],
                "jetson_model": hw.jetson_model,
            },
            "memory": {"reserved_bytes": self.reserved_bytes, "max_model_fraction": self.max_model_fraction,
                       "budget_bytes": self.budget_bytes},
            "runtime": {"backends": list(self.backends), "threads": self.threads},
            "export": {"flavour": self.export.flavour, "dtype": self.export.dtype, "weights": self.export.weights,
                       "kv_dtype": self.export.kv_dtype, "max_context": self.export.max_context},
            "tensorrt": None if trt is None else {
                "optimization_level": trt.optimization_level, "workspace_bytes": trt.workspace_bytes,
                "precision_flags": list(trt.precision_flags), "strongly_typed": trt.strongly_typed},
            "path": self.path,
            "sha256": self.sha256,
        }


# --- finding and reading files ------------------------------------------------------------------------


def _shipped_dir():
    return resources.files(PACKAGE)


def list_profiles() -> list[str]:
    """Names of the profiles shipped with edgecpm, sorted."""
    return sorted(entry.name[: -len(".toml")] for entry in _shipped_dir().iterdir()
                  if entry.name.endswith(".toml") and entry.is_file())


def _is_path(name_or_path: str | Path) -> bool:
    if isinstance(name_or_path, Path):
        return True
    return "/" in name_or_path or "\\" in name_or_path or name_or_path.endswith(".toml")


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """A shipped profile by name (`jetson-orin-nano-8gb`), or a user's file by path (`./my-board.toml`)."""
    if _is_path(name_or_path):
        path = Path(name_or_path)
        if not path.exists():
            raise DeviceProfileError("no such file", path=path)
        if not path.is_file():
            raise DeviceProfileError("not a file", path=path)
        if path.stat().st_size > MAX_FILE_BYTES:
            raise DeviceProfileError(f"larger than {MAX_FILE_BYTES} bytes; not a device profile", path=path)
        return parse_profile(path.read_bytes(), str(path))
    name = str(name_or_path)
    shipped = list_profiles()
    if name not in shipped:
        raise DeviceProfileError(f"no such device profile (shipped: {', '.join(shipped)}; or give a path to a .toml "
                                 "file)", path=name)
    entry = _shipped_dir().joinpath(f"{name}.toml")
    return parse_profile(entry.read_bytes(), str(entry), expected_name=name)


def parse_profile(data: bytes, source: str, *, expected_name: str | None = None) -> DeviceProfile:
    """Validates a profile's bytes; `source` names the file in errors and in `DeviceProfile.path`."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DeviceProfileError(f"not UTF-8 text (bad byte at offset {exc.start})", path=source) from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        detail = str(exc).splitlines()[0] if str(exc) else "syntax error"
        raise DeviceProfileError(f"malformed TOML: {detail}", path=source) from None
    profile = _build(_Table(raw, source, ""), source, hashlib.sha256(data).hexdigest())
    if expected_name is not None and profile.name != expected_name:
        raise DeviceProfileError(f"must match the file name {expected_name!r}, got {profile.name!r}", path=source,
                                 field="name")
    return profile


# --- typed reading of one TOML table ------------------------------------------------------------------


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    text = repr(value) if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


class _Table:
    """One TOML table; every read names its dotted field, `only` rejects keys the schema does not know."""

    def __init__(self, raw: dict[str, Any], source: str, prefix: str):
        self.raw = raw
        self.source = source
        self.prefix = prefix

    def field(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def error(self, key: str | None, message: str) -> DeviceProfileError:
        field = self.field(key) if key is not None else (self.prefix or None)
        return DeviceProfileError(message, path=self.source, field=field)

    def only(self, *keys: str) -> None:
        unknown = sorted(set(self.raw) - set(keys))
        if unknown:
            raise self.error(unknown[0], f"unknown key (allowed here: {', '.join(keys)})")

    def value(self, key: str, default: Any = _MISSING) -> Any:
        if key not in self.raw:
            if default is _MISSING:
                raise self.error(key, "required key is missing")
            return default
        return self.raw[key]

    def number(self, key: str, *, minimum: float = 0.0, above: bool = True, maximum: float | None = None,
               default: Any = _MISSING) -> Any:
        value = self.value(key, default)
        if value is default and default is not _MISSING:
            return value
        low = f"greater than {minimum:g}" if above else f"at least {minimum:g}"
        if minimum == 0 and above:
            low = "positive"
        elif minimum == 0:
            low = "non-negative"
        wanted = f"must be a {low} number" + (f" no larger than {maximum:g}" if maximum is not None else "")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.error(key, f"{wanted}, got {_show(value)}")
        if (value <= minimum if above else value < minimum) or (maximum is not None and value > maximum):
            raise self.error(key, f"{wanted}, got {_show(value)}")
        return float(value)

    def integer(self, key: str, *, minimum: int, maximum: int | None = None, default: Any = _MISSING) -> Any:
        value = self.value(key, default)
        if value is default and default is not _MISSING:
            return value
        span = f"in {minimum}..{maximum}" if maximum is not None else f"at least {minimum}"
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"must be an integer {span}, got {_show(value)}")
        if value < minimum or (maximum is not None and value > maximum):
            raise self.error(key, f"must be an integer {span}, got {_show(value)}")
        return value

    def boolean(self, key: str) -> bool:
        value = self.value(key)
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, got {_show(value)}")
        return value

    def string(self, key: str, *, choices: Iterable[str] | None = None, pattern: re.Pattern[str] | None = None,
               like: str = "", default: Any = _MISSING) -> Any:
        value = self.value(key, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, str) or not value.strip():
            raise self.error(key, f"must be a non-empty string, got {_show(value)}")
        return self._check_text(key, value, choices, pattern, like)

    def strings(self, key: str, *, choices: Iterable[str] | None = None, allow_empty: bool = False) -> tuple[str, ...]:
        value = self.value(key)
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise self.error(key, f"must be a list of strings, got {_show(value)}")
        if not value and not allow_empty:
            raise self.error(key, "must not be empty")
        for item in value:
            self._check_text(key, item, choices, None, "")
        duplicates = sorted({item for item in value if value.count(item) > 1})
        if duplicates:
            raise self.error(key, f"lists {duplicates[0]!r} more than once")
        return tuple(value)

    def _check_text(self, key: str, value: str, choices: Iterable[str] | None, pattern: re.Pattern[str] | None,
                    like: str) -> str:
        if choices is not None and value not in tuple(choices):
            raise self.error(key, f"unknown value {_show(value)} (choose from {', '.join(choices)})")
        if pattern is not None and not pattern.match(value):
            raise self.error(key, f"must look like {like}, got {_show(value)}")
        return value

    def table(self, key: str, *, required: bool = True) -> _Table | None:
        if key not in self.raw:
            if required:
                raise self.error(key, "required table is missing")
            return None
        value = self.raw[key]
        if not isinstance(value, dict):
            raise self.error(key, f"must be a table, got {_show(value)}")
        return _Table(value, self.source, self.field(key))

    def tables(self, key: str) -> list[_Table]:
        value = self.value(key, [])
        if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
            raise self.error(key, f"must be a list of tables, got {_show(value)}")
        return [_Table(item, self.source, f"{self.field(key)}[{index}]") for index, item in enumerate(value)]


# --- the schema -----------------------------------------------------------------------------------------


def _bytes(gib: float) -> int:
    return round(gib * GIB)


def _build(top: _Table, source: str, sha256: str) -> DeviceProfile:
    # The version first: a newer file may hold keys this reader has never heard of.
    schema_version = top.integer("schema_version", minimum=1)
    if schema_version > SCHEMA_VERSION:
        raise top.error("schema_version", f"written for schema version {schema_version}; this edgecpm reads up to "
                                          f"{SCHEMA_VERSION} (upgrade edgecpm)")
    top.only("schema_version", "name", "version", "description", "hardware", "memory", "runtime", "export", "tensorrt")
    name = top.string("name", pattern=_NAME, like="a lower-case name such as 'jetson-orin-nano-8gb'")
    version = top.string("version", pattern=_VERSION, like="'1.0.0'")
    description = top.string("description")
    hardware = _hardware(top.table("hardware"))
    memory = top.table("memory")
    memory.only("reserved_gib", "max_model_fraction")
    reserved = memory.number("reserved_gib", minimum=0.0, above=False)
    if _bytes(reserved) >= hardware.memory_bytes:
        raise memory.error("reserved_gib", f"must be less than hardware.memory_gib "
                                           f"({hardware.memory_bytes / GIB:g}), got {reserved:g}")
    fraction = memory.number("max_model_fraction", maximum=1.0, default=None)
    runtime = top.table("runtime")
    runtime.only("backends", "threads")
    backends = runtime.strings("backends", choices=BACKENDS)
    threads = runtime.integer("threads", minimum=0)
    export = _export(top.table("export"))
    tensorrt_table = top.table("tensorrt", required=False)
    tensorrt = _tensorrt(tensorrt_table) if tensorrt_table is not None else None
    if "tensorrt" in backends:
        if hardware.gpu is None:
            raise runtime.error("backends", "lists tensorrt, which needs an NVIDIA GPU ([hardware.gpu])")
        if export.flavour != "standard":
            raise top.error("export.flavour", f"must be 'standard' when runtime.backends lists tensorrt (TensorRT builds "
                                              f"from the standard graph), got {export.flavour!r}")
        if tensorrt is None:
            raise top.error("tensorrt", "required table is missing (runtime.backends lists tensorrt)")
    elif tensorrt is not None:
        raise top.error("tensorrt", "given, but runtime.backends does not list tensorrt")
    return DeviceProfile(name=name, version=version, description=description, schema_version=schema_version,
                         hardware=hardware, reserved_bytes=_bytes(reserved), backends=backends, threads=threads,
                         export=export, tensorrt=tensorrt, path=source, sha256=sha256, max_model_fraction=fraction)


def _hardware(hw: _Table) -> HardwareFacts:
    hw.only("memory_gib", "unified_memory", "memory_bandwidth_gbps", "jetson_model", "power_modes", "gpu", "cpu")
    memory = hw.number("memory_gib")
    unified = hw.boolean("unified_memory")
    bandwidth = hw.number("memory_bandwidth_gbps")
    jetson_model = hw.string("jetson_model", default=None)
    modes = []
    for mode in hw.tables("power_modes"):
        mode.only("name", "watts")
        modes.append(PowerMode(name=mode.string("name"), watts=mode.number("watts")))
    names = [mode.name for mode in modes]
    if len(set(names)) != len(names):
        raise hw.error("power_modes", "names a power mode more than once")
    gpu_table = hw.table("gpu", required=False)
    gpu = None
    if gpu_table is not None:
        gpu_table.only("name", "sm", "sm_count", "cuda_cores")
        gpu = GpuFacts(name=gpu_table.string("name"), sm=gpu_table.string("sm", pattern=_SM, like="'8.7'"),
                       sm_count=gpu_table.integer("sm_count", minimum=1),
                       cuda_cores=gpu_table.integer("cuda_cores", minimum=1))
    cpu_table = hw.table("cpu")
    cpu_table.only("name", "cores", "isa")
    cpu = CpuFacts(name=cpu_table.string("name"), cores=cpu_table.integer("cores", minimum=1),
                   isa=cpu_table.strings("isa", choices=ISA_FEATURES))
    if jetson_model is not None and (gpu is None or not unified):
        raise hw.error("jetson_model", "a Jetson has an integrated GPU ([hardware.gpu]) and unified_memory = true")
    return HardwareFacts(memory_bytes=_bytes(memory), unified_memory=unified, memory_bandwidth_gbps=bandwidth,
                         gpu=gpu, cpu=cpu, power_modes=tuple(modes), jetson_model=jetson_model)


def _export(export: _Table) -> ExportDefaults:
    export.only("flavour", "dtype", "weights", "kv_dtype", "max_context")
    dtype, kv_dtype = export.string("dtype", choices=DTYPES), export.string("kv_dtype", choices=DTYPES)
    if kv_dtype != dtype:  # exported graphs cache keys and values at their activation precision
        raise export.error("kv_dtype", f"must equal dtype ({dtype}): the graph caches K/V at its activation precision")
    return ExportDefaults(flavour=export.string("flavour", choices=FLAVOURS), dtype=dtype,
                          weights=export.string("weights", choices=WEIGHTS), kv_dtype=kv_dtype,
                          max_context=export.integer("max_context", minimum=1, default=None))


def _tensorrt(trt: _Table) -> TensorRTSettings:
    trt.only("optimization_level", "workspace_gib", "precision_flags", "strongly_typed")
    level = trt.integer("optimization_level", minimum=0, maximum=5)
    workspace = trt.number("workspace_gib")
    flags = trt.strings("precision_flags", choices=PRECISION_FLAGS, allow_empty=True)
    strongly_typed = trt.boolean("strongly_typed")
    if strongly_typed and flags:
        raise trt.error("precision_flags", "must be empty when strongly_typed = true (a strongly typed network takes "
                                           "its precision from the graph)")
    return TensorRTSettings(optimization_level=level, workspace_bytes=_bytes(workspace), precision_flags=flags,
                            strongly_typed=strongly_typed)
