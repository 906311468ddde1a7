"""Opening SQLite files safely: WAL, sane pragmas, and corrupt files moved aside."""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from pathlib import Path

from teg_gateway.fsutil import fsync_dir

log = logging.getLogger(__name__)

CORRUPTION_CODES = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})
SIDE_FILES = ("-wal", "-shm", "-journal")
JOURNAL_SIZE_LIMIT = 4 * 1024 * 1024


def is_corruption(exc: BaseException) -> bool:
    """True when ``exc`` says the file is damaged (not when it is locked or the disk is full)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return (code & 0xFF) in CORRUPTION_CODES
    return isinstance(exc, sqlite3.DatabaseError) and not isinstance(
        exc, sqlite3.OperationalError | sqlite3.IntegrityError)


def is_disk_full(exc: BaseException) -> bool:
    return (getattr(exc, "sqlite_errorcode", 0) & 0xFF) == sqlite3.SQLITE_FULL


def file_id(path: Path) -> tuple[int, int] | None:
    """(device, inode) of a file, None when it does not exist: a replaced file shows here."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def move_aside(path: Path) -> Path:
    """Rename a damaged database (and its WAL files) to ``<name>.corrupt-<UTC time>``.

    Nothing is deleted: an operator can still try to recover the file.
    """
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    if path.exists():
        path.rename(target)
    for suffix in SIDE_FILES:
        side = path.with_name(path.name + suffix)
        if side.exists():
            side.rename(target.with_name(target.name + suffix))
    fsync_dir(path.parent)
    return target


def connect(path: Path, *, synchronous: str = "FULL") -> sqlite3.Connection:
    """Open ``path`` in WAL mode with autocommit off (explicit transactions only)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, timeout=5.0)
    try:
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        # The WAL file shrinks back after a checkpoint instead of keeping its largest size.
        conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
    except BaseException:
        conn.close()
        raise
    return conn


def check_readable(conn: sqlite3.Connection, schema: str = "main") -> None:
    """Raise if the file is not a database or its first pages are damaged."""
    conn.execute(f"SELECT count(*) FROM {schema}.sqlite_master").fetchone()
    row = conn.execute(f"PRAGMA {schema}.quick_check(1)").fetchone()
    if row is None or row[0] != "ok":
        raise sqlite3.DatabaseError(f"integrity check failed: {row[0] if row else '?'}")


def open_checked(path: Path, schema_sql: str, *, synchronous: str = "FULL",
                 quick_check: bool = False) -> tuple[sqlite3.Connection, Path | None]:
    """Open ``path``, create its schema; a damaged file is moved aside and a new one started.

    Returns the connection and where a damaged file was moved (None when it was fine).
    """
    moved: Path | None = None
    for _ in range(2):
        conn: sqlite3.Connection | None = None
        try:
            conn = connect(path, synchronous=synchronous)
            if quick_check:
                check_readable(conn)
            else:
                conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            conn.executescript(schema_sql)
            return conn, moved
        except sqlite3.DatabaseError as exc:
            if conn is not None:
                conn.close()
            if not is_corruption(exc) or moved is not None:
                raise
            moved = move_aside(path)
            log.error("database %s is damaged (%s); moved aside to %s, starting a new one",
                      path, exc, moved)
    raise AssertionError("unreachable")  # pragma: no cover


# -- small helpers shared by the stores ----------------------------------------------


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


def used_bytes(conn: sqlite3.Connection, schema: str) -> int:
    """Bytes of the database file in use (free pages not counted)."""
    page_size = conn.execute(f"PRAGMA {schema}.page_size").fetchone()[0]
    pages = conn.execute(f"PRAGMA {schema}.page_count").fetchone()[0]
    free = conn.execute(f"PRAGMA {schema}.freelist_count").fetchone()[0]
    return int((pages - free) * page_size)
