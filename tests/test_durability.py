"""Nothing the controller hands over is lost: ThingsBoard outages, a frozen server,
``kill -9``, a corrupt outbox, graceful and forced shutdowns. Real gateway processes, the
ThingsBoard stand-in as a real MQTT server over TLS; duplicates are allowed, counted and
reported, losses are not.

The stand-in records a publish before it acknowledges it, as ThingsBoard does, so an
outage can come at any moment: publishes in flight when the server stops or drops the
connection are the gateway's to resend.
"""

from __future__ import annotations

import re
import signal
from pathlib import Path
from typing import Any

from conftest import GatewayFactory
from teg_gateway.sandbox.controller import QueueWriter, make_records
from teg_gateway.sandbox.process import GatewayProcess
from teg_gateway.sandbox.thingsboard import FakeThingsBoard
from teg_gateway.store.state import cloud_state
from test_forwarding import (
    WAIT,
    Report,
    Stream,
    duplicate_bound,
    health_records,
    log_records,
    outbox_seqs,
    query,
    wait_connected,
    wait_delivered,
    wait_until,
)

PAYLOAD = 4096  # small publishes: many of them in flight at any moment
INFLIGHT = 8
STREAM_CONFIG = {"outbox": {"max_payload_bytes": PAYLOAD, "max_inflight": INFLIGHT}}



def restart_cloud(thingsboard: FakeThingsBoard) -> None:
    """ThingsBoard is back, on the same port."""
    thingsboard.start()


def cloud_status(gateway: GatewayProcess) -> dict[str, Any]:
    """What the gateway keeps about its ThingsBoard connection (``state/cloud.json``, shown
    by ``teg-gateway status``): last_result, last_connected_ms, last_failure_ms."""
    return cloud_state(Path(gateway.env["TEG_DATA_PATH"])).read()


def wait_cloud_lost(gateway: GatewayProcess, timeout: float = WAIT) -> None:
    """Until the gateway has noticed that its ThingsBoard connection is gone."""
    wait_until(lambda: cloud_status(gateway).get("last_result") not in (None, "connected"),
               "the gateway notices the lost connection (it must not hang)", gateway,
               timeout=timeout)


def assert_clean_log(gateway: GatewayProcess) -> None:
    """No stray asyncio errors: they would also go to ThingsBoard as log records. (Here
    the log is the product: a user never sees a traceback.)"""
    text = gateway.log_text()
    for bad in ("never retrieved", "Task exception", "Traceback"):
        assert bad not in text, f"{bad!r} in the gateway log:\n{gateway.log_tail(40)}"


def received_count(thingsboard: FakeThingsBoard) -> int:
    return len(thingsboard.telemetry_values("seq"))


def stop_cloud(thingsboard: FakeThingsBoard, *, kill: bool = False) -> None:
    """Take ThingsBoard down while the gateway has publishes in flight; with `kill`, every
    connection is first cut abruptly (a crash rather than a shutdown)."""
    if kill:
        thingsboard.kill_connections()
    thingsboard.stop()


def assert_no_violation(thingsboard: FakeThingsBoard) -> None:
    """The server never had to close the connection for a bad, oversize or too fast
    publish."""
    assert (thingsboard.bad_payload_closes, thingsboard.oversize_closes,
            thingsboard.rate_limit_closes) == (0, 0, 0), thingsboard.closes


def test_broker_outage_mid_stream_loses_nothing(make_gateway: GatewayFactory,
                                                thingsboard: FakeThingsBoard,
                                                queue_writer: QueueWriter,
                                                report: Report) -> None:
    total = 20_000
    gateway = make_gateway(STREAM_CONFIG)
    gateway.start()
    wait_connected(thingsboard, gateway)
    with Stream(queue_writer, total, chunk=200, pause_s=0.02) as stream:
        wait_until(lambda: received_count(thingsboard) >= 3000, "3000 records arrive", gateway)
        stop_cloud(thingsboard)
        at_stop = received_count(thingsboard)
        # The controller goes on writing; the gateway keeps taking its records meanwhile.
        wait_cloud_lost(gateway)
        written_during = stream.written
        wait_until(lambda: stream.written >= written_during + 2000,
                   "the controller writes on during the outage", gateway)
        restart_cloud(thingsboard)
    result = wait_delivered(thingsboard, range(total), gateway)

    report(f"broker outage after {at_stop} records: {result.describe()}")
    assert result.unexpected == []
    assert result.duplicates <= duplicate_bound(1, INFLIGHT, PAYLOAD)
    assert_no_violation(thingsboard)
    wait_until(lambda: any(h["reconnects"] >= 1 for h in health_records(thingsboard)),
               "health telemetry reports the reconnect", gateway)
    assert gateway.stop() == 0
    assert_clean_log(gateway)


def test_broker_killed_repeatedly_mid_stream(make_gateway: GatewayFactory,
                                             thingsboard: FakeThingsBoard,
                                             queue_writer: QueueWriter,
                                             report: Report) -> None:
    """ThingsBoard crashes while publishes are in flight, again and again: the gateway
    must notice every time (it once spun forever on a dead connection) and lose nothing."""
    total, cycles = 20_000, 4
    gateway = make_gateway({**STREAM_CONFIG,
                            "thingsboard": {"reconnect_min_s": 0.05, "reconnect_max_s": 0.2}})
    gateway.start()
    wait_connected(thingsboard, gateway)
    with Stream(queue_writer, total, chunk=100, pause_s=0.01):
        for cycle in range(cycles):
            wait_until(lambda c=cycle: received_count(thingsboard) >= 2000 * (c + 1),  # type: ignore[misc]
                       f"records keep arriving (cycle {cycle})", gateway)
            connected_ms = cloud_status(gateway)["last_connected_ms"]
            stop_cloud(thingsboard, kill=True)
            wait_cloud_lost(gateway, timeout=15.0)
            restart_cloud(thingsboard)
            wait_until(lambda n=connected_ms: cloud_status(gateway).get(  # type: ignore[misc]
                "last_connected_ms", 0) > n, "the gateway reconnects", gateway)
    result = wait_delivered(thingsboard, range(total), gateway)

    report(f"broker killed {cycles} times: {result.describe()}")
    assert result.unexpected == []
    assert result.duplicates <= duplicate_bound(cycles, INFLIGHT, PAYLOAD)
    assert gateway.stop() == 0
    assert_clean_log(gateway)


def test_kill_9_mid_stream_loses_nothing(make_gateway: GatewayFactory,
                                         thingsboard: FakeThingsBoard,
                                         queue_writer: QueueWriter, data_dir: Path,
                                         report: Report) -> None:
    total = 20_000
    gateway = make_gateway(STREAM_CONFIG)
    gateway.start()
    wait_connected(thingsboard, gateway)
    kills = 0
    with Stream(queue_writer, total, chunk=200, pause_s=0.02):
        for threshold in (3000, 9000):
            wait_until(lambda t=threshold: received_count(thingsboard) >= t,  # type: ignore[misc]
                       f"{threshold} records arrive", gateway)
            assert gateway.kill() == -signal.SIGKILL
            kills += 1
            left = len(outbox_seqs(data_dir))
            report(f"kill -9 after {received_count(thingsboard)} records received; "
                   f"{left} records in the outbox")
            gateway.start()
    result = wait_delivered(thingsboard, range(total), gateway)

    report(f"kill -9 x{kills}: {result.describe()}")
    assert result.unexpected == []
    assert result.duplicates <= duplicate_bound(kills, INFLIGHT, PAYLOAD)
    assert gateway.stop() == 0
    assert_clean_log(gateway)
    assert outbox_seqs(data_dir) == []


def test_frozen_broker_puback_timeout_reconnects_and_resends(make_gateway: GatewayFactory,
                                                            thingsboard: FakeThingsBoard,
                                                            queue_writer: QueueWriter,
                                                            report: Report) -> None:
    gateway = make_gateway({**STREAM_CONFIG,
                            "outbox": {**STREAM_CONFIG["outbox"], "puback_timeout_s": 2.0}})
    gateway.start()
    wait_connected(thingsboard, gateway)
    queue_writer.write(make_records(2000, start_seq=0))
    wait_delivered(thingsboard, range(2000), gateway)

    thingsboard.pause()
    try:
        queue_writer.write(make_records(3000, start_seq=2000))
        wait_cloud_lost(gateway)  # it gives up the connection that acknowledges nothing
    finally:
        thingsboard.resume()
    queue_writer.write(make_records(1000, start_seq=5000))
    result = wait_delivered(thingsboard, range(6000), gateway)

    connects = thingsboard.connection_count
    report(f"frozen broker: {result.describe()}, {connects} connections")
    assert connects >= 2, "the gateway reconnected after the PUBACK timeout"
    assert result.unexpected == []
    assert result.duplicates <= duplicate_bound(1, INFLIGHT, PAYLOAD)
    assert gateway.stop() == 0
    assert_clean_log(gateway)


def test_corrupt_outbox_at_start_is_moved_aside_and_reported(make_gateway: GatewayFactory,
                                                             thingsboard: FakeThingsBoard,
                                                             queue_writer: QueueWriter,
                                                             data_dir: Path,
                                                             report: Report) -> None:
    garbage = b"\x00garbage, not SQLite\x00" * 1000
    (data_dir / "outbox.db").write_bytes(garbage)
    queue_writer.write(make_records(3000))
    gateway = make_gateway()
    gateway.start()

    result = wait_delivered(thingsboard, range(3000), gateway)
    wait_until(lambda: any("gateway_problem" in r["values"] for r in thingsboard.telemetry()),
               "telemetry gateway_problem arrives", gateway)

    problems = [r["values"]["gateway_problem"] for r in thingsboard.telemetry()
                if "gateway_problem" in r["values"]]
    moved = [p for p in data_dir.glob("outbox.db.corrupt-*")
             if not p.name.endswith(("-wal", "-shm"))]
    report(f"corrupt outbox: {result.describe()}; problem reported: {problems[0]!r}")
    assert len(moved) == 1
    assert moved[0].read_bytes() == garbage
    assert any("outbox.db" in p and "moved aside" in p for p in problems)
    # The ERROR line is what an operator reads in ThingsBoard: its wording counts.
    wait_until(lambda: any(r["severity"] == "ERROR" and "moved aside" in r["message"]
                           for r in log_records(thingsboard)),
               "the ERROR log record reaches ThingsBoard", gateway)
    assert result.duplicates == 0
    assert gateway.stop() == 0
    assert_clean_log(gateway)


def freeze_with_records_in_flight(gateway: GatewayProcess,
                                  thingsboard: FakeThingsBoard,
                                  queue_writer: QueueWriter) -> None:
    """Start the gateway, deliver seq 0-999, freeze the server, and let the gateway take
    seq 1000-2999, which ThingsBoard cannot acknowledge. The caller resumes the server."""
    gateway.start()
    wait_connected(thingsboard, gateway)
    queue_writer.write(make_records(1000, start_seq=0))
    wait_delivered(thingsboard, range(1000), gateway)
    thingsboard.pause()
    queue_writer.write(make_records(2000, start_seq=1000))
    wait_until(lambda: queue_writer.pending() == 0, "the gateway takes the records", gateway)


def restart_and_deliver_all(gateway: GatewayProcess, thingsboard: FakeThingsBoard,
                            report: Report) -> None:
    """Start the gateway again: seq 0-2999 all arrive, few duplicates, a clean stop."""
    gateway.start()
    result = wait_delivered(thingsboard, range(3000), gateway)
    report(f"after the restart: {result.describe()}")
    assert result.unexpected == []
    assert result.duplicates <= duplicate_bound(1, INFLIGHT, PAYLOAD)
    assert gateway.stop() == 0
    assert_clean_log(gateway)


def test_graceful_shutdown_keeps_unacknowledged_records(make_gateway: GatewayFactory, *,
                                                        thingsboard: FakeThingsBoard,
                                                        queue_writer: QueueWriter,
                                                        data_dir: Path,
                                                        report: Report) -> None:
    gateway = make_gateway({**STREAM_CONFIG,
                            "shutdown": {"timeout_s": 25.0, "drain_s": 1.0}})
    freeze_with_records_in_flight(gateway, thingsboard, queue_writer)
    try:
        code = gateway.stop(timeout=WAIT)
    finally:
        thingsboard.resume()

    assert code == 0, gateway.log_tail()
    left = outbox_seqs(data_dir)
    report(f"graceful shutdown with a frozen broker: {len(left)} records left in the outbox")
    assert set(range(1000, 3000)) <= set(left), "unacknowledged records stay in the outbox"
    assert query(data_dir / "outbox.db", "PRAGMA integrity_check") == [("ok",)]

    restart_and_deliver_all(gateway, thingsboard, report)
    left = outbox_seqs(data_dir)
    assert left == [], f"{len(left)} records still in the outbox after a clean stop"


def test_forced_shutdown_exits_3_and_loses_nothing(make_gateway: GatewayFactory, *,
                                                   thingsboard: FakeThingsBoard,
                                                   queue_writer: QueueWriter,
                                                   data_dir: Path, report: Report) -> None:
    gateway = make_gateway({**STREAM_CONFIG,
                            "shutdown": {"timeout_s": 2.0, "drain_s": 10.0}})
    freeze_with_records_in_flight(gateway, thingsboard, queue_writer)
    try:
        gateway.signal(signal.SIGTERM)
        code = gateway.wait(WAIT)
        left = outbox_seqs(data_dir)
    finally:
        thingsboard.resume()

    report(f"forced shutdown: exit {code}, {len(left)} records left in the outbox")
    assert code == 3, gateway.log_tail()
    assert set(range(1000, 3000)) <= set(left)

    restart_and_deliver_all(gateway, thingsboard, report)


def test_restart_with_queued_and_unsent_records(make_gateway: GatewayFactory,
                                                thingsboard: FakeThingsBoard,
                                                queue_writer: QueueWriter,
                                                report: Report) -> None:
    """The cloud is down for a whole run: records wait in the outbox across a restart."""
    gateway = make_gateway(STREAM_CONFIG)
    gateway.start()
    wait_connected(thingsboard, gateway)
    stop_cloud(thingsboard)
    wait_cloud_lost(gateway)
    queue_writer.write(make_records(5000))
    wait_until(lambda: queue_writer.pending() == 0, "the gateway takes the records", gateway)
    assert gateway.stop() == 0
    assert_clean_log(gateway)

    restart_cloud(thingsboard)
    gateway.start()
    result = wait_delivered(thingsboard, range(5000), gateway)
    report(f"outage across a restart: {result.describe()}")
    assert result.duplicates == 0
    assert result.unexpected == []
    assert gateway.stop() == 0
    assert_clean_log(gateway)


def test_damaged_outbox_at_start_is_salvaged(make_gateway: GatewayFactory, *,
                                             thingsboard: FakeThingsBoard,
                                             queue_writer: QueueWriter, data_dir: Path,
                                             report: Report) -> None:
    """Records wait in the outbox (cloud down), a page of the file is then damaged: on the
    next start every record that can still be read is sent; only the damaged page's are
    missing."""
    total = 5000
    gateway = make_gateway()
    gateway.start()
    wait_connected(thingsboard, gateway)
    stop_cloud(thingsboard)
    wait_cloud_lost(gateway)
    queue_writer.write(make_records(total))
    wait_until(lambda: queue_writer.pending() == 0, "the gateway takes the records", gateway)
    assert gateway.stop() == 0
    path = data_dir / "outbox.db"
    data = path.read_bytes()
    offset = data.find(f'"seq":{total // 2},'.encode())
    assert offset > 0
    page = offset // 4096
    on_page = {int(m) for m in re.findall(rb'"seq":(\d+),', data[page * 4096:(page + 1) * 4096])}
    with path.open("r+b") as fh:
        fh.seek(page * 4096)
        fh.write(b"\xa5" * 4096)

    restart_cloud(thingsboard)
    gateway.start()
    expected = sorted(set(range(total)) - on_page)
    result = wait_delivered(thingsboard, expected, gateway)
    wait_until(lambda: any("salvaged" in str(r["values"].get("gateway_problem", ""))
                           for r in thingsboard.telemetry()),
               "telemetry gateway_problem reports the salvage", gateway)

    got = set(thingsboard.telemetry_values("seq"))
    report(f"damaged outbox: {result.describe()}; {len(on_page)} records were on the damaged "
           f"page, {len(on_page & got)} of them arrived anyway")
    assert result.unexpected == []
    assert result.duplicates == 0
    assert gateway.stop() == 0
    assert_clean_log(gateway)


def test_outbox_quota_drops_oldest_and_reports_it(make_gateway: GatewayFactory, *,
                                                  thingsboard: FakeThingsBoard,
                                                  queue_writer: QueueWriter, data_dir: Path,
                                                  report: Report) -> None:
    """Over its quota (cloud down), the outbox drops the oldest telemetry: counted in
    records_dropped, reported, kept in the archive; everything newer is sent."""
    total = 10_000
    gateway = make_gateway({"outbox": {"quota_mb": 0.25}})
    gateway.start()
    wait_connected(thingsboard, gateway)
    stop_cloud(thingsboard)
    wait_cloud_lost(gateway)
    for first in range(0, total, 500):
        queue_writer.write(make_records(500, start_seq=first))
        wait_until(lambda: queue_writer.pending() == 0, "the gateway takes the records",
                   gateway)
    wait_until(lambda: query(data_dir / "outbox.db", "SELECT value FROM counters "
                             "WHERE name = 'records_dropped'") not in ([], [(0,)]),
               "the outbox drops its oldest records", gateway)
    restart_cloud(thingsboard)

    wait_until(lambda: any(h["records_dropped"] > 0 and h["outbox_depth"] <= 2
                           for h in health_records(thingsboard)),
               "health reports the dropped records and an empty outbox", gateway)
    dropped = max(h["records_dropped"] for h in health_records(thingsboard))
    # The gateway's own telemetry (its log records) is dropped too, so records_dropped
    # may count a few more than controller records.
    first_kept = min(thingsboard.telemetry_values("seq"))
    result = wait_delivered(thingsboard, range(first_kept, total), gateway)
    got = set(thingsboard.telemetry_values("seq"))
    report(f"quota: {dropped} oldest dropped, of them {first_kept} controller records; "
           f"{result.describe()}")
    assert 0 < first_kept <= dropped < total
    assert got == set(range(first_kept, total)), "exactly the oldest were dropped"
    assert result.duplicates == 0
    archived = query(data_dir / "archive.db", "SELECT count(*) FROM records")
    assert archived == [(total,)], "dropped records stay in the archive"
    assert gateway.stop() == 0
    assert_clean_log(gateway)


def test_damaged_controller_queue_is_reported_and_leaves_the_stores_alone(
        make_gateway: GatewayFactory, thingsboard: FakeThingsBoard, data_dir: Path,
        report: Report) -> None:
    """The controller's queue file is garbage: that is reported (once a minute), the
    gateway's own databases are not reopened again and again, and once the controller
    starts a new queue file its records flow."""
    queue_path = data_dir / "communication_queue.db"
    queue_path.write_bytes(b"not a database " * 1000)
    gateway = make_gateway()
    gateway.start()
    wait_connected(thingsboard, gateway)
    wait_until(lambda: len(health_records(thingsboard)) >= 3, "three health records", gateway)
    wait_until(lambda: any("controller queue database" in r["message"]
                           for r in log_records(thingsboard)), "the error reported", gateway)
    errors = [r for r in log_records(thingsboard) if r["severity"] == "ERROR"]

    report(f"damaged queue: {len(errors)} ERROR record(s) sent: {errors[0]['message'][:100]!r}")
    # Reported once (not at every poll): the ERROR record an operator reads.
    assert len([r for r in errors if "controller queue database" in r["message"]]) == 1
    # Nothing but the log shows a needless reopening of the gateway's own stores.
    assert "checking the files" not in gateway.log_text(), "own stores reopened needlessly"
    assert list(data_dir.glob("*.corrupt-*")) == []

    queue_path.unlink()
    with QueueWriter(data_dir) as writer:
        writer.write(make_records(1000))
        result = wait_delivered(thingsboard, range(1000), gateway)
    assert result.duplicates == 0
    assert gateway.stop() == 0
    assert_clean_log(gateway)


def test_sigterm_mid_stream_drains_and_restart_loses_nothing(make_gateway: GatewayFactory,
                                                             thingsboard: FakeThingsBoard,
                                                             queue_writer: QueueWriter,
                                                             data_dir: Path,
                                                             report: Report) -> None:
    """SIGTERM while records flow: publishes in flight are acknowledged before the exit
    (so nothing is sent twice), the rest waits in the outbox or the queue for the next
    start."""
    total = 20_000
    gateway = make_gateway(STREAM_CONFIG)
    gateway.start()
    wait_connected(thingsboard, gateway)
    with Stream(queue_writer, total, chunk=200, pause_s=0.02):
        wait_until(lambda: received_count(thingsboard) >= 5000, "5000 records arrive", gateway)
        assert gateway.stop() == 0
        left = outbox_seqs(data_dir)
        gateway.start()
    result = wait_delivered(thingsboard, range(total), gateway)

    report(f"SIGTERM mid-stream ({len(left)} records left in the outbox): {result.describe()}")
    assert result.unexpected == []
    assert result.duplicates == 0
    assert gateway.stop() == 0
    assert_clean_log(gateway)
