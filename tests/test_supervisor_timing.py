"""The supervisor's timing logic on a fake clock: restart backoff, crash counting, the
healthy run that resets the backoff, the health timeout and the stop grace.

Time moves only when the test advances the clock, so minutes of supervision take
milliseconds and no assertion depends on how fast the machine is. The controller is a
scripted stand-in for a runtime (the test says when it exits); the supervisor with real
processes and containers is tested in ``test_supervisor.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from teg_gateway.clock import FakeClock
from teg_gateway.config import ControllerSettings
from teg_gateway.controller.supervisor import Supervisor
from teg_gateway.store.state import StateFile


class ScriptedRuntime:
    """A runtime that runs nothing: the test makes the controller exit; waits run on
    the fake clock."""

    name = "scripted"
    requires_version = False
    stop_on_shutdown_default = True

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.running = False
        self.starts = 0
        self.stop_graces: list[float] = []
        self._exited = asyncio.Event()
        self._started_ms: int | None = None
        self._last_exit: int | None = None

    async def start(self, version: str | None) -> None:
        self.running = True
        self.starts += 1
        self._exited = asyncio.Event()
        self._started_ms = self.clock.now_ms()

    async def stop(self, grace_s: float) -> None:
        self.stop_graces.append(grace_s)
        if self.running:
            self.exit(-15)

    async def is_running(self) -> bool:
        return self.running

    async def wait(self, timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            await self.clock.wait_for(self._exited.wait(), timeout_s)

    def started_at_ms(self) -> int | None:
        return self._started_ms if self.running else None

    def version(self) -> str | None:
        return None

    def last_exit(self) -> int | None:
        return self._last_exit

    def describe(self) -> str:
        return "scripted"

    async def remove_version(self, version: str) -> None:
        """Nothing to free."""

    def exit(self, code: int) -> None:
        """The controller ends with ``code`` (minus a signal number)."""
        self.running = False
        self._last_exit = code
        self._started_ms = None
        self._exited.set()


def controller_settings(**values: Any) -> ControllerSettings:
    ctl = ControllerSettings(runtime="process", command=["unused"], default_version="1.0",
                             restart_min_s=2.0, restart_max_s=16.0, healthy_after_s=60.0,
                             health_timeout_s=600.0, stop_grace_s=7.0)
    for key, value in values.items():
        setattr(ctl, key, value)
    return ctl


async def settle() -> None:
    """Let every task that can run, run (no time passes on the fake clock)."""
    for _ in range(50):
        await asyncio.sleep(0)


async def run_for(clock: FakeClock, seconds: float, step: float = 1.0) -> None:
    """Advance the clock by ``seconds`` in steps, letting the supervisor act each time."""
    moved = 0.0
    while moved < seconds:
        await clock.advance(min(step, seconds - moved))
        moved += step
        await settle()


class Setup:
    def __init__(self, tmp_path: Path, **controller: Any) -> None:
        self.clock = FakeClock()
        self.runtime = ScriptedRuntime(self.clock)
        self.reports: list[dict[str, Any]] = []
        self.health_check_ms = 0
        self.supervisor = Supervisor(
            self.runtime, controller_settings(**controller),
            StateFile(tmp_path / "controller.json"),
            last_health_check_ms=lambda: self.health_check_ms,
            report=self.reports.append, request_sw_version=lambda: None,
            clock=self.clock, check_interval_s=1.0, rng=random.Random(7))

    def states(self) -> list[str]:
        return [r["controller_state"] for r in self.reports]

    def last(self, state: str) -> dict[str, Any]:
        return [r for r in self.reports if r["controller_state"] == state][-1]

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Supervisor]:
        task = asyncio.ensure_future(self.supervisor.run())
        await settle()
        try:
            yield self.supervisor
        finally:
            await self.supervisor.shutdown()
            await asyncio.wait_for(task, 5.0)


def test_crashes_are_counted_and_restarts_wait_a_growing_delay(tmp_path: Path) -> None:
    s = Setup(tmp_path)

    async def main() -> None:
        async with s.running() as sup:
            assert s.runtime.starts == 1 and sup.state == "running"
            for crash in range(1, 5):
                s.runtime.exit(3)
                await settle()
                assert sup.state == "crashed"
                assert sup.consecutive_failures == crash
                delay = sup.delays[-1]
                step = min(2.0 * 2 ** (crash - 1), 16.0)
                assert step / 2 <= delay <= step
                report = s.last("crashed")
                assert report["controller_restart_delay_s"] == round(delay, 3)
                assert report["controller_last_exit"] == "exit code 3"
                # Not restarted a moment before the delay is over, restarted right after.
                await s.clock.advance(delay - 0.01)
                await settle()
                assert s.runtime.starts == crash
                await s.clock.advance(0.02)
                await settle()
                assert s.runtime.starts == crash + 1
                assert sup.state == "running"
            assert sup.restarts == 4

    asyncio.run(main())


def test_a_run_healthy_for_healthy_after_s_resets_the_backoff(tmp_path: Path) -> None:
    s = Setup(tmp_path)

    async def main() -> None:
        async with s.running() as sup:
            for _ in range(3):
                s.runtime.exit(1)
                await settle()
                await run_for(s.clock, sup.delays[-1] + 0.1)
            assert sup.consecutive_failures == 3 and s.runtime.starts == 4
            # Health signals for a little less than healthy_after_s: not yet reset.
            for _ in range(59):
                sup.note_health("up")
                await run_for(s.clock, 1.0)
            assert sup.consecutive_failures == 3
            assert not any(r.get("controller_healthy") for r in s.reports)
            for _ in range(3):
                sup.note_health("up")
                await run_for(s.clock, 1.0)
            assert sup.consecutive_failures == 0
            assert s.last("running").get("controller_healthy") is True
            # The next crash starts from the shortest delay again.
            s.runtime.exit(1)
            await settle()
            assert 1.0 <= sup.delays[-1] <= 2.0
            assert sup.consecutive_failures == 1

    asyncio.run(main())


def test_a_silent_controller_is_stopped_with_its_grace_after_the_health_timeout(
        tmp_path: Path) -> None:
    s = Setup(tmp_path)

    async def main() -> None:
        async with s.running() as sup:
            sup.note_health("up")
            await run_for(s.clock, 590.0, step=10.0)
            assert sup.state == "running" and s.runtime.stop_graces == []
            # The queue database's health_check counts as a signal too.
            s.health_check_ms = s.clock.now_ms()
            await run_for(s.clock, 590.0, step=10.0)
            assert sup.state == "running" and s.runtime.stop_graces == []
            await run_for(s.clock, 30.0)
            assert "hung" in s.states()
            assert s.runtime.stop_graces == [7.0]
            hung = s.last("hung")
            assert hung["controller_last_exit"].startswith("hung: no health signal for 60")
            assert hung["controller_last_exit"].endswith("(killed by SIGTERM)")
            await run_for(s.clock, sup.delays[-1] + 1.0)
            assert s.runtime.starts == 2 and sup.state == "running"
        # The gateway's shutdown stops it with the same grace.
        assert s.runtime.stop_graces == [7.0, 7.0]

    asyncio.run(main())


def test_wait_healthy_times_out_on_the_clock(tmp_path: Path) -> None:
    s = Setup(tmp_path)

    async def main() -> None:
        async with s.running() as sup:
            waiter = asyncio.ensure_future(sup.wait_healthy(120.0))
            await run_for(s.clock, 119.0, step=10.0)
            assert not waiter.done()
            await run_for(s.clock, 2.0)
            assert waiter.done() and waiter.result() is False
            waiter = asyncio.ensure_future(sup.wait_healthy(120.0))
            await settle()
            sup.note_health("up")
            await settle()
            assert waiter.done() and waiter.result() is True

    asyncio.run(main())
