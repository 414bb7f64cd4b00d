"""Architectures, found through a registry keyed by HF `model_type` / GGUF `general.architecture`."""

from edgecpm.arch import minicpm, minicpm3  # noqa: F401  (registration)
from edgecpm.arch.base import Architecture, DecoderConfig, get_architecture
from edgecpm.arch.rope import RopeConfig


def config_from_dict(data: dict) -> DecoderConfig:
    """Rebuilds a config saved with `DecoderConfig.to_dict()` (bundle manifests)."""
    return get_architecture(data["architecture"], field_name="architecture").config_class.from_dict(data)


__all__ = ["Architecture", "DecoderConfig", "RopeConfig", "config_from_dict", "get_architecture"]
