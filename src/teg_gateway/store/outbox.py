"""The outbox: every message bound for ThingsBoard, on disk until ThingsBoard acknowledges it.

Rows are ordered by id. Telemetry bodies are stored as ThingsBoard's ``{"ts","values"}``
JSON text, so a publish is made by joining stored texts into a JSON array: no record is
parsed on the way out.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

TELEMETRY = 0
ATTRIBUTES = 1

TOPIC_TELEMETRY = "v1/devices/me/telemetry"
TOPIC_ATTRIBUTES = "v1/devices/me/attributes"
TOPICS = {TELEMETRY: TOPIC_TELEMETRY, ATTRIBUTES: TOPIC_ATTRIBUTES}

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind INTEGER NOT NULL,
    body TEXT NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letter (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue_id INTEGER,
    type TEXT,
    message TEXT,
    reason TEXT NOT NULL,
    at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""

READ_AHEAD = 4096
# Default cap of the dead letters (outbox.dead_letters_mb); see store/deadletters.py.
DEAD_LETTER_CAP_BYTES = 8 * 1024 * 1024


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class Batch:
    """One publish: the outbox rows ``first_id..last_id`` (all of one kind)."""

    first_id: int
    last_id: int
    kind: int
    count: int
    payload: bytes

    @property
    def topic(self) -> str:
        return TOPICS[self.kind]


class Outbox:
    """Durable FIFO of messages for ThingsBoard (table ``outbox`` of the main schema)."""

    def __init__(self, conn: sqlite3.Connection, max_payload_bytes: int) -> None:
        self.conn = conn
        self.max_payload_bytes = max_payload_bytes
        self.dead_letter_cap_bytes = DEAD_LETTER_CAP_BYTES
        self._read_upto = 0
        self._ahead: deque[tuple[int, int, bytes]] = deque()

    # -- intake ---------------------------------------------------------------------------

    def put(self, kind: int, bodies: Sequence[str]) -> None:
        """Append messages in one durable transaction."""
        if not bodies:
            return
        created = now_ms()
        with transaction(self.conn):
            self.conn.executemany(
                "INSERT INTO outbox (kind, body, created_ms) VALUES (?, ?, ?)",
                [(kind, body, created) for body in bodies])

    def put_telemetry(self, values: dict[str, object], ts_ms: int | None = None) -> None:
        self.put(TELEMETRY, [telemetry_body(values, ts_ms)])

    def put_attributes(self, attributes: dict[str, object]) -> None:
        self.put(ATTRIBUTES, [json.dumps(attributes, separators=(",", ":"), default=str)])

    # -- forwarding -----------------------------------------------------------------------

    def next_batch(self) -> Batch | None:
        """The next publish after those already handed out, or None when all are out.

        Telemetry rows are packed into one JSON array up to ``max_payload_bytes``; any
        other kind goes one row per publish. A single record larger than the limit is
        still sent alone (ThingsBoard will judge it) rather than blocking the outbox.
        """
        if not self._ahead:
            self._read_ahead()
            if not self._ahead:
                return None
        first_id, kind, body = self._ahead.popleft()
        if kind != TELEMETRY:
            return Batch(first_id, first_id, kind, 1, body)
        parts = [body]
        size = len(body) + 2
        last_id = first_id
        limit = self.max_payload_bytes
        while True:
            if not self._ahead:
                self._read_ahead()
                if not self._ahead:
                    break
            next_id, next_kind, next_body = self._ahead[0]
            if next_kind != TELEMETRY or size + len(next_body) + 1 > limit:
                break
            self._ahead.popleft()
            parts.append(next_body)
            size += len(next_body) + 1
            last_id = next_id
        return Batch(first_id, last_id, TELEMETRY, len(parts),
                     b"[" + b",".join(parts) + b"]")

    def _read_ahead(self) -> None:
        rows = self.conn.execute(
            "SELECT id, kind, CAST(body AS BLOB) FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
            (self._read_upto, READ_AHEAD)).fetchall()
        if rows:
            self._ahead.extend(rows)
            self._read_upto = rows[-1][0]

    def unsent(self) -> int:
        """Rows not yet handed to the forwarder (an estimate from ids; cheap)."""
        row = self.conn.execute("SELECT max(id) FROM outbox").fetchone()
        newest = int(row[0]) if row and row[0] is not None else 0
        return max(0, newest - self._read_upto) + len(self._ahead)

    def rewind(self) -> None:
        """Forget what was handed out: the next batch starts at the oldest row again."""
        self._read_upto = 0
        self._ahead.clear()

    def ack(self, batches: Iterable[Batch]) -> int:
        """Delete acknowledged batches; returns the number of records removed."""
        ranges = [(b.first_id, b.last_id) for b in batches]
        if not ranges:
            return 0
        # Losing an acknowledgement in a power cut only means a duplicate later, so this
        # commit need not wait for the disk.
        self.conn.execute("PRAGMA main.synchronous = NORMAL")
        try:
            with transaction(self.conn):
                before = self.conn.total_changes
                self.conn.executemany("DELETE FROM outbox WHERE id BETWEEN ? AND ?", ranges)
                removed = self.conn.total_changes - before
                add_counter(self.conn, "records_sent", removed)
        finally:
            self.conn.execute("PRAGMA main.synchronous = FULL")
        return removed

    # -- figures --------------------------------------------------------------------------

    def depth(self) -> int:
        row = self.conn.execute("SELECT count(*) FROM outbox").fetchone()
        return int(row[0])

    def oldest_age_ms(self) -> int | None:
        row = self.conn.execute("SELECT created_ms FROM outbox ORDER BY id LIMIT 1").fetchone()
        return None if row is None else max(0, now_ms() - int(row[0]))

    def used_bytes(self) -> int:
        return used_bytes(self.conn, "main")

    def enforce_quota(self, quota_bytes: int) -> int:
        """Drop the oldest telemetry while the outbox uses more than ``quota_bytes``.

        It goes down to 90 % of the quota so that the next records do not trigger it
        again at once. Returns the number of records dropped (they stay in the archive).
        Dead letters do not count: they have a cap of their own.
        """
        used = self.used_bytes()
        if used <= quota_bytes:
            return 0
        used -= dead_letter_bytes(self.conn)
        if used <= quota_bytes:
            return 0
        count = self.depth()
        if count == 0:
            return 0
        per_row = max(1, used // count)
        to_drop = max(1, (used - int(quota_bytes * 0.9)) // per_row)
        with transaction(self.conn):
            before = self.conn.total_changes
            self.conn.execute(
                "DELETE FROM outbox WHERE id IN "
                "(SELECT id FROM outbox WHERE kind = ? ORDER BY id LIMIT ?)",
                (TELEMETRY, to_drop))
            dropped = self.conn.total_changes - before
            add_counter(self.conn, "records_dropped", dropped)
        # Rows read ahead may be among those dropped: read them again. Rows already in
        # flight stay in flight (their acknowledgement then deletes nothing).
        if self._ahead:
            self._read_upto = self._ahead[0][0] - 1
            self._ahead.clear()
        return dropped

    def counter(self, name: str) -> int:
        return get_counter(self.conn, name)


def telemetry_body(values: dict[str, object], ts_ms: int | None = None) -> str:
    """ThingsBoard's ``{"ts","values"}`` text for one record."""
    return json.dumps({"ts": now_ms() if ts_ms is None else ts_ms, "values": values},
                      separators=(",", ":"), default=str)


class transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.conn.execute("COMMIT")
        elif self.conn.in_transaction:
            self.conn.execute("ROLLBACK")


def add_counter(conn: sqlite3.Connection, name: str, amount: int, schema: str = "main") -> None:
    if amount:
        conn.execute(
            f"INSERT INTO {schema}.counters (name, value) VALUES (?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value", (name, amount))


def get_counter(conn: sqlite3.Connection, name: str, schema: str = "main") -> int:
    row = conn.execute(f"SELECT value FROM {schema}.counters WHERE name = ?", (name,)).fetchone()
    return 0 if row is None else int(row[0])


def dead_letter_bytes(conn: sqlite3.Connection) -> int:
    """Bytes the dead letters take in the outbox file (pages, overflow included)."""
    try:
        row = conn.execute(
            "SELECT sum(pgsize) FROM dbstat('main') WHERE name = 'dead_letter'").fetchone()
    except sqlite3.OperationalError:  # SQLite built without the dbstat table
        row = conn.execute(
            "SELECT sum(coalesce(length(CAST(message AS BLOB)), 0) + length(reason) + 32) "
            "FROM main.dead_letter").fetchone()
    return int(row[0] or 0)


def used_bytes(conn: sqlite3.Connection, schema: str) -> int:
    """Bytes of the database file in use (free pages not counted)."""
    page_size = conn.execute(f"PRAGMA {schema}.page_size").fetchone()[0]
    pages = conn.execute(f"PRAGMA {schema}.page_count").fetchone()[0]
    free = conn.execute(f"PRAGMA {schema}.freelist_count").fetchone()[0]
    return int((pages - free) * page_size)
