"""Energy meters the machine exposes: RAPL counters (x86, /sys/class/powercap) or a Jetson's INA3221 power rails.

`energy_meter(root)` returns a meter whose `measure()` context gives the joules spent while it was open, or a
meter that is unavailable and says why (`reason`): no powercap tree in this VM, counters readable only by root, no
INA3221. RAPL counts the whole CPU package (every process and the idle cores too); INA3221 rails are sampled
every `interval` seconds and integrated (the trapezoid rule), so energy over runs much shorter than the interval
is not meaningful. `root` lets tests point the meter at a recorded sysfs tree.
"""

from __future__ import annotations

import itertools
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RAPL_DIR = "sys/class/powercap"
INA3221_IIO = "sys/bus/i2c/drivers/ina3221x"  # JetPack 4: iio:device*/in_power*_input (mW), rail_name_*
INA3221_HWMON = "sys/bus/i2c/drivers/ina3221"  # JetPack 5/6: hwmon/hwmon*/in*_label, in*_input (mV), curr*_input (mA)


@dataclass
class Reading:
    joules: float | None = None
    seconds: float = 0.0
    by_domain: dict[str, float] = field(default_factory=dict)


class EnergyMeter:
    source: str | None = None
    reason: str = ""

    @property
    def available(self) -> bool:
        return self.source is not None

    def describe(self) -> dict[str, Any]:
        return {"available": self.available, "source": self.source, "reason": self.reason, "domains": self.domains()}

    def domains(self) -> list[str]:
        return []

    @contextmanager
    def measure(self) -> Iterator[Reading]:
        reading = Reading()
        start = time.perf_counter()
        try:
            yield reading
        finally:
            reading.seconds = time.perf_counter() - start


class Unavailable(EnergyMeter):
    def __init__(self, reason: str):
        self.reason = reason


class Rapl(EnergyMeter):
    """Top-level RAPL zones (packages, or psys where that is all there is): energy_uj, wrapped at max_energy_range_uj."""

    source = "rapl"

    def __init__(self, zones: list[Path]):
        self.zones = zones
        self.names = [(zone / "name").read_text().strip() if (zone / "name").is_file() else zone.name for zone in zones]
        self.ranges = [_int(zone / "max_energy_range_uj") for zone in zones]
        self.reason = f"RAPL energy_uj of {', '.join(self.names)}: the whole CPU package, other processes included"

    def domains(self) -> list[str]:
        return list(self.names)

    def _counters(self) -> list[int]:
        return [int((zone / "energy_uj").read_text()) for zone in self.zones]

    @contextmanager
    def measure(self) -> Iterator[Reading]:
        reading = Reading()
        before, start = self._counters(), time.perf_counter()
        try:
            yield reading
        finally:
            after, reading.seconds = self._counters(), time.perf_counter() - start
            for name, first, last, wrap in zip(self.names, before, after, self.ranges):
                delta = last - first if last >= first else last + (wrap or 0) - first
                reading.by_domain[name] = delta / 1e6
            reading.joules = sum(reading.by_domain.values())


class PowerRails(EnergyMeter):
    """INA3221 rails read every `interval` seconds by a thread, integrated over the measurement."""

    source = "ina3221"

    def __init__(self, rails: dict[str, tuple[Path, ...]], interval: float = 0.02):
        self.rails, self.interval = rails, interval
        total = [name for name in rails if name.upper().startswith("VIN")]
        # The input rail is the module's whole draw; the others are parts of it (summing them all would count twice).
        self.counted = total or list(rails)
        self.reason = (f"INA3221 rails {', '.join(self.counted)} sampled every {interval * 1000:.0f} ms and integrated"
                       + ("" if total else " (no input rail: the sum of the rails listed)"))

    def domains(self) -> list[str]:
        return list(self.counted)

    def _watts(self) -> dict[str, float]:
        watts = {}
        for name, files in self.rails.items():
            if len(files) == 1:  # mW
                watts[name] = _int(files[0]) / 1000
            else:  # mV, mA
                watts[name] = _int(files[0]) * _int(files[1]) / 1e6
        return watts

    @contextmanager
    def measure(self) -> Iterator[Reading]:
        reading = Reading()
        samples: list[tuple[float, dict[str, float]]] = [(time.perf_counter(), self._watts())]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(self.interval):
                samples.append((time.perf_counter(), self._watts()))

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield reading
        finally:
            stop.set()
            thread.join()
            samples.append((time.perf_counter(), self._watts()))
            reading.seconds = samples[-1][0] - samples[0][0]
            for name in self.counted:
                reading.by_domain[name] = sum((t1 - t0) * (a[name] + b[name]) / 2
                                              for (t0, a), (t1, b) in itertools.pairwise(samples))
            reading.joules = sum(reading.by_domain.values())


def _int(path: Path) -> int:
    return int(path.read_text().strip())


def _rapl(root: Path) -> EnergyMeter | None:
    base = root / RAPL_DIR
    if not base.is_dir():
        return Unavailable(f"no /{RAPL_DIR} (RAPL is not exposed here: no powercap driver, or a VM that hides it)")
    zones = sorted(p for p in base.iterdir() if re.fullmatch(r"(intel|amd)-rapl:\d+", p.name))
    if not zones:
        return Unavailable(f"/{RAPL_DIR} has no RAPL package zones")
    packages = [z for z in zones if (z / "name").is_file() and (z / "name").read_text().startswith("package")]
    zones = packages or zones
    try:
        meter = Rapl(zones)
        meter._counters()
    except PermissionError:
        return Unavailable(f"{zones[0]}/energy_uj is not readable (RAPL counters need root on recent kernels)")
    except (OSError, ValueError) as error:
        return Unavailable(f"RAPL energy_uj could not be read: {error}")
    return meter


def _ina3221(root: Path) -> EnergyMeter | None:
    rails: dict[str, tuple[Path, ...]] = {}
    for power in sorted((root / INA3221_IIO).glob("*/iio:device*/in_power*_input")):
        channel = power.name[len("in_power"):-len("_input")]
        label = power.parent / f"rail_name_{channel}"
        name = label.read_text().strip() if label.is_file() else f"{power.parent.name}:{channel}"
        rails[name] = (power,)
    for voltage in sorted((root / INA3221_HWMON).glob("*/hwmon/hwmon*/in*_input")):
        channel = voltage.name[2:-len("_input")]
        current, label = voltage.parent / f"curr{channel}_input", voltage.parent / f"in{channel}_label"
        if current.is_file() and label.is_file() and "sum" not in label.read_text().lower():
            rails[label.read_text().strip()] = (voltage, current)
    if not rails:
        return None
    meter = PowerRails(rails)
    try:
        meter._watts()
    except (OSError, ValueError) as error:
        return Unavailable(f"INA3221 rails could not be read: {error}")
    return meter


def energy_meter(root: str | Path = "/") -> EnergyMeter:
    """The machine's energy meter: a Jetson's INA3221 rails, else RAPL, else one that says why there is none."""
    root = Path(root)
    rails = _ina3221(root)
    if rails is not None:
        return rails
    return _rapl(root)
