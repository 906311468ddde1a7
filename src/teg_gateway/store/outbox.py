"""The outbox: every message bound for ThingsBoard, on disk until ThingsBoard acknowledges it.

Rows are ordered by id. Telemetry bodies are stored as ThingsBoard's ``{"ts","values"}``
JSON text, so a publish is made by joining stored texts into a JSON array: no record is
parsed on the way out.

A telemetry row may hold several records (the intake packs each batch so, up to what one
publish carries): ``body`` is their texts joined by commas, ``records`` their number and
``sizes`` the byte length of each (comma-separated; NULL for a row of one record). Such a
row is sent, acknowledged and deleted as a whole, so a drain costs a few rows per publish
instead of one per record. Only when the server's limits are smaller than the row (a
smaller ``maxPayloadSize``, a data-point limit) is it split into its records on the way
out; the records acknowledged are then remembered, and the row is deleted once all of
them are, or rewritten without them when the connection ends.
"""

from __future__ import annotations

import bisect
import itertools
import json
import operator
import sqlite3
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

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
# ``values``); -1 for a body that is not JSON (it can never be sent); NULL for a row of
# several records (counted record by record when it is split).
POINTS_SQL = ("CASE WHEN kind <> 0 THEN 0 WHEN records > 1 THEN NULL WHEN json_valid(body) "
              "THEN (SELECT count(*) FROM json_each(body, '$.values')) ELSE -1 END")

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind INTEGER NOT NULL,
    body TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    records INTEGER NOT NULL DEFAULT 1,
    sizes TEXT
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

# The data points of a row whose sizes do not match its text (it cannot be split).
DAMAGED_ROW = -2
DAMAGED_ROW_REASON = ("damaged in the outbox: the sizes of its records do not match its "
                      "text")

# The rows of several records, by id: how many records wait is known without reading
# the rows (whose text may continue on overflow pages). Created by ``upgrade`` (the
# column is missing in files of earlier releases until then).
PACKED_INDEX = ("CREATE INDEX IF NOT EXISTS main.outbox_packed ON outbox (id, records) "
                "WHERE records > 1")

# Columns added since the first release, for outbox files made before them.
ADDED_COLUMNS = (("records", "INTEGER NOT NULL DEFAULT 1"), ("sizes", "TEXT"))

# Reading ahead stops at whichever comes first.
READ_AHEAD = 4096
READ_AHEAD_BYTES = 512 * 1024


# What is read ahead and handed out: a whole row, or one record of a row of several (after
# a split): (row id, kind, body, data points, first record, records, records in the row,
# the row's sizes column). Data points are -1 for a body that is not JSON, and None where
# not counted (a row of several records).
Piece = tuple[int, int, bytes, int | None, int, int, int, str | None]


class Span(NamedTuple):
    """Rows ``first..last`` of ``kind`` to delete once acknowledged. ``counted``: their
    records count as removed (False for a split row, whose records were counted as they
    were acknowledged)."""

    first: int
    last: int
    kind: int
    counted: bool = True


@dataclass(frozen=True)
class Batch:
    """One publish: pieces of the outbox rows ``first_id..last_id`` (all of one kind)."""

    first_id: int
    last_id: int
    kind: int
    count: int
    payload: bytes
    points: int = 0
    rows: tuple[Piece, ...] = ()

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
        self._ahead: deque[Piece] = deque()
        # Messages other than telemetry (client attributes): read on a cursor of their own
        # and sent first. ``_others_maybe``: there may be some not read yet.
        self._others_upto = 0
        self._others: deque[Piece] = deque()
        self._others_maybe = True
        # Ranges ThingsBoard acknowledged whose delete failed (a full disk, say): never
        # sent again, deleted again later.
        self._unsettled: list[Span] = []
        # Rows of several records of which some, not all, are settled (acknowledged or
        # moved to the dead letters): row id -> indices of those records. They are not
        # handed out again; the row goes when all are settled, or is rewritten without
        # them at the next rewind.
        self._done: dict[int, set[int]] = {}

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
        Telemetry is packed into one JSON array of at most ``max_bytes`` bytes (default
        ``max_record_bytes`` + 2) and ``max_points`` data points. A row of several records
        goes whole when it fits alone and no data points are counted, else record by
        record. A record that could never be sent within these limits goes to the dead
        letters, with the reason, and the next one is taken.
        """
        limit = self.max_record_bytes + 2 if max_bytes is None else max_bytes
        while (other := self._next_other()) is not None:
            reason = _never_fits(other, limit, max_points)
            if reason is None:
                return Batch(other[0], other[0], other[1], 1, other[2], 0, (other,))
            self.dead_letter_rows([other[0]], reason)
        ahead = self._ahead
        pieces: list[Piece] = []
        bodies: list[bytes] = []
        size = 1
        count = total = 0
        # The loop of a drain runs once per row (about fifty records), not per record.
        while True:
            if not ahead:
                self._read_ahead()
                if not ahead:
                    break
            piece = ahead[0]
            body = piece[2]
            if piece[5] > 1 and piece[3] != DAMAGED_ROW and (
                    max_points is not None or len(body) + 2 > limit):
                self._split_first(count_points=max_points is not None)
                continue
            if not pieces:
                reason = _never_fits(piece, limit, max_points)
                if reason is not None:
                    ahead.popleft()
                    self._dead_letter_piece(piece, reason)
                    continue
            points = piece[3] or 0
            if size + len(body) + 1 > limit or (
                    max_points is not None and total + points > max_points):
                break
            ahead.popleft()
            pieces.append(piece)
            bodies.append(body)
            size += len(body) + 1
            count += piece[5]
            total += points
        if not pieces:
            return None
        return Batch(pieces[0][0], pieces[-1][0], TELEMETRY, count,
                     b"[" + b",".join(bodies) + b"]", total, tuple(pieces))

    def _next_other(self) -> Piece | None:
        if not self._others and self._others_maybe:
            rows = self.conn.execute(
                "SELECT id, kind, CAST(body AS BLOB), 0, 0, 1, 1, NULL FROM outbox "
                "WHERE kind <> 0 AND id > ? ORDER BY id LIMIT 64",
                (self._others_upto,)).fetchall()
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

    def _read_ahead(self) -> None:
        """Read the next telemetry rows, up to READ_AHEAD rows or READ_AHEAD_BYTES."""
        points = POINTS_SQL if self.count_points else "0"
        cursor = self.conn.execute(
            f"SELECT id, kind, CAST(body AS BLOB), {points}, records, sizes FROM outbox "
            "WHERE kind = 0 AND id > ? ORDER BY id LIMIT ?", (self._read_upto, READ_AHEAD))
        budget = READ_AHEAD_BYTES
        want = 64
        try:
            while budget > 0 and (rows := cursor.fetchmany(want)):
                self._read_upto = rows[-1][0]
                for row_id, kind, body, row_points, row_records, sizes in rows:
                    budget -= len(body)
                    if self._unsettled and self._is_unsettled(row_id):
                        continue
                    records = row_records if isinstance(row_records, int) else 1
                    records = max(records, 1)
                    self._ahead.append(
                        (row_id, kind, body, row_points, 0, records, records, sizes))
                    if records > 1 and row_id in self._done:
                        self._split_last()
                want = max(1, min(64, budget // max(1, len(rows[-1][2]))))
        finally:
            cursor.close()

    def _split_first(self, count_points: bool) -> None:
        """Replace the first piece read ahead (a row of several records) by its records."""
        piece = self._ahead.popleft()
        self._ahead.extendleft(reversed(self._records_of(piece, count_points)))

    def _split_last(self) -> None:
        """Split the last piece read ahead (a row partly settled) into its unsettled
        records."""
        piece = self._ahead.pop()
        self._ahead.extend(self._records_of(piece, count_points=self.count_points))

    def _records_of(self, piece: Piece, count_points: bool) -> list[Piece]:
        """The records of ``piece`` (of a row of several) not settled yet, one piece each.
        A row whose sizes do not match its text becomes one piece that can never be sent."""
        row_id, kind, body, _points, first, _count, in_row, sizes = piece
        texts = split_records(body, sizes, in_row)
        if texts is None:
            # Whole and marked: it goes to the dead letters when its turn comes.
            return [(row_id, kind, body, DAMAGED_ROW, first, in_row, in_row, sizes)]
        done = self._done.get(row_id, ())
        return [(row_id, kind, text, _points_of(text) if count_points else 0, first + i, 1,
                 in_row, sizes)
                for i, text in enumerate(texts) if first + i not in done]

    def _is_unsettled(self, row_id: int) -> bool:
        return any(span.first <= row_id <= span.last for span in self._unsettled)

    def unsent(self) -> int:
        """Records not yet handed to the forwarder (an estimate from ids and the index of
        the rows of several records; cheap)."""
        top = self.conn.execute("SELECT max(id) FROM outbox").fetchone()[0]
        extra = self.conn.execute(
            "SELECT coalesce(sum(records - 1), 0) FROM outbox INDEXED BY outbox_packed "
            "WHERE records > 1 AND id > ?", (self._read_upto,)).fetchone()[0]
        return (max(0, int(top or 0) - self._read_upto) + int(extra)
                + sum(piece[5] for piece in self._ahead))

    def rewind(self) -> None:
        """Forget what was handed out: the next batch starts at the oldest row again.

        Rows of several records partly settled are rewritten without the settled ones
        first; when that fails (a full disk), they stay remembered and are skipped when
        read again."""
        self._rewrite_done()
        self._read_upto = 0
        self._ahead.clear()
        self._others_upto = 0
        self._others.clear()
        self._others_maybe = True

    def _rewrite_done(self) -> None:
        if not self._done:
            return
        try:
            with transaction(self.conn):
                for row_id, done in self._done.items():
                    self._rewrite_row(row_id, done)
        except sqlite3.Error:
            return
        self._done.clear()

    def _rewrite_row(self, row_id: int, drop: set[int]) -> None:
        """Inside a transaction: rewrite a row of several records without ``drop`` (record
        indices); delete it when none is left."""
        row = self.conn.execute("SELECT CAST(body AS BLOB), records, sizes FROM outbox "
                                "WHERE id = ?", (row_id,)).fetchone()
        if row is None:
            return
        texts = split_records(row[0], row[2], row[1] if isinstance(row[1], int) else 1)
        if texts is None:
            return
        keep = [text for i, text in enumerate(texts) if i not in drop]
        if not keep:
            self.conn.execute("DELETE FROM outbox WHERE id = ?", (row_id,))
        elif len(keep) < len(texts):
            body, records, sizes = pack_row(keep)
            self.conn.execute("UPDATE outbox SET body = CAST(? AS TEXT), records = ?, sizes = ? "
                              "WHERE id = ?", (body, records, sizes, row_id))

    def ack(self, batches: Iterable[Batch]) -> int:
        """Settle acknowledged batches; returns the number of records removed (rows
        deleted, records of a split row the first time they are acknowledged).

        When the delete fails (a full disk), the ranges are remembered: they are not
        handed out again, and their delete is tried again with the next acknowledgement
        (or ``settle``). The error is raised after that bookkeeping.
        """
        ranges: list[Span] = []
        settled = 0
        for batch in batches:
            settled += self._settle_pieces(batch.rows, batch.kind, ranges)
        if not ranges and not self._unsettled:
            if settled:
                self._count_sent(settled)
            return settled
        ranges = self._unsettled + ranges
        self._unsettled = []
        try:
            return settled + self._delete(ranges, settled)
        except sqlite3.Error:
            self._unsettled = ranges
            raise

    def _settle_pieces(self, pieces: Iterable[Piece], kind: int, ranges: list[Span]) -> int:
        """Add to ``ranges`` the rows settled in full by ``pieces``; the records of split
        rows are remembered. Returns how many of those were new.

        Consecutive whole rows of one batch leave no row of their kind between them
        unsent, so one range covers them; a split row ends a range."""
        start = last = -1
        new = 0
        for piece in pieces:
            if piece[5] != piece[6]:
                added, complete = self._settle_records(piece)
                new += added
                if start >= 0:
                    ranges.append(Span(start, last, kind))
                    start = -1
                if complete:
                    ranges.append(Span(piece[0], piece[0], kind, counted=False))
                continue
            if start < 0:
                start = piece[0]
            last = piece[0]
        if start >= 0:
            ranges.append(Span(start, last, kind))
        return new

    def _settle_records(self, piece: Piece) -> tuple[int, bool]:
        """Remember the records of ``piece`` (some of a row) as settled: (how many were
        not yet, whether the whole row now is)."""
        done = self._done.get(piece[0])
        if done is None:
            if self.conn.execute("SELECT 1 FROM outbox WHERE id = ?",
                                 (piece[0],)).fetchone() is None:
                return 0, False  # settled before (a repeated acknowledgement)
            done = self._done[piece[0]] = set()
        before = len(done)
        done.update(range(piece[4], piece[4] + piece[5]))
        added = len(done) - before
        if len(done) < piece[6]:
            return added, False
        del self._done[piece[0]]
        return added, True

    def settle(self) -> int:
        """Try again to delete acknowledged ranges whose delete failed."""
        return self.ack(())

    @property
    def unsettled(self) -> int:
        """Acknowledged ranges still waiting for their delete."""
        return len(self._unsettled)

    def _delete(self, ranges: list[Span], settled: int) -> int:
        """Delete the rows of ``ranges``; returns the records removed, ``settled`` records
        of split rows added to the ``records_sent`` counter with them."""
        removed = 0
        # Losing an acknowledgement in a power cut only means a duplicate later, so this
        # commit need not wait for the disk.
        self.conn.execute("PRAGMA main.synchronous = NORMAL")
        try:
            with transaction(self.conn):
                for span in ranges:
                    rows = self.conn.execute(
                        "DELETE FROM outbox WHERE id BETWEEN ? AND ? AND kind = ? "
                        "RETURNING records", (span.first, span.last, span.kind)).fetchall()
                    if span.counted:
                        removed += sum(row[0] for row in rows)
                add_counter(self.conn, "records_sent", removed + settled)
        finally:
            self.conn.execute("PRAGMA main.synchronous = FULL")
        return removed

    def _count_sent(self, settled: int) -> None:
        with transaction(self.conn):
            add_counter(self.conn, "records_sent", settled)

    def check_rows(self, first_id: int, last_id: int) -> int:
        """Check the rows ``first_id..last_id`` record by record, as ThingsBoard would read
        them; a damaged one goes to the dead letters. Returns how many did."""
        self._rewrite_done()
        bad_rows: dict[str, list[int]] = {}
        bad_records: list[tuple[int, set[int], list[tuple[str, str, str]]]] = []
        for row_id, kind, body, records, sizes in self.conn.execute(
                "SELECT id, kind, CAST(body AS BLOB), records, sizes FROM outbox "
                "WHERE id BETWEEN ? AND ?", (first_id, last_id)).fetchall():
            texts = split_records(body, sizes, records if isinstance(records, int) else 1)
            if texts is None:
                bad_rows.setdefault(DAMAGED_ROW_REASON, []).append(row_id)
                continue
            if len(texts) == 1:
                reason = _damage(kind, body)
                if reason is not None:
                    bad_rows.setdefault(reason, []).append(row_id)
                continue
            drop: set[int] = set()
            letters = []
            for i, text in enumerate(texts):
                reason = _damage(kind, text)
                if reason is not None:
                    drop.add(i)
                    letters.append((KIND_NAMES[TELEMETRY], _text(text), reason))
            if drop:
                bad_records.append((row_id, drop, letters))
        for reason, ids in bad_rows.items():
            self.dead_letter_rows(ids, reason)
        if bad_records:
            with transaction(self.conn):
                for row_id, drop, letters in bad_records:
                    deadletters.add_rows(self.conn, letters,
                                         cap_bytes=self.dead_letter_cap_bytes)
                    self._rewrite_row(row_id, drop)
        bad = sum(len(ids) for ids in bad_rows.values()) + sum(
            len(drop) for _, drop, _ in bad_records)
        if bad:
            self.rewind()
        return bad

    def dead_letter_rows(self, ids: Sequence[int], reason: str) -> None:
        """Move outbox rows that can never be sent to the dead letters, with the reason."""
        deadletters.move_from_outbox(self.conn, ids, reason,
                                     cap_bytes=self.dead_letter_cap_bytes)

    def _dead_letter_piece(self, piece: Piece, reason: str) -> None:
        """A piece that can never be sent: a whole row moves to the dead letters; a record
        of a row of several is copied there and settled (the row goes once all are)."""
        if piece[5] == piece[6] and piece[0] not in self._done:
            self.dead_letter_rows([piece[0]], reason)
            return
        with transaction(self.conn):
            deadletters.add_rows(self.conn, [(KIND_NAMES[TELEMETRY], _text(piece[2]), reason)],
                                 cap_bytes=self.dead_letter_cap_bytes)
        if self._settle_records(piece)[1]:
            self._unsettled.append(Span(piece[0], piece[0], TELEMETRY, counted=False))
            self.settle()

    # -- figures --------------------------------------------------------------------------

    def depth(self) -> int:
        """Records in the outbox."""
        return pending_records(self.conn)

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
        count = int(self.conn.execute("SELECT count(*) FROM outbox").fetchone()[0])
        if count == 0:
            return 0
        per_row = max(1, used // count)
        to_drop = max(1, (used - int(quota_bytes * 0.9)) // per_row)
        with transaction(self.conn):
            oldest = self.conn.execute(
                "SELECT id, records FROM outbox WHERE kind = ? ORDER BY id LIMIT ?",
                (TELEMETRY, to_drop)).fetchall()
            if oldest:
                self.conn.execute("DELETE FROM outbox WHERE kind = ? AND id <= ?",
                                  (TELEMETRY, oldest[-1][0]))
            dropped = int(sum(records for _, records in oldest))
            add_counter(self.conn, "records_dropped", dropped)
        # Rows read ahead may be among those dropped: read them again. Rows already in
        # flight stay in flight (their acknowledgement then deletes nothing).
        if self._ahead:
            self._read_upto = self._ahead[0][0] - 1
            self._ahead.clear()
        return dropped

    def counter(self, name: str) -> int:
        return get_counter(self.conn, name)


def _never_fits(row: Piece, max_bytes: int, max_points: int | None) -> str | None:
    """Why ``row`` can never be sent within these limits (None: it can)."""
    kind, body, points = row[1], row[2], row[3]
    if points == DAMAGED_ROW:
        return DAMAGED_ROW_REASON
    size = len(body) + (2 if kind == TELEMETRY else 0)
    if size > max_bytes:
        return (f"message is {len(body)} bytes; a publish may carry at most {max_bytes} "
                "bytes (the server's maxPayloadSize)")
    if points is not None and points < 0:
        return "message is not valid JSON"
    if kind == TELEMETRY and max_points is not None and (points or 0) > max_points:
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


def stored_records(conn: sqlite3.Connection, kind: int | None = None) -> list[bytes]:
    """The text of every message in the outbox of ``conn``, a record each, in order (for
    tools and tests; the forwarder reads rows)."""
    texts: list[bytes] = []
    for row_kind, body, records, sizes in conn.execute(
            "SELECT kind, CAST(body AS BLOB), records, sizes FROM outbox ORDER BY id"):
        if kind is not None and row_kind != kind:
            continue
        parts = split_records(body, sizes, records) or [body]
        texts.extend(parts)
    return texts


def pending_records(conn: sqlite3.Connection) -> int:
    """Records in the outbox of ``conn`` (also of a file of an earlier release: a record
    a row). Reads no row's text: rows are counted, and the records beyond one a row come
    from the index of the rows of several."""
    rows = int(conn.execute("SELECT count(*) FROM outbox").fetchone()[0])
    try:
        row = conn.execute("SELECT coalesce(sum(records - 1), 0) FROM outbox "
                           "INDEXED BY outbox_packed WHERE records > 1").fetchone()
    except sqlite3.OperationalError as exc:
        if "no such" not in str(exc):  # column, or index: a file of an earlier release
            raise
        return rows
    return rows + int(row[0])


def upgrade(conn: sqlite3.Connection) -> None:
    """Give an outbox file made by an earlier release the columns added since, and the
    index of the rows of several records."""
    have = {row[1] for row in conn.execute("PRAGMA main.table_info(outbox)")}
    for name, decl in ADDED_COLUMNS:
        if name not in have:
            conn.execute(f"ALTER TABLE main.outbox ADD COLUMN {name} {decl}")
    conn.execute(PACKED_INDEX)


def pack_row(texts: Sequence[bytes]) -> tuple[bytes, int, str | None]:
    """(body, records, sizes) of a telemetry row holding ``texts``."""
    if len(texts) == 1:
        return texts[0], 1, None
    return b",".join(texts), len(texts), ",".join(str(len(text)) for text in texts)


def pack_rows(joined: bytes, sizes: str, max_bytes: int
              ) -> list[tuple[bytes, int, str | None]]:
    """Cut records joined by commas (``sizes``: the byte length of each, comma-separated)
    into rows (body, records, sizes) whose body and sizes together take at most
    ``max_bytes`` (a record larger than that is a row alone).

    The work per record is done by C loops (``map``, ``accumulate``); Python runs once a
    row."""
    texts = sizes.split(",")
    lengths = list(map(int, texts))
    # What a record takes in a row: its text and a comma, its size and a comma.
    costs = map(operator.add, map(operator.add, lengths, map(len, texts)), itertools.repeat(2))
    taken = list(itertools.accumulate(costs, initial=0))
    # Where each record's text ends in ``joined`` (a comma follows all but the last).
    ends = list(itertools.accumulate(map(operator.add, lengths, itertools.repeat(1)),
                                     initial=0))
    rows: list[tuple[bytes, int, str | None]] = []
    first, count = 0, len(lengths)
    while first < count:
        last = bisect.bisect_right(taken, taken[first] + max_bytes, first + 2) - 1
        last = max(last, first + 1)
        body = joined[ends[first]:ends[last] - 1]
        rows.append((body, 1, None) if last - first == 1
                    else (body, last - first, ",".join(texts[first:last])))
        first = last
    return rows


def split_records(body: bytes, sizes: str | None, records: int) -> list[bytes] | None:
    """The records of a row (its body, its sizes column, its records column); None when
    the sizes do not match the text (a damaged row)."""
    if records <= 1:
        return [body]
    try:
        lengths = [int(size) for size in (sizes or "").split(",")]
    except ValueError:
        return None
    if (len(lengths) != records or min(lengths) < 0
            or sum(lengths) + records - 1 != len(body)):
        return None
    texts = []
    pos = 0
    for length in lengths:
        if pos and body[pos - 1] != 0x2C:  # the comma between two records
            return None
        texts.append(body[pos:pos + length])
        pos += length + 1
    return texts


def _points_of(text: bytes) -> int:
    """Data points of one telemetry record (keys of ``values``); -1 when it is not one."""
    try:
        value = json.loads(text)
    except ValueError:
        return -1
    values = value.get("values") if isinstance(value, dict) else None
    return len(values) if isinstance(values, dict) else -1


def _text(body: bytes) -> str:
    return body.decode("utf-8", "replace")
