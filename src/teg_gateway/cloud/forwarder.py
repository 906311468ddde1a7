"""Moves outbox batches to ThingsBoard, several publishes in flight, deleting on PUBACK.

Every publish is sized and paced by the session's limits (``cloud/limits.py``): a batch
fits the server's payload and data-point limits, and waits for its tokens on a timer.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections import deque
from collections.abc import Callable

from teg_gateway.clock import Clock
from teg_gateway.cloud import topics
from teg_gateway.cloud.session import CloudSession
from teg_gateway.mqttlink import ConnectionLost, MqttConnection
from teg_gateway.store.outbox import TELEMETRY, Batch, Outbox

log = logging.getLogger(__name__)


class Forwarder:
    """Sends the outbox in order while connected.

    A batch leaves the outbox only when its PUBACK arrives. When the connection drops, or
    a PUBACK does not come within the timeout (the connection is then closed), every batch
    still in flight is sent again from the outbox on the next connection.
    """

    def __init__(self, outbox: Outbox, session: CloudSession, *, max_inflight: int,
                 puback_timeout_s: float, max_payload_bytes: int,
                 on_db_error: Callable[[BaseException], None] | None = None,
                 clock: Clock | None = None) -> None:
        self.outbox = outbox
        self.clock = clock or Clock()
        self.session = session
        self.max_inflight = max_inflight
        self.puback_timeout_s = puback_timeout_s
        self.max_payload_bytes = max_payload_bytes
        self.on_db_error = on_db_error
        self.wake = asyncio.Event()
        self.paused = False
        self.publishes = 0
        self.records = 0
        self.telemetry_publishes = 0
        self.telemetry_records = 0
        self.points = 0
        self._inflight: deque[tuple[Batch, asyncio.Future[None], float]] = deque()
        self._stuck: set[int] = set()
        self.idle = asyncio.Event()
        self.idle.set()
        self._waiter: asyncio.Future[None] | None = None

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def poke(self, *_: object) -> None:
        self.wake.set()
        _wake_up(self._waiter)

    async def run(self) -> None:
        while True:
            # Connected, and the session limits are known: nothing is sent before.
            await self.session.ready.wait()
            conn = self.session.connection
            if conn is None or conn.closed.is_set():
                # The session has not noticed the loss yet: let it run (never spin here
                # without yielding, or the event loop hangs).
                await asyncio.sleep(0.05)
                continue
            try:
                await self._pump(conn)
            except ConnectionLost:
                if not conn.closed.is_set():
                    # A publish failed (paho lost the socket) before the connection
                    # noticed: close it, so that the session reconnects.
                    await conn.close("a publish failed")
            except sqlite3.Error as exc:
                log.error("outbox read failed: %s", exc)
                if self.on_db_error:
                    self.on_db_error(exc)
                await asyncio.sleep(1.0)
            finally:
                self._settle()
                self.outbox.rewind()

    async def _pump(self, conn: MqttConnection) -> None:
        pacer = self.session.pacer
        # Data points are counted (in SQL, when reading ahead) only while they are limited.
        self.outbox.count_points = pacer.max_points() is not None
        # The end of the connection wakes the wait below (one helper for the connection).
        ended = asyncio.ensure_future(conn.closed.wait())
        ended.add_done_callback(self.poke)
        try:
            await self._pump_until_closed(conn)
        finally:
            ended.remove_done_callback(self.poke)
            ended.cancel()

    async def _pump_until_closed(self, conn: MqttConnection) -> None:
        pacer = self.session.pacer
        while not conn.closed.is_set():
            self.wake.clear()
            paced = self._fill(conn)
            self._collect()
            timeout = 1.0
            if self._inflight:
                overdue = self._inflight[0][2] - self.clock.monotonic()
                if overdue <= 0:
                    log.warning("ThingsBoard: no PUBACK within %.0f s; reconnecting",
                                self.puback_timeout_s)
                    await conn.close(f"no PUBACK within {self.puback_timeout_s:.0f} s")
                    raise ConnectionLost("PUBACK timeout")
                timeout = min(overdue, timeout)
            elif not paced:
                self.idle.set()
            if paced:
                timeout = min(paced, timeout)
            elif self.outbox.unsettled:
                self._settle_deletes()
            if self.wake.is_set():
                continue
            started = self.clock.monotonic()
            await self._sleep(timeout)
            if paced:
                pacer.waited_s += self.clock.monotonic() - started
        raise ConnectionLost(conn.close_reason)

    async def _sleep(self, timeout: float) -> None:
        """Wait for ``poke`` (a PUBACK, new rows, the connection's end) or ``timeout``:
        one future and one timer a wait, no helper tasks."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiter = waiter
        timer = loop.call_later(timeout, _wake_up, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def _fill(self, conn: MqttConnection) -> float:
        """Publish batches while the in-flight window and the limits allow; returns how
        long the next batch must wait for its tokens (0: nothing waits)."""
        pacer = self.session.pacer
        max_inflight = pacer.max_inflight(self.max_inflight)
        max_bytes = pacer.payload_limit(topics.TELEMETRY, self.max_payload_bytes)
        max_points = pacer.max_points()
        while not self.paused and len(self._inflight) < max_inflight:
            batch = self.outbox.next_batch(max_bytes, max_points)
            if batch is None:
                return 0.0
            telemetry = batch.kind == TELEMETRY
            delay = pacer.outbox_delay(telemetry, batch.points)
            if delay > 0:
                # Built again when its tokens are there: it may have grown meanwhile.
                self.outbox.put_back(batch)
                return delay
            pacer.take_outbox(telemetry, batch.points)
            fut = conn.publish(batch.topic, batch.payload)
            fut.add_done_callback(self.poke)
            self._inflight.append((batch, fut, self.clock.monotonic() + self.puback_timeout_s))
            self.idle.clear()
            self.publishes += 1
            if telemetry:
                self.telemetry_publishes += 1
                self.telemetry_records += batch.count
                self.points += batch.points
        return 0.0

    def _collect(self) -> None:
        """Acknowledge every finished publish; raise if one failed."""
        acked: list[Batch] = []
        failed: BaseException | None = None
        keep: deque[tuple[Batch, asyncio.Future[None], float]] = deque()
        for entry in self._inflight:
            fut = entry[1]
            if not fut.done():
                keep.append(entry)
            elif fut.exception() is None:
                acked.append(entry[0])
            else:
                failed = fut.exception()
                keep.append(entry)
        self._inflight = keep
        self._ack(acked)
        if failed is not None:
            raise ConnectionLost(str(failed))

    def _ack(self, batches: list[Batch]) -> None:
        if not batches:
            return
        self.records += sum(b.count for b in batches)
        try:
            self.outbox.ack(batches)
        except sqlite3.Error as exc:
            # ThingsBoard has these records: they are never sent again, and the delete is
            # tried again later. Sending on is right; a rewind would resend what is in
            # flight, again and again while the disk stays full.
            if self.on_db_error:
                self.on_db_error(exc)

    def _settle_deletes(self) -> None:
        try:
            self.outbox.settle()
        except sqlite3.Error as exc:
            if self.on_db_error:
                self.on_db_error(exc)

    def _settle(self) -> None:
        """After a connection ends: keep what was acknowledged, forget the rest.

        The batches left unacknowledged are remembered: one starting with the same row
        left so at the next end too has its rows checked one by one (a body damaged on
        disk would otherwise make ThingsBoard close every connection on it)."""
        acked: list[Batch] = []
        unacked: list[Batch] = []
        for batch, fut, _ in self._inflight:
            ok = fut.done() and not fut.cancelled() and fut.exception() is None
            (acked if ok else unacked).append(batch)
        for _b, fut, _ in self._inflight:
            if not fut.done():
                fut.cancel()
        self._inflight.clear()
        self._ack(acked)
        for batch in unacked:
            if batch.first_id in self._stuck:
                self._check(batch)
        self._stuck = {batch.first_id for batch in unacked}
        self.idle.set()

    def _check(self, batch: Batch) -> None:
        try:
            bad = self.outbox.check_rows(batch.first_id, batch.last_id)
        except sqlite3.Error as exc:
            if self.on_db_error:
                self.on_db_error(exc)
            return
        if bad:
            log.error("%d damaged record(s) in the outbox moved to the dead letters: the "
                      "server closed the connection on them twice", bad)

    async def drain(self, deadline_s: float) -> bool:
        """Stop sending new batches and wait for those in flight; True if all were acked."""
        self.paused = True
        self.poke()
        try:
            await asyncio.wait_for(self.idle.wait(), deadline_s)
        except TimeoutError:
            return False
        return not self._inflight


def _wake_up(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)
