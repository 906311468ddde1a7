"""Time, in one place.

:func:`now_ms` is the one way the gateway computes epoch milliseconds (timestamps that
leave the device). Timers use the monotonic clock. Parts that wait take a :class:`Clock`
in their constructor, so tests of timing logic run on a :class:`FakeClock` that moves
only when the test says so, instead of sleeping.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


def now_ms() -> int:
    """Wall-clock time in epoch milliseconds."""
    return time.time_ns() // 1_000_000


def ms(seconds: float) -> int:
    """Seconds as whole milliseconds."""
    return round(seconds * 1000)


class Clock:
    """The real clock: monotonic seconds for timers, epoch milliseconds for timestamps."""

    def monotonic(self) -> float:
        return time.monotonic()

    def now_ms(self) -> int:
        return now_ms()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def wait_for(self, awaitable: Awaitable[T], timeout_s: float) -> T:
        """``awaitable``'s result; TimeoutError (and ``awaitable`` cancelled) when it takes
        longer than ``timeout_s`` on this clock."""
        return await asyncio.wait_for(awaitable, timeout_s)


class FakeClock(Clock):
    """A clock for tests: time stands still until :meth:`advance`; a sleeper wakes when
    the clock has been advanced past its deadline."""

    def __init__(self, start_monotonic: float = 1000.0, start_ms: int = 1_700_000_000_000
                 ) -> None:
        self._mono = start_monotonic
        self._offset_ms = start_ms - round(start_monotonic * 1000)
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def monotonic(self) -> float:
        return self._mono

    def now_ms(self) -> int:
        return round(self._mono * 1000) + self._offset_ms

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append((self._mono + seconds, fut))
        try:
            await fut
        finally:
            self._sleepers = [(t, f) for t, f in self._sleepers if f is not fut]

    async def wait_for(self, awaitable: Awaitable[T], timeout_s: float) -> T:
        task = asyncio.ensure_future(awaitable)
        timer = asyncio.ensure_future(self.sleep(timeout_s))
        try:
            await asyncio.wait({task, timer}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            timer.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
            raise TimeoutError
        return task.result()

    def sleeping(self) -> int:
        """How many sleepers wait now."""
        return sum(1 for _t, fut in self._sleepers if not fut.done())

    async def advance(self, seconds: float) -> None:
        """Move time forward, waking every sleeper whose deadline has come (in order),
        and let the woken tasks run."""
        target = self._mono + seconds
        while True:
            due = [(t, f) for t, f in self._sleepers if t <= target and not f.done()]
            if not due:
                break
            deadline, fut = min(due, key=lambda item: item[0])
            self._mono = max(self._mono, deadline)
            fut.set_result(None)
            for _ in range(5):
                await asyncio.sleep(0)
        self._mono = target
        for _ in range(5):
            await asyncio.sleep(0)
