"""Delivery into a rate-limited ThingsBoard: the real gateway process against the stand-in
server over TLS, which closes the connection without PUBACK on any violation, as
ThingsBoard does.

Figures (how long a drain took against what the limits allow, RPC round trips) are
printed with each run; the tests assert outcomes: every record arrives exactly once and
the server never had to close the connection.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import GatewayFactory
from teg_gateway.cloud.limits import parse_rate_limit
from teg_gateway.sandbox.certs import Pki
from teg_gateway.sandbox.controller import QueueWriter
from teg_gateway.sandbox.process import GatewayProcess
from teg_gateway.sandbox.thingsboard import FakeThingsBoard, Limits
from test_forwarding import Report, delivery, wait_connected, wait_delivered, wait_until

# The limits of the acceptance scenario: a tenant profile of a ThingsBoard Cloud size.
MESSAGES = "60:1,1800:60"
TELEMETRY_MESSAGES = "20:1,600:60"
DATA_POINTS = "400:1,6000:60"
MAX_PAYLOAD = 8192
LIMITED = Limits(messages=MESSAGES, telemetry_messages=TELEMETRY_MESSAGES,
                 telemetry_data_points=DATA_POINTS, max_payload_size=MAX_PAYLOAD)
# Health every few seconds (its data points count too), nothing else of the fast config's
# chattiness.
CONFIG: dict[str, dict[str, Any]] = {"health": {"interval_s": 5.0}}


@pytest.fixture
def limited(pki: Pki) -> Iterator[FakeThingsBoard]:
    with FakeThingsBoard(pki, limits=LIMITED) as tb:
        yield tb


def records(count: int, start: int = 0) -> list[tuple[str, str]]:
    """Rows of two data points each (``seq`` and ``co2``)."""
    base = int(time.time() * 1000)
    return [("telemetry", json.dumps({"ts": base + i, "values": {"seq": i, "co2": 400 + i % 97}}))
            for i in range(start, start + count)]


def allowed_seconds(points: int, spec: str) -> float:
    """How long ``points`` take at the most under continuously refilled buckets that
    start full."""
    return max(max(0.0, (points - w.capacity) / w.rate) for w in parse_rate_limit(spec))


def points_received(tb: FakeThingsBoard) -> int:
    return sum(len(r["values"]) for r in tb.telemetry())


def rpc_round_trip(tb: FakeThingsBoard, method: str = "ping") -> float:
    started = time.monotonic()
    tb.rpc(method, timeout=10.0)
    return time.monotonic() - started


def gateway_for(make_gateway: GatewayFactory, tb: FakeThingsBoard,
                config: dict[str, dict[str, Any]] | None = None) -> GatewayProcess:
    env = {"TB_HOST": tb.tls_hostname, "TB_PORT": str(tb.tls_port)}
    return make_gateway({**CONFIG, **(config or {})}, env=env)


def start_draining(make_gateway: GatewayFactory, tb: FakeThingsBoard, data_dir: Path,
                   count: int, under_way: int) -> GatewayProcess:
    """A backlog of ``count`` records in the queue, a gateway started on it; returns once
    ``under_way`` records arrived."""
    with QueueWriter(data_dir) as writer:
        writer.write(records(count))
    gateway = gateway_for(make_gateway, tb)
    gateway.start()
    wait_connected(tb, gateway)
    wait_until(lambda: tb.record_count > under_way, "the drain is under way", gateway)
    return gateway


def test_a_backlog_drains_within_the_limits_without_a_cut(
        make_gateway: GatewayFactory, limited: FakeThingsBoard, data_dir: Path,
        report: Report) -> None:
    count = 5000
    gateway = start_draining(make_gateway, limited, data_dir, count, under_way=500)

    # An RPC in the middle of the drain goes ahead of the telemetry backlog.
    round_trips = [rpc_round_trip(limited) for _ in range(3)]

    result = wait_delivered(limited, range(count), gateway, timeout=150.0)
    times = limited.receive_times_ms()
    elapsed = (times[-1] - times[0]) / 1000
    allowed = allowed_seconds(points_received(limited), DATA_POINTS)
    assert result.duplicates == 0
    assert limited.rate_limit_closes == 0, limited.closes
    assert limited.oversize_closes == 0, limited.closes
    assert [r["method"] for r in limited.client_rpc_requests][:1] == ["getSessionLimits"]
    health = [r["values"] for r in limited.telemetry() if "outbox_eta_s" in r["values"]]
    assert any(h["rate_limited_ms"] > 0 for h in health)
    assert any(h["outbox_eta_s"] > 0 for h in health)
    assert limited.client_attributes["session_limits"]["rateLimits"] == {
        "messages": MESSAGES, "telemetryMessages": TELEMETRY_MESSAGES,
        "telemetryDataPoints": DATA_POINTS}
    report(f"backlog of {count} records (2 data points each) under {DATA_POINTS} data "
           f"points, {TELEMETRY_MESSAGES} telemetry messages, {MAX_PAYLOAD} bytes: "
           f"{result.describe()}; {elapsed:.1f} s where the limits allow {allowed:.1f} s "
           f"(x{elapsed / allowed:.2f}); {limited.publish_count} publishes, 0 cuts; "
           f"RPC ping during the drain: {', '.join(f'{t * 1000:.0f} ms' for t in round_trips)}")


def test_configured_limits_serve_a_server_that_does_not_say(
        make_gateway: GatewayFactory, pki: Pki, data_dir: Path, report: Report) -> None:
    data_points = "300:1,1000:10"
    limits = Limits(telemetry_messages="10:1", telemetry_data_points=data_points,
                    max_payload_size=4096)
    with FakeThingsBoard(pki, limits=limits) as tb:
        tb.answer_session_limits = False
        count = 1000
        with QueueWriter(data_dir) as writer:
            writer.write(records(count))
        gateway = gateway_for(make_gateway, tb, {"thingsboard": {
            "rate_limits_telemetry_messages": "10:1",
            "rate_limits_telemetry_data_points": data_points, "max_payload_bytes": 4096}})
        gateway.start()
        result = wait_delivered(tb, range(count), gateway, timeout=90.0)
        assert result.duplicates == 0
        assert tb.rate_limit_closes == 0, tb.closes
        assert tb.oversize_closes == 0, tb.closes
        described = tb.client_attributes["session_limits"]
        assert described["source"] == "config"
        assert described["rateLimits"]["telemetryDataPoints"] == data_points
        times = tb.receive_times_ms()
        elapsed = (times[-1] - times[0]) / 1000
        allowed = allowed_seconds(points_received(tb), data_points)
        report(f"configured limits, silent server: {result.describe()}, {elapsed:.1f} s "
               f"where the limits allow {allowed:.1f} s, 0 cuts")
        status = subprocess.run(
            [sys.executable, "-m", "teg_gateway", "--data-path", str(data_dir), "status"],
            capture_output=True, text=True, timeout=30, check=False)
        assert "session limits:" in status.stdout
        assert f"data points {data_points}" in status.stdout


def test_lowered_limits_are_followed_after_at_most_one_cut(
        make_gateway: GatewayFactory, pki: Pki, data_dir: Path, report: Report) -> None:
    lowered = "3:1,100:60"
    with FakeThingsBoard(pki, limits=Limits()) as tb:
        gateway = gateway_for(make_gateway, tb)
        gateway.start()
        wait_connected(tb, gateway)
        stop = threading.Event()
        written: list[int] = []

        def feed() -> None:
            # 100 records/s in small commits: about ten publishes a second.
            with QueueWriter(data_dir) as writer:
                seq = 0
                while not stop.is_set():
                    writer.write(records(10, seq))
                    written.extend(range(seq, seq + 10))
                    seq += 10
                    time.sleep(0.1)

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        try:
            wait_until(lambda: tb.record_count > 200, "records flow unlimited", gateway)
            # The operator lowers the limits below what the gateway sends now.
            tb.set_limits(telemetry_messages=lowered)
            wait_until(lambda: tb.client_attributes.get("session_limits", {}).get(
                "rateLimits", {}).get("telemetryMessages") == lowered,
                "the gateway asked the new limits", gateway, timeout=60.0)
            cuts_after_following = tb.rate_limit_closes
            time.sleep(8.0)
        finally:
            stop.set()
            feeder.join()
        result = wait_delivered(tb, written, gateway, timeout=120.0)
        assert cuts_after_following <= 1, tb.closes
        assert tb.rate_limit_closes == cuts_after_following, tb.closes
        health = [r["values"] for r in tb.telemetry() if "rate_limit_disconnects" in r["values"]]
        assert health[-1]["rate_limit_disconnects"] == cuts_after_following
        report(f"limits lowered to {lowered} telemetry messages under a 100 records/s feed: "
               f"{tb.rate_limit_closes} cut(s), {tb.connection_count} connections, "
               f"{result.describe()}")


def test_a_record_the_server_can_never_take_is_a_dead_letter(
        make_gateway: GatewayFactory, pki: Pki, data_dir: Path, report: Report) -> None:
    """Fits the gateway's own limit, not the server's: it is set aside with the reason
    and everything behind it arrives, without a cut."""
    with FakeThingsBoard(pki, limits=Limits(max_payload_size=4096,
                                            telemetry_data_points="50:1")) as tb:
        big = json.dumps({"ts": 1, "values": {"seq": 100000, "pad": "x" * 10000}})
        wide = json.dumps({"ts": 2, "values": {"seq": 100001,
                                               **{f"k{i}": i for i in range(60)}}})
        with QueueWriter(data_dir) as writer:
            writer.write([*records(100), ("telemetry", big), ("telemetry", wide),
                          *records(100, 100)])
        gateway = gateway_for(make_gateway, tb)
        gateway.start()
        result = wait_delivered(tb, range(200), gateway, timeout=60.0)
        assert delivery(tb, [100000, 100001]).missing == [100000, 100001]
        assert tb.closes == []
        conn = sqlite3.connect(data_dir / "outbox.db")
        reasons = [r for (r,) in conn.execute("SELECT reason FROM dead_letter ORDER BY id")]
        conn.close()
        assert len(reasons) == 2
        assert "maxPayloadSize" in reasons[0]
        assert "61 data points" in reasons[1]
        report(f"records the server can never take: {result.describe()}; dead letters: "
               f"{reasons}")


def test_client_side_rpc_is_not_taken_for_a_command(
        make_gateway: GatewayFactory, thingsboard: FakeThingsBoard) -> None:
    gateway = make_gateway()
    gateway.start()
    wait_connected(thingsboard, gateway)
    wait_until(lambda: "session_limits" in thingsboard.client_attributes,
               "the limits are published", gateway)
    assert [r["method"] for r in thingsboard.client_rpc_requests] == ["getSessionLimits"]
    # The server's own RPC ids start at 1 too: the device answers the server's request 1,
    # and never answers its own request as if it were a command.
    assert thingsboard.rpc("ping")
    # Its answer to itself would share the id of the server's request: only the log can
    # tell that no "unknown method" error was made of it.
    assert "unknown method" not in gateway.log_text()


def test_a_gateway_killed_while_it_sends_rows_record_by_record_loses_nothing(
        make_gateway: GatewayFactory, pki: Pki, data_dir: Path, report: Report) -> None:
    """A server whose payloads are smaller than an outbox row and which limits data points:
    every row goes out record by record, in several publishes. The gateway is killed
    (SIGKILL) in the middle, with rows partly acknowledged; after its restart every record
    arrives (those acknowledged before the kill may arrive twice, none is lost)."""
    count = 3000
    limits = Limits(telemetry_data_points="1500:1", max_payload_size=1024)
    with FakeThingsBoard(pki, limits=limits) as tb:
        gateway = start_draining(make_gateway, tb, data_dir, count, under_way=700)
        gateway.kill()
        before_kill = tb.record_count

        gateway.start()
        result = wait_delivered(tb, range(count), gateway, timeout=120.0)
        assert result.unexpected == []
        assert tb.rate_limit_closes == 0, tb.closes
        assert tb.oversize_closes == 0, tb.closes
        payloads = tb.publish_count
        assert gateway.stop() == 0
    conn = sqlite3.connect(data_dir / "outbox.db")
    try:
        left = conn.execute("SELECT count(*) FROM outbox WHERE kind = 0").fetchone()[0]
    finally:
        conn.close()
    assert left == 0
    report(f"killed after {before_kill} of {count} records arrived, rows split into "
           f"publishes of at most 1,024 bytes: {result.describe()}; {payloads} publishes")
