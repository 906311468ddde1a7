"""Exponential backoff with full jitter, capped."""

from __future__ import annotations

import random


class Backoff:
    """Delays that double from ``minimum`` up to ``maximum``, randomised.

    The delay is drawn uniformly from [d/2, d] where d is the current step, so a fleet
    of gateways that lost the server together does not come back in lockstep.
    """

    def __init__(self, minimum: float, maximum: float, rng: random.Random | None = None) -> None:
        if minimum <= 0 or maximum < minimum:
            raise ValueError("backoff needs 0 < minimum <= maximum")
        self.minimum = minimum
        self.maximum = maximum
        self._rng = rng or random.Random()
        self._step = minimum

    def next_delay(self) -> float:
        """The delay before the next attempt; each call grows the following one."""
        step = self._step
        self._step = min(self._step * 2, self.maximum)
        return self._rng.uniform(step / 2, step)

    def reset(self) -> None:
        """Start again from the minimum (after a success)."""
        self._step = self.minimum
