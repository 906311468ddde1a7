"""Moves outbox batches to ThingsBoard, several publishes in flight, deleting on PUBACK."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections import deque
from collections.abc import Callable

from teg_gateway.cloud.session import CloudSession
from teg_gateway.mqttlink import ConnectionLost, MqttConnection
from teg_gateway.store.outbox import Batch, Outbox

log = logging.getLogger(__name__)


class Forwarder:
    """Sends the outbox in order while connected.

    A batch leaves the outbox only when its PUBACK arrives. When the connection drops, or
    a PUBACK does not come within the timeout (the connection is then closed), every batch
    still in flight is sent again from the outbox on the next connection.
    """

    def __init__(self, outbox: Outbox, session: CloudSession, max_inflight: int,
                 puback_timeout_s: float,
                 on_db_error: Callable[[BaseException], None] | None = None) -> None:
        self.outbox = outbox
        self.session = session
        self.max_inflight = max_inflight
        self.puback_timeout_s = puback_timeout_s
        self.on_db_error = on_db_error
        self.wake = asyncio.Event()
        self.paused = False
        self.publishes = 0
        self.records = 0
        self._inflight: deque[tuple[Batch, asyncio.Future[None], float]] = deque()
        self.idle = asyncio.Event()
        self.idle.set()

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def poke(self, *_: object) -> None:
        self.wake.set()

    async def run(self) -> None:
        while True:
            await self.session.connected.wait()
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
        while not conn.closed.is_set():
            self.wake.clear()
            self._fill(conn)
            self._collect()
            if self._inflight:
                overdue = self._inflight[0][2] - time.monotonic()
                if overdue <= 0:
                    log.warning("ThingsBoard: no PUBACK within %.0f s; reconnecting",
                                self.puback_timeout_s)
                    await conn.close(f"no PUBACK within {self.puback_timeout_s:.0f} s")
                    raise ConnectionLost("PUBACK timeout")
                timeout = min(overdue, 1.0)
            else:
                timeout = 1.0
                self.idle.set()
            if self.wake.is_set():
                continue
            closed = asyncio.ensure_future(conn.closed.wait())
            woken = asyncio.ensure_future(self.wake.wait())
            await asyncio.wait({closed, woken}, timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)
            closed.cancel()
            woken.cancel()
        raise ConnectionLost(conn.close_reason)

    def _fill(self, conn: MqttConnection) -> None:
        while not self.paused and len(self._inflight) < self.max_inflight:
            batch = self.outbox.next_batch()
            if batch is None:
                return
            fut = conn.publish(batch.topic, batch.payload)
            fut.add_done_callback(self.poke)
            self._inflight.append((batch, fut, time.monotonic() + self.puback_timeout_s))
            self.idle.clear()
            self.publishes += 1

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
        self.outbox.ack(batches)

    def _settle(self) -> None:
        """After a connection ends: keep what was acknowledged, forget the rest."""
        acked = [b for b, fut, _ in self._inflight
                 if fut.done() and not fut.cancelled() and fut.exception() is None]
        for _b, fut, _ in self._inflight:
            if not fut.done():
                fut.cancel()
        self._inflight.clear()
        try:
            self._ack(acked)
        except Exception as exc:
            log.exception("recording acknowledgements failed")
            if self.on_db_error:
                self.on_db_error(exc)
        self.idle.set()

    async def drain(self, deadline_s: float) -> bool:
        """Stop sending new batches and wait for those in flight; True if all were acked."""
        self.paused = True
        self.wake.set()
        try:
            await asyncio.wait_for(self.idle.wait(), deadline_s)
        except TimeoutError:
            return False
        return not self._inflight
