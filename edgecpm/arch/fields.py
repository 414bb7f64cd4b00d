"""Typed access to an untrusted config mapping; every failure names the file and the field."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgecpm.errors import CheckpointError

_MISSING = object()


class ConfigFields:
    """Reads fields of a parsed config.json (or GGUF metadata turned into one) with type checks."""

    def __init__(self, raw: Mapping[str, Any], source: str | Path):
        if not isinstance(raw, Mapping):
            raise CheckpointError("expected a JSON object at the top level", path=source)
        self.raw = raw
        self.source = source

    def error(self, field: str, message: str) -> CheckpointError:
        return CheckpointError(message, path=self.source, field=field)

    def has(self, name: str) -> bool:
        return self.raw.get(name) is not None

    def get(self, name: str, kind: type, default: Any = _MISSING, *, minimum: float | None = None) -> Any:
        value = self.raw.get(name)
        if value is None:
            if default is _MISSING:
                raise self.error(name, "required field is missing")
            return default
        return check_value(value, kind, name, self, minimum)

    def int(self, name: str, default: Any = _MISSING, *, minimum: int | None = 1) -> Any:
        return self.get(name, int, default, minimum=minimum)

    def float(self, name: str, default: Any = _MISSING, *, minimum: float | None = None) -> Any:
        return self.get(name, float, default, minimum=minimum)

    def bool(self, name: str, default: Any = _MISSING) -> Any:
        return self.get(name, bool, default)

    def str(self, name: str, default: Any = _MISSING) -> Any:
        return self.get(name, str, default)

    def token_ids(self, name: str) -> tuple[int, ...]:
        """An id or a list of ids (eos_token_id is either in released configs)."""
        value = self.raw.get(name)
        if value is None:
            return ()
        values = value if isinstance(value, list) else [value]
        return tuple(check_value(v, int, name, self, 0) for v in values)

    def floats(self, name: str, length: int) -> tuple[float, ...]:
        value = self.raw.get(name)
        if not isinstance(value, list) or len(value) != length:
            raise self.error(name, f"expected a list of {length} numbers")
        return tuple(check_value(v, float, name, self, None) for v in value)

    def sub(self, name: str) -> ConfigFields | None:
        value = self.raw.get(name)
        if value is None:
            return None
        if not isinstance(value, Mapping):
            raise self.error(name, "expected an object")
        return ConfigFields(value, f"{self.source}: {name}")


def check_value(value: Any, kind: type, name: str, fields: ConfigFields, minimum: float | None) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise fields.error(name, f"expected {kind.__name__}, got {value!r:.40}")
    if kind is float and not math.isfinite(value):
        raise fields.error(name, f"expected a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise fields.error(name, f"must be >= {minimum}, got {value!r}")
    return value
