"""Prometheus text exposition, written by hand: a few counters, gauges and histograms need no library."""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence

TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TOKEN_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)


class Histogram:
    def __init__(self, name: str, help: str, buckets: Sequence[float]):
        self.name, self.help, self.buckets = name, help, tuple(buckets)
        self._counts = [0] * (len(self.buckets) + 1)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self._counts[bisect.bisect_left(self.buckets, value)] += 1
            self._sum += value

    def render(self) -> list[str]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, count in zip([*self.buckets, float("inf")], counts):
            cumulative += count
            label = "+Inf" if bound == float("inf") else repr(bound)
            lines.append(f'{self.name}_bucket{{le="{label}"}} {cumulative}')
        lines += [f"{self.name}_sum {total}", f"{self.name}_count {cumulative}"]
        return lines


class Counter:
    def __init__(self, name: str, help: str, label: str | None = None):
        self.name, self.help, self.label = name, help, label
        self._values: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, label: str = "") -> None:
        with self._lock:
            self._values[label] += amount

    def value(self, label: str = "") -> float:
        return self._values.get(label, 0.0)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        with self._lock:
            items = sorted(self._values.items()) or [("", 0.0)]
        for label, value in items:
            suffix = f'{{{self.label}="{label}"}}' if self.label and label else ""
            lines.append(f"{self.name}{suffix} {value:g}")
        return lines


class Metrics:
    def __init__(self, queue_depth: Callable[[], int], in_flight: Callable[[], int]):
        self.ttft = Histogram("edgecpm_time_to_first_token_seconds", "From request accepted to the first token.", TTFT_BUCKETS)
        self.time_per_token = Histogram("edgecpm_time_per_output_token_seconds", "Decode time of each later token.",
                                        TOKEN_BUCKETS)
        self.requests = Counter("edgecpm_requests_total", "Requests answered, by HTTP status.", "status")
        self.errors = Counter("edgecpm_errors_total", "Error responses, by error code.", "code")
        self.prompt_tokens = Counter("edgecpm_prompt_tokens_total", "Prompt tokens of finished requests.")
        self.completion_tokens = Counter("edgecpm_completion_tokens_total", "Generated tokens of finished requests.")
        self.finished = Counter("edgecpm_generations_total", "Finished generations, by finish reason.", "reason")
        self._queue_depth, self._in_flight = queue_depth, in_flight

    def render(self) -> str:
        lines = [
            "# HELP edgecpm_queue_depth Requests waiting for the model.", "# TYPE edgecpm_queue_depth gauge",
            f"edgecpm_queue_depth {self._queue_depth()}",
            "# HELP edgecpm_requests_in_flight Requests admitted and not yet answered.", "# TYPE edgecpm_requests_in_flight gauge",
            f"edgecpm_requests_in_flight {self._in_flight()}",
        ]
        for metric in (self.ttft, self.time_per_token, self.requests, self.errors, self.prompt_tokens, self.completion_tokens,
                       self.finished):
            lines += metric.render()
        return "\n".join(lines) + "\n"
