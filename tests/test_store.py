"""The gateway's stores on real SQLite files: intake, outbox, archive, recovery.

Everything runs in-process against files in ``tmp_path``; nothing is mocked.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from conftest import outbox_seqs
from teg_gateway.controller.intake import IntakeConfig, IntakeCore, IntakeResult
from teg_gateway.sandbox.controller import QueueWriter, make_records
from teg_gateway.store.archive import BUILD_MS, DAY_MS
from teg_gateway.store.outbox import (
    ATTRIBUTES,
    TELEMETRY,
    Batch,
    Outbox,
    stored_records,
    telemetry_body,
)
from teg_gateway.store.stores import Stores

MAX_PAYLOAD = 49152


# -- helpers ------------------------------------------------------------------------------


def outbox_bodies(stores: Stores, kind: int | None = TELEMETRY) -> list[Any]:
    """Decoded bodies of the outbox rows (of ``kind``; all kinds with None), in id order."""
    return [json.loads(text) for text in stored_records(stores.conn, kind)]


def archive_rows(stores: Stores) -> list[tuple[int, str | None, Any]]:
    rows = stores.conn.execute("SELECT ts, type, body FROM archive.records ORDER BY id")
    return [(int(ts), typ, json.loads(body)) for ts, typ, body in rows]


def dead_letters(stores: Stores) -> list[tuple[int, str | None, Any, str]]:
    rows = stores.conn.execute(
        "SELECT queue_id, type, message, reason FROM dead_letter ORDER BY id").fetchall()
    return [(int(r[0]), r[1], r[2], r[3]) for r in rows]


class QueueIntake:
    """The intake's steps in-process, on the files of the store connection given."""

    def __init__(self, controller_dir: Path, batch_size: int,
                 max_payload_bytes: int | None = None) -> None:
        self.queue_path = controller_dir / "communication_queue.db"
        self.batch_size = batch_size
        self.max_payload_bytes = max_payload_bytes
        self.core: IntakeCore | None = None

    def _core(self, conn: sqlite3.Connection) -> IntakeCore:
        if self.core is None:
            files = {name: Path(file) for _n, name, file in
                     conn.execute("PRAGMA database_list").fetchall()}
            self.core = IntakeCore(IntakeConfig(self.queue_path, files["main"],
                                                files["archive"], self.batch_size,
                                                self.max_payload_bytes))
            self.core.open()
        return self.core

    def move_batch(self, conn: sqlite3.Connection) -> IntakeResult:
        return self._core(conn).step()

    def has_rows(self, conn: sqlite3.Connection) -> bool:
        core = self._core(conn)
        assert core.conn is not None
        return core.conn.execute("SELECT 1 FROM queue.messages WHERE id > ? LIMIT 1",
                                 (core.mark,)).fetchone() is not None

    def last_health_check_ms(self, conn: sqlite3.Connection) -> int:
        return self._core(conn).health_check_ms()


def queue_count(controller_dir: Path) -> int:
    conn = sqlite3.connect(controller_dir / "communication_queue.db")
    try:
        return int(conn.execute("SELECT count(*) FROM messages").fetchone()[0])
    finally:
        conn.close()


def good(seq: int, ts: int | None = None) -> tuple[str, str]:
    return ("telemetry", json.dumps({"ts": 1_700_000_000_000 + seq if ts is None else ts,
                                     "values": {"seq": seq}}))


def drain(outbox: Outbox) -> list[Batch]:
    batches = []
    while (batch := outbox.next_batch()) is not None:
        batches.append(batch)
    return batches


def batch_records(batch: Batch) -> list[Any]:
    value = json.loads(batch.payload)
    return value if isinstance(value, list) else [value]


# -- intake -------------------------------------------------------------------------------


def test_intake_moves_rows_to_outbox_and_archive_and_empties_queue(
        stores: Stores, writer: QueueWriter, controller_dir: Path) -> None:
    records = make_records(300, ts_ms=1_700_000_000_000)
    writer.write(records)
    intake = QueueIntake(controller_dir, batch_size=1000)

    assert intake.has_rows(stores.conn)
    result = intake.move_batch(stores.conn)

    assert (result.taken, result.forwarded, result.archived, result.dead) == (300, 300, 300, 0)
    expected = [json.loads(message) for _type, message in records]
    assert outbox_bodies(stores) == expected
    assert [body for _ts, _type, body in archive_rows(stores)] == expected
    assert [ts for ts, _type, _body in archive_rows(stores)] == [r["ts"] for r in expected]
    assert queue_count(controller_dir) == 0
    assert not intake.has_rows(stores.conn)
    assert stores.outbox.counter("records_accepted") == 300
    # Nothing left to move: an empty batch changes nothing.
    assert intake.move_batch(stores.conn).taken == 0
    assert stores.outbox.depth() == 300


def test_intake_moves_in_batches_in_order(stores: Stores, writer: QueueWriter,
                                         controller_dir: Path) -> None:
    writer.write(make_records(250))
    intake = QueueIntake(controller_dir, batch_size=100)

    taken = [intake.move_batch(stores.conn).taken for _ in range(4)]

    assert taken == [100, 100, 50, 0]
    assert outbox_seqs(stores.conn) == list(range(250))
    assert queue_count(controller_dir) == 0


def test_an_archive_failure_holds_up_neither_the_outbox_nor_a_row_twice(
        stores: Stores, writer: QueueWriter, controller_dir: Path) -> None:
    """The archive refuses the insert: the rows still reach the outbox (once), stay in the
    queue until they are archived, and are never taken again; once the archive works, it
    catches up from the queue and the queue is emptied."""
    writer.write(make_records(50))
    writer.write([("telemetry", "not json")])
    stores.conn.execute(
        "CREATE TRIGGER archive.refuse BEFORE INSERT ON records "
        "BEGIN SELECT RAISE(ABORT, 'archive refuses'); END")
    intake = QueueIntake(controller_dir, batch_size=1000)

    result = intake.move_batch(stores.conn)
    assert (result.taken, result.forwarded, result.dead, result.archived) == (51, 50, 1, 0)
    assert queue_count(controller_dir) == 51, "kept until archived"
    assert intake.move_batch(stores.conn).taken == 0, "never taken twice"
    assert outbox_seqs(stores.conn) == list(range(50))
    assert len(dead_letters(stores)) == 1
    assert archive_rows(stores) == []

    stores.conn.execute("DROP TRIGGER archive.refuse")
    assert intake.move_batch(stores.conn).taken == 0
    assert [body["values"]["seq"] for _ts, _t, body in archive_rows(stores)] == list(range(50))
    assert outbox_seqs(stores.conn) == list(range(50))
    assert queue_count(controller_dir) == 0
    assert stores.outbox.counter("records_accepted") == 50


def test_log_types_go_to_the_outbox_but_not_the_archive(
        stores: Stores, writer: QueueWriter, controller_dir: Path) -> None:
    def row(typ: str | None, n: int) -> tuple[str | None, str]:
        return (typ, json.dumps({"ts": 1000 + n, "values": {"n": n}}))

    rows: list[Any] = [row("telemetry", 0), row("log", 1), row("controller_log", 2),
                       row("logs", 3), row(None, 4), row("event", 5)]
    writer.write(rows)
    result = QueueIntake(controller_dir, batch_size=100).move_batch(stores.conn)

    assert (result.forwarded, result.archived) == (6, 3)
    assert [b["values"]["n"] for b in outbox_bodies(stores)] == [0, 1, 2, 3, 4, 5]
    assert [(typ, body["values"]["n"]) for _ts, typ, body in archive_rows(stores)] == [
        ("telemetry", 0), (None, 4), ("event", 5)]


MALFORMED: list[tuple[str, object, str]] = [
    ("not JSON", "{not json", "message is not valid JSON"),
    ("truncated JSON", '{"ts": 1, "values": {"a": 1}', "message is not valid JSON"),
    ("empty text", "", "message is not valid JSON"),
    ("array", "[1, 2]", "message is not a JSON object"),
    ("string", '"text"', "message is not a JSON object"),
    ("number", "42", "message is not a JSON object"),
    ("ts missing", '{"values": {"a": 1}}', "ts is missing"),
    ("ts float", '{"ts": 1.5, "values": {"a": 1}}', "ts is not an integer"),
    ("ts string", '{"ts": "1700000000000", "values": {"a": 1}}', "ts is not an integer"),
    ("ts null", '{"ts": null, "values": {"a": 1}}', "ts is not an integer"),
    ("values missing", '{"ts": 1}', "values is missing"),
    ("values array", '{"ts": 1, "values": [1]}', "values is not an object"),
    ("values string", '{"ts": 1, "values": "a"}', "values is not an object"),
    ("values null", '{"ts": 1, "values": null}', "values is not an object"),
    ("NULL message", None, "message is NULL"),
    ("BLOB message", b'{"ts": 1, "values": {"a": 1}}', "message is not text but blob"),
    # The TEXT column turns an integer into text: valid JSON, but not an object.
    ("integer message", 7, "message is not a JSON object"),
]


def test_every_malformed_kind_goes_to_dead_letter_without_blocking(
        stores: Stores, writer: QueueWriter, controller_dir: Path) -> None:
    """Each malformed row sits between good ones; all good rows pass, in order, and each bad
    row is in the dead-letter table with its reason, its queue id, type and text."""
    rows: list[Any] = []
    expected_dead: list[tuple[int, str, object, str]] = []
    seq = 0
    for name, message, reason in MALFORMED:
        rows.append(good(seq))
        seq += 1
        rows.append((f"bad {name}", message))
        expected_dead.append((len(rows), f"bad {name}", message, reason))
    rows.append(good(seq))
    seq += 1
    writer.write(rows)
    # A small batch size: malformed rows also straddle batch boundaries.
    intake = QueueIntake(controller_dir, batch_size=4)

    moved = 0
    while intake.has_rows(stores.conn):
        moved += intake.move_batch(stores.conn).taken
    intake.move_batch(stores.conn)  # the idle round deletes what was moved from the queue

    assert moved == len(rows)
    assert outbox_seqs(stores.conn) == list(range(seq))
    assert [r[0] for r in archive_rows(stores)] == [1_700_000_000_000 + i for i in range(seq)]
    dead = dead_letters(stores)
    assert [(q, t, r) for q, t, _m, r in dead] == [(q, t, r) for q, t, _m, r in expected_dead]
    for (_q, _t, stored, _r), (_q2, _t2, message, _r2) in zip(dead, expected_dead, strict=True):
        original = str(message) if isinstance(message, int) else message
        assert stored == original, "the dead letter keeps the original message as it was"
    assert stores.outbox.counter("dead_letters") == len(MALFORMED)
    assert stores.outbox.counter("records_accepted") == seq
    assert queue_count(controller_dir) == 0


def test_record_too_large_for_one_publish_goes_to_dead_letter(
        stores: Stores, writer: QueueWriter, controller_dir: Path) -> None:
    """A record that cannot fit in a publish of max_payload_bytes would be refused by
    ThingsBoard (it closes the connection) and block the outbox: it is a dead letter."""
    limit = 1024
    fits = json.dumps({"ts": 5, "values": {"seq": 1, "pad": "x" * 900}})
    # The largest record that fits: its array of one is exactly `limit` bytes.
    body = json.dumps({"ts": 6, "values": {"seq": 2, "pad": ""}}, separators=(",", ":"))
    exact = json.dumps({"ts": 6, "values": {"seq": 2, "pad": "x" * (limit - 2 - len(body))}},
                       separators=(",", ":"))  # kept as written: its body is this text
    too_big = json.dumps({"ts": 7, "values": {"seq": 3, "pad": "é" * 600}})
    writer.write([good(0), ("telemetry", fits), ("telemetry", exact), ("telemetry", too_big),
                  good(4)])
    intake = QueueIntake(controller_dir, batch_size=100, max_payload_bytes=limit)

    result = intake.move_batch(stores.conn)

    assert (result.taken, result.forwarded, result.archived, result.dead) == (5, 4, 4, 1)
    assert outbox_seqs(stores.conn) == [0, 1, 2, 4]
    [(queue_id, _type, message, reason)] = dead_letters(stores)
    assert (queue_id, message) == (4, too_big)
    assert reason.startswith("record is ") and "1024 bytes" in reason
    stores.outbox.max_record_bytes = limit - 2
    assert all(len(b.payload) <= limit for b in drain(stores.outbox))


def test_malformed_rows_are_described_for_the_log(
        stores: Stores, writer: QueueWriter, controller_dir: Path) -> None:
    writer.write([good(0), ("telemetry", "oops"), good(1)])
    result = QueueIntake(controller_dir, batch_size=100).move_batch(stores.conn)
    assert result.dead == 1
    assert result.dead_detail == "row 2 (type 'telemetry'): message is not valid JSON"


def test_last_health_check(stores: Stores, writer: QueueWriter, controller_dir: Path) -> None:
    intake = QueueIntake(controller_dir, batch_size=100)
    assert intake.last_health_check_ms(stores.conn) == 0
    writer.health_check(1_700_000_000_123)
    assert intake.last_health_check_ms(stores.conn) == 1_700_000_000_123


# -- outbox -------------------------------------------------------------------------------


def test_batches_respect_max_payload_bytes_and_keep_order(gateway_dir: Path) -> None:
    limit = 1024
    stores = Stores(gateway_dir, limit)
    stores.open()
    try:
        # Sizes vary, and multi-byte characters make bytes and characters differ.
        bodies = [json.dumps({"ts": 1000 + i, "values": {"seq": i, "text": "é" * (i % 97)}},
                             separators=(",", ":"), ensure_ascii=False) for i in range(2000)]
        stores.outbox.put(TELEMETRY, bodies)

        batches = drain(stores.outbox)

        assert all(len(b.payload) <= limit for b in batches)
        assert all(b.kind == TELEMETRY and b.topic == "v1/devices/me/telemetry"
                   for b in batches)
        records = [r for b in batches for r in batch_records(b)]
        assert [r["values"]["seq"] for r in records] == list(range(2000))
        assert all(b.count == len(batch_records(b)) for b in batches)
        # Batches are full: adding the next record would have crossed the limit.
        for this, following in itertools.pairwise(batches):
            first_next = json.dumps(batch_records(following)[0], separators=(",", ":"),
                                    ensure_ascii=False).encode()
            assert len(this.payload) + 1 + len(first_next) > limit
        ids = [(b.first_id, b.last_id) for b in batches]
        assert ids[0][0] == 1
        assert ids[-1][1] == 2000
        assert all(a[1] + 1 == b[0] for a, b in itertools.pairwise(ids))
    finally:
        stores.close()


def test_oversize_message_is_a_dead_letter_and_other_kinds_go_one_per_publish(
        gateway_dir: Path) -> None:
    """Whatever path puts a message too large for one publish into the outbox (the local
    bus, logs, RPC results, health), it becomes a dead letter with the reason; it never
    reaches the forwarder, where ThingsBoard would close the connection on it."""
    limit = 1024
    stores = Stores(gateway_dir, limit)
    stores.open()
    try:
        outbox = stores.outbox
        outbox.put_telemetry({"seq": 0}, 1)
        outbox.put_telemetry({"seq": 1, "big": "x" * 3000}, 2)
        outbox.put_telemetry({"seq": 2}, 3)
        outbox.put_attributes({"attr": 1})
        outbox.put_attributes({"attr": "é" * 600})
        outbox.put_attributes({"attr": 2})
        outbox.put_telemetry({"seq": 3}, 4)

        batches = drain(outbox)

        # Client attributes go ahead of the telemetry, one per publish.
        assert [(b.kind, b.count) for b in batches] == [
            (ATTRIBUTES, 1), (ATTRIBUTES, 1), (TELEMETRY, 3)]
        assert [r["values"]["seq"] for r in batch_records(batches[2])] == [0, 2, 3]
        assert json.loads(batches[0].payload) == {"attr": 1}
        assert batches[0].topic == "v1/devices/me/attributes"
        letters = stores.conn.execute(
            "SELECT type, message, reason FROM dead_letter ORDER BY id").fetchall()
        assert [(t, json.loads(m)) for t, m, _ in letters] == [
            ("telemetry", {"ts": 2, "values": {"seq": 1, "big": "x" * 3000}}),
            ("attributes", {"attr": "é" * 600})]
        assert all("larger than the 1022 bytes one publish may carry" in r
                   for _, _, r in letters)
        assert outbox.counter("dead_letters") == 2
    finally:
        stores.close()


def test_batches_fit_the_server_limits_and_what_never_fits_is_a_dead_letter(
        stores: Stores) -> None:
    """Limits the server announces later (smaller payloads, data points per publish) size
    the batches; a stored record that can never fit them goes to the dead letters and the
    records behind it still go."""
    outbox = stores.outbox
    outbox.count_points = True
    outbox.put_telemetry({"a": 1, "b": 2}, 1)
    outbox.put_telemetry({"a": 1, "b": 2, "c": 3, "d": 4, "e": 5}, 2)
    outbox.put_telemetry({"big": "x" * 400}, 3)
    outbox.put_attributes({"attr": "y" * 400})
    outbox.put(TELEMETRY, [telemetry_body({"a": i, "b": i}, 10 + i) for i in range(30)])

    batches = []
    while (batch := outbox.next_batch(max_bytes=300, max_points=4)) is not None:
        batches.append(batch)

    assert all(len(b.payload) <= 300 and b.points <= 4 for b in batches)
    assert [b.points for b in batches] == [2] + [4] * 15
    sent = [r["ts"] for b in batches for r in batch_records(b)]
    assert sent == [1] + [10 + i for i in range(30)]
    reasons = [r for (r,) in stores.conn.execute("SELECT reason FROM dead_letter ORDER BY id")]
    assert len(reasons) == 3
    # The attribute first (attributes go ahead), then the telemetry in order.
    assert all("at most 300 bytes" in reasons[i] for i in (0, 2))
    assert "5 data points" in reasons[1] and "at most 4" in reasons[1]
    assert outbox.depth() == 31


def test_damaged_bodies_are_found_row_by_row(stores: Stores) -> None:
    outbox = stores.outbox
    outbox.put(TELEMETRY, [telemetry_body({"seq": i}, i) for i in range(6)])
    outbox.put_attributes({"attr": 1})
    damaged = {2: b'{"ts":2,"values":{"seq"', 3: b'{"ts":3,"values":{"seq":\xff}}',
               4: b'{"ts":"4","values":{}}', 7: b'[1]'}
    for row_id, body in damaged.items():
        stores.conn.execute("UPDATE outbox SET body = CAST(? AS TEXT) WHERE id = ?",
                            (body, row_id))
    assert outbox.check_rows(1, 7) == 4
    assert [r[0] for r in stores.conn.execute("SELECT id FROM outbox ORDER BY id")] == [1, 5, 6]
    reasons = sorted(r for (r,) in stores.conn.execute("SELECT reason FROM dead_letter"))
    assert reasons == ["damaged in the outbox: not a JSON object",
                       "damaged in the outbox: not a {ts, values} record",
                       "damaged in the outbox: not valid JSON text",
                       "damaged in the outbox: not valid JSON text"]
    assert outbox.check_rows(1, 7) == 0


def test_a_batch_put_back_is_handed_out_again_and_can_grow(stores: Stores) -> None:
    outbox = stores.outbox
    outbox.put(TELEMETRY, [telemetry_body({"seq": i}, i) for i in range(3)])
    batch = outbox.next_batch()
    assert batch is not None and batch.count == 3
    outbox.put_back(batch)
    outbox.put(TELEMETRY, [telemetry_body({"seq": i}, i) for i in range(3, 5)])
    again = outbox.next_batch()
    assert again is not None
    assert [r["values"]["seq"] for r in batch_records(again)] == [0, 1, 2, 3, 4]
    assert outbox.next_batch() is None


def test_failed_delete_is_never_sent_again_and_retried(stores: Stores) -> None:
    """A delete after PUBACK that fails (a full disk) must not make the forwarder send the
    acknowledged records again; the delete is retried later."""
    outbox = stores.outbox
    outbox.put(TELEMETRY, [telemetry_body({"seq": i}, i) for i in range(10)])
    first = outbox.next_batch(max_bytes=200)
    assert first is not None
    stores.conn.execute("CREATE TEMP TRIGGER refuse BEFORE DELETE ON main.outbox "
                        "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")
    with pytest.raises(sqlite3.Error):
        outbox.ack([first])
    assert outbox.unsettled == 1

    outbox.rewind()
    resent = drain(outbox)
    assert all(b.first_id > first.last_id for b in resent)

    stores.conn.execute("DROP TRIGGER temp.refuse")
    assert outbox.settle() == first.count
    assert outbox.unsettled == 0
    assert outbox.depth() == 10 - first.count


def test_ack_deletes_exactly_the_batch(stores: Stores) -> None:
    stores.outbox.max_record_bytes = 1022
    stores.outbox.put(TELEMETRY, [telemetry_body({"seq": i}, i) for i in range(200)])
    batches = drain(stores.outbox)
    assert len(batches) >= 4
    second = batches[1]

    removed = stores.outbox.ack([second])

    assert removed == second.count
    remaining = outbox_seqs(stores.conn)
    acked = {r["values"]["seq"] for r in batch_records(second)}
    assert remaining == [s for s in range(200) if s not in acked]
    assert stores.outbox.counter("records_sent") == second.count
    # Acknowledging again (a duplicate PUBACK after a reconnect) removes nothing more.
    assert stores.outbox.ack([second]) == 0
    assert stores.outbox.ack([]) == 0
    assert stores.outbox.depth() == 200 - second.count

    assert stores.outbox.ack(batches) == 200 - second.count
    assert stores.outbox.depth() == 0
    assert stores.outbox.counter("records_sent") == 200


def test_rewind_resends_unacknowledged(stores: Stores) -> None:
    outbox = stores.outbox
    outbox.max_record_bytes = 1022
    outbox.put(TELEMETRY, [telemetry_body({"seq": i}, i) for i in range(200)])
    first, second, third = outbox.next_batch(), outbox.next_batch(), outbox.next_batch()
    assert first and second and third
    outbox.ack([first, third])

    outbox.rewind()

    again = drain(outbox)
    records = [r["values"]["seq"] for b in again for r in batch_records(b)]
    done = {r["values"]["seq"] for b in (first, third) for r in batch_records(b)}
    assert records == [s for s in range(200) if s not in done]
    assert again[0].first_id == second.first_id
    # Without a rewind nothing is handed out twice.
    assert outbox.next_batch() is None


def test_new_rows_after_everything_was_handed_out(stores: Stores) -> None:
    outbox = stores.outbox
    outbox.put_telemetry({"seq": 0}, 1)
    assert outbox.next_batch() is not None
    assert outbox.next_batch() is None
    outbox.put_telemetry({"seq": 1}, 2)
    batch = outbox.next_batch()
    assert batch is not None
    assert [r["values"]["seq"] for r in batch_records(batch)] == [1]


def test_outbox_survives_reopening(gateway_dir: Path) -> None:
    stores = Stores(gateway_dir, MAX_PAYLOAD)
    stores.open()
    stores.outbox.put(TELEMETRY, [telemetry_body({"seq": i}, i) for i in range(10)])
    stores.close()
    stores.open()
    try:
        assert outbox_seqs(stores.conn) == list(range(10))
        assert stores.problems == []
    finally:
        stores.close()


def test_quota_drops_the_oldest_telemetry_only(stores: Stores, writer: QueueWriter,
                                              controller_dir: Path) -> None:
    stores.outbox.put_attributes({"oldest": "attribute"})
    writer.write(make_records(5000, ts_ms=1_700_000_000_000))
    QueueIntake(controller_dir, batch_size=10_000).move_batch(stores.conn)
    stores.outbox.put_attributes({"newest": "attribute"})
    archived = len(archive_rows(stores))
    used = stores.outbox.used_bytes()
    # Read some rows ahead, as the forwarder would have.
    handed_out = stores.outbox.next_batch()
    assert handed_out is not None

    dropped = stores.outbox.enforce_quota(used // 2)

    assert dropped > 0
    assert stores.outbox.counter("records_dropped") == dropped
    seqs = outbox_seqs(stores.conn)
    assert seqs == list(range(dropped, 5000)), "the oldest telemetry goes first"
    assert outbox_bodies(stores, ATTRIBUTES) == [
        {"oldest": "attribute"}, {"newest": "attribute"}]
    assert len(archive_rows(stores)) == archived == 5000, "dropped records stay in the archive"
    # The forwarder's read-ahead does not hand out dropped rows, nor skip kept ones.
    rest = drain(stores.outbox)
    sent = [r.get("values", r).get("seq") for b in rest for r in batch_records(b)]
    assert [s for s in sent if s is not None] == list(range(dropped, 5000))
    # Under the quota nothing more is dropped.
    assert stores.outbox.enforce_quota(used * 2) == 0


def test_quota_never_drops_attributes(stores: Stores) -> None:
    stores.outbox.put(ATTRIBUTES, [json.dumps({"k": i}) for i in range(100)])
    stores.outbox.put(TELEMETRY, [telemetry_body({"seq": i}, i) for i in range(100)])

    stores.outbox.enforce_quota(1)

    assert stores.outbox.counter("records_dropped") == 100
    assert outbox_seqs(stores.conn) == []
    assert len(outbox_bodies(stores, ATTRIBUTES)) == 100


# -- archive ------------------------------------------------------------------------------


def fill_archive(stores: Stores, writer: QueueWriter, controller_dir: Path,
                 timestamps: list[int]) -> None:
    writer.write([good(i, ts) for i, ts in enumerate(timestamps)])
    QueueIntake(controller_dir, batch_size=100_000).move_batch(stores.conn)
    # Start from an empty outbox, as if everything had been sent.
    stores.conn.execute("DELETE FROM outbox")


def test_archive_republish_by_inclusive_time_range(stores: Stores, writer: QueueWriter,
                                                  controller_dir: Path) -> None:
    # Out of order on purpose: republishing goes in time order.
    timestamps = [1005, 1000, 1009, 1003, 1006, 1001, 1004, 1008, 1002, 1007]
    fill_archive(stores, writer, controller_dir, timestamps)

    assert stores.archive.republish(1003, 1006) == 4

    assert [b["ts"] for b in outbox_bodies(stores)] == [1003, 1004, 1005, 1006]
    assert stores.archive.count() == 10, "republishing keeps the archive"
    assert stores.archive.republish(2000, 3000) == 0
    assert stores.archive.republish(1009, 1009) == 1
    assert [b["ts"] for b in outbox_bodies(stores)] == [1003, 1004, 1005, 1006, 1009]


def test_archive_discard_by_inclusive_time_range(stores: Stores, writer: QueueWriter,
                                                controller_dir: Path) -> None:
    fill_archive(stores, writer, controller_dir, list(range(1000, 1010)))

    assert stores.archive.discard(1003, 1006) == 4

    assert [ts for ts, _t, _b in archive_rows(stores)] == [1000, 1001, 1002, 1007, 1008, 1009]
    assert stores.archive.discard(1003, 1006) == 0


def test_retention_by_age(stores: Stores, writer: QueueWriter, controller_dir: Path) -> None:
    now_s = BUILD_MS / 1000 + 100 * 86400.0
    now = int(now_s * 1000)
    timestamps = [now - 40 * DAY_MS, now - 31 * DAY_MS, now - 30 * DAY_MS + 1000,
                  now - 29 * DAY_MS, now - DAY_MS, now]
    fill_archive(stores, writer, controller_dir, timestamps)

    removed = stores.archive.enforce_retention(30.0, 1 << 40, now=now_s)

    assert removed == 2
    assert [ts for ts, _t, _b in archive_rows(stores)] == timestamps[2:]


def test_retention_by_size_removes_the_oldest(stores: Stores, writer: QueueWriter,
                                             controller_dir: Path) -> None:
    count = 20_000
    # Newest first in the queue: "oldest" means the smallest ts, not the first row.
    timestamps = [1_700_000_000_000 + count - i for i in range(count)]
    fill_archive(stores, writer, controller_dir, timestamps)
    used = stores.archive.used_bytes()

    removed = stores.archive.enforce_retention(10_000.0, used // 2, now=1_700_000_000.0)

    assert 0 < removed < count
    kept = sorted(ts for ts, _t, _b in archive_rows(stores))
    assert len(kept) == count - removed
    assert kept == sorted(timestamps)[removed:], "the oldest records are removed first"
    assert stores.archive.used_bytes() <= used // 2


# -- damaged files ------------------------------------------------------------------------


def corrupt_files(directory: Path, name: str) -> list[Path]:
    return sorted(directory.glob(f"{name}.corrupt-*"))


def test_garbage_outbox_is_moved_aside(gateway_dir: Path) -> None:
    garbage = os.urandom(3) + b"this is not a database" + os.urandom(8192)
    (gateway_dir / "outbox.db").write_bytes(garbage)
    stores = Stores(gateway_dir, MAX_PAYLOAD)

    stores.open()
    try:
        moved = [p for p in corrupt_files(gateway_dir, "outbox.db")
                 if not p.name.endswith(("-wal", "-shm"))]
        assert len(moved) == 1
        assert moved[0].read_bytes() == garbage, "the damaged file is kept, not deleted"
        assert any("outbox.db" in p and "moved aside" in p for p in stores.problems)
        # The new outbox works.
        stores.outbox.put_telemetry({"seq": 1}, 1)
        batch = stores.outbox.next_batch()
        assert batch is not None
        assert stores.outbox.ack([batch]) == 1
    finally:
        stores.close()
    # And it is a healthy database on the next start.
    again = Stores(gateway_dir, MAX_PAYLOAD)
    again.open()
    again.close()
    assert again.problems == []


def test_garbage_archive_is_moved_aside(gateway_dir: Path, writer: QueueWriter,
                                       controller_dir: Path) -> None:
    (gateway_dir / "archive.db").write_bytes(b"garbage" * 2000)
    stores = Stores(gateway_dir, MAX_PAYLOAD)
    stores.open()
    try:
        assert len(corrupt_files(gateway_dir, "archive.db")) == 1
        assert any("archive.db" in p for p in stores.problems)
        writer.write([good(0)])
        result = QueueIntake(controller_dir, batch_size=10).move_batch(stores.conn)
        assert (result.forwarded, result.archived) == (1, 1)
    finally:
        stores.close()


def page_of_row(path: Path, seq: int) -> int:
    """The page (1-based) whose bytes hold the outbox row of ``seq`` (found by its text)."""
    data = path.read_bytes()
    page_size = 4096
    needle = f'"seq":{seq},'.encode()
    offset = data.find(needle)
    assert offset > 0
    return offset // page_size + 1


def test_damaged_outbox_has_its_readable_rows_salvaged(gateway_dir: Path) -> None:
    count = 3000
    stores = Stores(gateway_dir, MAX_PAYLOAD)
    stores.open()
    assert stores.conn.execute("PRAGMA page_size").fetchone()[0] == 4096
    stores.outbox.put(TELEMETRY, [telemetry_body({"seq": i, "pad": "p" * 60}, 1000 + i)
                                  for i in range(count)])
    stores.outbox.put_attributes({"kept": True})
    stores.close()
    path = gateway_dir / "outbox.db"
    # Overwrite one table page in the middle with garbage.
    damaged = page_of_row(path, count // 2)
    data = path.read_bytes()
    on_page = {int(m) for m in re.findall(rb'"seq":(\d+),',
                                          data[(damaged - 1) * 4096:damaged * 4096])}
    assert count // 2 in on_page
    with path.open("r+b") as fh:
        fh.seek((damaged - 1) * 4096)
        fh.write(b"\xa5" * 4096)

    stores = Stores(gateway_dir, MAX_PAYLOAD)
    stores.open()
    try:
        assert len(corrupt_files(gateway_dir, "outbox.db")) >= 1
        salvaged = outbox_seqs(stores.conn)
        print(f"salvage: {len(salvaged)} of {count} telemetry rows recovered; "
              f"{count - len(salvaged)} were on the damaged page")
        assert salvaged == sorted(salvaged), "salvaged rows keep their order"
        assert set(salvaged) <= set(range(count))
        missing = set(range(count)) - set(salvaged)
        # Only the rows on the damaged page may be missing.
        assert missing <= on_page
        assert len(missing) <= 60
        assert outbox_bodies(stores, ATTRIBUTES) == [{"kept": True}]
        assert stores.outbox.counter("records_salvaged") == len(salvaged) + 1
        assert any("salvaged" in p for p in stores.problems)
        assert any("moved aside" in p for p in stores.problems)
    finally:
        stores.close()



def damage_page_holding(path: Path, seq: int) -> set[int]:
    """Overwrite the page that holds the row of ``seq``; the seqs that were on it."""
    damaged = page_of_row(path, seq)
    data = path.read_bytes()
    on_page = {int(m) for m in re.findall(rb'"seq":(\d+),',
                                          data[(damaged - 1) * 4096:damaged * 4096])}
    with path.open("r+b") as fh:
        fh.seek((damaged - 1) * 4096)
        fh.write(b"\x5a" * 4096)
    return on_page


def test_recovery_keeps_record_ids_for_late_acknowledgements(gateway_dir: Path) -> None:
    """The outbox is found damaged while publishes are in flight: their acknowledgement
    after the recovery deletes exactly their records, not others that took their ids."""
    count = 3000
    stores = Stores(gateway_dir, 2048)
    stores.open()
    stores.outbox.put(TELEMETRY, [telemetry_body({"seq": i, "pad": "p" * 60}, 1000 + i)
                                  for i in range(count)])
    batches = drain(stores.outbox)
    sent = [b for b in batches if batch_records(b)[-1]["values"]["seq"] < 1000]
    stores.outbox.ack(sent)
    in_flight = batches[len(sent)]
    in_flight_seqs = {r["values"]["seq"] for r in batch_records(in_flight)}
    acked = {r["values"]["seq"] for b in sent for r in batch_records(b)}
    stores.close()
    lost = damage_page_holding(gateway_dir / "outbox.db", 2500)

    stores.open()  # what Stores.recover does after a corruption error at run time
    try:
        assert len(corrupt_files(gateway_dir, "outbox.db")) >= 1
        assert stores.outbox.ack([in_flight]) == len(in_flight_seqs)
        remaining = set(outbox_seqs(stores.conn))
        expected = set(range(count)) - acked - in_flight_seqs - lost
        assert remaining == expected
        # New records come after the salvaged ones.
        stores.outbox.put_telemetry({"seq": count}, 1)
        assert outbox_seqs(stores.conn)[-1] == count
    finally:
        stores.close()
