"""The gateway's own health, as ThingsBoard and ``teg-gateway status`` see it.

- health telemetry every ``health.interval_s`` (the keys of telemetry_keys.HEALTH_KEYS;
  the README describes each one);
- the client attribute ``sys_info`` on every connect to ThingsBoard, and
  ``session_limits`` whenever the limits in force change;
- the answer to the RPC ``status`` and the systemd status line (:meth:`Health.status_values`);
- how late the event loop wakes up (:class:`LagMonitor`).

It reads the parts it is given and changes none of them.
"""

from __future__ import annotations

import platform
import socket
import sqlite3
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from teg_gateway import __version__
from teg_gateway.clock import Clock
from teg_gateway.cloud.limits import SessionLimits
from teg_gateway.controller.intake import IntakePump
from teg_gateway.logs import CloudLogHandler
from teg_gateway.store.recovery import StoreRecovery
from teg_gateway.store.stores import Stores

if TYPE_CHECKING:
    from teg_gateway.cloud.forwarder import Forwarder
    from teg_gateway.cloud.session import CloudSession
    from teg_gateway.config import HealthSettings
    from teg_gateway.controller.supervisor import Supervisor

LAG_PERIOD_S = 0.5


class LagMonitor:
    """Measures how late the event loop wakes up: a busy or blocked loop shows here."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.max_lag_ms = 0.0

    async def run(self) -> None:
        while True:
            start = self.clock.monotonic()
            await self.clock.sleep(LAG_PERIOD_S)
            lag = (self.clock.monotonic() - start - LAG_PERIOD_S) * 1000
            self.max_lag_ms = max(self.max_lag_ms, lag)

    def take(self) -> float:
        value, self.max_lag_ms = self.max_lag_ms, 0.0
        return value


class Health:
    """Health telemetry, ``sys_info``, ``session_limits`` and the status answer.

    ``session()``/``forwarder()`` are the ThingsBoard session and forwarder once there are
    (None before); ``local_broker()`` says how the local bus is ("connected", ...);
    ``restart_pending()`` the id of a restart under way, if any. What it sends goes
    through ``recovery`` (the outbox, and the DB-error policy on failure).
    """

    def __init__(self, settings: HealthSettings, clock: Clock, *, stores: Stores,
                 recovery: StoreRecovery, intake: IntakePump, cloud_logs: CloudLogHandler,
                 supervisor: Supervisor | None,
                 session: Callable[[], CloudSession | None],
                 forwarder: Callable[[], Forwarder | None],
                 local_broker: Callable[[], str],
                 restart_pending: Callable[[], str | None]) -> None:
        self.settings = settings
        self.clock = clock
        self.stores = stores
        self.recovery = recovery
        self.intake = intake
        self.cloud_logs = cloud_logs
        self.supervisor = supervisor
        self._session = session
        self._forwarder = forwarder
        self._local_broker = local_broker
        self._restart_pending = restart_pending
        self.lag = LagMonitor(clock)
        self.started_ms = clock.now_ms()
        self._started_monotonic = clock.monotonic()  # uptime survives wall-clock jumps
        self._published_limits: dict[str, Any] | None = None

    def uptime_ms(self) -> int:
        return int((self.clock.monotonic() - self._started_monotonic) * 1000)

    # -- health telemetry -----------------------------------------------------------------

    async def run(self) -> None:
        """Health telemetry every ``health.interval_s``."""
        while True:
            await self.clock.sleep(self.settings.interval_s)
            self.recovery.report_telemetry(self.health_values(), "health telemetry")

    def health_values(self) -> dict[str, Any]:
        """The gateway's health telemetry: keys from telemetry_keys.HEALTH_KEYS (the README
        describes each; a test checks that nothing else is sent)."""
        outbox = self.stores.outbox
        session = self._session()
        now = self.clock.now_ms()
        depth = outbox.depth()
        values: dict[str, Any] = {
            "gateway_uptime_ms": self.uptime_ms(),
            "outbox_depth": depth,
            "outbox_oldest_age_ms": outbox.oldest_age_ms() or 0,
            "outbox_bytes": outbox.used_bytes(),
            "archive_bytes": self.stores.archive.used_bytes(),
            "records_accepted": outbox.counter("records_accepted"),
            "records_sent": outbox.counter("records_sent"),
            "records_dropped": outbox.counter("records_dropped"),
            "dead_letters": outbox.counter("dead_letters"),
            "dead_letters_removed": outbox.counter("dead_letters_removed"),
            "reconnects": session.reconnects if session else 0,
            "rate_limit_disconnects": session.rate_limit_disconnects if session else 0,
            "rate_limited_ms": session.pacer.take_waited_ms() if session else 0,
            "outbox_eta_s": self.outbox_eta_s(depth),
            "loop_lag_ms": round(self.lag.take(), 1),
            "logs_suppressed": self.cloud_logs.suppressed,
        }
        last_check = self.intake.last_health_check_ms()
        if last_check:
            values["ms_since_last_controller_health_check"] = now - last_check
        if self.supervisor is not None:
            values.update(self.supervisor.health_values())
        return values

    def outbox_eta_s(self, depth: int) -> int:
        """Seconds until the outbox is empty at the rate the server's limits allow now (or,
        without limits, at the rate seen so far); 0 when empty, -1 when unknown."""
        session, fwd = self._session(), self._forwarder()
        if depth == 0 or session is None or fwd is None:
            return 0
        points_per_record = fwd.points / fwd.telemetry_records if fwd.telemetry_records else 1.0
        per_publish = (fwd.telemetry_records / fwd.telemetry_publishes
                       if fwd.telemetry_publishes else 1.0)
        rate = session.pacer.records_per_s(points_per_record, per_publish)
        if rate is None:
            elapsed_s = self.clock.monotonic() - self._started_monotonic
            rate = fwd.records / elapsed_s if fwd.records and elapsed_s > 0 else None
        return round(depth / rate) if rate else -1

    # -- client attributes ------------------------------------------------------------------

    def publish_sys_info(self) -> None:
        """The client attribute ``sys_info`` (on every connect)."""
        info = {
            "gateway_version": __version__,
            "hostname": socket.gethostname(),
            "platform": platform.platform(),
            "machine": platform.machine(),
            "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version,
            "started_ms": self.started_ms,
        }
        self.recovery.publish_attributes({"sys_info": info}, "sys_info", wake=False)

    def publish_session_limits(self, limits: SessionLimits) -> None:
        """The limits in force, as the client attribute ``session_limits`` (when changed)."""
        described = limits.describe()
        if described != self._published_limits:
            self._published_limits = described
            self.recovery.publish_attributes({"session_limits": described})

    # -- status ---------------------------------------------------------------------------

    def status_values(self) -> dict[str, Any]:
        """The RPC ``status`` answer (without the version)."""
        outbox = self.stores.outbox
        session = self._session()
        return {
            "uptime_s": round(self.uptime_ms() / 1000, 1),
            "thingsboard": "connected" if session and session.connected.is_set()
            else (session.last_error if session else "not provisioned yet") or "connecting",
            "reconnects": session.reconnects if session else 0,
            "rate_limit_disconnects": session.rate_limit_disconnects if session else 0,
            "session_limits": session.pacer.limits.describe() if session and
            session.ready.is_set() else None,
            "local_broker": self._local_broker(),
            "outbox_depth": outbox.depth(),
            "outbox_oldest_age_ms": outbox.oldest_age_ms() or 0,
            "controller": self.supervisor.state if self.supervisor else "not supervised",
            "controller_version": self.supervisor.version if self.supervisor else None,
            "restart_pending": self._restart_pending(),
        }
