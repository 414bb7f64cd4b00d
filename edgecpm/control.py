"""Bounding and stopping a generation from outside it: deadlines, cancellation, and a fair request queue.

    token = CancelToken()
    threading.Timer(0.5, token.cancel).start()            # any thread may cancel
    engine.generate("...", cancel=token, max_time=2.0)     # finish_reason "cancelled" or "time"

The generation loop asks `Interrupt.reason()` before the prefill and after every token, so a cancel or an
expired deadline stops it within one decode step (a prefill already running is not cut short: it is one
backend call). One Engine runs one sequence at a time; `RequestQueue` makes concurrent callers wait their
turn in arrival order, and a caller that is cancelled or runs out of time while waiting leaves the queue.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from edgecpm.errors import GenerationError

# A waiting caller re-checks its own cancel callback this often (a CancelToken wakes it at once).
WAIT_POLL_SECONDS = 0.02


class CancelToken:
    """A thread-safe "stop now" flag. Also callable (returns whether it was cancelled), so anything that
    accepts a cancel callback accepts a token."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._listeners: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    def cancel(self) -> None:
        with self._lock:
            self._event.set()
            listeners, self._listeners = self._listeners, []
        for listener in listeners:
            listener()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def __call__(self) -> bool:
        return self._event.is_set()

    def on_cancel(self, listener: Callable[[], None]) -> None:
        """Calls `listener` once when cancelled (at once if it already was)."""
        with self._lock:
            if not self._event.is_set():
                self._listeners.append(listener)
                return
        listener()


CancelCheck = Callable[[], bool]


@dataclass(frozen=True)
class Interrupt:
    """Why a generation must stop early, if it must: a cancel check that fired ("cancelled") or a
    deadline on the `time.monotonic()` clock that passed ("time")."""

    checks: tuple[CancelCheck, ...] = ()
    deadline: float | None = None
    tokens: tuple[CancelToken, ...] = field(default=(), repr=False)  # the checks that can wake a waiter

    @classmethod
    def build(cls, *cancels: CancelCheck | None, deadline: float | None = None, max_time: float | None = None) -> Interrupt:
        """`deadline` is absolute (time.monotonic()); `max_time` counts from now; the earlier one wins."""
        limits = [t for t in (deadline, None if max_time is None else time.monotonic() + max_time) if t is not None]
        checks = tuple(c for c in cancels if c is not None)
        return cls(checks, min(limits) if limits else None, tuple(c for c in checks if isinstance(c, CancelToken)))

    def reason(self) -> str | None:
        if any(check() for check in self.checks):
            return "cancelled"
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return "time"
        return None

    def seconds_left(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())


NO_INTERRUPT = Interrupt()


class RequestQueue:
    """Runs callers one at a time, first come first served (a plain Lock wakes waiters in any order)."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._waiting: deque[object] = deque()
        self._owner: object | None = None
        self._owner_thread: int | None = None

    @property
    def depth(self) -> int:
        """Callers waiting, not counting the one running."""
        with self._condition:
            return len(self._waiting)

    @property
    def busy(self) -> bool:
        return self._owner is not None

    @contextmanager
    def turn(self, interrupt: Interrupt = NO_INTERRUPT) -> Iterator[bool]:
        """Waits for this caller's turn; yields True while it holds the turn, or False when the interrupt
        fired first (it then never held the turn)."""
        ticket = object()
        if self._owner is not None and self._owner_thread == threading.get_ident():
            # Waiting would deadlock: the turn belongs to a stream this same thread has not finished.
            raise GenerationError("this thread has an unfinished stream on the same engine; run it to the end or "
                                  "close() it before starting another")
        for token in interrupt.tokens:
            token.on_cancel(self._wake_all)
        with self._condition:
            self._waiting.append(ticket)
            try:
                while self._owner is not None or self._waiting[0] is not ticket:
                    if interrupt.reason() is not None:
                        break
                    left = interrupt.seconds_left()
                    self._condition.wait(WAIT_POLL_SECONDS if left is None else min(left, WAIT_POLL_SECONDS))
                else:
                    self._owner, self._owner_thread = ticket, threading.get_ident()
            finally:
                self._waiting.remove(ticket)
                self._condition.notify_all()  # whoever is now first in line may go
        if self._owner is not ticket:
            yield False
            return
        try:
            yield True
        finally:
            with self._condition:
                self._owner = self._owner_thread = None
                self._condition.notify_all()

    def _wake_all(self) -> None:
        with self._condition:
            self._condition.notify_all()
