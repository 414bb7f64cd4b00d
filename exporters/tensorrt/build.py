"""`edgecpm engine build`: a TensorRT engine from a bundle's `standard` graph, built and pinned on the target.

Two steps, so that nothing is written before everything that can be checked has been:

- `plan_build` reads the bundle and the device profile and checks them, then checks that TensorRT imports and a CUDA
  GPU is there (one-line errors otherwise), and derives the two optimization profiles from the manifest's graph I/O
  (`optimization_profiles`, a pure function).
- `run_build` parses `model.onnx` with TensorRT's OnnxParser straight from disk (`parse_from_file`: the parser reads
  the external weights itself; Python never holds them), builds a strongly typed network where TensorRT has them
  (10.x: the STRONGLY_TYPED creation flag; 11.x: every network), with the profile's memory-pool limit, optimization
  level and (weakly typed builds only) precision flags, reuses and refreshes the bundle's timing cache, reports
  progress through an `IProgressMonitor` where TensorRT has one, and writes `tensorrt/<device>-sm<sm>-trt<version>.engine`
  under a temporary name renamed into place, then the manifest with its `EngineRecord` (replacing the device's older
  one) in one more rename.

Profiles: "prefill" takes input_ids [1, 1..prefill_max] over a past of [0..max_context-1] rows, "decode" input_ids
[1, 1] over the same past range. TensorRT's profiles are boxes, so past + new <= max_context cannot be stated; the
runtime keeps to it, and prefill's past range reaches max_context - 1 so that a chat turn late in the context is
still one prefill (the cost: the builder sizes attention scratch for past + prefill_max positions).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from edgecpm.exporters.tensorrt.pin import HostFacts, current_host
from edgecpm.exporters.tensorrt.plugins import PLUGIN_DIR, SparsePlugin, load_plugin_library, plugin_graph

from edgecpm.bundle import EngineRecord, Manifest, read_manifest, write_manifest
from edgecpm.errors import BundleError, EdgecpmError, MissingDependencyError, UnsupportedError
from edgecpm.planner import PREFILL_PASS

ENGINE_DIR = "tensorrt"
TIMING_CACHE = f"{ENGINE_DIR}/timing.cache"
DEFAULT_PREFILL_MAX = PREFILL_PASS["tensorrt"]  # the prompt tokens per pass the memory planner allows for
PROFILE_NAMES = ("prefill", "decode")  # optimization profile 0, 1 (the runtime looks them up by name)
SEQUENCE, PAST = "sequence_length", "past_sequence_length"
PRECISION_FLAGS = {"fp16": "FP16", "bf16": "BF16", "int8": "INT8", "int4": "INT4", "fp8": "FP8", "tf32": "TF32"}
TENSORRT_PURPOSE = "engine build (TensorRT 10.x or 11.x; on a Jetson it ships with JetPack)"

Say = Callable[[str], None]


class BuildMonitor(Protocol):
    """What the builder reports as it goes (TensorRT's IProgressMonitor, without TensorRT types)."""

    def phase_start(self, phase: str, parent: str | None, steps: int) -> None: ...

    def step_complete(self, phase: str, step: int) -> bool: ...  # False cancels the build

    def phase_finish(self, phase: str) -> None: ...


@dataclass(frozen=True)
class BuildSettings:
    """Builder settings: a device profile's `[tensorrt]` table, or TensorRT's defaults."""

    optimization_level: int | None = None   # None: TensorRT's default (3)
    workspace_bytes: int | None = None      # None: no limit beyond the device's memory
    precision_flags: tuple[str, ...] = ()   # weakly typed builds only
    strongly_typed: bool = True
    source: str = "TensorRT defaults"


@dataclass(frozen=True)
class BuildPlan:
    bundle: Path
    manifest: Manifest
    device: str
    settings: BuildSettings
    max_context: int
    prefill_max: int
    shape_profiles: dict[str, dict[str, list[list[int]]]]
    host: HostFacts
    engine_file: str
    replaces: EngineRecord | None
    sparse_plugin: SparsePlugin | None = None  # the InfLLM v2 plugin in place of the graph's lowering


# --- pure parts ------------------------------------------------------------------------------------------


def check_standard_bundle(manifest: Manifest, bundle: str | Path) -> None:
    """TensorRT takes only the `standard` graph (standard ONNX ops, KV appended by the runtime)."""
    if manifest.flavour != "standard":
        raise UnsupportedError(f"a TensorRT engine is built from the standard graph, this bundle is {manifest.flavour!r}; "
                               "export it with --flavour standard (or --device <a GPU profile>)", path=bundle, field="flavour")
    if manifest.kv_layout.get("mode") != "append":
        raise UnsupportedError(f"KV layout {manifest.kv_layout.get('mode')!r} is not the standard graph's 'append'; "
                               "re-export with --flavour standard", path=bundle, field="kv_layout.mode")
    if not manifest.graph_io.get("inputs"):
        raise BundleError("the manifest has no graph_io; re-export the bundle", path=bundle, field="graph_io")


def check_sizes(manifest: Manifest, max_context: int | None, prefill_max: int | None) -> tuple[int, int]:
    """(max_context, prefill_max): the bundle's context by default, prefill up to DEFAULT_PREFILL_MAX tokens."""
    limit = int(manifest.max_context)
    max_context = limit if max_context is None else int(max_context)
    if not 2 <= max_context <= limit:
        raise UnsupportedError(f"--max-context must be 2..{limit} (the bundle's rotary tables end at {limit})",
                               field="--max-context")
    prefill_max = min(DEFAULT_PREFILL_MAX, max_context) if prefill_max is None else int(prefill_max)
    if not 1 <= prefill_max <= max_context:
        raise UnsupportedError(f"--prefill-max must be 1..{max_context}", field="--prefill-max")
    return max_context, prefill_max


def optimization_profiles(manifest: Manifest, max_context: int, prefill_max: int) -> dict[str, dict[str, list[list[int]]]]:
    """profile name -> graph input -> [min, opt, max] shape, from the manifest's graph_io and kv_layout.

    Dimensions: `sequence_length` is the new tokens (prefill 1..prefill_max, decode 1), `past_sequence_length` the
    cached ones (0..max_context-1 in both), integers are kept. Every input is listed: input_ids, the KV inputs of
    kv_layout["tensors"] and the position inputs of kv_layout["position_inputs"] (none in the standard graph).
    """
    specs = {spec["name"]: spec for spec in manifest.graph_io.get("inputs", [])}
    layout = manifest.kv_layout
    names = ["input_ids", *(t["input"] for t in layout.get("tensors", [])), *layout.get("position_inputs", [])]
    for name in specs:
        if name not in names:
            names.append(name)
    ranges = {
        "prefill": {SEQUENCE: (1, max(1, prefill_max // 2), prefill_max), PAST: (0, 0, max_context - 1)},
        "decode": {SEQUENCE: (1, 1, 1), PAST: (0, max_context // 2, max_context - 1)},
    }
    profiles: dict[str, dict[str, list[list[int]]]] = {}
    for profile, symbols in ranges.items():
        shapes = {}
        for name in names:
            if name not in specs:
                raise BundleError(f"input {name!r} is not in graph_io; re-export the bundle", field="graph_io")
            corners: list[list[int]] = [[], [], []]
            for dim in specs[name]["shape"]:
                if isinstance(dim, int):
                    values = (dim, dim, dim)
                elif dim in symbols:
                    values = symbols[dim]
                else:
                    raise UnsupportedError(f"input {name!r} has dimension {dim!r}, which edgecpm cannot size for TensorRT",
                                           field="graph_io")
                for corner, value in zip(corners, values):
                    corner.append(int(value))
            shapes[name] = corners
        profiles[profile] = shapes
    return profiles


def slug(text: str) -> str:
    value = re.sub(r"[^a-z0-9._-]+", "-", text.strip().lower()).strip("-.")
    return value or "gpu"


def engine_file_name(device: str, sm: str, tensorrt_version: str) -> str:
    """`tensorrt/<device>-sm<sm>-trt<version>.engine`, relative to the bundle: "jetson-agx-orin-64gb-sm87-trt10.3.0.30"."""
    return f"{ENGINE_DIR}/{slug(device)}-sm{sm.replace('.', '')}-trt{slug(tensorrt_version)}.engine"


def with_engine(manifest: Manifest, record: EngineRecord) -> Manifest:
    """The manifest with `record` appended, replacing any older record for the same device."""
    return replace(manifest, engines=[e for e in manifest.engines if e.device != record.device] + [record])


def settings_from_profile(profile: Any) -> BuildSettings:
    trt = getattr(profile, "tensorrt", None)
    if trt is None:
        return BuildSettings(source=f"TensorRT defaults (profile {profile.name} has no [tensorrt] table)")
    flags = tuple(trt.precision_flags)
    unknown = [flag for flag in flags if flag not in PRECISION_FLAGS]
    if unknown:
        raise UnsupportedError(f"unknown TensorRT precision flag {unknown[0]!r} (known: {', '.join(PRECISION_FLAGS)})",
                               field="tensorrt.precision_flags")
    return BuildSettings(optimization_level=int(trt.optimization_level), workspace_bytes=int(trt.workspace_bytes),
                         precision_flags=flags, strongly_typed=bool(trt.strongly_typed), source=f"profile {profile.name}")


# --- the plan: every check before anything is written ------------------------------------------------------


def require_tensorrt() -> Any:
    """The tensorrt module, or MissingDependencyError naming the package and the extra (one line)."""
    from edgecpm.optional import require

    return require("tensorrt", "tensorrt", TENSORRT_PURPOSE)


def missing_tensorrt(host: HostFacts) -> MissingDependencyError:
    """The error `require_tensorrt` raises, for a HostFacts that has no TensorRT."""
    cause = f" ({host.tensorrt_problem})" if host.tensorrt_problem and "No module named" not in host.tensorrt_problem else ""
    return MissingDependencyError(f"{TENSORRT_PURPOSE} needs the 'tensorrt' package: pip install 'edgecpm[tensorrt]'{cause}")


def require_gpu(host: HostFacts) -> None:
    if not host.has_gpu:
        raise UnsupportedError(f"engine build needs an NVIDIA GPU with CUDA, and none was found ({host.gpu_problem}); "
                               "run it on the target (Jetson or RTX machine) with pip install 'edgecpm[tensorrt]'")


def _load_profile(name_or_path: str):
    from edgecpm.devices.profile import load_profile

    return load_profile(name_or_path)


def resolve_device(device: str | None, manifest: Manifest, host: HostFacts) -> tuple[str, BuildSettings]:
    """(device name, settings): --device's profile; else the profile the bundle was exported for; else this GPU's
    name (slugged) with TensorRT's defaults. A --device equal to this GPU's slug names that profile-less choice."""
    gpu_slug = slug(host.gpu_name or "gpu")
    if device is None and manifest.device is not None:
        try:
            profile = _load_profile(manifest.device.name)
        except (EdgecpmError, ImportError):
            raise UnsupportedError(f"the bundle was exported for device {manifest.device.name}, whose profile edgecpm "
                                   "cannot load here; pass --device with its .toml file or another GPU profile",
                                   field="--device") from None
        return _checked_profile(profile, host)
    if device is None:
        return gpu_slug, BuildSettings()
    if device == gpu_slug:  # the name a profile-less build recorded (and its rebuild command repeats)
        try:
            profile = _load_profile(device)
        except (EdgecpmError, ImportError):
            return gpu_slug, BuildSettings()
        return _checked_profile(profile, host)
    return _checked_profile(_load_profile(device), host)


def _checked_profile(profile: Any, host: HostFacts) -> tuple[str, BuildSettings]:
    if profile.kind == "cpu" or profile.hardware.gpu is None:
        raise UnsupportedError(f"device profile {profile.name} has no GPU; a TensorRT engine needs a Jetson or GPU profile",
                               field="--device")
    wanted = profile.hardware.gpu.sm
    if host.sm is not None and wanted != host.sm:
        raise UnsupportedError(f"device profile {profile.name} is for SM {wanted}, this GPU is SM {host.sm} "
                               f"({host.gpu_name}); build on the target, or pass this GPU's profile", field="--device")
    return profile.name, settings_from_profile(profile)


def check_sparse_plugin(manifest: Manifest, sparse_plugin: SparsePlugin | None) -> SparsePlugin | None:
    """The plugin, checked: it exists, and the bundle's graph has the operator it implements."""
    if sparse_plugin is None:
        return None
    if manifest.graph_attention != "sparse":
        raise UnsupportedError("--sparse-plugin replaces a sparse graph's InfLLM v2 lowering; this bundle's graph attends "
                               "densely (export it with --attention sparse)", field="--sparse-plugin")
    return sparse_plugin.checked()


def plan_build(bundle: str | Path, *, device: str | None = None, max_context: int | None = None,
               prefill_max: int | None = None, overwrite: bool = False, host: HostFacts | None = None,
               sparse_plugin: SparsePlugin | None = None) -> BuildPlan:
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    check_standard_bundle(manifest, bundle)
    sparse_plugin = check_sparse_plugin(manifest, sparse_plugin)
    max_context, prefill_max = check_sizes(manifest, max_context, prefill_max)
    profiles = optimization_profiles(manifest, max_context, prefill_max)
    if host is None:
        require_tensorrt()
        host = current_host()
    if host.tensorrt_version is None:
        raise missing_tensorrt(host)
    require_gpu(host)
    name, settings = resolve_device(device, manifest, host)
    replaces = next((e for e in manifest.engines if e.device == name), None)
    if replaces is not None and not overwrite:
        raise BundleError(f"the bundle has an engine for device {name} ({replaces.file}); pass --overwrite to rebuild it",
                          path=bundle)
    return BuildPlan(bundle, manifest, name, settings, max_context, prefill_max, profiles, host,
                     engine_file_name(name, host.sm, host.tensorrt_version), replaces, sparse_plugin)


# --- the build (needs TensorRT and a GPU) -------------------------------------------------------------------


def _major(trt) -> int:
    return int(str(trt.__version__).split(".")[0])


def _progress_monitor(trt, monitor: BuildMonitor):
    """An IProgressMonitor forwarding to `monitor`; TensorRT calls it from its own threads."""

    class _Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            try:
                monitor.phase_start(phase_name, parent_phase, num_steps)
            except Exception:  # noqa: BLE001, S110  (a display error must not abort the build)
                pass

        def step_complete(self, phase_name, step):
            try:
                return monitor.step_complete(phase_name, step) is not False
            except Exception:  # noqa: BLE001
                return True

        def phase_finish(self, phase_name):
            try:
                monitor.phase_finish(phase_name)
            except Exception:  # noqa: BLE001, S110
                pass

    return _Monitor()


def _precheck(plan: BuildPlan, say: Say) -> None:
    """Warnings for what TensorRT's documented rules say its parser/builder will refuse (best effort)."""
    if importlib.util.find_spec("onnx") is None:
        return
    from edgecpm.exporters.tensorrt.onnx_support import check_model, table_for_version

    try:
        table = table_for_version(plan.host.tensorrt_version or "")
        if table is None:
            return
        findings = check_model(plan.bundle / plan.manifest.model_file, table)
    except EdgecpmError:
        return
    if findings:
        shown = "; ".join(str(f) for f in findings[:3])
        more = f" (+{len(findings) - 3} more)" if len(findings) > 3 else ""
        say(f"warning: {len(findings)} place(s) in the graph break TensorRT {table.versions}'s documented rules: {shown}{more}")


def _write_atomically(path: Path, chunks, digest=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.partial")
    try:
        with open(staging, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
                if digest is not None:
                    digest.update(chunk)
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise


def run_build(plan: BuildPlan, *, monitor: BuildMonitor | None = None, say: Say | None = None) -> EngineRecord:
    say = say or (lambda message: None)
    trt = require_tensorrt()
    _precheck(plan, say)
    major = _major(trt)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)

    strongly = plan.settings.strongly_typed or major >= 11  # 11.x builds strongly typed networks only
    flags = 0
    typed_flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly and typed_flag is not None:
        flags |= 1 << int(typed_flag)
    elif strongly and major < 11:
        say("warning: this TensorRT has no strongly typed networks; building weakly typed with precision flags")
        strongly = False
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    model_path = plan.bundle / plan.manifest.model_file
    if plan.sparse_plugin is not None:
        load_plugin_library(plan.sparse_plugin.library)
        model_path = plugin_graph(model_path)  # the same graph without the lowering: the plugin takes the node
        say(f"InfLLM v2 attention from the plugin {plan.sparse_plugin.library.name}")
    say(f"parsing {model_path.name} (weights read from disk by TensorRT)")
    try:
        parsed = parser.parse_from_file(str(model_path))
    finally:
        if plan.sparse_plugin is not None:
            model_path.unlink(missing_ok=True)
    if not parsed:
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        first = errors[0].desc() if errors else "no error reported"
        node = getattr(errors[0], "node_name", None) if errors else None
        where = f" at node {node()}" if callable(node) and node() else ""
        more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
        raise BundleError(f"TensorRT {trt.__version__}'s ONNX parser refused the graph{where}: {first}{more}",
                          path=model_path)

    config = builder.create_builder_config()
    settings = plan.settings
    if settings.workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings.workspace_bytes))
    if settings.optimization_level is not None:
        config.builder_optimization_level = int(settings.optimization_level)
    if not strongly:
        wanted = settings.precision_flags or ((plan.manifest.precision,) if plan.manifest.precision == "fp16" else ())
        for flag in wanted:
            member = getattr(trt.BuilderFlag, PRECISION_FLAGS[flag], None)
            if member is None:
                raise UnsupportedError(f"TensorRT {trt.__version__} has no {flag} builder flag", field="tensorrt.precision_flags")
            config.set_flag(member)
    for name in PROFILE_NAMES:
        profile = builder.create_optimization_profile()
        for tensor, (low, opt, high) in plan.shape_profiles[name].items():
            profile.set_shape(tensor, low, opt, high)
        config.add_optimization_profile(profile)

    cache_path = plan.bundle / TIMING_CACHE
    cached = cache_path.read_bytes() if cache_path.is_file() else b""
    cache = config.create_timing_cache(cached)
    if not config.set_timing_cache(cache, False):
        say("timing cache in the bundle was made elsewhere; starting a new one")
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
    elif cached:
        say(f"reusing the timing cache ({len(cached)} bytes)")

    keep_alive = None
    if monitor is not None and hasattr(trt, "IProgressMonitor") and hasattr(config, "progress_monitor"):
        keep_alive = _progress_monitor(trt, monitor)
        config.progress_monitor = keep_alive
    say(f"building for {plan.host.gpu_name} (SM {plan.host.sm}) with TensorRT {trt.__version__}, "
        f"{'strongly' if strongly else 'weakly'} typed, {settings.source}"
        + ("" if keep_alive is not None else "; this TensorRT reports no build progress, it can take minutes"))
    serialized = builder.build_serialized_network(network, config)  # keep_alive outlives the build (TensorRT's rule)
    if serialized is None:
        raise BundleError("TensorRT could not build the engine (its messages above say why); the bundle is unchanged",
                          path=plan.bundle)
    return _install(plan, memoryview(serialized), config.get_timing_cache().serialize(), say)


def _install(plan: BuildPlan, engine: memoryview, timing_cache, say: Say) -> EngineRecord:
    """Engine file (temp + rename), then the manifest (one rename); an older file of the same name comes back on failure."""
    import edgecpm

    target = plan.bundle / plan.engine_file
    backup = target.with_name(f".{target.name}.old") if target.exists() else None
    digest = hashlib.sha256()
    step = 64 << 20
    chunks = (engine[i:i + step] for i in range(0, len(engine), step))
    if backup is not None:
        os.replace(target, backup)
    plugins = []
    if plan.sparse_plugin is not None:  # the engine needs the library wherever it is deserialized: the bundle keeps it
        plugins = [f"{PLUGIN_DIR}/{plan.sparse_plugin.library.name}"]
        _write_atomically(plan.bundle / plugins[0], [plan.sparse_plugin.library.read_bytes()])
    try:
        _write_atomically(target, chunks, digest)
        record = EngineRecord(file=plan.engine_file, sha256=digest.hexdigest(), device=plan.device,
                              tensorrt_version=plan.host.tensorrt_version, gpu_name=plan.host.gpu_name, sm=plan.host.sm,
                              l4t_release=plan.host.l4t_release, max_context=plan.max_context,
                              shape_profiles=plan.shape_profiles, timing_cache=TIMING_CACHE, built_with=edgecpm.__version__,
                              plugins=plugins)
        manifest = with_engine(read_manifest(plan.bundle), record)
        write_manifest(plan.bundle, manifest)
    except BaseException:
        target.unlink(missing_ok=True)
        if backup is not None:
            os.replace(backup, target)
        raise
    if backup is not None:
        backup.unlink(missing_ok=True)
    old = plan.replaces
    if old is not None and old.file != record.file and all(e.file != old.file for e in manifest.engines):
        (plan.bundle / old.file).unlink(missing_ok=True)
    try:
        _write_atomically(plan.bundle / TIMING_CACHE, [memoryview(timing_cache)])
    except OSError as exc:
        say(f"warning: could not save the timing cache ({exc})")
    say(f"wrote {plan.engine_file} ({len(engine) / 2**20:.1f} MiB)")
    return record


def build_engine(bundle: str | Path, *, device: str | None = None, max_context: int | None = None,
                 prefill_max: int | None = None, overwrite: bool = False, monitor: BuildMonitor | None = None,
                 say: Say | None = None, sparse_plugin: SparsePlugin | None = None) -> EngineRecord:
    """Builds, pins and records a TensorRT engine for this machine's GPU; returns its EngineRecord. `sparse_plugin`:
    the InfLLM v2 plugin library runs a sparse graph's attention instead of its lowering (exporters/tensorrt/plugins.py)."""
    plan = plan_build(bundle, device=device, max_context=max_context, prefill_max=prefill_max, overwrite=overwrite,
                      sparse_plugin=sparse_plugin)
    return run_build(plan, monitor=monitor, say=say)


__all__ = ["BuildMonitor", "BuildPlan", "BuildSettings", "build_engine", "check_sizes", "check_sparse_plugin",
           "check_standard_bundle",
           "engine_file_name", "optimization_profiles", "plan_build", "resolve_device", "run_build",
           "settings_from_profile", "with_engine"]
