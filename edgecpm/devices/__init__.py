"""Device profiles (shipped TOML data, validated) and detection of the device edgecpm runs on."""

from edgecpm.devices.profile import (
    BACKENDS,
    SCHEMA_VERSION,
    CpuFacts,
    DeviceProfile,
    DeviceProfileError,
    ExportDefaults,
    GpuFacts,
    HardwareFacts,
    PowerMode,
    TensorRTSettings,
    list_profiles,
    load_profile,
)

__all__ = [
    "BACKENDS", "SCHEMA_VERSION", "CpuFacts", "DeviceProfile", "DeviceProfileError", "ExportDefaults", "GpuFacts",
    "HardwareFacts", "PowerMode", "TensorRTSettings", "list_profiles", "load_profile",
]
