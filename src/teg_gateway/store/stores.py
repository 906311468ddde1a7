"""The gateway's own databases on one connection: the outbox (main) and the archive.

The controller's queue database is attached to the same connection by the intake, so a
batch moves from the queue to the outbox and the archive in one transaction.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from teg_gateway.store import archive as archive_mod
from teg_gateway.store import db
from teg_gateway.store import outbox as outbox_mod
from teg_gateway.store.archive import Archive
from teg_gateway.store.outbox import Outbox, add_counter, transaction

log = logging.getLogger(__name__)

OUTBOX_FILE = "outbox.db"
ARCHIVE_FILE = "archive.db"


class Stores:
    """Opens, attaches, and recovers the databases. ``problems`` lists what was reported."""

    def __init__(self, data_dir: Path, max_payload_bytes: int) -> None:
        self.outbox_path = data_dir / OUTBOX_FILE
        self.archive_path = data_dir / ARCHIVE_FILE
        self.max_payload_bytes = max_payload_bytes
        self.problems: list[str] = []
        self._conn: sqlite3.Connection | None = None
        self.outbox: Outbox
        self.archive: Archive

    @property
    def conn(self) -> sqlite3.Connection:
        assert self._conn is not None, "stores are closed"
        return self._conn

    def open(self, quick_check: bool = True) -> None:
        salvaged: list[tuple[int, int, str, int]] = []
        if quick_check and self.outbox_path.exists():
            salvaged = self._salvage_if_damaged()
        archive_conn, moved = db.open_checked(self.archive_path, archive_mod.SCHEMA,
                                              quick_check=quick_check)
        archive_conn.close()
        self._note_moved(self.archive_path, moved)
        conn, moved = db.open_checked(self.outbox_path, outbox_mod.SCHEMA,
                                      quick_check=quick_check)
        self._note_moved(self.outbox_path, moved)
        conn.execute("ATTACH DATABASE ? AS archive", (str(self.archive_path),))
        conn.execute("PRAGMA archive.synchronous = FULL")
        self._conn = conn
        # A record is accepted if it fits a publish alone: "[" + record + "]".
        self.outbox = Outbox(conn, self.max_payload_bytes - 2)
        self.archive = Archive(conn)
        if salvaged:
            # Each record keeps its id: an acknowledgement of a publish made before the
            # damage was found then deletes that record, never another one.
            with transaction(conn):
                conn.executemany("INSERT OR IGNORE INTO outbox (id, kind, body, created_ms) "
                                 "VALUES (?, ?, ?, ?)", salvaged)
                add_counter(conn, "records_salvaged", len(salvaged))
            self._report(f"salvaged {len(salvaged)} records from the damaged outbox")

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("PRAGMA main.wal_checkpoint(TRUNCATE)")
            self._conn.close()
            self._conn = None

    def recover(self, error: BaseException) -> None:
        """After a corruption error at run time: move damaged files aside and reopen."""
        self._report(f"database error at run time: {error}; checking the files")
        self.close()
        self.open(quick_check=True)

    def _salvage_if_damaged(self) -> list[tuple[int, int, str, int]]:
        """Read what can still be read from a damaged outbox before it is moved aside."""
        try:
            conn = db.connect(self.outbox_path)
        except sqlite3.DatabaseError:
            return []
        try:
            db.check_readable(conn)
            return []
        except sqlite3.DatabaseError:
            pass
        try:
            return _readable_rows(conn)
        finally:
            conn.close()

    def _note_moved(self, path: Path, moved: Path | None) -> None:
        if moved is not None:
            self._report(f"{path.name} was damaged; moved aside to {moved.name} and a new one "
                         "was started")

    def _report(self, text: str) -> None:
        log.error("%s", text)
        self.problems.append(text)


SALVAGE_CHUNK = 256
_SALVAGE_SELECT = ("SELECT id, kind, body, created_ms FROM outbox WHERE id >= ? "
                   "ORDER BY id LIMIT ?")


def _readable_rows(conn: sqlite3.Connection) -> list[tuple[int, int, str, int]]:
    """Every outbox row that can still be read, in id order, skipping damaged pages.

    A scan stops at the first damaged page, so the rows after it are found by seeking past
    it: a seek into the damaged id range fails, one beyond it succeeds.
    """
    rows: list[tuple[int, int, str, int]] = []

    def read(start: int, limit: int) -> list[Any] | None:
        try:
            return conn.execute(_SALVAGE_SELECT, (start, limit)).fetchall()
        except sqlite3.DatabaseError:
            return None

    top = _highest_id(conn)
    start = 1
    while start <= top:
        chunk = read(start, SALVAGE_CHUNK)
        if chunk is None:
            # Row by row up to the damage (LIMIT 1 never steps onto the following page).
            chunk = []
            while (one := read(start, 1)) is not None and one:
                chunk.extend(one)
                start = int(one[0][0]) + 1
            if one is None:
                for row in chunk:
                    rows.append((int(row[0]), int(row[1]), str(row[2]), int(row[3])))
                start = _first_readable_after(read, start, top)
                continue
        if not chunk:
            break
        for row in chunk:
            rows.append((int(row[0]), int(row[1]), str(row[2]), int(row[3])))
        start = int(chunk[-1][0]) + 1
    return rows


def _first_readable_after(read: Callable[[int, int], list[Any] | None], bad: int,
                          top: int) -> int:
    """The smallest id from which a seek works again (``top + 1`` when none does)."""
    step = 1
    good = top + 1
    while bad + step <= top:
        if read(bad + step, 1) is not None:
            good = bad + step
            break
        bad += step
        step *= 2
    while good - bad > 1:
        middle = (bad + good) // 2
        if read(middle, 1) is not None:
            good = middle
        else:
            bad = middle
    return good


def _highest_id(conn: sqlite3.Connection) -> int:
    for sql in ("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'",
                "SELECT max(id) FROM outbox"):
        try:
            row = conn.execute(sql).fetchone()
        except sqlite3.DatabaseError:
            continue
        if row is not None and row[0] is not None:
            return int(row[0])
    return 2**62
