"""Keeps the controller running: restarts with backoff, health checks, version, controls.

The supervisor runs in the gateway's event loop (``await supervisor.run()``) and drives a
:class:`~teg_gateway.controller.runtime.ControllerRuntime`:

- a controller that is not running is started again after a delay that doubles from
  ``restart_min_s`` up to ``restart_max_s`` (with jitter); a run with a health signal
  that lasts ``healthy_after_s`` resets the delay;
- the controller is healthy while it updates ``health_check`` in the queue database or
  publishes ``status/health`` ``up`` on the local bus (either counts); no signal for
  ``health_timeout_s`` means hung: it is stopped and started again;
- the version last launched is kept in the state file, with
  ``[controller] default_version`` as the fallback; with none at all the supervisor
  reports ``no_version`` and asks ThingsBoard for ``sw_version``;
- every change of state is reported as telemetry (``controller_state``,
  ``controller_restarts``, ``controller_version``, ``controller_last_exit``), so a crash
  loop shows on ThingsBoard instead of being hidden.

Lifecycle operations (start, stop, restart, switch version) hold one asyncio lock, so
the main loop, an RPC and OTA never act on the runtime at the same time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from typing import Any

from teg_gateway.backoff import Backoff
from teg_gateway.clock import Clock
from teg_gateway.config import ControllerSettings, Settings
from teg_gateway.controller.runtime import (
    ControllerError,
    ControllerRuntime,
    ControllerStartError,
    ControllerUnavailable,
    describe_exit,
    stop_on_shutdown,
)
from teg_gateway.controller.versions import check_version
from teg_gateway.store.state import StateFile, state_dir

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = 1.0
NO_VERSION_RETRY_S = 300.0

# controller_state values
RUNNING = "running"
CRASHED = "crashed"
RESTARTING = "restarting"
HUNG = "hung"
STOPPED = "stopped"
NO_VERSION = "no_version"
UNAVAILABLE = "unavailable"


def controller_state_file(settings: Settings) -> StateFile:
    """``<data>/state/controller.json``: launched version, restart count, last state."""
    return StateFile(state_dir(settings.data_dir) / "controller.json")


class Supervisor:
    """Starts, watches and restarts the controller; see the module docstring.

    ``last_health_check_ms`` reads health_check from the queue database (ms since the
    epoch, 0 when none); ``report`` sends telemetry; ``request_sw_version`` asks
    ThingsBoard for the shared attribute ``sw_version``; ``ask_health`` asks the
    controller's service on the local bus for its health (a health check command) once
    it has been silent for half the health timeout. Every delay, timeout and duration
    (backoff, ``healthy_after_s``, the health timeout) is measured on ``clock``.
    """

    def __init__(
        self,
        runtime: ControllerRuntime,
        settings: ControllerSettings,
        state: StateFile,
        *,
        last_health_check_ms: Callable[[], int],
        report: Callable[[dict[str, Any]], None],
        request_sw_version: Callable[[], None],
        ask_health: Callable[[], None] | None = None,
        clock: Clock | None = None,
        check_interval_s: float = CHECK_INTERVAL_S,
        no_version_retry_s: float = NO_VERSION_RETRY_S,
        rng: random.Random | None = None,
    ) -> None:
        self.runtime = runtime
        self.settings = settings
        self.state_file = state
        self._last_health_check_ms = last_health_check_ms
        self._report_cb = report
        self._request_sw_version = request_sw_version
        self._ask_health = ask_health
        self._last_ask: float | None = None
        self.clock = clock or Clock()
        self.check_interval_s = check_interval_s
        self.no_version_retry_s = no_version_retry_s
        self.backoff = Backoff(settings.restart_min_s, settings.restart_max_s, rng)
        #: Every restart delay chosen, in order (seconds).
        self.delays: list[float] = []
        #: Failures (crash, hang, failed start) since the last healthy run.
        self.consecutive_failures = 0
        self.state = STOPPED
        saved = state.read()
        restarts = saved.get("restarts")
        #: Restarts of the controller, over the gateway's whole life (kept in the state).
        self.restarts = restarts if isinstance(restarts, int) and restarts >= 0 else 0
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._healthy = asyncio.Event()
        self._closing = False
        self._first = True
        self._ever_started = False
        self._generation = 0
        self._run_started: float | None = None
        self._age_at_run_start_ms = 0
        self._signal_since_start = False
        self._healthy_this_run = False
        self._last_signal: float | None = None
        self._last_signal_ms: int | None = None
        self._db_seen: int | None = None
        self._bus_status: str | None = None
        self._problem: tuple[str, str] | None = None
        self._start_exc: ControllerError | None = None
        self._last_exit_text = ""
        self._unavailable_logged = ""
        self._version: str | None = self._resolve_version()

    # -- public ---------------------------------------------------------------------------

    @property
    def version(self) -> str | None:
        """The version the supervisor launches (last launched, else the default)."""
        return self._version

    def started_at_ms(self) -> int | None:
        """When the running controller started (ms since the epoch), None if not running."""
        return self.runtime.started_at_ms() if self._run_started is not None else None

    def last_health_ms(self) -> int | None:
        """Time (ms since the epoch) of the last health signal from either source."""
        return self._last_signal_ms

    def health_values(self) -> dict[str, int]:
        """``ms_since_controller_startup`` and ``ms_since_last_controller_health_check``,
        each present only when known. Both are measured on the monotonic clock, so a
        jump of the wall clock (NTP setting the time of a device without a real-time
        clock) does not change them."""
        now = self.clock.monotonic()
        values: dict[str, int] = {}
        if self._run_started is not None and self.started_at_ms() is not None:
            values["ms_since_controller_startup"] = int(
                self._age_at_run_start_ms + (now - self._run_started) * 1000)
        if self._last_signal is not None:
            values["ms_since_last_controller_health_check"] = int(
                max(0.0, now - self._last_signal) * 1000)
        return values

    def note_health(self, status: str, ts_ms: int | None = None) -> None:
        """A ``status/health`` message of the controller's service on the local bus."""
        if status == "up":
            self._signal(ts_ms or self.clock.now_ms())
        elif status != self._bus_status:
            log.info("controller service reports %r on the local bus", status)
        self._bus_status = status

    async def wait_healthy(self, timeout_s: float) -> bool:
        """Wait for the first health signal of the current run (OTA: did the new version
        come up?); False after ``timeout_s``."""
        try:
            await self.clock.wait_for(self._healthy.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def run(self) -> None:
        """Supervise until :meth:`shutdown`; never raises (problems are reported)."""
        if self._version is None:
            self._ask_for_version()
        while not self._closing:
            try:
                await self._step()
            except asyncio.CancelledError:
                raise
            except ControllerUnavailable as exc:
                await self._failed(UNAVAILABLE, str(exc))
            except Exception as exc:
                log.exception("controller supervision failed")
                await self._failed(CRASHED, f"supervisor error: {exc}")

    async def restart_now(self, reason: str) -> str:
        """Stop and start the controller at once; the answer says what happened.

        Raises ControllerError when it cannot be started (the supervisor keeps trying)."""
        async with self._lock:
            if self._closing:
                raise ControllerError("the gateway is shutting down")
            if self._needs_version():
                raise ControllerError("no controller version is known yet, so there is "
                                      "nothing to start; set sw_version in ThingsBoard")
            log.warning("restarting the controller: %s", reason)
            self._report(RESTARTING, controller_restart_reason=reason)
            ok = await self._stop_and_start_locked()
        if not ok and self._start_exc is not None:
            raise self._start_exc
        return (f"controller restarted ({self.runtime.describe()}, "
                f"version {self._version or '(none)'})")

    async def switch_version(self, version: str) -> None:
        """Stop the controller, make ``version`` the launched version (kept durably), and
        start it. Raises ControllerError when it cannot start; the supervisor then keeps
        trying with backoff, so OTA may switch back."""
        check_version(version)
        async with self._lock:
            if self._closing:
                raise ControllerError("the gateway is shutting down")
            log.info("switching the controller from version %s to %s",
                     self._version or "(none)", version)
            self._version = version
            self.state_file.update(version=version)
            self._report(RESTARTING, controller_restart_reason=f"switch to version {version}")
            ok = await self._stop_and_start_locked()
        if not ok and self._start_exc is not None:
            raise self._start_exc

    async def _stop_and_start_locked(self) -> bool:
        try:
            await self.runtime.stop(self.settings.stop_grace_s)
            self._run_ended()
            self._first = False
            return await self._start_locked()
        finally:
            # Also when the stop failed (no Docker engine): the loop reports the outcome
            # now, not "restarting" until its backoff delay has passed.
            self._wake.set()

    async def shutdown(self) -> None:
        """The gateway stops: stop the controller when ``stop_on_shutdown`` says so
        (auto: a process yes, a container no), and end :meth:`run`."""
        self._closing = True
        self._wake.set()
        async with self._lock:
            if not stop_on_shutdown(self.settings, self.runtime):
                log.info("gateway stops; the controller (%s) is left running",
                         self.runtime.describe())
                return
            try:
                await self.runtime.stop(self.settings.stop_grace_s)
            except ControllerError as exc:
                log.error("could not stop the controller: %s", exc)
                return
            if self._run_started is not None:
                self._last_exit_text = describe_exit(self.runtime.last_exit())
            self._run_ended()
            self._report(STOPPED)
            log.info("controller stopped with the gateway")

    # -- the loop -------------------------------------------------------------------------

    async def _step(self) -> None:
        if self._needs_version():
            await self._sleep(self.no_version_retry_s)
            if self._needs_version() and not self._closing:
                self._ask_for_version()
            return
        if self._run_started is not None:
            await self.runtime.wait(self.check_interval_s)
        async with self._lock:
            if self._closing:
                return
            engine_ok = True
            try:
                running = await self.runtime.is_running()
            except ControllerUnavailable as exc:
                self._problem = (UNAVAILABLE, str(exc))
                running = engine_ok = False
            if running:
                if self._run_started is None:
                    await self._found_running()
                    return
                if not self._hung():
                    return
                kind = HUNG
                silent = self.clock.monotonic() - max(self._run_started,
                                                      self._last_signal or 0.0)
                await self.runtime.stop(self.settings.stop_grace_s)
                self._last_exit_text = (f"hung: no health signal for {silent:.0f} s; "
                                        f"stopped ({describe_exit(self.runtime.last_exit())})")
                log.error("controller hung (no health signal for %.0f s): restarting it",
                          silent)
                self._run_ended()
            elif self._first and engine_ok:
                self._first = False
                await self._start_locked()
                return
            elif self._run_started is not None:
                kind = CRASHED
                self._last_exit_text = describe_exit(self.runtime.last_exit())
                log.error("controller stopped unexpectedly (%s)", self._last_exit_text)
                self._run_ended()
            elif self._problem is not None:
                kind, text = self._problem
                self._last_exit_text = text if kind == CRASHED else self._last_exit_text
            else:
                kind = CRASHED
            delay = self._next_delay()
            extra: dict[str, Any] = {"controller_restart_delay_s": round(delay, 3)}
            if kind == UNAVAILABLE and self._problem is not None:
                extra["controller_error"] = self._problem[1]
                self._log_unavailable(self._problem[1])
            self._report(kind, **extra)
            generation = self._generation
        await self._sleep(delay)
        async with self._lock:
            if self._closing or self._needs_version() or generation != self._generation:
                return
            try:
                if await self.runtime.is_running():
                    return
            except ControllerUnavailable as exc:
                self._problem = (UNAVAILABLE, str(exc))
                return
            self._first = False
            await self._start_locked()

    async def _failed(self, kind: str, text: str) -> None:
        """An error outside the normal flow: report it and wait a backoff delay."""
        self._problem = (kind, text)
        if kind == UNAVAILABLE:
            self._log_unavailable(text)
        delay = self._next_delay()
        self._report(kind, controller_error=text, controller_restart_delay_s=round(delay, 3))
        await self._sleep(delay)

    async def _found_running(self) -> None:
        """A controller that runs although this supervisor did not start it (a container
        left running by the previous gateway): adopt it, or switch it to the launched
        version."""
        found = self.runtime.version()
        self._first = False
        self._ever_started = True
        if found and self._version is None:
            self._version = found
            self.state_file.update(version=found)
        if found and self._version and found != self._version:
            log.warning("controller runs version %s, but %s is the launched one: restarting",
                        found, self._version)
            await self.runtime.stop(self.settings.stop_grace_s)
            await self._start_locked()
            return
        log.info("controller already running (%s, version %s): supervising it",
                 self.runtime.describe(), found or "(unknown)")
        self._run_begun()
        self._report(RUNNING)

    async def _start_locked(self) -> bool:
        """Start the runtime (the caller holds the lock); False when it failed. Every
        successful start after the first one counts as a restart."""
        self._observe_db(count=False)
        self._start_exc = None
        try:
            await self.runtime.start(self._version)
        except ControllerUnavailable as exc:
            self._start_exc = exc
            self._problem = (UNAVAILABLE, str(exc))
            self._log_unavailable(str(exc))
            return False
        except ControllerStartError as exc:
            self._start_exc = exc
            self._problem = (CRASHED, f"start failed: {exc}")
            log.error("controller could not be started: %s", exc)
            return False
        self._problem = None
        self._unavailable_logged = ""
        self._generation += 1
        if self._ever_started:
            self.restarts += 1
        self._ever_started = True
        self._run_begun()
        self.state_file.update(version=self._version, restarts=self.restarts,
                               launched_ms=self.clock.now_ms())
        self._report(RUNNING)
        return True

    def _run_begun(self) -> None:
        self._run_started = self.clock.monotonic()
        # How long the controller had been running when this run was taken up (a
        # container kept across a gateway restart): read from the wall clock once.
        started_ms = self.runtime.started_at_ms()
        self._age_at_run_start_ms = (max(0, self.clock.now_ms() - started_ms) if started_ms
                                     else 0)
        self._signal_since_start = False
        self._healthy_this_run = False
        self._healthy.clear()

    def _run_ended(self) -> None:
        self._run_started = None

    # -- health ---------------------------------------------------------------------------

    def _signal(self, ts_ms: int) -> None:
        self._last_signal = self.clock.monotonic()
        self._last_signal_ms = ts_ms
        if self._run_started is not None:
            self._signal_since_start = True
            self._healthy.set()

    def _observe_db(self, count: bool = True) -> None:
        """Read health_check; a changed value is a health signal."""
        try:
            value = int(self._last_health_check_ms())
        except Exception as exc:
            log.debug("controller health check not readable: %s", exc)
            return
        if value == self._db_seen:
            return
        first = self._db_seen is None
        self._db_seen = value
        if count and not first and value:
            self._signal(value)

    def _hung(self) -> bool:
        """Observe the health signals; True when the controller is hung. Resets the
        backoff once the run has been healthy for ``healthy_after_s``."""
        assert self._run_started is not None
        self._observe_db()
        now = self.clock.monotonic()
        ctl = self.settings
        if (not self._healthy_this_run and self._signal_since_start
                and now - self._run_started >= ctl.healthy_after_s):
            self._healthy_this_run = True
            if self.consecutive_failures:
                log.info("controller healthy for %.0f s: restart backoff reset",
                         ctl.healthy_after_s)
            self.backoff.reset()
            self.consecutive_failures = 0
            self._report(RUNNING, controller_healthy=True)
        last = max(self._run_started, self._last_signal or self._run_started)
        silent = now - last
        if self._ask_health is not None and silent >= ctl.health_timeout_s / 2 and (
                self._last_ask is None or now - self._last_ask >= max(
                    ctl.health_timeout_s / 8, self.check_interval_s)):
            # A service that reports its health only on change or when asked (the
            # thin-edge.io way) is asked before it would count as hung.
            self._last_ask = now
            log.info("no health signal from the controller for %.0f s: asking its service",
                     silent)
            self._ask_health()
        return silent > ctl.health_timeout_s

    # -- helpers --------------------------------------------------------------------------

    def _resolve_version(self) -> str | None:
        saved = self.state_file.read().get("version")
        for candidate, where in ((saved, "the state file"),
                                 (self.settings.default_version,
                                  "controller.default_version")):
            if isinstance(candidate, str) and candidate:
                try:
                    return check_version(candidate)
                except ValueError as exc:
                    log.error("controller version from %s ignored: %s", where, exc)
        return None

    def _needs_version(self) -> bool:
        return self._version is None and self.runtime.requires_version

    def _ask_for_version(self) -> None:
        text = ("no controller version known: set sw_version in ThingsBoard or "
                "[controller] default_version (TEG_DEFAULT_CONTROLLER_VERSION)")
        log.warning("%s; asking ThingsBoard for sw_version", text)
        self._report(NO_VERSION, controller_error=text)
        try:
            self._request_sw_version()
        except Exception:
            log.exception("asking ThingsBoard for sw_version failed")

    def _log_unavailable(self, text: str) -> None:
        if text != self._unavailable_logged:
            self._unavailable_logged = text
            log.error("controller runtime %s unavailable: %s", self.runtime.name, text)

    def _next_delay(self) -> float:
        delay = self.backoff.next_delay()
        self.delays.append(delay)
        self.consecutive_failures += 1
        return delay

    async def _sleep(self, seconds: float) -> None:
        """Sleep, cut short by restart_now, switch_version or shutdown."""
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await self.clock.wait_for(self._wake.wait(), seconds)

    def _report(self, state: str, **extra: Any) -> None:
        self.state = state
        values: dict[str, Any] = {
            "controller_state": state,
            "controller_restarts": self.restarts,
            "controller_version": self._version or "",
            "controller_last_exit": self._last_exit_text,
            "controller_consecutive_failures": self.consecutive_failures,
        }
        values.update(extra)
        try:
            self._report_cb(values)
        except Exception:
            log.exception("controller state could not be reported")
        try:
            self.state_file.update(state=state, last_exit=self._last_exit_text,
                                   updated_ms=self.clock.now_ms())
        except OSError as exc:
            log.error("controller state file %s: cannot write: %s", self.state_file.path, exc)
