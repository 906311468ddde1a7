"""Outbox rows of several records: packed at intake, sent whole, split only when the
server's limits are smaller, and nothing lost or counted twice on the way.

Real SQLite files (the ``stores`` fixture), the intake's own steps; nothing is mocked.
Every scenario that could lose a record checks them one by one.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from conftest import outbox_seqs
from teg_gateway.controller.intake import ROW_BYTES, IntakeConfig, IntakeCore
from teg_gateway.sandbox.controller import QueueWriter, make_records
from teg_gateway.store.outbox import (
    DAMAGED_ROW_REASON,
    Batch,
    Outbox,
    pack_rows,
    split_records,
    stored_records,
)
from teg_gateway.store.stores import Stores

MAX_PAYLOAD = 49152


def take_all(stores: Stores, writer: QueueWriter, records: list[tuple[str, str]]) -> None:
    """Write ``records`` to the controller's queue and run the intake until it is empty."""
    writer.write(records)
    core = IntakeCore(IntakeConfig(writer.path, stores.outbox_path, stores.archive_path,
                                   5000, MAX_PAYLOAD))
    core.open()
    try:
        while core.step().taken:
            pass
    finally:
        core.close()


def seqs_of(batch: Batch) -> list[int]:
    return [record["values"]["seq"] for record in json.loads(batch.payload)]


def drain(outbox: Outbox, **limits: Any) -> list[Batch]:
    batches = []
    while (batch := outbox.next_batch(**limits)) is not None:
        batches.append(batch)
    return batches


def row_shapes(stores: Stores) -> list[tuple[int, int]]:
    return [(int(r[0]), int(r[1])) for r in stores.conn.execute(
        "SELECT records, length(CAST(body AS BLOB)) + coalesce(length(sizes), 0) "
        "FROM outbox ORDER BY id")]


# -- packing ------------------------------------------------------------------------------


@pytest.mark.parametrize("texts", [
    [b'{"a":1}'],
    [b'{"a":1}', b'{"b":"\xc3\xa9t\xc3\xa9"}', b"{}"],
    [b"x" * 50] * 200,
    [b"y" * 5000, b"z" * 10, b"w" * 3000],
])
def test_records_packed_into_rows_come_back_as_written(texts: list[bytes]) -> None:
    rows = pack_rows(b",".join(texts), ",".join(str(len(t)) for t in texts), 1000)
    back = [part for body, records, sizes in rows
            for part in (split_records(body, sizes, records) or [])]
    assert back == texts
    for body, records, sizes in rows:
        # A row is within the limit, or a single record larger than it.
        assert records == 1 or len(body) + len(sizes or "") <= 1000
        assert (sizes is None) == (records == 1)


def test_sizes_that_do_not_match_the_text_are_a_damaged_row() -> None:
    assert split_records(b'{"a":1},{"b":2}', "7,7", 2) == [b'{"a":1}', b'{"b":2}']
    assert split_records(b'{"a":1},{"b":2}', "7,6", 2) is None
    assert split_records(b'{"a":1},{"b":2}', "7", 2) is None
    assert split_records(b'{"a":1},{"b":2}', "x,7", 2) is None
    assert split_records(b'{"a":1};{"b":2}', "7,7", 2) is None
    assert split_records(b'{"a":1},{"b":2}', None, 2) is None


# -- intake -------------------------------------------------------------------------------


def test_intake_packs_a_batch_into_rows_within_one_page(stores: Stores,
                                                        writer: QueueWriter) -> None:
    # Records of different sizes, some with characters of several bytes.
    records = [("telemetry", json.dumps({"ts": i, "values": {
        "seq": i, "note": "é" * (i % 40), "pad": "x" * (i % 300)}}, ensure_ascii=False))
        for i in range(3000)]
    take_all(stores, writer, records)

    assert outbox_seqs(stores.conn) == list(range(3000))
    assert stores.outbox.depth() == 3000
    assert stores.outbox.counter("records_accepted") == 3000
    shapes = row_shapes(stores)
    assert len(shapes) < 3000 // 10
    assert all(size <= ROW_BYTES for _records, size in shapes)
    # No overflow page: a page damaged on disk holds only the records on it.
    overflow = stores.conn.execute("SELECT count(*) FROM dbstat('main') "
                                   "WHERE name = 'outbox' AND pagetype = 'overflow'").fetchone()
    assert overflow == (0,)


def test_rows_go_whole_into_publishes_and_are_deleted_whole(stores: Stores,
                                                            writer: QueueWriter) -> None:
    take_all(stores, writer, make_records(5000))
    rows = len(row_shapes(stores))

    batches = drain(stores.outbox)

    assert all(len(batch.payload) <= MAX_PAYLOAD for batch in batches)
    assert sum(len(batch.rows) for batch in batches) == rows, "no row was split"
    assert [s for batch in batches for s in seqs_of(batch)] == list(range(5000))
    assert stores.outbox.ack(batches) == 5000
    assert stores.outbox.depth() == 0
    assert stores.outbox.counter("records_sent") == 5000


# -- a server with smaller limits ---------------------------------------------------------


def test_a_row_larger_than_the_servers_payload_is_sent_record_by_record(
        stores: Stores, writer: QueueWriter) -> None:
    take_all(stores, writer, make_records(400))
    outbox = stores.outbox
    batches = drain(outbox, max_bytes=1000)
    assert all(len(batch.payload) <= 1000 for batch in batches)
    assert [s for batch in batches for s in seqs_of(batch)] == list(range(400))

    # Acknowledged out of order, one at a time: a row goes only once all its records did.
    sent = 0
    for batch in reversed(batches):
        sent += outbox.ack([batch])
        assert outbox.depth() >= 400 - sent  # rows still hold the rest
        assert outbox.ack([batch]) == 0, "a repeated acknowledgement counts nothing"
    assert sent == 400
    assert outbox.depth() == 0
    assert outbox.counter("records_sent") == 400


def test_the_records_of_a_split_row_acknowledged_before_a_disconnect_are_not_sent_again(
        stores: Stores, writer: QueueWriter) -> None:
    take_all(stores, writer, make_records(300))
    outbox = stores.outbox
    batches = drain(outbox, max_bytes=1500)
    acked = batches[1::2]  # every other publish acknowledged, then the connection ends
    outbox.ack(acked)
    outbox.rewind()  # rewrites the rows without what was acknowledged

    done = {s for batch in acked for s in seqs_of(batch)}
    assert outbox_seqs(stores.conn) == [s for s in range(300) if s not in done]
    again = drain(outbox)
    assert [s for batch in again for s in seqs_of(batch)] == [
        s for s in range(300) if s not in done]
    outbox.ack(again)
    assert outbox.depth() == 0
    assert outbox.counter("records_sent") == 300


def test_rows_are_split_by_data_points_and_each_publish_keeps_the_limit(
        stores: Stores, writer: QueueWriter) -> None:
    records = [("telemetry", json.dumps({"ts": i, "values": {
        "seq": i, **{f"k{j}": j for j in range(i % 7)}}})) for i in range(500)]
    take_all(stores, writer, records)
    outbox = stores.outbox
    outbox.count_points = True
    batches = drain(outbox, max_points=20)

    assert all(batch.points <= 20 for batch in batches)
    for batch in batches:
        counted = sum(len(r["values"]) for r in json.loads(batch.payload))
        assert counted == batch.points
    assert [s for batch in batches for s in seqs_of(batch)] == list(range(500))
    assert outbox.ack(batches) == 500
    assert outbox.depth() == 0


def test_a_record_of_a_row_that_never_fits_goes_to_the_dead_letters_alone(
        stores: Stores, writer: QueueWriter) -> None:
    records = [("telemetry", json.dumps({"ts": i, "values": (
        {f"k{j}": j for j in range(50)} if i == 7 else {"seq": i})})) for i in range(20)]
    take_all(stores, writer, records)
    assert len(row_shapes(stores)) == 1
    outbox = stores.outbox
    outbox.count_points = True

    batches = drain(outbox, max_points=10)

    sent = [r["ts"] for batch in batches for r in json.loads(batch.payload)]
    assert sent == [i for i in range(20) if i != 7]
    [(message, reason)] = stores.conn.execute(
        "SELECT message, reason FROM dead_letter").fetchall()
    assert json.loads(message)["ts"] == 7
    assert "50 data points" in reason
    outbox.ack(batches)
    assert outbox.depth() == 0


def test_a_row_whose_sizes_are_damaged_is_a_dead_letter_when_it_must_be_split(
        stores: Stores, writer: QueueWriter) -> None:
    take_all(stores, writer, make_records(50))
    take_all(stores, writer, make_records(10, start_seq=50))
    first = stores.conn.execute("SELECT min(id) FROM outbox").fetchone()[0]
    stores.conn.execute("UPDATE outbox SET sizes = '1,2' WHERE id = ?", (first,))

    batches = drain(stores.outbox, max_bytes=500)

    assert [s for batch in batches for s in seqs_of(batch)] == list(range(50, 60))
    [(reason,)] = stores.conn.execute("SELECT reason FROM dead_letter").fetchall()
    assert reason == DAMAGED_ROW_REASON


def test_checking_rows_sets_aside_only_the_damaged_record(stores: Stores,
                                                          writer: QueueWriter) -> None:
    take_all(stores, writer, make_records(100))
    stores.conn.execute("""UPDATE outbox SET body = replace(body, '"seq":42,', '"seq":42:')""")

    assert stores.outbox.check_rows(1, 10**9) == 1

    assert outbox_seqs(stores.conn) == [s for s in range(100) if s != 42]
    [(message, reason)] = stores.conn.execute(
        "SELECT message, reason FROM dead_letter").fetchall()
    assert '"seq":42:' in message
    assert reason == "damaged in the outbox: not valid JSON text"


def test_the_quota_counts_records_not_rows(stores: Stores, writer: QueueWriter) -> None:
    take_all(stores, writer, make_records(20_000))
    outbox = stores.outbox
    quota = outbox.used_bytes() // 2

    dropped = outbox.enforce_quota(quota)

    assert dropped > 0
    assert outbox.counter("records_dropped") == dropped
    assert outbox_seqs(stores.conn) == list(range(dropped, 20_000))


# -- files of an earlier release ----------------------------------------------------------


def test_an_outbox_of_an_earlier_release_is_read_and_upgraded(gateway_dir: Path) -> None:
    path = gateway_dir / "outbox.db"
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, kind INTEGER NOT NULL,
                             body TEXT NOT NULL, created_ms INTEGER NOT NULL);
        CREATE TABLE dead_letter (id INTEGER PRIMARY KEY AUTOINCREMENT, queue_id INTEGER,
                                  type TEXT, message TEXT, reason TEXT NOT NULL,
                                  at_ms INTEGER NOT NULL);
        CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
    """)
    conn.executemany("INSERT INTO outbox (kind, body, created_ms) VALUES (0, ?, 1)",
                     [(json.dumps({"ts": i, "values": {"seq": i}}),) for i in range(30)])
    conn.commit()
    conn.close()

    stores = Stores(gateway_dir, MAX_PAYLOAD)
    stores.open()
    try:
        assert stores.outbox.depth() == 30
        batches = drain(stores.outbox)
        assert [s for batch in batches for s in seqs_of(batch)] == list(range(30))
        assert stores.outbox.ack(batches) == 30
        assert stores.outbox.depth() == 0
    finally:
        stores.close()


def test_waiting_records_are_counted_without_reading_the_rows(
        stores: Stores, writer: QueueWriter) -> None:
    take_all(stores, writer, make_records(1000))
    stores.outbox.put_telemetry({"seq": 1000}, 1)  # a row of one record
    take_all(stores, writer, make_records(1, start_seq=1001))
    total = len(stored_records(stores.conn))

    assert stores.outbox.depth() == total == 1002
    assert stores.outbox.unsent() == total
    batch = stores.outbox.next_batch()
    assert batch is not None
    assert stores.outbox.unsent() == total - batch.count
    # The records beyond one a row come from an index that holds them: no row is read.
    plan = " ".join(row[-1] for row in stores.conn.execute(
        "EXPLAIN QUERY PLAN SELECT coalesce(sum(records - 1), 0) FROM outbox "
        "INDEXED BY outbox_packed WHERE records > 1 AND id > 5"))
    assert "COVERING INDEX outbox_packed" in plan
