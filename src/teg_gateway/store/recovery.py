"""What the gateway does when its databases fail, and how its own records reach the outbox.

- :class:`RateLimitedLog` logs one kind of problem at most once a minute (a full disk
  would otherwise log on every batch).
- :class:`StoreRecovery` is the DB-error policy: a full disk is said (records wait in the
  controller's queue until there is space), a damaged database is moved aside and
  recreated once the intake worker has let go of it, a database file deleted or replaced
  under the gateway is reopened. It also enforces the outbox quota after each intake
  batch, and writes the gateway's own telemetry and client attributes into the outbox
  (then wakes the forwarder): a database error there is handled by the same policy.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from teg_gateway.clock import Clock
from teg_gateway.store.db import is_corruption, is_disk_full
from teg_gateway.store.stores import Stores

if TYPE_CHECKING:
    from teg_gateway.cloud.forwarder import Forwarder
    from teg_gateway.config import OutboxSettings
    from teg_gateway.controller.intake import IntakePump

log = logging.getLogger(__name__)

#: The same kind of problem is logged at most once in this many seconds.
ERROR_REPEAT_S = 60.0


class RateLimitedLog:
    """Logs a kind of problem (``key``) at most once every ``repeat_s`` seconds."""

    def __init__(self, clock: Clock, repeat_s: float = ERROR_REPEAT_S,
                 logger: logging.Logger = log) -> None:
        self.clock = clock
        self.repeat_s = repeat_s
        self.logger = logger
        self._last: dict[str, float] = {}

    def report_every(self, key: str, level: int, text: str) -> bool:
        """Log ``text`` unless a problem of kind ``key`` was logged less than ``repeat_s``
        ago; True if logged."""
        now = self.clock.monotonic()
        last = self._last.get(key)
        if last is None or now - last >= self.repeat_s:
            self._last[key] = now
            self.logger.log(level, "%s", text)
            return True
        return False


class StoreRecovery:
    """The DB-error policy and the gateway's own writes into the outbox.

    ``forwarder()`` is the forwarder once ThingsBoard is connected (None before). The
    intake pump is attached with :meth:`use_intake` once it exists: a damaged database
    found elsewhere is recovered only after the intake worker closed its connection.
    """

    def __init__(self, stores: Stores, outbox_settings: OutboxSettings, clock: Clock,
                 forwarder: Callable[[], Forwarder | None]) -> None:
        self.stores = stores
        self.outbox_settings = outbox_settings
        self.errors = RateLimitedLog(clock)
        self._forwarder = forwarder
        self._intake: IntakePump | None = None
        self._dropped_unreported = 0

    def use_intake(self, intake: IntakePump) -> None:
        self._intake = intake

    def report_every(self, key: str, level: int, text: str) -> bool:
        return self.errors.report_every(key, level, text)

    # -- database errors ------------------------------------------------------------------

    def on_db_error(self, exc: BaseException, where: str = "outbox") -> None:
        """A database operation at ``where`` failed with ``exc``."""
        if is_disk_full(exc):
            self.report_every("disk-full", logging.ERROR,
                              f"{where}: the disk is full; records wait in the controller "
                              "queue until there is space")
            return
        self.report_every(f"db-{where}", logging.ERROR, f"{where}: database error: {exc}")
        if is_corruption(exc):
            if self._intake is None:
                self.on_stores_problem(exc)
            else:
                self._intake.release(lambda: self.on_stores_problem(exc))

    def on_stores_problem(self, problem: BaseException | None) -> None:
        """On the loop, while the intake worker has its connection closed: a database file
        of ours was deleted or replaced (``problem`` None) or is damaged."""
        try:
            if problem is None:
                self.stores.reopen_replaced()
            else:
                self.stores.recover(problem)
        except sqlite3.Error as again:
            self.report_every("db-recover", logging.ERROR,
                              f"could not reopen the databases: {again}")
            return
        forwarder = self._forwarder()
        if forwarder is not None:
            forwarder.outbox = self.stores.outbox
        for text in self.stores.take_problems():
            self.report_telemetry({"gateway_problem": text})

    def report_open_problems(self) -> None:
        """What opening the databases found (a damaged file moved aside, ...), as
        ``gateway_problem`` telemetry."""
        for problem in self.stores.take_problems():
            self.stores.outbox.put_telemetry({"gateway_problem": problem})

    def enforce_quota(self) -> None:
        """Keep the outbox under ``outbox.quota_mb`` (the oldest telemetry goes; it stays in
        the archive); said at most once a minute."""
        quota_mb = self.outbox_settings.quota_mb
        try:
            self._dropped_unreported += self.stores.outbox.enforce_quota(
                int(quota_mb * 1024 * 1024))
        except sqlite3.Error as exc:
            self.on_db_error(exc, "outbox quota")
            return
        if self._dropped_unreported and self.report_every(
                "quota", logging.WARNING,
                f"outbox over its quota of {quota_mb:g} MB: "
                f"dropped the {self._dropped_unreported} oldest telemetry records "
                "(they stay in the archive)"):
            self._dropped_unreported = 0

    # -- the gateway's own records ----------------------------------------------------------

    def poke(self) -> None:
        """Wake the forwarder: there is something new in the outbox."""
        forwarder = self._forwarder()
        if forwarder is not None:
            forwarder.poke()

    def report_telemetry(self, values: dict[str, Any], where: str = "gateway telemetry",
                         ts_ms: int | None = None) -> None:
        """Gateway telemetry for ThingsBoard, through the outbox."""
        try:
            self.stores.outbox.put_telemetry(values, ts_ms)
        except sqlite3.Error as exc:
            self.on_db_error(exc, where)
            return
        self.poke()

    def publish_attributes(self, attributes: dict[str, Any],
                           where: str = "client attributes", *, wake: bool = True) -> None:
        """Client attributes for ThingsBoard, through the outbox; ``wake``: wake the
        forwarder now (else they go with its next round)."""
        try:
            self.stores.outbox.put_attributes(attributes)
        except sqlite3.Error as exc:
            self.on_db_error(exc, where)
            return
        if wake:
            self.poke()
