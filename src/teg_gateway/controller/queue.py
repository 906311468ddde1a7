"""Intake from the controller's queue database (``communication_queue.db``).

Rows move in batches, entirely in SQL: validated with SQLite's JSON functions, copied to
the outbox (and, unless they are logs, to the archive), malformed ones to the dead-letter
table, and only then deleted from the queue, all in one transaction. The outbox (main
schema) commits first, with a sync, so a power cut can at worst leave a row in both
places (a duplicate), never in neither.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from teg_gateway.store import db
from teg_gateway.store.outbox import TELEMETRY, add_counter, now_ms, transaction

log = logging.getLogger(__name__)

QUEUE_FILE = "communication_queue.db"

QUEUE_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT, type TEXT, message TEXT);
CREATE TABLE IF NOT EXISTS health_check (
    id INTEGER PRIMARY KEY, timestamp_ms INTEGER);
"""

# Why a row is refused (NULL when it is good). CASE stops at the first true branch, so
# the JSON functions only ever see valid JSON text.
REASON_SQL = """CASE
    WHEN message IS NULL THEN 'message is NULL'
    WHEN typeof(message) <> 'text' THEN 'message is not text but ' || typeof(message)
    WHEN NOT json_valid(message) THEN 'message is not valid JSON'
    WHEN json_type(message) <> 'object' THEN 'message is not a JSON object'
    WHEN json_type(message, '$.ts') IS NULL THEN 'ts is missing'
    WHEN json_type(message, '$.ts') <> 'integer' THEN 'ts is not an integer'
    WHEN json_type(message, '$.values') IS NULL THEN 'values is missing'
    WHEN json_type(message, '$.values') <> 'object' THEN 'values is not an object'
    ELSE NULL END"""

BATCH_TABLE = """
CREATE TEMP TABLE IF NOT EXISTS intake_batch (
    id INTEGER PRIMARY KEY, type TEXT, message TEXT, reason TEXT, ts INTEGER, body TEXT)
"""

FILL_BATCH = f"""
INSERT INTO temp.intake_batch (id, type, message, reason, ts, body)
SELECT id, type, message, reason,
       CASE WHEN reason IS NULL THEN json_extract(message, '$.ts') END,
       CASE WHEN reason IS NULL THEN json_object(
           'ts', json_extract(message, '$.ts'),
           'values', json(json_extract(message, '$.values'))) END
FROM (SELECT id, type, message, {REASON_SQL} AS reason
      FROM queue.messages ORDER BY id LIMIT ?)
"""

TOO_LARGE = """
UPDATE temp.intake_batch
SET reason = 'record is ' || length(CAST(body AS BLOB)) || ' bytes, too large for a publish of '
             || ?1 || ' bytes (outbox.max_payload_bytes)', ts = NULL, body = NULL
WHERE reason IS NULL AND length(body) * 4 > ?2 AND length(CAST(body AS BLOB)) > ?2
"""

ATTACHED_MARK = "queue"


@dataclass
class IntakeResult:
    taken: int = 0
    forwarded: int = 0
    archived: int = 0
    dead: int = 0


def open_queue(path: Path) -> sqlite3.Connection:
    """Open the controller's queue database, creating its tables if missing."""
    conn = db.connect(path, synchronous="NORMAL")
    try:
        conn.executescript(QUEUE_SCHEMA)
    except BaseException:
        conn.close()
        raise
    return conn


class QueueIntake:
    """Moves rows from the controller queue into the outbox and the archive."""

    def __init__(self, queue_dir: Path, batch_size: int,
                 max_payload_bytes: int | None = None) -> None:
        self.path = queue_dir / QUEUE_FILE
        self.batch_size = batch_size
        # A record that cannot fit in one publish ("[" + record + "]") can never be sent:
        # ThingsBoard closes the connection on it, and it would block the outbox forever.
        self.max_record_bytes = None if max_payload_bytes is None else max_payload_bytes - 2
        self._attached_to: sqlite3.Connection | None = None
        self._inode: int | None = None
        self._inode_checked = 0.0
        self.last_error: str | None = None

    def attach(self, conn: sqlite3.Connection) -> None:
        """Attach the queue database to the store connection (again if it was reopened or
        the file was replaced)."""
        if self._attached_to is conn and not self._file_replaced():
            return
        if self._attached_to is conn:
            conn.execute(f"DETACH DATABASE {ATTACHED_MARK}")
            self._attached_to = None
        queue_conn = open_queue(self.path)
        queue_conn.close()
        conn.execute(f"ATTACH DATABASE ? AS {ATTACHED_MARK}", (str(self.path),))
        conn.execute(f"PRAGMA {ATTACHED_MARK}.synchronous = NORMAL")
        conn.execute(BATCH_TABLE)
        self._attached_to = conn
        self._inode = _inode(self.path)

    def _file_replaced(self) -> bool:
        now = time.monotonic()
        if now - self._inode_checked < 5.0:
            return False
        self._inode_checked = now
        return _inode(self.path) != self._inode

    def has_rows(self, conn: sqlite3.Connection) -> bool:
        self.attach(conn)
        row = conn.execute(f"SELECT id FROM {ATTACHED_MARK}.messages LIMIT 1").fetchone()
        return row is not None

    def move_batch(self, conn: sqlite3.Connection) -> IntakeResult:
        """Move up to ``batch_size`` rows. Returns what was moved."""
        self.attach(conn)
        result = IntakeResult()
        created = now_ms()
        with transaction(conn):
            conn.execute("DELETE FROM temp.intake_batch")
            conn.execute(FILL_BATCH, (self.batch_size,))
            taken, last_id, dead, longest = conn.execute(
                "SELECT count(*), max(id), count(reason), max(length(body)) "
                "FROM temp.intake_batch").fetchone()
            if not taken:
                return result
            # A character takes at most 4 bytes: only then can a record be too large.
            limit = self.max_record_bytes
            if limit is not None and longest is not None and longest * 4 > limit:
                conn.execute(TOO_LARGE, (limit + 2, limit))
                dead = conn.execute(
                    "SELECT count(reason) FROM temp.intake_batch").fetchone()[0]
            result.taken, result.dead = int(taken), int(dead)
            before = conn.total_changes
            conn.execute(
                "INSERT INTO main.outbox (kind, body, created_ms) "
                "SELECT ?, body, ? FROM temp.intake_batch WHERE reason IS NULL ORDER BY id",
                (TELEMETRY, created))
            result.forwarded = conn.total_changes - before
            before = conn.total_changes
            conn.execute(
                "INSERT INTO archive.records (ts, type, body) "
                "SELECT ts, type, body FROM temp.intake_batch "
                "WHERE reason IS NULL AND instr(coalesce(type, ''), 'log') = 0 ORDER BY id")
            result.archived = conn.total_changes - before
            if dead:
                conn.execute(
                    "INSERT INTO main.dead_letter (queue_id, type, message, reason, at_ms) "
                    "SELECT id, type, message, reason, ? FROM temp.intake_batch "
                    "WHERE reason IS NOT NULL ORDER BY id", (created,))
                add_counter(conn, "dead_letters", result.dead)
            add_counter(conn, "records_accepted", result.forwarded)
            conn.execute(f"DELETE FROM {ATTACHED_MARK}.messages WHERE id <= ?", (last_id,))
        if dead:
            self._report_dead(conn, result.dead)
        return result

    def _report_dead(self, conn: sqlite3.Connection, count: int) -> None:
        rows = conn.execute(
            "SELECT id, type, reason FROM temp.intake_batch WHERE reason IS NOT NULL "
            "ORDER BY id LIMIT 5").fetchall()
        detail = "; ".join(f"row {r[0]} (type {r[1]!r}): {r[2]}" for r in rows)
        more = f" and {count - len(rows)} more" if count > len(rows) else ""
        log.warning("controller queue: %d malformed row(s) moved to the dead-letter table: "
                    "%s%s", count, detail, more)

    def queue_damaged(self) -> bool:
        """Whether the controller's queue database file itself is damaged.

        Tells a damaged queue from damaged gateway databases after a corruption error in
        the intake: only the latter are the gateway's to move aside and reopen."""
        try:
            conn = db.connect(self.path, synchronous="NORMAL")
        except sqlite3.DatabaseError as exc:
            return db.is_corruption(exc)
        try:
            db.check_readable(conn)
        except sqlite3.DatabaseError as exc:
            return db.is_corruption(exc)
        finally:
            conn.close()
        return False

    def last_health_check_ms(self, conn: sqlite3.Connection) -> int:
        """The controller's last health check (ms since the epoch), 0 when none."""
        self.attach(conn)
        row = conn.execute(
            f"SELECT max(timestamp_ms) FROM {ATTACHED_MARK}.health_check").fetchone()
        return int(row[0]) if row and row[0] is not None else 0


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None
