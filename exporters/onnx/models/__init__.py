"""One small graph builder per architecture, looked up by the architecture registry name."""

from __future__ import annotations

from collections.abc import Callable

from edgecpm.exporters.onnx.models import decoder, mla
from edgecpm.exporters.onnx.ops import BuildContext
from edgecpm.errors import UnsupportedError

BUILDERS: dict[str, Callable[[BuildContext], str]] = {
    "minicpm": decoder.build,
    "llama": decoder.build,
    "minicpm3": mla.build,
}


def builder_for(architecture: str) -> Callable[[BuildContext], str]:
    try:
        return BUILDERS[architecture]
    except KeyError:
        raise UnsupportedError(f"no ONNX graph builder for architecture {architecture!r}", field="architecture") from None
