"""The archive: every non-log record the controller handed over, indexed by time.

It outlives the outbox (records stay after ThingsBoard acknowledged them) until the
retention removes them, so an operator can republish a time range later.
"""

from __future__ import annotations

import datetime
import sqlite3

from teg_gateway import BUILD_DATE
from teg_gateway.clock import ms, now_ms
from teg_gateway.store.db import transaction, used_bytes
from teg_gateway.store.outbox import TELEMETRY

SCHEMA = """
PRAGMA auto_vacuum = INCREMENTAL;
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY,
    ts INTEGER NOT NULL,
    type TEXT,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS records_ts ON records (ts);
"""

DAY_MS = 86_400_000
BUILD_MS = ms(datetime.datetime.fromisoformat(BUILD_DATE).replace(
    tzinfo=datetime.UTC).timestamp())


class Archive:
    """Records kept for later republishing (schema ``archive`` on the store connection)."""

    def __init__(self, conn: sqlite3.Connection, schema: str = "archive") -> None:
        self.conn = conn
        self.schema = schema

    def count(self) -> int:
        return int(self.conn.execute(f"SELECT count(*) FROM {self.schema}.records").fetchone()[0])

    def used_bytes(self) -> int:
        return used_bytes(self.conn, self.schema)

    def republish(self, start_ms: int, end_ms: int) -> int:
        """Copy records with ``start_ms <= ts <= end_ms`` into the outbox, in time order."""
        with transaction(self.conn):
            before = self.conn.total_changes
            self.conn.execute(
                f"INSERT INTO main.outbox (kind, body, created_ms) "
                f"SELECT ?, body, ? FROM {self.schema}.records "
                f"WHERE ts BETWEEN ? AND ? ORDER BY ts, id",
                (TELEMETRY, now_ms(), start_ms, end_ms))
            return self.conn.total_changes - before

    def discard(self, start_ms: int, end_ms: int) -> int:
        """Delete records with ``start_ms <= ts <= end_ms``."""
        with transaction(self.conn):
            before = self.conn.total_changes
            self.conn.execute(f"DELETE FROM {self.schema}.records WHERE ts BETWEEN ? AND ?",
                              (start_ms, end_ms))
            return self.conn.total_changes - before

    def enforce_retention(self, max_age_days: float, max_bytes: int,
                          now: float | None = None) -> int:
        """Remove records older than the retention and the oldest above the size cap.

        The age counts back from the newest record stored, and only while the wall clock
        is plausible (not before the newest record, not before this version's release):
        a clock set years ahead must not empty the archive, one back in 1970 does nothing.
        """
        removed = 0
        reference = self.retention_reference_ms(now_ms() if now is None else ms(now))
        if reference is not None:
            cutoff = int(reference - max_age_days * DAY_MS)
            with transaction(self.conn):
                before = self.conn.total_changes
                self.conn.execute(f"DELETE FROM {self.schema}.records WHERE ts < ?", (cutoff,))
                removed += self.conn.total_changes - before
        used = self.used_bytes()
        if used > max_bytes:
            count = self.count()
            if count:
                per_row = max(1, used // count)
                to_remove = max(1, (used - int(max_bytes * 0.9)) // per_row)
                with transaction(self.conn):
                    before = self.conn.total_changes
                    self.conn.execute(
                        f"DELETE FROM {self.schema}.records WHERE id IN (SELECT id FROM "
                        f"{self.schema}.records ORDER BY ts LIMIT ?)", (to_remove,))
                    removed += self.conn.total_changes - before
        return removed


    def retention_reference_ms(self, wall_ms: int) -> int | None:
        """The time the retention counts back from, None when the clock is not plausible."""
        row = self.conn.execute(f"SELECT max(ts) FROM {self.schema}.records").fetchone()
        newest = row[0] if row and isinstance(row[0], int) else None
        if wall_ms < BUILD_MS or newest is None or wall_ms < newest:
            return None
        return min(wall_ms, newest)


def republish_chunk(archive: Archive, start_ms: int, end_ms: int, after_id: int,
                    limit: int) -> tuple[int, int]:
    """Copy up to ``limit`` archived records of the range with id > ``after_id`` into the
    outbox, in archive order. Returns (records copied, last id) - (0, after_id) when done.
    """
    schema = archive.schema
    conn = archive.conn
    row = conn.execute(
        f"SELECT count(*), max(id) FROM (SELECT id FROM {schema}.records "
        f"WHERE ts BETWEEN ? AND ? AND id > ? ORDER BY id LIMIT ?)",
        (start_ms, end_ms, after_id, limit)).fetchone()
    count, last_id = int(row[0]), row[1]
    if not count:
        return 0, after_id
    with transaction(conn):
        conn.execute(
            f"INSERT INTO main.outbox (kind, body, created_ms) SELECT ?, body, ? "
            f"FROM {schema}.records WHERE ts BETWEEN ? AND ? AND id > ? AND id <= ? "
            f"ORDER BY id", (TELEMETRY, now_ms(), start_ms, end_ms, after_id, last_id))
    return count, int(last_id)


def discard_chunk(archive: Archive, start_ms: int, end_ms: int, limit: int) -> int:
    """Delete up to ``limit`` archived records of the range; the number deleted."""
    schema = archive.schema
    with transaction(archive.conn):
        before = archive.conn.total_changes
        archive.conn.execute(
            f"DELETE FROM {schema}.records WHERE id IN (SELECT id FROM {schema}.records "
            f"WHERE ts BETWEEN ? AND ? LIMIT ?)", (start_ms, end_ms, limit))
        return archive.conn.total_changes - before
