"""What flows into the outbox besides the gateway's own telemetry: the controller's queue
(through the intake pump), the local bus, and the gateway's log records for ThingsBoard;
and the archive's upkeep.

:class:`Feed` builds the :class:`~teg_gateway.controller.intake.IntakePump` and handles
what it reports after each batch on the loop (wake the forwarder, dead letters, archive
space, the outbox quota); it holds intake back while a backlog waits unsent on a live
connection, so a large backlog stays in the controller's queue instead of filling the
outbox. Its loops copy the log records meant for ThingsBoard into the outbox and apply
the archive's retention.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Callable
from typing import TYPE_CHECKING

from teg_gateway.clock import Clock
from teg_gateway.controller.intake import IntakeConfig, IntakePump, IntakeResult
from teg_gateway.local.topics import Mapped
from teg_gateway.logs import CloudLogHandler
from teg_gateway.store.outbox import TELEMETRY
from teg_gateway.store.recovery import StoreRecovery
from teg_gateway.store.stores import Stores

if TYPE_CHECKING:
    from teg_gateway.cloud.session import CloudSession
    from teg_gateway.config import ArchiveSettings

log = logging.getLogger(__name__)

MAINTENANCE_PERIOD_S = 60.0
LOG_FLUSH_PERIOD_S = 0.2
#: While connected, intake pauses when this many batches wait in the outbox unsent.
BACKLOG_BATCHES = 4


class Feed:
    """The intake pump and its glue; the local bus and the log records into the outbox.

    ``session()`` is the ThingsBoard session once there is one (None before).
    """

    def __init__(self, intake_config: IntakeConfig, poll_s: float, *,
                 archive: ArchiveSettings, stores: Stores, recovery: StoreRecovery,
                 cloud_logs: CloudLogHandler, session: Callable[[], CloudSession | None],
                 clock: Clock) -> None:
        self.archive = archive
        self.stores = stores
        self.recovery = recovery
        self.cloud_logs = cloud_logs
        self._session = session
        self.clock = clock
        self.intake = IntakePump(intake_config, poll_s, on_batch=self.on_intake_batch,
                                 on_stores=recovery.on_stores_problem, hold=self.backlogged)

    # -- the controller's queue -----------------------------------------------------------

    def on_intake_batch(self, result: IntakeResult) -> None:
        """On the loop, after each batch the intake worker moved."""
        if result.forwarded:
            self.recovery.poke()
        if result.dead:
            log.warning("controller queue: %d malformed row(s) moved to the dead-letter "
                        "table: %s", result.dead, result.dead_detail)
        if result.trimmed:
            self.recovery.report_every(
                "archive-space", logging.WARNING,
                f"free disk below archive.min_free_mb ({self.archive.min_free_mb:g} MB): "
                f"the archive gave up its {result.trimmed} oldest records")
        self.recovery.enforce_quota()

    def backlogged(self) -> bool:
        """Hold intake: connected, and more than a few batches wait unsent."""
        session = self._session()
        if session is None or not session.connected.is_set():
            return False
        return self.stores.outbox.unsent() > BACKLOG_BATCHES * self.intake.batch_size

    # -- the local bus ----------------------------------------------------------------------

    def on_local_mapped(self, mapped: Mapped) -> None:
        """Measurements, events, alarms and twin values from the local bus."""
        try:
            if mapped.telemetry:
                self.stores.outbox.put_telemetry(mapped.telemetry, mapped.ts_ms)
            if mapped.attributes:
                self.stores.outbox.put_attributes(mapped.attributes)
        except sqlite3.Error as exc:
            self.recovery.on_db_error(exc, "local bus")
            return
        self.recovery.poke()

    # -- the gateway's log records ----------------------------------------------------------

    def flush_cloud_logs(self) -> None:
        """The log records waiting for ThingsBoard, into the outbox."""
        bodies = self.cloud_logs.take()
        if bodies:
            self.stores.outbox.put(TELEMETRY, bodies)
            self.recovery.poke()

    async def log_flush_loop(self) -> None:
        """Move log records into the outbox a moment after they come (records of that
        moment go in one transaction); while none waits, sleep until one does."""
        loop = asyncio.get_running_loop()
        waiting = asyncio.Event()

        def notify() -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed at exit
                loop.call_soon_threadsafe(waiting.set)

        self.cloud_logs.notify = notify
        try:
            while True:
                if not self.cloud_logs.owed():
                    waiting.clear()
                    if not self.cloud_logs.owed():  # one may have come meanwhile
                        await waiting.wait()
                await self.clock.sleep(LOG_FLUSH_PERIOD_S)
                try:
                    self.flush_cloud_logs()
                except sqlite3.Error as exc:
                    self.recovery.on_db_error(exc, "gateway log")
        finally:
            self.cloud_logs.notify = None

    # -- the archive ------------------------------------------------------------------------

    async def maintenance_loop(self) -> None:
        """The archive's retention (age and size), once a minute."""
        while True:
            try:
                removed = self.stores.archive.enforce_retention(
                    self.archive.retention_days, int(self.archive.max_mb * 1024 * 1024))
                if removed:
                    log.info("archive retention removed %d records", removed)
            except sqlite3.Error as exc:
                self.recovery.on_db_error(exc, "archive")
            await self.clock.sleep(MAINTENANCE_PERIOD_S)
