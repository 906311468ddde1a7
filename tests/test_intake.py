"""The intake's steps on real SQLite files, in-process: crash between the steps, a replaced
queue, hostile rows (property-based), dead letters and their cap, the archive's clock.

The same steps run in the gateway's worker thread; test_faults.py runs them in the real
gateway process against full disks, locked queues and damaged files.
"""

from __future__ import annotations

import datetime
import json
import os
import sqlite3
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import outbox_seqs
from teg_gateway import BUILD_DATE
from teg_gateway.controller.intake import IntakeConfig, IntakeCore, IntakeResult
from teg_gateway.sandbox.controller import QueueWriter, make_records
from teg_gateway.store import deadletters
from teg_gateway.store.archive import BUILD_MS, DAY_MS
from teg_gateway.store.db import transaction
from teg_gateway.store.deadletters import dead_letter_bytes
from teg_gateway.store.outbox import stored_records
from teg_gateway.store.stores import Stores

MAX_PAYLOAD = 49152


def make_core(stores: Stores, writer: QueueWriter, batch_size: int = 1000,
              **options: Any) -> IntakeCore:
    core = IntakeCore(IntakeConfig(writer.path, stores.outbox_path, stores.archive_path,
                                   batch_size, MAX_PAYLOAD, **options))
    core.open()
    return core


def run_all(core: IntakeCore) -> list[IntakeResult]:
    results = []
    while (result := core.step()).taken:
        results.append(result)
    return results


def archive_seqs(stores: Stores) -> list[int]:
    return [json.loads(b)["values"]["seq"] for (b,) in stores.conn.execute(
        "SELECT body FROM archive.records ORDER BY id")]


def queue_ids(writer: QueueWriter) -> list[int]:
    conn = sqlite3.connect(writer.path)
    try:
        return [r[0] for r in conn.execute("SELECT id FROM messages ORDER BY id")]
    finally:
        conn.close()


# -- a crash between the steps -------------------------------------------------------------


def test_a_crash_after_the_outbox_step_is_resumed_without_duplicates(
        stores: Stores, writer: QueueWriter) -> None:
    """The outbox committed, then the process died before the archive and the queue steps
    (the archive refused, and the intake is thrown away like a killed process): a new
    intake archives the rows once, empties the queue, and sends nothing twice."""
    writer.write(make_records(300))
    stores.conn.execute("CREATE TRIGGER archive.refuse BEFORE INSERT ON records "
                        "BEGIN SELECT RAISE(ABORT, 'crash'); END")
    first = make_core(stores, writer, batch_size=100)
    first.step()
    first.close()  # "killed" after step 1 of one batch
    assert outbox_seqs(stores.conn) == list(range(100))
    assert len(queue_ids(writer)) == 300
    stores.conn.execute("DROP TRIGGER archive.refuse")

    second = make_core(stores, writer, batch_size=100)
    run_all(second)
    second.step()

    assert outbox_seqs(stores.conn) == list(range(300))
    assert archive_seqs(stores) == list(range(300))
    assert queue_ids(writer) == []


def test_a_crash_before_the_queue_delete_takes_nothing_twice(
        stores: Stores, writer: QueueWriter) -> None:
    """Outbox and archive committed, the queue delete did not happen (the controller held
    its lock): the rows stay in the queue below the mark and are never moved again."""
    writer.write(make_records(50))
    lock = sqlite3.connect(writer.path, timeout=0)
    lock.execute("BEGIN IMMEDIATE")
    core = make_core(stores, writer)
    result = core.step()
    assert (result.taken, result.forwarded, result.archived) == (50, 50, 50)
    core.close()
    lock.rollback()
    lock.close()
    assert len(queue_ids(writer)) == 50

    again = make_core(stores, writer)
    assert again.step().taken == 0
    assert queue_ids(writer) == []
    assert outbox_seqs(stores.conn) == list(range(50))
    assert archive_seqs(stores) == list(range(50))


def test_a_replaced_queue_file_is_taken_from_its_first_row(
        stores: Stores, writer: QueueWriter, tmp_path: Path) -> None:
    writer.write(make_records(20))
    core = make_core(stores, writer)
    run_all(core)
    core.close()
    path = writer.path
    writer.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    fresh = QueueWriter(tmp_path / "controller")
    try:
        fresh.write(make_records(5, start_seq=20))  # ids 1..5 again, below the old mark
        core = make_core(stores, writer)
        run_all(core)
        assert outbox_seqs(stores.conn) == list(range(25))
    finally:
        fresh.close()


# -- hostile rows ----------------------------------------------------------------------------


def insert_raw(writer: QueueWriter, rows: Sequence[tuple[object, object]]) -> None:
    conn = sqlite3.connect(writer.path)
    try:
        with conn:
            conn.executemany("INSERT INTO messages (type, message) VALUES (?, ?)", rows)
    finally:
        conn.close()


def test_invalid_utf8_in_a_rejected_row_is_a_clear_dead_letter(
        stores: Stores, writer: QueueWriter) -> None:
    """A malformed row whose type is not UTF-8 is a dead letter with its reason (it once
    came out as a database error); text that is not UTF-8 in a good row is forwarded byte
    for byte, as the controller wrote it."""
    conn = sqlite3.connect(writer.path)
    with conn:
        conn.execute("INSERT INTO messages (type, message) VALUES (CAST(? AS TEXT), ?)",
                     (b"\xff\xfe telemetry", "not json"))
        conn.execute("INSERT INTO messages (type, message) VALUES (CAST(? AS TEXT), "
                     "CAST(? AS TEXT))", (b"t\xc3", b'{"ts":1,"values":{"a":"\xff"}}'))
        conn.execute("INSERT INTO messages (type, message) VALUES (?, ?)",
                     ("telemetry", json.dumps({"ts": 2, "values": {"seq": 1}})))
    conn.close()
    core = make_core(stores, writer)
    result = core.step()
    assert (result.taken, result.forwarded, result.dead) == (3, 2, 1)
    assert result.dead_detail == "row 1 (type '\ufffd\ufffd telemetry'): message is not valid JSON"
    assert stored_records(stores.conn)[0] == b'{"ts":1,"values":{"a":"\xff"}}'


@pytest.mark.parametrize("ts", [0, -1, 1, 2**63 - 1, -(2**63), 4_102_444_800_000,
                                86_400_000])
def test_any_integer_ts_is_forwarded_as_written(stores: Stores, writer: QueueWriter,
                                                ts: int) -> None:
    message = '{"ts":' + str(ts) + ',"values":{"seq":7,"big":123456789012345678901234567890}}'
    insert_raw(writer, [("telemetry", message)])
    make_core(stores, writer).step()
    (body,) = stores.conn.execute("SELECT body FROM outbox").fetchone()
    assert body == message


@pytest.mark.parametrize(("message", "body"), [
    # ThingsBoard's shape: kept as the controller wrote it, whitespace and key order too
    ('{"ts": 5, "values": {"a": 1.50, "b": "x y"}}',
     '{"ts": 5, "values": {"a": 1.50, "b": "x y"}}'),
    ('{"values":{"a":1},"ts":-0}', '{"values":{"a":1},"ts":-0}'),
    # anything more: rebuilt from the first ts and the first values
    ('{"ts":5,"values":{"a":1},"extra":{"b":2}}', '{"ts":5,"values":{"a":1}}'),
    ('{"ts":5,"values":{"a":1},"ts":"x"}', '{"ts":5,"values":{"a":1}}'),
    ('{"ts":5,"values":{"a":1},"values":{"b":[2, 3]}}', '{"ts":5,"values":{"a":1}}'),
])
def test_a_record_of_thingsboards_shape_is_kept_as_written_others_are_rebuilt(
        stores: Stores, writer: QueueWriter, message: str, body: str) -> None:
    insert_raw(writer, [("telemetry", message)])
    result = make_core(stores, writer).step()
    assert (result.forwarded, result.dead) == (1, 0)
    assert stores.conn.execute("SELECT body FROM outbox").fetchone() == (body,)
    assert stores.conn.execute("SELECT ts, body FROM archive.records").fetchone() == (
        5 if '"ts":-0' not in message else 0, body)


@pytest.mark.parametrize("ts", ["9223372036854775808", "99999999999999999999",
                                "-9223372036854775809"])
def test_a_ts_beyond_64_bits_is_a_dead_letter(stores: Stores, writer: QueueWriter,
                                              ts: str) -> None:
    insert_raw(writer, [("telemetry", '{"ts":' + ts + ',"values":{"a":1}}')])
    result = make_core(stores, writer).step()
    assert (result.forwarded, result.dead) == (0, 1)
    (reason,) = stores.conn.execute("SELECT reason FROM dead_letter").fetchone()
    assert reason == "ts is beyond the 64-bit integer range"


TEXTS = st.one_of(st.none(), st.text(max_size=60), st.binary(max_size=60),
                  st.integers(min_value=-(2**63), max_value=2**63 - 1),
                  st.floats(allow_nan=False))
MESSAGES = st.one_of(
    TEXTS,
    st.builds(lambda ts, values: json.dumps({"ts": ts, "values": values}),
              st.one_of(st.integers(), st.floats(allow_nan=False), st.text(max_size=5)),
              st.dictionaries(st.text(max_size=8),
                              st.one_of(st.integers(), st.text(max_size=20), st.none()),
                              max_size=4)),
    st.builds(json.dumps, st.recursive(
        st.one_of(st.none(), st.integers(), st.text(max_size=10)),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
            st.sampled_from(["ts", "values", "x"]), inner, max_size=3), max_leaves=8)))


@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(TEXTS, MESSAGES), min_size=1, max_size=30))
def test_every_queue_row_ends_forwarded_or_dead_with_a_reason(
        tmp_path_factory: pytest.TempPathFactory, rows: list[tuple[object, object]]) -> None:
    base = tmp_path_factory.mktemp("prop")
    stores = Stores(base / "gateway", MAX_PAYLOAD)
    stores.open()
    writer = QueueWriter(base / "controller")
    try:
        insert_raw(writer, rows)
        good = [("tail", json.dumps({"ts": 1, "values": {"seq": 1}}))]
        insert_raw(writer, good)
        ids = queue_ids(writer)
        core = make_core(stores, writer, batch_size=7)
        results = run_all(core)
        core.step()

        forwarded = sum(r.forwarded for r in results)
        dead = sum(r.dead for r in results)
        assert forwarded + dead == len(ids)
        assert stores.outbox.depth() == forwarded
        dead_rows = stores.conn.execute(
            "SELECT queue_id, reason FROM dead_letter ORDER BY id").fetchall()
        assert len(dead_rows) == dead
        assert all(reason and len(reason) <= deadletters.MAX_REASON for _q, reason in dead_rows)
        assert queue_ids(writer) == []
        records = stored_records(stores.conn)
        assert json.loads(records[-1]) == {"ts": 1, "values": {"seq": 1}}, "intake keeps going"
        for body in records:
            json.loads(body.decode("utf-8", "replace"))  # every forwarded body is JSON
    finally:
        writer.close()
        stores.close()


# -- dead letters ------------------------------------------------------------------------------


def test_dead_letters_have_their_own_cap_outside_the_quota(stores: Stores,
                                                          writer: QueueWriter) -> None:
    big = json.dumps({"ts": 1, "values": {"blob": "x" * 60_000}})
    for n in range(40):
        insert_raw(writer, [("telemetry", big)] + [
            ("telemetry", json.dumps({"ts": 1, "values": {"seq": n * 25 + i}}))
            for i in range(25)])
        core = make_core(stores, writer, dead_letter_cap_bytes=1024 * 1024)
        run_all(core)
        core.close()
        assert stores.outbox.enforce_quota(1024 * 1024) == 0, "dead letters are not quota"
    assert outbox_seqs(stores.conn) == list(range(1000))
    assert dead_letter_bytes(stores.conn) <= 1024 * 1024
    assert stores.outbox.counter("dead_letters") == 40
    removed = stores.outbox.counter("dead_letters_removed")
    kept = stores.conn.execute("SELECT count(*) FROM dead_letter").fetchone()[0]
    assert removed > 0 and kept + removed == 40
    first_kept = stores.conn.execute("SELECT min(queue_id) FROM dead_letter").fetchone()[0]
    assert first_kept > 1, "the oldest went first"


def test_every_writer_of_dead_letters_is_bounded(stores: Stores) -> None:
    with transaction(stores.conn):
        deadletters.add(stores.conn, "SELECT NULL AS queue_id, 'outbox' AS type, "
                        "? AS message, ? AS reason", ("m" * 200_000, "r" * 5000),
                        cap_bytes=10_000_000)
    (message, reason) = stores.conn.execute("SELECT message, reason FROM dead_letter").fetchone()
    assert len(message) == deadletters.MAX_MESSAGE
    assert len(reason) == deadletters.MAX_REASON


def test_outbox_rows_that_can_never_be_sent_move_to_the_capped_dead_letters(
        stores: Stores) -> None:
    # Stored before the limit was lowered (put() itself refuses such a message now).
    with transaction(stores.conn):
        stores.conn.executemany(
            "INSERT INTO outbox (kind, body, created_ms) VALUES (0, ?, 1)",
            [(json.dumps({"ts": 1, "values": {"blob": "x" * 50_000}}),)] * 30)
    ids = [r[0] for r in stores.conn.execute("SELECT id FROM outbox ORDER BY id")]
    moved = deadletters.move_from_outbox(stores.conn, ids, "too large for ThingsBoard",
                                         cap_bytes=512 * 1024)
    assert moved == 30
    assert stores.outbox.depth() == 0
    assert dead_letter_bytes(stores.conn) <= 512 * 1024
    assert stores.outbox.counter("dead_letters") == 30
    assert stores.outbox.counter("dead_letters_removed") > 0


# -- the archive's clock ---------------------------------------------------------------------


def fill_archive(stores: Stores, timestamps: list[int]) -> None:
    with transaction(stores.conn):
        stores.conn.executemany("INSERT INTO archive.records (ts, type, body) VALUES (?, ?, ?)",
                                [(ts, "t", "{}") for ts in timestamps])


def test_a_clock_years_ahead_does_not_empty_the_archive(stores: Stores) -> None:
    now_ms = BUILD_MS + 10 * DAY_MS
    fill_archive(stores, [now_ms - 40 * DAY_MS, now_ms - DAY_MS, now_ms])
    years_ahead = (now_ms + 20 * 365 * DAY_MS) / 1000
    assert stores.archive.enforce_retention(30.0, 1 << 40, now=years_ahead) == 1
    assert stores.archive.count() == 2, "only what is old compared with the newest record"


@pytest.mark.parametrize("wall_s", [0.0, 86_400.0, BUILD_MS / 1000 - 1])
def test_a_clock_before_the_release_or_the_newest_record_removes_nothing(
        stores: Stores, wall_s: float) -> None:
    fill_archive(stores, [1000, BUILD_MS + DAY_MS])
    assert stores.archive.enforce_retention(30.0, 1 << 40, now=wall_s) == 0
    assert stores.archive.count() == 2


def test_the_build_date_is_not_in_the_future_of_the_release() -> None:
    build = datetime.date.fromisoformat(BUILD_DATE)
    assert build <= datetime.datetime.now(datetime.UTC).date()
    last_commit = subprocess.run(["git", "log", "-1", "--format=%cs"], capture_output=True,
                                 text=True, cwd=Path(__file__).parent, check=False).stdout.strip()
    if last_commit:
        assert build <= datetime.date.fromisoformat(last_commit) + datetime.timedelta(days=1)


# -- the gateway's own files replaced -----------------------------------------------------------


def test_a_deleted_outbox_is_recreated_and_ids_go_on(stores: Stores) -> None:
    stores.outbox.put_telemetry({"a": 1})
    stores.outbox.put_telemetry({"a": 2})
    os.unlink(stores.outbox_path)
    assert stores.replaced() == [stores.outbox_path]
    assert stores.reopen_replaced()
    assert stores.take_problems() == [
        "outbox.db was deleted or replaced while the gateway was running; the records it "
        "held are lost; a new one was started"]
    assert stores.outbox_path.exists()
    stores.outbox.put_telemetry({"a": 3})
    (new_id,) = stores.conn.execute("SELECT id FROM outbox").fetchone()
    assert new_id == 3, "an acknowledgement from the old file never deletes a new record"
    assert not stores.replaced()


def test_salvage_skips_rows_it_cannot_read_and_starts(tmp_path: Path) -> None:
    """A NULL in a NOT NULL column (what one flipped byte did): salvage skips the row,
    reports it, and the stores open with every other record."""
    directory = tmp_path / "gateway"
    stores = Stores(directory, MAX_PAYLOAD)
    stores.open()
    stores.outbox.put(0, [json.dumps({"ts": 1, "values": {"seq": i}}) for i in range(10)])
    stores.close()
    conn = sqlite3.connect(directory / "outbox.db")
    conn.execute("PRAGMA writable_schema = ON")
    (schema,) = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'outbox'").fetchone()
    loose = schema.replace("NOT NULL", "")
    conn.execute("UPDATE sqlite_master SET sql = ? WHERE name = 'outbox'", (loose,))
    conn.commit()
    conn.close()
    conn = sqlite3.connect(directory / "outbox.db")
    with conn:
        conn.execute("UPDATE outbox SET kind = NULL WHERE id = 3")
        conn.execute("UPDATE outbox SET body = NULL WHERE id = 6")
        conn.execute("PRAGMA writable_schema = ON")
        conn.execute("UPDATE sqlite_master SET sql = ? WHERE name = 'outbox'", (schema,))
    conn.close()

    stores = Stores(directory, MAX_PAYLOAD)
    stores.open()
    try:
        assert outbox_seqs(stores.conn) == [0, 1, 3, 4, 6, 7, 8, 9]
        assert any("salvaged 8 records" in p for p in stores.take_problems())
    finally:
        stores.close()


def test_the_intake_connection_keeps_a_small_page_cache(stores: Stores,
                                                        writer: QueueWriter) -> None:
    """Peak memory while draining: the intake's page caches are small."""
    from teg_gateway.controller.intake import CACHE_KIB

    core = make_core(stores, writer)
    try:
        assert core.conn is not None
        for schema, kib in CACHE_KIB.items():
            assert core.conn.execute(f"PRAGMA {schema}.cache_size").fetchone()[0] == -kib
        writer.write(make_records(3000))
        assert sum(r.taken for r in run_all(core)) == 3000
    finally:
        core.close()
    assert outbox_seqs(stores.conn) == list(range(3000))
