"""Forwarding with a real gateway process, a real mosquitto over TLS and the stand-in.

Checks are record by record: the ``seq`` values the stand-in received are compared with
those written to the controller queue; every one must be there, duplicates are counted
and reported.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conftest import GatewayFactory, needs_mosquitto
from conftest import outbox_seqs as stored_seqs
from teg_gateway.sandbox.controller import QueueWriter, make_records
from teg_gateway.sandbox.process import GatewayProcess
from teg_gateway.sandbox.thingsboard import FakeThingsBoard

pytestmark = needs_mosquitto

WAIT = 30.0  # generous bound for anything the gateway should do "soon"
HEALTH_KEYS = ("outbox_depth", "outbox_oldest_age_ms", "records_sent", "records_dropped",
               "reconnects", "loop_lag_ms")

Report = Callable[[str], None]


# -- helpers shared with test_durability.py -----------------------------------------------



@dataclass
class Delivery:
    """What the stand-in received compared with what was written."""

    expected: int
    received: int
    missing: list[int]
    duplicates: int
    unexpected: list[int]
    in_order: bool  # first arrivals in the order written (repeats after a resend aside)

    def describe(self) -> str:
        missing = self.missing[:20]
        return (f"{self.expected} written, {self.received} received, "
                f"{len(self.missing)} missing {missing}{'...' if len(self.missing) > 20 else ''}"
                f", {self.duplicates} duplicates, {len(self.unexpected)} unexpected"
                f"{'' if self.in_order else ', OUT OF ORDER'}")


def delivery(thingsboard: FakeThingsBoard, expected: Iterable[int]) -> Delivery:
    wanted = set(expected)
    received = [v for v in thingsboard.telemetry_values("seq") if isinstance(v, int)]
    counts = Counter(received)
    first_arrivals = list(dict.fromkeys(received))
    return Delivery(
        expected=len(wanted),
        received=len(received),
        missing=sorted(wanted - counts.keys()),
        duplicates=sum(n - 1 for n in counts.values() if n > 1),
        unexpected=sorted(counts.keys() - wanted),
        in_order=first_arrivals == sorted(first_arrivals),
    )


def wait_delivered(thingsboard: FakeThingsBoard, expected: Iterable[int],
                   gateway: GatewayProcess, timeout: float = WAIT) -> Delivery:
    """Wait until every expected seq has arrived; the final comparison. Records must
    first arrive in the order written (a resend after a disruption repeats older ones)."""
    wanted = list(expected)
    deadline = time.monotonic() + timeout
    while True:
        result = delivery(thingsboard, wanted)
        if not result.missing:
            assert result.in_order, f"records arrived out of order: {result.describe()}"
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"records missing after {timeout:g} s: {result.describe()}\n"
                                 f"--- gateway log ---\n{gateway.log_tail(60)}")
        time.sleep(0.05)


def wait_until(predicate: Callable[[], bool], what: str, gateway: GatewayProcess,
               timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}\n"
                                 f"--- gateway log ---\n{gateway.log_tail(60)}")
        if not gateway.running:
            raise AssertionError(f"the gateway exited ({gateway.returncode}) while waiting: "
                                 f"{what}\n--- gateway log ---\n{gateway.log_tail(60)}")
        time.sleep(0.05)


def wait_connected(thingsboard: FakeThingsBoard, gateway: GatewayProcess) -> None:
    """The gateway is provisioned and connected: its sys_info attribute arrived."""
    wait_until(lambda: "sys_info" in thingsboard.client_attributes,
               "the gateway connects and publishes sys_info", gateway)


def query(db: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Read a gateway database (running or not) with a separate connection."""
    conn = sqlite3.connect(db, timeout=10.0)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def outbox_seqs(data_dir: Path) -> list[int]:
    """The ``seq`` of every telemetry record in the gateway's outbox, in order."""
    conn = sqlite3.connect(data_dir / "outbox.db")
    try:
        return stored_seqs(conn)
    finally:
        conn.close()


def health_records(thingsboard: FakeThingsBoard) -> list[dict[str, Any]]:
    return [r["values"] for r in thingsboard.telemetry() if "records_sent" in r["values"]]


def log_records(thingsboard: FakeThingsBoard) -> list[dict[str, Any]]:
    return [r["values"] for r in thingsboard.telemetry() if "severity" in r["values"]]


def duplicate_bound(disruptions: int, max_inflight: int, max_payload: int) -> int:
    """Records that may arrive twice: those in flight (plus one batch being acknowledged)
    at each disruption; a record of make_records takes at least 60 bytes."""
    return disruptions * (max_inflight + 2) * (max_payload // 60 + 1)


class Stream:
    """Writes ``total`` records (seq from ``start``) into the queue from a thread, in chunks,
    at a steady pace, as a controller does."""

    def __init__(self, writer: QueueWriter, total: int, start: int = 0, chunk: int = 200,
                 pause_s: float = 0.02) -> None:
        self.writer = writer
        self.seqs = range(start, start + total)
        self.chunk = chunk
        self.pause_s = pause_s
        self.written = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            for first in range(self.seqs.start, self.seqs.stop, self.chunk):
                n = min(self.chunk, self.seqs.stop - first)
                self.writer.write(make_records(n, start_seq=first))
                self.written += n
                time.sleep(self.pause_s)
        except BaseException as exc:  # reported by join()
            self.error = exc

    def __enter__(self) -> Stream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.join()

    def join(self, timeout: float = WAIT) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the record stream did not finish"
        if self.error is not None:
            raise self.error


# -- forwarding ---------------------------------------------------------------------------


def test_every_record_arrives_in_order(make_gateway: GatewayFactory,
                                       thingsboard: FakeThingsBoard,
                                       queue_writer: QueueWriter, report: Report) -> None:
    """20,000 records, half queued before the start and half while running, all arrive,
    each with the values it was written with, in the order written."""
    written: dict[int, dict[str, Any]] = {}
    before = make_records(10_000, start_seq=0, ts_ms=1_700_000_000_000)
    queue_writer.write(before)
    gateway = make_gateway()
    gateway.start()
    with Stream(queue_writer, 10_000, start=10_000, chunk=500, pause_s=0.01):
        pass
    result = wait_delivered(thingsboard, range(20_000), gateway)

    report(f"in order: {result.describe()}, {thingsboard.publish_count} publishes")
    assert result.unexpected == []
    assert result.duplicates == 0, "no disruption, so nothing is sent twice"
    for _type, message in before:
        record = json.loads(message)
        written[record["values"]["seq"]] = record
    received = [r for r in thingsboard.telemetry() if "seq" in r["values"]]
    seqs = [r["values"]["seq"] for r in received]
    assert seqs == list(range(20_000)), "records arrive in the order they were written"
    for record in received[:10_000]:
        assert record == written[record["values"]["seq"]]
    for record in received[10_000:]:
        assert set(record["values"]) == {"seq", "co2", "temperature"}
    assert thingsboard.bad_payloads == 0
    assert gateway.stop() == 0


def test_publishes_never_exceed_max_payload_bytes(make_gateway: GatewayFactory,
                                                  thingsboard: FakeThingsBoard,
                                                  queue_writer: QueueWriter,
                                                  report: Report) -> None:
    limit = 4096
    # The stand-in drops (and counts) anything larger, as ThingsBoard would refuse it.
    thingsboard.max_payload_size = limit
    records = make_records(20_000)
    queue_writer.write(records)
    total_bytes = sum(len(message) for _type, message in records)
    gateway = make_gateway({"outbox": {"max_payload_bytes": limit}})
    gateway.start()

    result = wait_delivered(thingsboard, range(20_000), gateway)

    report(f"max payload {limit}: {result.describe()}, {thingsboard.publish_count} publishes "
           f"for {total_bytes} bytes of records")
    assert thingsboard.oversize_payloads == 0
    assert thingsboard.bad_payloads == 0
    assert result.duplicates == 0
    # Each publish carries at most `limit` bytes, so there must be at least this many.
    assert thingsboard.publish_count >= math.ceil(total_bytes / limit)
    assert thingsboard.publish_count < 20_000, "records are batched, not sent one by one"
    assert gateway.stop() == 0


def test_a_record_too_large_for_a_publish_is_a_dead_letter(make_gateway: GatewayFactory,
                                                          thingsboard: FakeThingsBoard,
                                                          queue_writer: QueueWriter,
                                                          data_dir: Path,
                                                          report: Report) -> None:
    """ThingsBoard closes the connection on a frame above its limit: a record that cannot
    fit in a publish must not be sent (it would be refused again after every reconnect and
    block everything behind it); it goes to the dead letters, the rest flows."""
    limit = 4096
    thingsboard.max_payload_size = limit
    huge = json.dumps({"ts": 1, "values": {"seq": -1, "blob": "x" * 10_000}})
    queue_writer.write([*make_records(1000, start_seq=0), ("telemetry", huge),
                        *make_records(1000, start_seq=1000)])
    gateway = make_gateway({"outbox": {"max_payload_bytes": limit}})
    gateway.start()

    result = wait_delivered(thingsboard, range(2000), gateway)

    report(f"oversize record: {result.describe()}")
    assert thingsboard.oversize_payloads == 0
    assert result.unexpected == []
    [(message, reason)] = query(data_dir / "outbox.db",
                                "SELECT message, reason FROM dead_letter")
    assert message == huge
    assert "too large" in reason
    assert gateway.stop() == 0


def test_a_record_damaged_in_the_outbox_does_not_block_it(
        make_gateway: GatewayFactory, thingsboard: FakeThingsBoard, queue_writer: QueueWriter,
        data_dir: Path, report: Report) -> None:
    """A body damaged on disk (a flipped byte) makes ThingsBoard close the connection on the
    publish carrying it. After the second such close on the same batch its rows are checked
    one by one: the damaged one becomes a dead letter and everything else arrives."""
    gateway = make_gateway()
    gateway.start()
    wait_connected(thingsboard, gateway)
    thingsboard.stop()
    queue_writer.write(make_records(300))
    outbox = data_dir / "outbox.db"
    wait_until(lambda: len(outbox_seqs(data_dir)) == 300, "300 records wait in the outbox",
               gateway)
    assert gateway.stop() == 0
    conn = sqlite3.connect(outbox)
    with conn:
        # One byte of one record (rows hold several records: the others stay intact).
        conn.execute("UPDATE outbox SET body = replace(body, '\"seq\":150,', '\"seq\":150:') "
                     "WHERE kind = 0 AND body LIKE '%\"seq\":150,%'")
    conn.close()
    thingsboard.start()
    gateway.start()

    result = wait_delivered(thingsboard, [s for s in range(300) if s != 150], gateway)

    [(reason,)] = query(outbox, "SELECT reason FROM dead_letter")
    assert reason == "damaged in the outbox: not valid JSON text"
    assert thingsboard.bad_payload_closes <= 2
    assert result.unexpected == []
    report(f"damaged record in the outbox: {result.describe()}, "
           f"{thingsboard.bad_payload_closes} close(s) on it before it was set aside")


def test_a_new_row_is_forwarded_promptly_while_idle(make_gateway: GatewayFactory,
                                                    thingsboard: FakeThingsBoard,
                                                    queue_writer: QueueWriter) -> None:
    # No health telemetry to wake the forwarder: only the new row itself can.
    gateway = make_gateway({"health": {"interval_s": 3600.0}})
    gateway.start()
    wait_connected(thingsboard, gateway)
    queue_writer.write(make_records(1, start_seq=0))
    wait_delivered(thingsboard, [0], gateway)
    for seq in range(1, 4):
        # Let the gateway go idle, then one more row.
        time.sleep(1.5)
        queue_writer.write(make_records(1, start_seq=seq))
        wait_delivered(thingsboard, range(seq + 1), gateway, timeout=10.0)
    assert queue_writer.pending() == 0
    assert gateway.stop() == 0


def test_malformed_rows_do_not_block_and_are_reported(make_gateway: GatewayFactory,
                                                     thingsboard: FakeThingsBoard,
                                                     queue_writer: QueueWriter,
                                                     data_dir: Path, report: Report) -> None:
    bad: list[tuple[str, str]] = [
        ("telemetry", "{not json"),
        ("telemetry", "[1, 2, 3]"),
        ("telemetry", '{"values": {"seq": -1}}'),
        ("telemetry", '{"ts": 1.5, "values": {"seq": -2}}'),
        ("telemetry", '{"ts": "now", "values": {"seq": -3}}'),
        ("telemetry", '{"ts": 1}'),
        ("telemetry", '{"ts": 1, "values": 5}'),
    ]
    reasons = ["message is not valid JSON", "message is not a JSON object", "ts is missing",
               "ts is not an integer", "ts is not an integer", "values is missing",
               "values is not an object"]
    rows: list[Any] = []
    for i, row in enumerate(bad):
        rows.extend(make_records(100, start_seq=i * 100))
        rows.append(row)
    rows.extend(make_records(100, start_seq=len(bad) * 100))
    queue_writer.write(rows)
    # Rows the controller writes with other drivers: NULL and BLOB messages.
    conn = sqlite3.connect(queue_writer.path)
    with conn:
        conn.execute("INSERT INTO messages (type, message) VALUES ('telemetry', NULL)")
        conn.execute("INSERT INTO messages (type, message) VALUES ('telemetry', ?)",
                     (b'{"ts": 1, "values": {"seq": -9}}',))
    conn.close()
    queue_writer.write(make_records(100, start_seq=(len(bad) + 1) * 100))
    total = (len(bad) + 2) * 100

    gateway = make_gateway()
    gateway.start()
    result = wait_delivered(thingsboard, range(total), gateway)

    wait_until(lambda: any("malformed" in r["message"] for r in log_records(thingsboard)),
               "a WARNING about the malformed rows reaches ThingsBoard", gateway)
    warning = next(r for r in log_records(thingsboard) if "malformed" in r["message"])
    report(f"malformed rows: {result.describe()}; cloud log: {warning['message'][:120]!r}")
    assert result.duplicates == 0
    assert result.unexpected == [], "no malformed row reached ThingsBoard"
    assert warning["severity"] == "WARNING"
    assert warning["message"].startswith("GATEWAY - ")
    assert queue_writer.pending() == 0
    dead = query(data_dir / "outbox.db",
                 "SELECT type, message, reason FROM dead_letter ORDER BY queue_id")
    assert [d[2] for d in dead] == [*reasons, "message is NULL", "message is not text but blob"]
    assert [d[1] for d in dead[:len(bad)]] == [m for _t, m in bad]
    assert gateway.stop() == 0


def test_health_telemetry(make_gateway: GatewayFactory, thingsboard: FakeThingsBoard,
                          queue_writer: QueueWriter, report: Report) -> None:
    queue_writer.write(make_records(500))
    gateway = make_gateway({"health": {"interval_s": 0.5}})
    gateway.start()
    wait_delivered(thingsboard, range(500), gateway)

    wait_until(lambda: any(h["records_sent"] >= 500 for h in health_records(thingsboard)),
               "a health record counting the 500 records sent", gateway)
    health = next(h for h in health_records(thingsboard) if h["records_sent"] >= 500)
    report(f"health: {health}")
    for key in HEALTH_KEYS:
        assert key in health, f"health telemetry lacks {key}"
        assert isinstance(health[key], int | float) and health[key] >= 0, (key, health[key])
    assert health["records_dropped"] == 0
    assert health["reconnects"] == 0
    assert "ms_since_last_controller_health_check" not in health, "no health check yet"

    queue_writer.health_check()
    wait_until(lambda: any("ms_since_last_controller_health_check" in h
                           for h in health_records(thingsboard)),
               "health telemetry with ms_since_last_controller_health_check", gateway)
    after = next(h for h in health_records(thingsboard)
                 if "ms_since_last_controller_health_check" in h)
    assert 0 <= after["ms_since_last_controller_health_check"] < 600_000
    # The outbox drains: a later health record sees it nearly empty.
    wait_until(lambda: health_records(thingsboard)[-1]["outbox_depth"] <= 2,
               "the outbox depth reported drops to the health record itself", gateway)
    assert gateway.stop() == 0


def test_cloud_log_rate_limit(make_gateway: GatewayFactory, thingsboard: FakeThingsBoard,
                              queue_writer: QueueWriter, report: Report) -> None:
    """A storm of malformed rows logs a WARNING per intake batch; ThingsBoard gets at most
    what the token bucket allows, and then one summary of what was held back."""
    per_minute, burst, storm = 12, 3, 30
    gateway = make_gateway({"logging": {"cloud_per_minute": per_minute, "cloud_burst": burst},
                            "health": {"interval_s": 0.5}})
    started = time.monotonic()
    gateway.start()
    wait_connected(thingsboard, gateway)
    # One malformed row at a time: each is its own intake batch and its own WARNING.
    for i in range(storm):
        queue_writer.write([("telemetry", f"storm {i}")])
        wait_until(lambda: queue_writer.pending() == 0, "the intake takes the row", gateway)
    # What was held back is reported in a summary record, once a token is free again (one
    # every 60 / per_minute s), even though nothing else is logged meanwhile.
    def summaries() -> list[dict[str, Any]]:
        return [r for r in log_records(thingsboard) if "log records were not sent" in r["message"]]

    def accounted() -> int:
        sent = sum("malformed" in r["message"] for r in log_records(thingsboard))
        held = sum(int(r["message"].removeprefix("GATEWAY - ").split()[0]) for r in summaries())
        return sent + held

    wait_until(lambda: accounted() >= storm, "every WARNING sent or counted in a summary",
               gateway, timeout=40.0)
    elapsed_min = (time.monotonic() - started) / 60.0

    logs = log_records(thingsboard)
    allowed = burst + math.ceil(per_minute * elapsed_min)
    # The rate limit concerns log records: the local log keeps every one of them.
    warnings_logged = log_text_count(gateway, "malformed row(s) moved to the dead-letter")
    report(f"log storm: {warnings_logged} warnings logged locally, {len(logs)} records sent "
           f"to ThingsBoard (allowed {allowed}), summaries: "
           f"{[r['message'] for r in summaries()]}")
    assert warnings_logged == storm
    assert accounted() == storm, "each WARNING is sent or counted exactly once"
    assert 1 <= len(logs) <= allowed
    assert all(r["message"].startswith("GATEWAY - ") for r in logs)
    assert all(r["severity"] == "WARNING" for r in summaries())
    assert gateway.stop() == 0


def log_text_count(gateway: GatewayProcess, text: str) -> int:
    return gateway.log_text().count(text)
