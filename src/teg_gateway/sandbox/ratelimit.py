"""ThingsBoard's rate limits: multi-window token buckets given as ``"N:S,N:S,..."``.

Each ``N:S`` window is a bucket of capacity N that starts full and refills
continuously ("greedily") at N/S tokens per second. A limit with several windows
grants a request only when every window has the tokens, and then takes them from all
of them at once; otherwise it takes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

Clock = Callable[[], float]


def parse_limit_spec(spec: str) -> list[tuple[int, float]]:
    """``"60:1,1800:60"`` -> ``[(60, 1.0), (1800, 60.0)]``; ValueError with the reason."""
    windows: list[tuple[int, float]] = []
    for raw in spec.split(","):
        part = raw.strip()
        tokens, colon, seconds = part.partition(":")
        try:
            if not colon:
                raise ValueError
            count, period = int(tokens), float(seconds)
        except ValueError:
            raise ValueError(
                f"rate limit {spec!r}: {part!r} is not TOKENS:SECONDS (e.g. 60:1,1800:60)"
            ) from None
        if count <= 0 or not period > 0:
            raise ValueError(f"rate limit {spec!r}: tokens and seconds must be positive")
        windows.append((count, period))
    return windows


@dataclass
class _Window:
    capacity: int
    period_s: float
    tokens: float
    updated: float

    def refill(self, now: float) -> None:
        if now > self.updated:
            rate = self.capacity / self.period_s
            self.tokens = min(float(self.capacity), self.tokens + (now - self.updated) * rate)
            self.updated = now


class RateLimit:
    """All the windows of one limit spec; `try_consume` is all-or-nothing."""

    def __init__(self, spec: str, clock: Clock = time.monotonic) -> None:
        self.spec = spec
        self._clock = clock
        now = clock()
        self._windows = [_Window(count, period, float(count), now)
                         for count, period in parse_limit_spec(spec)]

    def try_consume(self, tokens: int = 1) -> bool:
        """Take `tokens` from every window if all have them; False (taking none) if not."""
        now = self._clock()
        for window in self._windows:
            window.refill(now)
        if any(window.tokens < tokens for window in self._windows):
            return False
        for window in self._windows:
            window.tokens -= tokens
        return True

    def available(self) -> float:
        """The tokens a request could take now (the smallest window's)."""
        now = self._clock()
        for window in self._windows:
            window.refill(now)
        return min(window.tokens for window in self._windows)
