"""The outbox: every message bound for ThingsBoard, on disk until ThingsBoard acknowledges it.

Rows are ordered by id. Telemetry bodies are stored as ThingsBoard's ``{"ts","values"}``
JSON text, so a publish is made by joining stored texts into a JSON array: no record is
parsed on the way out.
"""

from __future__ import annotations

import json
import sqlite3
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from teg_gateway.clock import now_ms
from teg_gateway.cloud import topics
from teg_gateway.store import deadletters
from teg_gateway.store.db import add_counter, get_counter, transaction, used_bytes
from teg_gateway.store.deadletters import DEAD_LETTER_CAP_BYTES, dead_letter_bytes

TELEMETRY = 0
ATTRIBUTES = 1

TOPICS = {TELEMETRY: topics.TELEMETRY, ATTRIBUTES: topics.ATTRIBUTES}
KIND_NAMES = {TELEMETRY: "telemetry", ATTRIBUTES: "attributes"}

# Data points of a stored telemetry record, as ThingsBoard counts them (one per key of
# ``values``); -1 for a body that is not JSON (it can never be sent).
POINTS_SQL = ("CASE WHEN kind <> 0 THEN 0 WHEN json_valid(body) THEN "
              "(SELECT count(*) FROM json_each(body, '$.values')) ELSE -1 END")

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind INTEGER NOT NULL,
    body TEXT NOT NULL,
    created_ms INTEGER NOT NULL
);
-- Client attributes go out ahead of the telemetry backlog: found without a scan of it.
CREATE INDEX IF NOT EXISTS outbox_not_telemetry ON outbox (id) WHERE kind <> 0;
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


# One row read ahead: (id, kind, body, data points).
Row = tuple[int, int, bytes, int]


@dataclass(frozen=True)
class Batch:
    """One publish: the outbox rows ``first_id..last_id`` (all of one kind)."""

    first_id: int
    last_id: int
    kind: int
    count: int
    payload: bytes
    points: int = 0
    rows: tuple[Row, ...] = ()

    @property
    def topic(self) -> str:
        return TOPICS[self.kind]


class Outbox:
    """Durable FIFO of messages for ThingsBoard (table ``outbox`` of the main schema).

    ``max_record_bytes`` bounds what is accepted: a message that could never be sent in
    one publish goes to the dead letters with the reason instead, so it cannot block the
    messages behind it.
    """

    def __init__(self, conn: sqlite3.Connection, max_record_bytes: int) -> None:
        self.conn = conn
        self.max_record_bytes = max_record_bytes
        # Count each telemetry record's data points when reading ahead (only needed while
        # the server limits data points; it costs a little SQL per record).
        self.count_points = False
        self.dead_letter_cap_bytes = DEAD_LETTER_CAP_BYTES
        self._read_upto = 0
        self._ahead: deque[Row] = deque()
        # Messages other than telemetry (client attributes): read on a cursor of their own
        # and sent first. ``_others_maybe``: there may be some not read yet.
        self._others_upto = 0
        self._others: deque[Row] = deque()
        self._others_maybe = True
        # Ranges ThingsBoard acknowledged whose delete failed (a full disk, say): never
        # sent again, deleted again later.
        self._unsettled: list[tuple[int, int]] = []

    # -- intake ---------------------------------------------------------------------------

    def put(self, kind: int, bodies: Sequence[str]) -> None:
        """Append messages in one durable transaction; one too large for a publish becomes
        a dead letter."""
        if not bodies:
            return
        created = now_ms()
        limit = self.max_record_bytes
        rows, refused = [], []
        for body in bodies:
            size = len(body) if len(body) * 4 <= limit else len(body.encode())
            if size > limit:
                refused.append((KIND_NAMES.get(kind, str(kind)), body,
                                f"message is {size} bytes, larger than the {limit} bytes "
                                "one publish may carry"))
            else:
                rows.append((kind, body, created))
        with transaction(self.conn):
            self.conn.executemany(
                "INSERT INTO outbox (kind, body, created_ms) VALUES (?, ?, ?)", rows)
            if refused:
                deadletters.add_rows(self.conn, refused, cap_bytes=self.dead_letter_cap_bytes)
        if kind != TELEMETRY:
            self._others_maybe = True

    def put_telemetry(self, values: dict[str, object], ts_ms: int | None = None) -> None:
        self.put(TELEMETRY, [telemetry_body(values, ts_ms)])

    def put_attributes(self, attributes: dict[str, object]) -> None:
        self.put(ATTRIBUTES, [json.dumps(attributes, separators=(",", ":"), default=str)])

    # -- forwarding -----------------------------------------------------------------------

    def next_batch(self, max_bytes: int | None = None,
                   max_points: int | None = None) -> Batch | None:
        """The next publish after those already handed out, or None when all are out.

        Client attributes go first, one row per publish, ahead of the telemetry backlog.
        Telemetry rows are packed into one JSON array of at most ``max_bytes`` bytes
        (default ``max_record_bytes`` + 2) and ``max_points`` data points. A row that could
        never be sent within these limits goes to the dead letters, with the reason, and
        the next row is taken.
        """
        limit = self.max_record_bytes + 2 if max_bytes is None else max_bytes
        while (other := self._next_other()) is not None:
            reason = _never_fits(other, limit, max_points)
            if reason is None:
                return Batch(other[0], other[0], other[1], 1, other[2], 0, (other,))
            self.dead_letter_rows([other[0]], reason)
        while True:
            row = self._next_row()
            if row is None:
                return None
            reason = _never_fits(row, limit, max_points)
            if reason is None:
                break
            self.dead_letter_rows([row[0]], reason)
        first_id, _kind, body, points = row
        rows = [row]
        bodies = [body]
        size = len(body) + 2
        total = points
        ahead = self._ahead
        # The per-record loop of a drain: kept to a few operations a row.
        while True:
            if not ahead:
                self._read_ahead()
                if not ahead:
                    break
            following = ahead[0]
            next_body = following[2]
            size += len(next_body) + 1
            if size > limit or (
                    max_points is not None and total + following[3] > max_points):
                break
            ahead.popleft()
            rows.append(following)
            bodies.append(next_body)
            total += following[3]
        return Batch(first_id, rows[-1][0], TELEMETRY, len(rows),
                     b"[" + b",".join(bodies) + b"]", total, tuple(rows))

    def _next_other(self) -> Row | None:
        if not self._others and self._others_maybe:
            rows = self.conn.execute(
                "SELECT id, kind, CAST(body AS BLOB), 0 FROM outbox WHERE kind <> 0 AND id > ? "
                "ORDER BY id LIMIT 64", (self._others_upto,)).fetchall()
            if rows:
                self._others_upto = rows[-1][0]
                self._others.extend(r for r in rows if not self._is_unsettled(r[0]))
            else:
                self._others_maybe = False
        return self._others.popleft() if self._others else None

    def put_back(self, batch: Batch) -> None:
        """Hand ``batch`` out again with the next call (it was not sent)."""
        queue = self._ahead if batch.kind == TELEMETRY else self._others
        queue.extendleft(reversed(batch.rows))

    def _next_row(self) -> Row | None:
        row = self._peek_row()
        if row is not None:
            self._ahead.popleft()
        return row

    def _peek_row(self) -> Row | None:
        if not self._ahead:
            self._read_ahead()
        return self._ahead[0] if self._ahead else None

    def _read_ahead(self) -> None:
        points = POINTS_SQL if self.count_points else "0"
        rows = self.conn.execute(
            f"SELECT id, kind, CAST(body AS BLOB), {points} FROM outbox "
            "WHERE kind = 0 AND id > ? ORDER BY id LIMIT ?",
            (self._read_upto, READ_AHEAD)).fetchall()
        if rows:
            self._read_upto = rows[-1][0]
            if self._unsettled:
                rows = [r for r in rows if not self._is_unsettled(r[0])]
            self._ahead.extend(rows)

    def _is_unsettled(self, row_id: int) -> bool:
        return any(first <= row_id <= last for first, last in self._unsettled)

    def unsent(self) -> int:
        """Rows not yet handed to the forwarder (an estimate from ids; cheap)."""
        row = self.conn.execute("SELECT max(id) FROM outbox").fetchone()
        newest = int(row[0]) if row and row[0] is not None else 0
        return max(0, newest - self._read_upto) + len(self._ahead)

    def rewind(self) -> None:
        """Forget what was handed out: the next batch starts at the oldest row again."""
        self._read_upto = 0
        self._ahead.clear()
        self._others_upto = 0
        self._others.clear()
        self._others_maybe = True

    def ack(self, batches: Iterable[Batch]) -> int:
        """Delete acknowledged batches; returns the number of records removed.

        When the delete fails (a full disk), the ranges are remembered: they are not
        handed out again, and their delete is tried again with the next acknowledgement
        (or ``settle``). The error is raised after that bookkeeping.
        """
        ranges = [(b.first_id, b.last_id) for b in batches]
        if not ranges and not self._unsettled:
            return 0
        ranges = self._unsettled + ranges
        self._unsettled = []
        try:
            return self._delete(ranges)
        except sqlite3.Error:
            self._unsettled = ranges
            raise

    def settle(self) -> int:
        """Try again to delete acknowledged ranges whose delete failed."""
        return self.ack(())

    @property
    def unsettled(self) -> int:
        """Acknowledged ranges still waiting for their delete."""
        return len(self._unsettled)

    def _delete(self, ranges: list[tuple[int, int]]) -> int:
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

    def check_rows(self, first_id: int, last_id: int) -> int:
        """Check the rows ``first_id..last_id`` one by one, as ThingsBoard would read them;
        a damaged one goes to the dead letters. Returns how many did."""
        bad: dict[str, list[int]] = {}
        for row_id, kind, body in self.conn.execute(
                "SELECT id, kind, CAST(body AS BLOB) FROM outbox WHERE id BETWEEN ? AND ?",
                (first_id, last_id)):
            reason = _damage(kind, body)
            if reason is not None:
                bad.setdefault(reason, []).append(row_id)
        for reason, ids in bad.items():
            self.dead_letter_rows(ids, reason)
        if bad:
            self.rewind()
        return sum(len(ids) for ids in bad.values())

    def dead_letter_rows(self, ids: Sequence[int], reason: str) -> None:
        """Move outbox rows that can never be sent to the dead letters, with the reason."""
        deadletters.move_from_outbox(self.conn, ids, reason,
                                     cap_bytes=self.dead_letter_cap_bytes)

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


def _never_fits(row: Row, max_bytes: int, max_points: int | None) -> str | None:
    """Why ``row`` can never be sent within these limits (None: it can)."""
    _, kind, body, points = row
    size = len(body) + (2 if kind == TELEMETRY else 0)
    if size > max_bytes:
        return (f"message is {len(body)} bytes; a publish may carry at most {max_bytes} "
                "bytes (the server's maxPayloadSize)")
    if points < 0:
        return "message is not valid JSON"
    if kind == TELEMETRY and max_points is not None and points > max_points:
        return (f"record has {points} data points; the server's telemetryDataPoints limit "
                f"allows at most {max_points} in one publish")
    return None


def _damage(kind: int, body: bytes) -> str | None:
    """Why a stored body is not what ThingsBoard accepts (None: it is)."""
    try:
        value = json.loads(body)
    except ValueError:  # UnicodeDecodeError included
        return "damaged in the outbox: not valid JSON text"
    if not isinstance(value, dict):
        return "damaged in the outbox: not a JSON object"
    if kind == TELEMETRY and not (isinstance(value.get("ts"), int)
                                  and isinstance(value.get("values"), dict)):
        return "damaged in the outbox: not a {ts, values} record"
    return None


def telemetry_body(values: dict[str, object], ts_ms: int | None = None) -> str:
    """ThingsBoard's ``{"ts","values"}`` text for one record."""
    return json.dumps({"ts": now_ms() if ts_ms is None else ts_ms, "values": values},
                      separators=(",", ":"), default=str)
