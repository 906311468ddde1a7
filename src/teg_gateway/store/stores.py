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
from teg_gateway.store import db, deadletters
from teg_gateway.store import outbox as outbox_mod
from teg_gateway.store.archive import Archive
from teg_gateway.store.db import add_counter, transaction
from teg_gateway.store.outbox import Outbox

log = logging.getLogger(__name__)

OUTBOX_FILE = "outbox.db"
# An outbox row read from a damaged file: (id, kind, body, created_ms, records, sizes).
SalvagedRow = tuple[int, int, str, int, int, str | None]
ARCHIVE_FILE = "archive.db"


class Stores:
    """Opens, attaches, and recovers the databases. ``problems`` lists what was reported."""

    def __init__(self, data_dir: Path, max_payload_bytes: int) -> None:
        self.outbox_path = data_dir / OUTBOX_FILE
        self.archive_path = data_dir / ARCHIVE_FILE
        self.max_payload_bytes = max_payload_bytes
        self.problems: list[str] = []
        self._conn: sqlite3.Connection | None = None
        self._file_ids: dict[Path, tuple[int, int] | None] = {}
        self.dead_letter_cap_bytes = deadletters.DEFAULT_CAP_BYTES
        self.outbox: Outbox
        self.archive: Archive

    @property
    def conn(self) -> sqlite3.Connection:
        assert self._conn is not None, "stores are closed"
        return self._conn

    def open(self, quick_check: bool = True, min_outbox_id: int = 0) -> None:
        salvaged: list[SalvagedRow] = []
        if quick_check and self.outbox_path.exists():
            salvaged = self._salvage_if_damaged()
        if not self.archive_path.exists():
            _create_incremental(self.archive_path)
        archive_conn, moved = db.open_checked(self.archive_path, archive_mod.SCHEMA,
                                              quick_check=quick_check)
        archive_conn.close()
        self._note_moved(self.archive_path, moved)
        if moved is not None:
            _create_incremental(self.archive_path)
        conn, moved = db.open_checked(self.outbox_path, outbox_mod.SCHEMA,
                                      quick_check=quick_check)
        self._note_moved(self.outbox_path, moved)
        try:
            outbox_mod.upgrade(conn)
            conn.execute("ATTACH DATABASE ? AS archive", (str(self.archive_path),))
            conn.execute("PRAGMA archive.synchronous = FULL")
            self._file_ids = {path: db.file_id(path)
                              for path in (self.outbox_path, self.archive_path)}
            if salvaged:
                min_outbox_id = max(min_outbox_id, salvaged[-1][0])
            if min_outbox_id:
                _continue_ids(conn, min_outbox_id)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        # A record is accepted if it fits a publish alone: "[" + record + "]".
        self.outbox = Outbox(conn, self.max_payload_bytes - 2)
        self.outbox.dead_letter_cap_bytes = self.dead_letter_cap_bytes
        self.archive = Archive(conn)
        if salvaged:
            # Each record keeps its id: an acknowledgement of a publish made before the
            # damage was found then deletes that record, never another one.
            with transaction(conn):
                conn.executemany("INSERT OR IGNORE INTO outbox "
                                 "(id, kind, body, created_ms, records, sizes) "
                                 "VALUES (?, ?, ?, ?, ?, ?)", salvaged)
                add_counter(conn, "records_salvaged", sum(row[4] for row in salvaged))
            self._report(f"salvaged {sum(row[4] for row in salvaged)} records from the "
                         "damaged outbox")

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("PRAGMA main.wal_checkpoint(TRUNCATE)")
            self._conn.close()
            self._conn = None

    def replaced(self) -> list[Path]:
        """Files of ours deleted or replaced since they were opened (a cheap stat each)."""
        return [path for path, known in self._file_ids.items() if db.file_id(path) != known]

    def reopen_replaced(self) -> bool:
        """When outbox.db or archive.db was deleted or replaced while open: report it, start
        new files, and go on. Outbox ids continue above the old ones, so that an
        acknowledgement of a publish from the old file never deletes a new record."""
        gone = self.replaced()
        if not gone or self._conn is None:
            return False
        last_id = self._last_outbox_id()
        for path in gone:
            self._report(f"{path.name} was deleted or replaced while the gateway was running; "
                         "the records it held are lost; a new one was started")
        self.close()
        self.open(quick_check=False, min_outbox_id=last_id)
        return True

    def recover(self, error: BaseException) -> None:
        """After a corruption error at run time: move damaged files aside and reopen."""
        self._report(f"database error at run time: {error}; checking the files")
        last_id = self._last_outbox_id()
        self.close()
        self.open(quick_check=True, min_outbox_id=last_id)

    def _last_outbox_id(self) -> int:
        if self._conn is None:
            return 0
        try:
            row = self._conn.execute(
                "SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
        except sqlite3.Error:
            return 0
        return int(row[0]) if row and isinstance(row[0], int) else 0

    def _salvage_if_damaged(self) -> list[SalvagedRow]:
        """Read what can still be read from a damaged outbox before it is moved aside."""
        try:
            return self._salvage()
        except Exception as exc:  # whatever the damage, the gateway starts
            self._report(f"salvage of the damaged outbox failed ({exc!r}); its records are "
                         "kept in the file moved aside")
            return []

    def _salvage(self) -> list[SalvagedRow]:
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

    def take_problems(self) -> list[str]:
        problems, self.problems = self.problems, []
        return problems

    def _report(self, text: str) -> None:
        log.error("%s", text)
        self.problems.append(text)


def _create_incremental(path: Path) -> None:
    """Create an empty database whose file shrinks when rows are deleted (the archive gives
    space back to the disk); this must be chosen before the file has its first page."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        conn.executescript(archive_mod.SCHEMA)
        conn.execute("PRAGMA journal_mode = WAL")
    finally:
        conn.close()


def _continue_ids(conn: sqlite3.Connection, last_id: int) -> None:
    """New outbox ids start above ``last_id``."""
    with transaction(conn):
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
        if row is None:
            conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('outbox', ?)",
                         (last_id,))
        elif int(row[0] or 0) < last_id:
            conn.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'outbox'",
                         (last_id,))


SALVAGE_CHUNK = 256
_SALVAGE_SELECT = ("SELECT id, kind, body, created_ms, {columns} FROM outbox WHERE id >= ? "
                   "ORDER BY id LIMIT ?")


def _readable_rows(conn: sqlite3.Connection) -> list[SalvagedRow]:
    """Every outbox row that can still be read, in id order, skipping damaged pages.

    A scan stops at the first damaged page, so the rows after it are found by seeking past
    it: a seek into the damaged id range fails, one beyond it succeeds.
    """
    rows: list[SalvagedRow] = []

    # A file of an earlier release has no records and sizes columns (one record a row).
    try:
        have = {row[1] for row in conn.execute("PRAGMA table_info(outbox)")}
    except sqlite3.DatabaseError:
        have = set()
    select = _SALVAGE_SELECT.format(
        columns="records, sizes" if {"records", "sizes"} <= have else "1, NULL")

    def read(start: int, limit: int) -> list[Any] | None:
        try:
            return conn.execute(select, (start, limit)).fetchall()
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
                rows.extend(_usable(chunk))
                start = _first_readable_after(read, start, top)
                continue
        if not chunk:
            break
        rows.extend(_usable(chunk))
        start = int(chunk[-1][0]) + 1
    return rows


def _usable(chunk: list[Any]) -> list[SalvagedRow]:
    """The rows of ``chunk`` whose fields have the types of the schema; a damaged row (a
    NULL or a number where text belongs, an unknown kind) is skipped and logged."""
    good = []
    for row_id, kind, body, created, records, sizes in chunk:
        if (isinstance(row_id, int) and kind in outbox_mod.TOPICS and isinstance(body, str)
                and isinstance(created, int) and isinstance(records, int) and records >= 1
                and (sizes is None or isinstance(sizes, str))):
            good.append((row_id, kind, body, created, records, sizes))
        else:
            log.error("salvage: outbox row %r is damaged (kind %r, body of type %s); skipped",
                      row_id, kind, type(body).__name__)
    return good


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
