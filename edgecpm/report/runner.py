"""Measures bundles on this machine in alternating rounds and assembles the raw report (summaries: summary.py).

Every (bundle, round) runs in a fresh process (edgecpm.report.worker), so its load time and resident-memory peak are
its own; round r starts at bundle r mod n, so on a noisy machine no bundle always runs first or last, and the ratio of
two bundles is taken within each round. A separate instrumented process per bundle measures the phase breakdown.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgecpm.errors import EdgecpmError
from edgecpm.report.schema import SCHEMA_ID, SCHEMA_VERSION
from edgecpm.report.worker import MARK


class ProfileError(EdgecpmError):
    """A bundle that could not be measured, or settings that cannot be measured."""


@dataclass
class ProfileSettings:
    prompt_lengths: tuple[int, ...] = (128, 1024, 4096)
    new_tokens: int = 128
    runs: int = 3
    threads: int | None = None
    kernels: str | None = None
    device: str | None = None
    bandwidth_gib: float = 1.0
    phase_steps: int = 32
    compare: bool = False
    command: list[str] = field(default_factory=list)

    def validate(self) -> ProfileSettings:
        if not self.prompt_lengths or any(n < 1 for n in self.prompt_lengths):
            raise ProfileError(f"prompt lengths must be positive integers (got {list(self.prompt_lengths)})")
        if self.new_tokens < 1:
            raise ProfileError(f"--new-tokens must be at least 1 (got {self.new_tokens})")
        if self.runs < 1:
            raise ProfileError(f"--runs must be at least 1 (got {self.runs})")
        if self.bandwidth_gib <= 0:
            raise ProfileError(f"the bandwidth probe needs a positive size (got {self.bandwidth_gib} GiB)")
        return self


def parse_lengths(text: str) -> tuple[int, ...]:
    try:
        lengths = tuple(int(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        raise ProfileError(f"--prompt-lengths must be comma-separated integers (got {text!r})") from None
    if not lengths or any(n < 1 for n in lengths):
        raise ProfileError(f"--prompt-lengths must be positive integers (got {text!r})")
    return tuple(sorted(set(lengths)))


def bundle_manifest(bundle: Path) -> dict[str, Any]:
    """The bundle's manifest as written, its (large) tensor index replaced by a count."""
    from edgecpm.bundle import read_manifest

    read_manifest(bundle)  # the same checks (schema version, fields) as every reader
    raw = json.loads((bundle / "edgecpm.json").read_text())
    tensors = raw.pop("tensors", None)
    raw["tensors"] = {"count": len(tensors or {}), "omitted": "the tensor index is left out of reports"}
    return raw


def labels(bundles: list[Path]) -> list[str]:
    names = [bundle.resolve().name for bundle in bundles]
    return [name if names.count(name) == 1 else f"{name} ({i + 1})" for i, name in enumerate(names)]


def device_profile(name: str | None) -> dict[str, Any]:
    from edgecpm.devices.detect import detect
    from edgecpm.devices.profile import load_profile

    reasons: list[str] = []
    if name is None:
        detection = detect()
        name, reasons = detection.profile, list(detection.reasons)
    profile = load_profile(name)
    return {"name": profile.name, "version": profile.version, "chosen_by": "detected" if reasons else "--device",
            "detection_reasons": reasons, "memory_bytes": profile.hardware.memory_bytes,
            "budget_bytes": profile.budget_bytes, "memory_bandwidth_gbps": profile.hardware.memory_bandwidth_gbps,
            "unified_memory": profile.hardware.unified_memory, "sha256": profile.sha256}


Progress = Callable[[str, int], None]  # (description, units to advance)


def run_worker(spec: dict, progress: Progress | None, description: str) -> dict:
    """Runs one measuring process; its progress lines advance `progress`, its result is returned."""
    with tempfile.TemporaryDirectory(prefix="edgecpm-profile-") as scratch:
        spec_file, errors = Path(scratch) / "spec.json", Path(scratch) / "stderr"
        spec_file.write_text(json.dumps(spec))
        result, error = None, None
        started = time.perf_counter()
        with open(errors, "w") as stderr:
            child = subprocess.Popen([sys.executable, "-m", "edgecpm.report.worker", str(spec_file)], stdout=subprocess.PIPE,
                                     stderr=stderr, text=True)
            assert child.stdout is not None
            for line in child.stdout:
                if not line.startswith(MARK):
                    continue
                message = json.loads(line[len(MARK):])
                if message["type"] == "progress" and progress:
                    progress(description, int(message["advance"]))
                elif message["type"] == "result":
                    result = message["data"]
                elif message["type"] == "error":
                    error = message["message"]
            child.wait()
        seconds = time.perf_counter() - started
        if result is None:
            tail = errors.read_text(errors="replace").strip().splitlines()
            raise ProfileError(error or (tail[-1] if tail else f"the measuring process exited with {child.returncode}"),
                               path=spec["bundle"])
    result["process_seconds"] = seconds
    return result


def units_per_run(settings: ProfileSettings) -> int:
    return len(settings.prompt_lengths) * (1 + settings.new_tokens)


def profile_bundles(bundles: list[str | Path], settings: ProfileSettings, *, progress: Progress | None = None,
                    on_stage: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The raw report: machine, versions, the device profile, the bandwidth probe and every run's samples."""
    from edgecpm.report.bandwidth import read_bandwidth
    from edgecpm.report.energy import energy_meter
    from edgecpm.report.machine import machine_facts, versions
    from edgecpm.runtimes.cpu import physical_cores

    settings.validate()
    paths = [Path(b) for b in bundles]
    if not paths:
        raise ProfileError("name at least one bundle")
    if settings.compare and len(paths) < 2:
        raise ProfileError("--compare needs at least two bundles")
    for path in paths:
        if not (path / "edgecpm.json").is_file():
            raise ProfileError("not an edgecpm bundle (no edgecpm.json)", path=path)
    names = labels(paths)
    entries = [{"label": name, "path": str(path.resolve()), "manifest": bundle_manifest(path), "runs": []}
               for name, path in zip(names, paths)]
    report: dict[str, Any] = {
        "schema": SCHEMA_ID, "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": list(settings.command),
        "settings": {"prompt_lengths": list(settings.prompt_lengths), "new_tokens": settings.new_tokens, "runs": settings.runs,
                     "threads": settings.threads, "kernels": settings.kernels or "auto", "sampling": "greedy, stop tokens ignored",
                     "bandwidth_probe_gib": settings.bandwidth_gib, "phase_steps": settings.phase_steps,
                     "order": "alternating rounds: round r starts at bundle r mod n, each run in a fresh process"},
        "machine": machine_facts(), "versions": versions(), "device_profile": device_profile(settings.device),
        "energy": energy_meter().describe(), "bundles": entries,
    }
    if on_stage:
        on_stage("bandwidth probe")
    report["bandwidth_probe"] = read_bandwidth(settings.bandwidth_gib, settings.threads or physical_cores())
    if progress:
        progress("bandwidth probe", 1)
    spec = {"threads": settings.threads, "kernels": settings.kernels, "prompt_lengths": list(settings.prompt_lengths),
            "new_tokens": settings.new_tokens, "phase_steps": min(settings.phase_steps, settings.new_tokens)}
    order = list(range(len(paths)))
    for round_index in range(settings.runs):
        start = round_index % len(order)
        for position, i in enumerate(order[start:] + order[:start]):
            description = f"round {round_index + 1}/{settings.runs}: {names[i]}"
            if on_stage:
                on_stage(description)
            result = run_worker({**spec, "bundle": str(paths[i]), "mode": "run"}, progress, description)
            entries[i]["runs"].append({"round": round_index, "order_in_round": position, **result})
    for i, entry in enumerate(entries):
        decode = entry["runs"][0]["kernels"].get("decode")
        mode = {"native": "native_phases", "onnxruntime": "onnxruntime_phases"}.get(decode)
        description = f"phases: {names[i]}"
        if on_stage:
            on_stage(description)
        if mode is None:
            entry["phases"] = {"source": None, "reason": f"no phase counters for {decode} decode"}
        else:
            entry["phases"] = run_worker({**spec, "bundle": str(paths[i]), "mode": mode}, None, description)
        if progress:
            progress(description, 1)
    return report


def total_units(bundles: int, settings: ProfileSettings) -> int:
    return 1 + bundles * settings.runs * units_per_run(settings) + bundles
