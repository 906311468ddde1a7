"""The controller's queue database (``communication_queue.db``): its schema, and the SQL
that validates its rows.

Rows are validated entirely in SQL with SQLite's JSON functions; the intake
(``controller/intake.py``) moves them to the outbox and the archive, malformed ones to the
dead letters.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from teg_gateway.store import db

QUEUE_FILE = "communication_queue.db"

QUEUE_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT, type TEXT, message TEXT);
CREATE TABLE IF NOT EXISTS health_check (
    id INTEGER PRIMARY KEY, timestamp_ms INTEGER);
"""

# Why a row is refused (NULL when it is good). CASE stops at the first true branch, so
# the JSON functions only ever see valid JSON text. A ``ts`` beyond 64 bits would come out
# as a floating point number, not as written: it is refused (TS_RANGE, after the batch is
# filled, where ``ts`` is already extracted). Text is forwarded as the controller wrote it,
# byte for byte, even when it is not valid UTF-8 (ThingsBoard replaces such bytes).
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

# A good row, tested in as few JSON calls as possible (SQLite keeps the parse of the text
# for the calls after the first): only a row failing this is asked REASON_SQL's questions
# one by one. A path with a key only ever matches in an object, so the message is one.
GOOD_SQL = ("typeof(message) = 'text' AND json_valid(message) "
            "AND json_type(message, '$.ts') = 'integer' "
            "AND json_type(message, '$.values') = 'object'")

# The body of a good row: the controller's text as it is (whitespace included) when it is
# exactly ThingsBoard's {"ts","values"} object (no other key, neither key twice), else
# rebuilt from its ts and values (the first of each, as json_extract reads them; an object
# json_extract returns goes into json_object as JSON, not as a string).
BODY_SQL = """CASE WHEN json_remove(message, '$.ts', '$.values') = '{}' THEN message
    ELSE json_object('ts', json_extract(message, '$.ts'),
                     'values', json_extract(message, '$.values')) END"""

BATCH_TABLE = """
CREATE TEMP TABLE IF NOT EXISTS intake_batch (
    id INTEGER PRIMARY KEY, type TEXT, message TEXT, reason TEXT, ts INTEGER, body TEXT)
"""

# Parameters: after id, up to id, limit.
FILL_BATCH = f"""
INSERT INTO temp.intake_batch (id, type, message, reason, ts, body)
SELECT id, type, message, reason,
       CASE WHEN reason IS NULL THEN json_extract(message, '$.ts') END,
       CASE WHEN reason IS NULL THEN {BODY_SQL} END
FROM (SELECT id, type, message, CASE WHEN {GOOD_SQL} THEN NULL ELSE {REASON_SQL} END AS reason
      FROM queue.messages WHERE id > ? AND id <= ? ORDER BY id LIMIT ?)
"""

TS_RANGE = """
UPDATE temp.intake_batch
SET reason = 'ts is beyond the 64-bit integer range', ts = NULL, body = NULL
WHERE reason IS NULL AND typeof(ts) <> 'integer'
"""

TOO_LARGE = """
UPDATE temp.intake_batch
SET reason = 'record is ' || length(CAST(body AS BLOB)) || ' bytes, too large for a publish of '
             || ?1 || ' bytes (outbox.max_payload_bytes)', ts = NULL, body = NULL
WHERE reason IS NULL AND length(body) * 4 > ?2 AND length(CAST(body AS BLOB)) > ?2
"""


ATTACHED_MARK = "queue"


def open_queue(path: Path) -> sqlite3.Connection:
    """Open the controller's queue database, creating its tables if missing."""
    conn = db.connect(path, synchronous="NORMAL")
    try:
        conn.executescript(QUEUE_SCHEMA)
    except BaseException:
        conn.close()
        raise
    return conn


def queue_damaged(path: Path) -> bool:
    """Whether the controller's queue database file itself is damaged.

    Tells a damaged queue from damaged gateway databases after a corruption error in
    the intake: only the latter are the gateway's to move aside and reopen."""
    try:
        conn = db.connect(path, synchronous="NORMAL")
    except sqlite3.DatabaseError as exc:
        return db.is_corruption(exc)
    try:
        db.check_readable(conn)
    except sqlite3.DatabaseError as exc:
        return db.is_corruption(exc)
    finally:
        conn.close()
    return False


def last_health_check_ms(conn: sqlite3.Connection, schema: str = "main") -> int:
    """The controller's last health check (ms since the epoch), 0 when none."""
    row = conn.execute(f"SELECT max(timestamp_ms) FROM {schema}.health_check").fetchone()
    return int(row[0]) if row and isinstance(row[0], int) else 0

