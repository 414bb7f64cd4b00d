"""The server's settings, checked once (the CLI and tests build the same frozen object)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from edgecpm.errors import EdgecpmError

LOOPBACK_NAMES = ("localhost",)


class ServeConfigError(EdgecpmError):
    pass


@dataclass(frozen=True)
class ServeConfig:
    bundle: Path
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    model_name: str | None = None  # the id clients send as "model"; default: the bundle directory's name
    max_body_bytes: int = 1024 * 1024
    max_tokens_limit: int = 4096  # the most tokens one request may ask for (also the default cap)
    default_max_tokens: int = 256
    max_queue: int = 16  # requests waiting behind the running one; more are answered 429
    request_timeout: float | None = 300.0  # seconds one request may take, queueing included (finish_reason "time")
    threads: int | None = None
    kernels: str | None = None
    kv_cache: str | None = None
    debug: bool = False

    @property
    def served_model(self) -> str:
        return self.model_name or self.bundle.resolve().name

    @property
    def is_loopback(self) -> bool:
        if self.host in LOOPBACK_NAMES:
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def validate(self) -> ServeConfig:
        checks = [
            (1 <= self.port <= 65535, "port", f"must be in 1..65535 (got {self.port})"),
            (self.is_loopback or bool(self.api_key), "host",
             f"{self.host} is reachable from other machines: set --api-key (or EDGECPM_API_KEY) to serve on it"),
            (self.api_key is None or len(self.api_key) >= 8, "api_key", "must be at least 8 characters"),
            (self.max_body_bytes >= 1024, "max_body_bytes", f"must be at least 1024 (got {self.max_body_bytes})"),
            (self.max_tokens_limit >= 1, "max_tokens_limit", f"must be at least 1 (got {self.max_tokens_limit})"),
            (1 <= self.default_max_tokens, "default_max_tokens", f"must be at least 1 (got {self.default_max_tokens})"),
            (self.max_queue >= 0, "max_queue", f"must be 0 or more (got {self.max_queue})"),
            (self.request_timeout is None or self.request_timeout > 0, "request_timeout",
             f"must be positive (got {self.request_timeout})"),
        ]
        for ok, name, message in checks:
            if not ok:
                raise ServeConfigError(message, field=name)
        return self
