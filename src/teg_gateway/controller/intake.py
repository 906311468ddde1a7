"""The intake: rows of the controller's queue moved into the outbox and the archive.

It runs in a worker thread with a connection of its own (the outbox with the archive and
the queue attached): the event loop's connection never has the queue attached and never
runs an intake transaction, so a controller holding its queue write-locked never blocks
the loop, and the intake and the forwarding use both cores.

SQLite does not commit across WAL databases atomically, so a batch moves in three steps,
each one transaction on one file, each idempotent:

1. **outbox**: the good rows, the dead letters, the counters and the *intake mark* (the
   highest queue id moved, with the queue file's device and inode) in one commit. From
   then on the rows belong to the outbox: rows at or below the mark are never taken again.
2. **archive**: the rows above the archive's own mark, up to the intake mark, with that
   mark. A failure here (a full disk) never holds up step 1: the rows wait in the queue
   and are archived from there later.
3. **queue**: rows at or below both marks are deleted (retried later when the controller
   holds its lock).

A crash between the steps is resumed at the next start from the marks. The queue ids are
AUTOINCREMENT, so a queue file replaced by a new one (another inode, or a sequence below
the mark) resets the marks. Transactions begin deferred and their first statement writes
the one file they change, so only that file is locked.

When free disk falls below ``archive.min_free_mb`` the archive gives up its oldest
records, before the outbox or the intake stall.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from teg_gateway.clock import now_ms
from teg_gateway.controller import watch
from teg_gateway.controller.queue import (
    BATCH_TABLE,
    FILL_BATCH,
    TOO_LARGE,
    TS_RANGE,
    last_health_check_ms,
    open_queue,
    queue_damaged,
)
from teg_gateway.store import db, deadletters
from teg_gateway.store.db import add_counter, used_bytes
from teg_gateway.store.outbox import TELEMETRY, pack_rows

log = logging.getLogger(__name__)

MAX_ID = 2**63 - 1
MARK_SCHEMA = """
CREATE TABLE IF NOT EXISTS main.intake_mark (
    id INTEGER PRIMARY KEY CHECK (id = 1), queue_id INTEGER NOT NULL,
    queue_dev INTEGER, queue_ino INTEGER);
CREATE TABLE IF NOT EXISTS archive.intake_mark (
    id INTEGER PRIMARY KEY CHECK (id = 1), queue_id INTEGER NOT NULL);
"""
SET_MARK = ("INSERT INTO main.intake_mark (id, queue_id, queue_dev, queue_ino) "
            "VALUES (1, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET queue_id = excluded.queue_id, "
            "queue_dev = excluded.queue_dev, queue_ino = excluded.queue_ino")
SET_ARCHIVE_MARK = ("INSERT INTO archive.intake_mark (id, queue_id) VALUES (1, ?) "
                    "ON CONFLICT(id) DO UPDATE SET queue_id = excluded.queue_id")
ARCHIVE_ROWS = ("INSERT INTO archive.records (ts, type, body) "
                "SELECT ts, type, body FROM temp.intake_batch "
                "WHERE id > ? AND id <= ? AND reason IS NULL "
                "AND instr(coalesce(type, ''), 'log') = 0 ORDER BY id")
# The good rows of the batch table in order, their texts and byte sizes joined by commas.
JOINED_BATCH = ("SELECT CAST(group_concat(body, ',') AS BLOB), "
                "group_concat(length(CAST(body AS BLOB)), ',') "
                "FROM (SELECT body FROM temp.intake_batch WHERE reason IS NULL ORDER BY id)")
# Outbox rows hold records up to this size (their texts and sizes): a row then fits in one
# 4 KiB page of SQLite (at most 4,061 bytes with its header, no overflow page), so a page
# damaged on disk costs only the records on it, and a row fits a publish of ThingsBoard
# Cloud's 8 KiB whole.
ROW_BYTES = 3960
DEAD_ROWS = ("SELECT id AS queue_id, type, message, reason FROM temp.intake_batch "
             "WHERE reason IS NOT NULL ORDER BY id")
BUSY_TIMEOUT_MS = 5000
QUEUE_DELETE_WAIT_MS = 200
QUEUE_DELETE_ROWS = 500
SPACE_CHECK_S = 0.0  # a statvfs costs microseconds: before every round
HOLD_CHECK_S = 0.1  # while held: how soon a release is seen
HOLD_IDLE_S = 1.0  # while not held (a batch handed over checks at once)
IDLE_CHECK_S = 0.25
REPORT_EVERY_S = 60.0
# Page cache of the intake's connection (SQLite's default: 2 MiB a database). It appends
# to the outbox and the archive and reads then deletes the queue, at the ends of the trees:
# a small cache costs no CPU there. The temp schema keeps its default: a batch of 5,000
# rows (about 1 MiB) spilling to a file did cost CPU.
CACHE_KIB = {"main": 512, "archive": 512, "queue": 256}
# Woken by a write to the queue's files, the intake looks after SETTLE_S (the write that
# woke it is the first of a commit, which becomes visible once the controller's fsync is
# done); finding nothing, it looks again after each of RECHECK_S, then waits for the next
# write, or at the latest FALLBACK_S (also what catches writes inotify cannot see).
SETTLE_S = 0.001
RECHECK_S = (0.002, 0.008, 0.032, 0.128)
FALLBACK_S = 1.0


@dataclass(frozen=True)
class IntakeConfig:
    queue_path: Path
    outbox_path: Path
    archive_path: Path
    batch_size: int
    max_payload_bytes: int | None = None
    dead_letter_cap_bytes: int = deadletters.DEFAULT_CAP_BYTES
    reserve_free_bytes: int = 0


@dataclass
class IntakeResult:
    taken: int = 0
    forwarded: int = 0
    archived: int = 0
    dead: int = 0
    dead_detail: str = ""
    trimmed: int = 0


class StoresReplaced(Exception):
    """outbox.db or archive.db is no longer the file the intake has open."""


def _locked(exc: BaseException) -> bool:
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    return code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


class IntakeCore:
    """The intake steps on one connection, used from one thread (synchronous)."""

    def __init__(self, config: IntakeConfig) -> None:
        self.config = config
        # A record that cannot fit in one publish ("[" + record + "]") can never be sent.
        self.max_record_bytes = (None if config.max_payload_bytes is None
                                 else config.max_payload_bytes - 2)
        self.conn: sqlite3.Connection | None = None
        self.mark = 0
        self.archived = 0
        self.deleted = 0
        self.queue_id: tuple[int, int] | None = None
        self.outbox_id: tuple[int, int] | None = None
        self.archive_id: tuple[int, int] | None = None
        self.archive_error: BaseException | None = None
        self.trimmed = 0
        self._space_checked = -SPACE_CHECK_S
        self._files_checked = -IDLE_CHECK_S
        self._deleted_at = 0.0

    # -- opening --------------------------------------------------------------------------

    def open(self) -> None:
        cfg = self.config
        if not (cfg.outbox_path.exists() and cfg.archive_path.exists()):
            raise StoresReplaced()  # the loop's stores create them (and report it)
        open_queue(cfg.queue_path).close()
        conn = db.connect(cfg.outbox_path)
        try:
            self.outbox_id = db.file_id(cfg.outbox_path)
            conn.execute("ATTACH DATABASE ? AS archive", (str(cfg.archive_path),))
            conn.execute("PRAGMA archive.synchronous = FULL")
            self.archive_id = db.file_id(cfg.archive_path)
            conn.execute("ATTACH DATABASE ? AS queue", (str(cfg.queue_path),))
            conn.execute("PRAGMA queue.synchronous = NORMAL")
            for schema, kib in CACHE_KIB.items():
                conn.execute(f"PRAGMA {schema}.cache_size = -{kib}")
            self.queue_id = db.file_id(cfg.queue_path)
            conn.execute(BATCH_TABLE)
            conn.executescript(MARK_SCHEMA)
            self.conn = conn
            self._load_marks()
        except BaseException:
            self.conn = None
            conn.close()
            raise

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(sqlite3.Error):
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
            self.conn.close()
            self.conn = None

    def _load_marks(self) -> None:
        conn = self._conn()
        row = conn.execute("SELECT queue_id, queue_dev, queue_ino FROM main.intake_mark "
                           "WHERE id = 1").fetchone()
        arow = conn.execute("SELECT queue_id FROM archive.intake_mark WHERE id = 1").fetchone()
        mark = _int(row[0]) if row else 0
        archived = _int(arow[0]) if arow else 0
        if row is not None and mark and (
                (row[1], row[2]) != self.queue_id or self._queue_sequence() < mark):
            log.warning("the controller queue database %s is not the file of the last intake "
                        "(replaced or recreated): taking its rows from the first one",
                        self.config.queue_path)
            mark = archived = 0
            self._write(SET_MARK, (0, *self._queue_ident()))
            self._write(SET_ARCHIVE_MARK, (0,))
        self.mark, self.archived, self.deleted = mark, archived, 0

    def _queue_sequence(self) -> int:
        conn = self._conn()
        try:
            row = conn.execute(
                "SELECT seq FROM queue.sqlite_sequence WHERE name = 'messages'").fetchone()
        except sqlite3.OperationalError:
            row = None
        top = conn.execute("SELECT max(id) FROM queue.messages").fetchone()
        return max(_int(row[0]) if row else 0, _int(top[0]) if top else 0)

    def _queue_ident(self) -> tuple[int | None, int | None]:
        return (None, None) if self.queue_id is None else self.queue_id

    def _conn(self) -> sqlite3.Connection:
        if self.conn is None:
            self.open()
        assert self.conn is not None
        return self.conn

    def _write(self, sql: str, params: tuple[object, ...]) -> None:
        conn = self._conn()
        conn.execute("BEGIN")
        try:
            conn.execute(sql, params)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    # -- one round ------------------------------------------------------------------------

    def check_files(self) -> None:
        """Raise StoresReplaced when outbox.db or archive.db was deleted or replaced; a
        replaced queue file is reopened (and the marks reset)."""
        cfg = self.config
        if self.conn is None:
            return
        if (db.file_id(cfg.outbox_path) != self.outbox_id
                or db.file_id(cfg.archive_path) != self.archive_id):
            raise StoresReplaced()
        if db.file_id(cfg.queue_path) != self.queue_id:
            self.close()
            self.open()

    def step(self) -> IntakeResult:
        """Resume what is pending, then move one batch. Returns what was moved."""
        conn = self._conn()
        self.trimmed = 0
        waiting = conn.execute("SELECT 1 FROM queue.messages WHERE id > ? LIMIT 1",
                               (self.mark,)).fetchone() is not None
        now = time.monotonic()
        # Before every batch; while idle (nothing is written then) a few times a second.
        if waiting or now - self._files_checked >= IDLE_CHECK_S:
            self._files_checked = now
            self.check_files()
            self.keep_free_space()
        if self.archived < self.mark:
            self._archive_pending()
        self._delete_moved(now=not waiting)
        if not waiting:
            return IntakeResult(trimmed=self.trimmed)
        result = self._move()
        if result.taken:
            self._delete_moved(now=False)
        result.trimmed = self.trimmed
        return result

    def _fill(self, after: int, upto: int) -> tuple[int, int, int, int | None]:
        conn = self._conn()
        conn.execute("DELETE FROM temp.intake_batch")
        conn.execute(FILL_BATCH, (after, upto, self.config.batch_size))
        taken, last_id, dead, longest, out_of_range = conn.execute(
            "SELECT count(*), max(id), count(reason), max(length(body)), "
            "count(CASE WHEN reason IS NULL AND typeof(ts) <> 'integer' THEN 1 END) "
            "FROM temp.intake_batch").fetchone()
        if not taken:
            return 0, after, 0, None
        limit = self.max_record_bytes
        recount = bool(out_of_range)
        if out_of_range:
            conn.execute(TS_RANGE)
        # A character takes at most 4 bytes: only then can a record be too large.
        if limit is not None and longest is not None and longest * 4 > limit:
            conn.execute(TOO_LARGE, (limit + 2, limit))
            recount = True
        if recount:
            dead = conn.execute("SELECT count(reason) FROM temp.intake_batch").fetchone()[0]
        return int(taken), int(last_id), int(dead), longest

    def _move(self) -> IntakeResult:
        conn = self._conn()
        result = IntakeResult()
        taken, last_id, dead, _ = self._fill(self.mark, MAX_ID)
        if not taken:
            return result
        result.taken, result.dead = taken, dead
        previous = self.mark
        created = now_ms()
        # One record (a controller writing slowly) needs no packing.
        rows = self._outbox_rows() if taken - dead > 1 else []
        conn.execute("BEGIN")
        try:
            # The first statement writes the outbox: only it is locked.
            if rows:
                conn.executemany(
                    "INSERT INTO main.outbox (kind, body, created_ms, records, sizes) "
                    "VALUES (?, CAST(? AS TEXT), ?, ?, ?)",
                    [(TELEMETRY, body, created, count, sizes) for body, count, sizes in rows])
                result.forwarded = sum(row[1] for row in rows)
            else:
                before = conn.total_changes
                conn.execute(
                    "INSERT INTO main.outbox (kind, body, created_ms) "
                    "SELECT ?, body, ? FROM temp.intake_batch WHERE reason IS NULL",
                    (TELEMETRY, created))
                result.forwarded = conn.total_changes - before
            if dead:
                deadletters.add(conn, DEAD_ROWS, cap_bytes=self.config.dead_letter_cap_bytes)
            add_counter(conn, "records_accepted", result.forwarded)
            conn.execute(SET_MARK, (last_id, *self._queue_ident()))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self.mark = last_id
        if dead:
            result.dead_detail = self._dead_detail(dead)
        if self.archived >= previous:  # else older rows are pending: archived from the queue
            result.archived = self._archive_batch(self.mark)
        return result

    def _outbox_rows(self) -> list[tuple[bytes, int, str | None]]:
        """The good rows of the batch table packed into outbox rows, each at most what one
        publish carries: one SQL call joins the whole batch, Python only cuts it."""
        joined, sizes = self._conn().execute(JOINED_BATCH).fetchone()
        if not joined:
            return []
        return pack_rows(joined, sizes, min(self.max_record_bytes or ROW_BYTES, ROW_BYTES))

    def _archive_batch(self, upto: int) -> int:
        """Step 2 for the rows in the batch table; a failure leaves them pending."""
        if upto <= self.archived:
            return 0
        conn = self._conn()
        try:
            conn.execute("BEGIN")
            try:
                before = conn.total_changes
                conn.execute(ARCHIVE_ROWS, (self.archived, upto))
                archived = conn.total_changes - before
                conn.execute(SET_ARCHIVE_MARK, (upto,))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            if db.is_corruption(exc):
                raise
            self.archive_error = exc
            if db.is_disk_full(exc):
                self.keep_free_space(force=True)
            return 0
        self.archive_error = None
        self.archived = upto
        return archived

    def _archive_pending(self) -> None:
        """Archive rows moved to the outbox but not archived yet (read again from the
        queue, where they stay until archived)."""
        while self.archived < self.mark:
            taken, last_id, _dead, _ = self._fill(self.archived, self.mark)
            upto = last_id if taken >= self.config.batch_size else self.mark
            before = self.archived
            self._archive_batch(upto)
            if self.archived == before:
                return  # failed: try again at the next round

    def _delete_moved(self, now: bool = True) -> None:
        """Step 3. While rows keep coming (``now`` false) it waits for a few hundred rows
        or a second: one commit on the queue instead of one a batch (rows below the mark
        are never taken again)."""
        upto = min(self.mark, self.archived)
        if upto <= self.deleted:
            return
        if (not now and upto - self.deleted < QUEUE_DELETE_ROWS
                and time.monotonic() - self._deleted_at < 1.0):
            return
        self._deleted_at = time.monotonic()
        conn = self._conn()
        conn.execute(f"PRAGMA busy_timeout = {QUEUE_DELETE_WAIT_MS}")
        try:
            conn.execute("DELETE FROM queue.messages WHERE id <= ?", (upto,))
            self.deleted = upto
        except sqlite3.OperationalError as exc:
            if not (_locked(exc) or db.is_disk_full(exc)):
                raise
            # The controller holds its queue locked (or its disk is full): the rows stay
            # there, below the mark, and are deleted at a later round.
        finally:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")

    def _dead_detail(self, count: int) -> str:
        rows = self._conn().execute(
            "SELECT id, CAST(type AS BLOB), reason FROM temp.intake_batch "
            "WHERE reason IS NOT NULL ORDER BY id LIMIT 5").fetchall()
        detail = "; ".join(f"row {r[0]} (type {_text(r[1])!r}): {r[2]}" for r in rows)
        more = f" and {count - len(rows)} more" if count > len(rows) else ""
        return detail + more

    # -- disk space -----------------------------------------------------------------------

    def free_bytes(self) -> int:
        st = os.statvfs(self.config.outbox_path.parent)
        return st.f_bavail * st.f_frsize

    def keep_free_space(self, force: bool = False) -> int:
        """Below the reserve of free disk, the archive gives up its oldest records.
        Returns the number removed."""
        reserve = self.config.reserve_free_bytes
        now = time.monotonic()
        if reserve <= 0 or (not force and now - self._space_checked < SPACE_CHECK_S):
            return 0
        self._space_checked = now
        try:
            free = self.free_bytes()
        except OSError:
            return 0
        if free >= reserve and not force:
            return 0
        conn = self._conn()
        removed = 0
        with contextlib.suppress(sqlite3.Error):
            # Space held by the WAL files first; it needs no new pages.
            conn.execute("PRAGMA archive.wal_checkpoint(TRUNCATE)")
            conn.execute("PRAGMA main.wal_checkpoint(TRUNCATE)")
        with contextlib.suppress(OSError):
            free = self.free_bytes()
        if free >= reserve:
            return 0
        try:
            count = int(conn.execute("SELECT count(*) FROM archive.records").fetchone()[0])
            if count:
                used = used_bytes(conn, "archive")
                per_row = max(1, used // count)
                wanted = max(reserve - free, 0) + reserve // 2
                to_remove = min(count, max(100, -(-wanted // per_row)))
                conn.execute("BEGIN")
                try:
                    before = conn.total_changes
                    conn.execute("DELETE FROM archive.records WHERE id IN "
                                 "(SELECT id FROM archive.records ORDER BY id LIMIT ?)",
                                 (to_remove,))
                    removed = conn.total_changes - before
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
                # executescript steps it to the end (execute() frees one page only).
                conn.executescript("PRAGMA archive.incremental_vacuum;")
                conn.execute("PRAGMA archive.wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            if db.is_corruption(exc):
                raise
            log.debug("archive: could not give up space: %s", exc)
        self.trimmed += removed
        return removed

    def health_check_ms(self) -> int:
        return last_health_check_ms(self._conn(), "queue")  # used by the tests


def _int(value: object) -> int:
    return value if isinstance(value, int) else 0


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        return value[:80].decode("utf-8", "replace")
    return None if value is None else str(value)[:80]


class IntakePump:
    """Runs the intake in a worker thread; results are handed to the event loop.

    ``on_batch(result)`` runs on the loop after each batch. ``on_stores(problem)`` runs on
    the loop while the worker has closed its connection: ``problem`` is None when
    outbox.db or archive.db was found deleted or replaced, else the corruption error.
    ``hold()`` (on the loop) pauses the intake while it is true: it is asked after every
    batch, then every ``HOLD_CHECK_S`` while true and every ``HOLD_IDLE_S`` otherwise.
    """

    def __init__(self, config: IntakeConfig, poll_s: float, *,
                 on_batch: Callable[[IntakeResult], None],
                 on_stores: Callable[[BaseException | None], None],
                 hold: Callable[[], bool]) -> None:
        self.config = config
        self.poll_s = poll_s
        self.on_batch = on_batch
        self.on_stores = on_stores
        self.hold = hold
        self.held = False
        self._stop = threading.Event()
        self._wake: watch.Wakeup | None = None
        self._thread: threading.Thread | None = None
        # Rounds of the worker, and why it woke up for them (read by tests and benchmarks).
        self.rounds = 0
        self.woken: dict[str, int] = {watch.SET: 0, watch.CHANGE: 0, watch.TIMEOUT: 0}
        self.hold_checks = 0
        self._hold_kick = asyncio.Event()  # held now: check again soon, not in HOLD_IDLE_S
        self._took = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._hold_task: asyncio.Task[None] | None = None
        self._release: Callable[[], None] | None = None
        self._health_ms = 0
        self._health_conn: sqlite3.Connection | None = None
        self._health_ident: tuple[int, int] | None = None
        self._reported: dict[str, float] = {}

    @property
    def path(self) -> Path:
        return self.config.queue_path

    @property
    def batch_size(self) -> int:
        return self.config.batch_size

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def watching(self) -> bool:
        """True while a commit to the queue wakes the intake at once (inotify)."""
        return self._wake is not None and self._wake.watching

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop.clear()
        queue = self.config.queue_path
        self._wake = watch.Wakeup(queue.parent, (queue.name, queue.name + "-wal"))
        if not self._wake.watching:
            log.info("changes of %s cannot be watched; looking for new rows every %g ms",
                     queue, self.poll_s * 1000)
        self._thread = threading.Thread(target=self._run, name="intake", daemon=True)
        self._thread.start()
        self._hold_task = asyncio.ensure_future(self._hold_loop())

    def poke(self) -> None:
        self._set_wake()

    def _set_wake(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def stop(self, timeout: float = 10.0) -> None:
        """Let the worker finish its round (a transaction under way commits or rolls back)
        and close its connection."""
        if self._hold_task is not None:
            self._hold_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._hold_task
        thread = self._thread
        self._close_health()
        if thread is None:
            return
        self._stop.set()
        self._set_wake()
        await asyncio.get_running_loop().run_in_executor(None, thread.join, timeout)
        if thread.is_alive():
            log.error("the intake did not stop within %.0f s; its transaction is abandoned "
                      "(SQLite rolls it back) and its rows stay in the controller queue",
                      timeout)
        elif self._wake is not None:
            self._wake.close()
        self._thread = None

    def release(self, action: Callable[[], None]) -> None:
        """Run ``action`` on the loop once the worker has closed its connection (to move
        damaged files aside or reopen replaced ones), then let the worker reopen."""
        if not self.running:
            action()
            return
        self._release = action
        self._set_wake()

    def last_health_check_ms(self) -> int:
        """The controller's last health check (ms since the epoch, 0 when none), read now.

        A read of a WAL database never waits for the controller's write lock; the read
        connection is the loop's own, read-only, and waits at most 100 ms otherwise."""
        path = self.config.queue_path
        try:
            ident = db.file_id(path)
            if self._health_conn is None or ident != self._health_ident:
                self._close_health()
                open_queue(path).close()
                conn = sqlite3.connect(path, timeout=0.1, isolation_level=None)
                conn.execute("PRAGMA query_only = 1")
                self._health_conn, self._health_ident = conn, db.file_id(path)
            self._health_ms = last_health_check_ms(self._health_conn)
        except sqlite3.Error as exc:
            log.debug("controller health check not readable: %s", exc)
            self._close_health()
        return self._health_ms

    def _close_health(self) -> None:
        if self._health_conn is not None:
            self._health_conn.close()
            self._health_conn = None

    async def _hold_loop(self) -> None:
        while True:
            self._check_hold()
            self._hold_kick.clear()
            delay = max(self.poll_s, HOLD_CHECK_S) if self.held else HOLD_IDLE_S
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._hold_kick.wait(), delay)

    def _check_hold(self) -> None:
        self.hold_checks += 1
        try:
            held = bool(self.hold())
        except Exception:  # a closed store during recovery: keep going
            held = False
        if self.held and not held:
            self._set_wake()
        elif held and not self.held:
            self._hold_kick.set()
        self.held = held

    def _batch_done(self, result: IntakeResult) -> None:
        self.on_batch(result)
        if result.taken:
            self._check_hold()

    # -- the worker thread ----------------------------------------------------------------

    def _run(self) -> None:
        core = IntakeCore(self.config)
        wake = self._wake
        assert wake is not None
        rechecks = len(RECHECK_S)  # none pending
        try:
            while not self._stop.is_set():
                self._took = 0
                delay = self._round(core)
                self.rounds += 1
                if delay <= 0:
                    continue
                idle = delay == self._idle_s()
                if self._took:
                    rechecks = len(RECHECK_S)
                if idle and rechecks < len(RECHECK_S):
                    cause = wake.wait(RECHECK_S[rechecks])
                    rechecks += 1
                    if cause == watch.TIMEOUT:
                        continue  # a second look after a change, not a wake-up
                else:
                    if idle and not wake.watching:
                        wake.rewatch()  # the directory was replaced, or came late
                    cause = wake.wait(delay)
                self.woken[cause] += 1
                if cause == watch.CHANGE:
                    rechecks = 0
                    time.sleep(SETTLE_S)
        finally:
            core.close()

    def _idle_s(self) -> float:
        """How long to wait when nothing is waiting in the queue."""
        wake = self._wake
        return max(self.poll_s, FALLBACK_S) if wake is not None and wake.watching \
            else self.poll_s

    def _round(self, core: IntakeCore) -> float:
        """One round of the worker; returns how long to wait before the next one."""
        if self._release is not None:
            self._do_release(core)
            return 0.0
        try:
            if core.conn is None:
                core.open()
            if self.held:
                core.check_files()
                return self.poll_s
            result = core.step()
            self._took = result.taken
        except StoresReplaced:
            self._release = lambda: self.on_stores(None)
            return 0.0
        except sqlite3.Error as exc:
            return self._on_error(core, exc)
        except Exception as exc:  # never let the worker die: report and try again
            self._report("intake-bug", logging.ERROR,
                         f"controller queue intake failed: {exc!r}", exc_info=exc)
            core.close()
            return 1.0
        if result.taken or result.trimmed:
            self._hand_over(result)
        if core.archive_error is not None:
            self._report("archive", logging.ERROR,
                         f"archive: {core.archive_error}; the records are forwarded and "
                         "wait in the controller queue to be archived")
        return 0.0 if result.taken >= self.config.batch_size else self._idle_s()

    def _hand_over(self, result: IntakeResult) -> None:
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed at exit
                self._loop.call_soon_threadsafe(self._batch_done, result)

    def _on_error(self, core: IntakeCore, exc: sqlite3.Error) -> float:
        if db.is_disk_full(exc):
            self._report("disk-full", logging.ERROR,
                         "controller queue intake: the disk is full; records wait in the "
                         "controller queue until there is space")
            with contextlib.suppress(sqlite3.Error):
                core.keep_free_space(force=True)
            return 0.5
        if db.is_corruption(exc):
            core.close()
            if queue_damaged(self.config.queue_path):
                # The controller's file, not ours: reopening our stores would not help.
                self._report("queue-damaged", logging.ERROR,
                             f"the controller queue database {self.config.queue_path} is "
                             f"damaged ({exc}); its records cannot be read until it is "
                             "repaired or replaced")
                return 1.0

            def recover() -> None:
                self.on_stores(exc)
            self._release = recover
            return 0.0
        self._report("intake-db", logging.ERROR,
                     f"controller queue intake: database error: {exc}")
        if not _locked(exc):
            core.close()
        return 1.0

    def _do_release(self, core: IntakeCore) -> None:
        action, self._release = self._release, None
        core.close()
        if action is None or self._loop is None:
            return
        done = threading.Event()

        def run() -> None:
            try:
                action()
            except Exception:
                log.exception("reopening the databases failed")
            finally:
                done.set()

        try:
            self._loop.call_soon_threadsafe(run)
        except RuntimeError:
            return
        while not done.wait(0.2):
            if self._stop.is_set():
                return

    def _report(self, key: str, level: int, text: str,
                exc_info: BaseException | None = None) -> None:
        """Log, but the same kind of problem at most once a minute."""
        now = time.monotonic()
        if now - self._reported.get(key, -REPORT_EVERY_S) >= REPORT_EVERY_S:
            self._reported[key] = now
            log.log(level, "%s", text, exc_info=exc_info)
