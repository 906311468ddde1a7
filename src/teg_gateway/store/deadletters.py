"""Dead letters: records that can never be sent, kept for an operator within a cap of their own.

They live in the outbox database (table ``dead_letter``) but do not count against the
outbox quota, and the oldest are removed above ``outbox.dead_letters_mb`` (counted in the
``dead_letters_removed`` counter). Every writer of dead letters goes through :func:`add`,
which bounds each row (message and reason) and enforces the cap.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import Any

from teg_gateway.clock import now_ms
from teg_gateway.store.db import add_counter, transaction, used_bytes

# Default cap of the dead letters (outbox.dead_letters_mb).
DEAD_LETTER_CAP_BYTES = 8 * 1024 * 1024
DEFAULT_CAP_BYTES = DEAD_LETTER_CAP_BYTES
# A dead letter keeps at most this much of the message (characters of text, bytes of a blob).
MAX_MESSAGE = 65536
MAX_REASON = 300

_INSERT = f"""
INSERT INTO main.dead_letter (queue_id, type, message, reason, at_ms)
SELECT queue_id, type,
       CASE WHEN length(message) > {MAX_MESSAGE} THEN substr(message, 1, {MAX_MESSAGE})
            ELSE message END,
       substr(coalesce(reason, 'unknown reason')
              || CASE WHEN length(message) > {MAX_MESSAGE}
                      THEN ' (message cut from ' || length(CAST(message AS BLOB)) || ' bytes)'
                      ELSE '' END, 1, {MAX_REASON}),
       ?
FROM ({{select}})
"""


def add(conn: sqlite3.Connection, select_sql: str, params: tuple[Any, ...] = (), *,
        cap_bytes: int = DEFAULT_CAP_BYTES) -> int:
    """Store the rows of ``select_sql`` as dead letters; the number stored.

    ``select_sql`` yields the columns ``queue_id, type, message, reason`` (in that order and
    with those names). Run it inside the caller's write transaction on the outbox database:
    the rows, the ``dead_letters`` counter and the cap are then one commit.
    """
    before = conn.total_changes
    conn.execute(_INSERT.format(select=select_sql), (now_ms(), *params))
    added = conn.total_changes - before
    add_counter(conn, "dead_letters", added)
    if added:
        enforce_cap(conn, cap_bytes)
    return added


def add_rows(conn: sqlite3.Connection, letters: Sequence[tuple[str, str, str]], *,
              cap_bytes: int = DEFAULT_CAP_BYTES) -> int:
    """Store (type, message, reason) dead letters from the gateway's own paths (messages
    refused before they entered the outbox), inside the caller's transaction."""
    if not letters:
        return 0
    return add(conn, "SELECT NULL AS queue_id, json_extract(value, '$[0]') AS type, "
                     "json_extract(value, '$[1]') AS message, "
                     "json_extract(value, '$[2]') AS reason FROM json_each(?)",
               (json.dumps([list(letter) for letter in letters]),), cap_bytes=cap_bytes)


def move_from_outbox(conn: sqlite3.Connection, ids: Sequence[int], reason: str, *,
                     cap_bytes: int = DEFAULT_CAP_BYTES) -> int:
    """Move outbox rows that can never be sent into the dead letters, in one transaction;
    the number moved (ids no longer in the outbox are skipped)."""
    if not ids:
        return 0
    id_list = json.dumps([int(i) for i in ids])
    with transaction(conn):
        moved = add(conn, "SELECT NULL AS queue_id, CASE kind WHEN 1 THEN 'attributes' "
                          "ELSE 'telemetry' END AS type, body AS message, ? AS reason "
                          "FROM main.outbox WHERE id IN (SELECT value FROM json_each(?)) "
                          "ORDER BY id", (reason, id_list), cap_bytes=cap_bytes)
        conn.execute("DELETE FROM main.outbox WHERE id IN (SELECT value FROM json_each(?))",
                     (id_list,))
    return moved


def enforce_cap(conn: sqlite3.Connection, cap_bytes: int) -> int:
    """Remove the oldest dead letters while they take more than ``cap_bytes`` (down to 90 %
    of it); the number removed, added to the ``dead_letters_removed`` counter."""
    removed = 0
    for _ in range(8):
        size = dead_letter_bytes(conn)
        if size <= cap_bytes:
            break
        count = int(conn.execute("SELECT count(*) FROM main.dead_letter").fetchone()[0])
        if not count:
            break
        per_row = max(1, size // count)
        to_remove = max(1, -(-(size - int(cap_bytes * 0.9)) // per_row))
        before = conn.total_changes
        conn.execute("DELETE FROM main.dead_letter WHERE id IN "
                     "(SELECT id FROM main.dead_letter ORDER BY id LIMIT ?)", (to_remove,))
        removed += conn.total_changes - before
    add_counter(conn, "dead_letters_removed", removed)
    return removed


def outbox_bytes(conn: sqlite3.Connection) -> int:
    """Bytes of the outbox database in use, the dead letters not counted."""
    used = used_bytes(conn, "main")
    return max(0, used - dead_letter_bytes(conn)) if used else 0


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
