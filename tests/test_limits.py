"""Session limits and pacing, on a fake clock: the arithmetic ThingsBoard's buckets do."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from teg_gateway.cloud import limits as limits_module
from teg_gateway.cloud.limits import (
    Bucket,
    LimitsError,
    Pacer,
    SessionLimits,
    Window,
    parse_rate_limit,
)
from teg_gateway.config import ConfigError, load_settings


@pytest.fixture
def no_latency(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bucket arithmetic alone, without the allowance for a publish in transit."""
    monkeypatch.setattr(limits_module, "LATENCY_ALLOWANCE_S", 0.0)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.mark.parametrize(("text", "windows"), [
    ("", ()),
    ("60:1", (Window(60, 1.0),)),
    ("1800:60, 60:1", (Window(60, 1.0), Window(1800, 60.0))),
    ("100:1,3000:60,7000:3600,", (Window(100, 1.0), Window(3000, 60.0),
                                  Window(7000, 3600.0))),
])
def test_parse_rate_limit(text: str, windows: tuple[Window, ...]) -> None:
    assert parse_rate_limit(text) == windows


@pytest.mark.parametrize("text", ["60", "60:", ":1", "a:1", "60:1.5", "0:1", "5:0", "-1:1",
                                  "60;1", "1:1:1"])
def test_parse_rate_limit_refuses_nonsense(text: str) -> None:
    with pytest.raises(LimitsError):
        parse_rate_limit(text)


def test_configured_limits_are_validated_with_the_setting_named(tmp_path: Any) -> None:
    settings = load_settings(env={"TEG_DATA_PATH": str(tmp_path)}, flags={
        "thingsboard.rate_limits_messages": "60:1,1800:60"})
    assert settings.thingsboard.rate_limits_messages == "60:1,1800:60"
    with pytest.raises(ConfigError, match=r"thingsboard\.rate_limits_telemetry_data_points: "
                                          r"'400:x' is not N:S"):
        load_settings(env={"TEG_DATA_PATH": str(tmp_path)}, flags={
            "thingsboard.rate_limits_telemetry_data_points": "400:x"})
    with pytest.raises(ConfigError, match=r"thingsboard\.max_payload_bytes"):
        load_settings(env={"TEG_DATA_PATH": str(tmp_path)},
                      flags={"thingsboard.max_payload_bytes": "10"})


@pytest.mark.usefixtures("no_latency")
def test_bucket_starts_full_and_refills_continuously_in_every_window() -> None:
    clock = FakeClock()
    bucket = Bucket(parse_rate_limit("10:1,30:60"), clock())
    assert bucket.delay(10, clock()) == 0
    bucket.take(10, clock())
    # The 1 s window refills at 10/s, the 60 s window at 0.5/s: both must hold the token.
    assert bucket.delay(1, clock()) == pytest.approx(0.1)
    clock.advance(1.0)
    assert bucket.delay(10, clock()) == 0
    bucket.take(10, clock())
    clock.advance(1.0)
    bucket.take(10, clock())
    clock.advance(0.2)
    # 30 taken from the 60 s window in 2.2 s: it has refilled 1.1 tokens since.
    assert bucket.delay(1, clock()) == 0
    bucket.take(1, clock())
    assert bucket.delay(1, clock()) == pytest.approx(0.9 / 0.5)
    # More than a window holds can never be taken.
    assert bucket.delay(11, clock()) == math.inf
    assert bucket.largest_take() == 10
    assert bucket.rate == 0.5


@pytest.mark.usefixtures("no_latency")
def test_the_pacer_keeps_a_reserve_of_messages_for_operations() -> None:
    clock = FakeClock()
    pacer = Pacer(clock)
    pacer.apply(SessionLimits(messages=parse_rate_limit("10:1")))
    sent = 0
    while pacer.outbox_delay(telemetry=False, points=0) == 0:
        pacer.take_outbox(telemetry=False, points=0)
        sent += 1
    # Telemetry leaves a fifth of the window (2 messages) to operations...
    assert sent == 8
    assert pacer.operation_delay() == 0
    pacer.take_operation()
    pacer.take_operation()
    # ...which may use the window to the last token, then wait like everyone.
    assert pacer.operation_delay() == pytest.approx(0.1)


@pytest.mark.usefixtures("no_latency")
def test_telemetry_waits_for_every_kind_of_token() -> None:
    clock = FakeClock()
    pacer = Pacer(clock)
    pacer.apply(SessionLimits(messages=parse_rate_limit("60:1"),
                              telemetry_messages=parse_rate_limit("2:1"),
                              telemetry_data_points=parse_rate_limit("100:1,200:60")))
    assert pacer.max_points() == 100
    pacer.take_outbox(telemetry=True, points=100)
    # The 1 s data-point window is empty: 50 points take half a second.
    assert pacer.outbox_delay(telemetry=True, points=50) == pytest.approx(0.5)
    clock.advance(1.0)
    pacer.take_outbox(telemetry=True, points=100)
    # Two telemetry messages in the window of one second, and the 60 s window of data
    # points is nearly used up: it refills at 200/60 points a second.
    clock.advance(0.01)
    assert pacer.outbox_delay(telemetry=True, points=10) == pytest.approx(
        (10 - 200 / 60 * 1.01) / (200 / 60), rel=0.01)
    # Attributes from the outbox need no telemetry tokens.
    assert pacer.outbox_delay(telemetry=False, points=0) == 0


@pytest.mark.usefixtures("no_latency")
def test_buckets_survive_a_reconnect_and_a_changed_limit_starts_empty() -> None:
    clock = FakeClock()
    pacer = Pacer(clock)
    limits = SessionLimits(telemetry_data_points=parse_rate_limit("400:1,6000:60"))
    pacer.apply(limits)
    pacer.take_outbox(telemetry=True, points=400)
    # The same limits after a reconnect: the server's buckets are per device, ours too.
    pacer.apply(limits)
    assert pacer.outbox_delay(telemetry=True, points=400) == pytest.approx(1.0)
    # Lowered limits: the new buckets fill from empty, so a lowered server is never overrun.
    pacer.apply(SessionLimits(telemetry_data_points=parse_rate_limit("100:1")))
    assert pacer.outbox_delay(telemetry=True, points=100) == pytest.approx(1.0)
    # Limits removed: nothing waits.
    pacer.apply(SessionLimits())
    assert pacer.outbox_delay(telemetry=True, points=100000) == 0
    assert pacer.max_points() is None


def test_a_take_from_a_full_window_allows_for_the_publish_in_transit() -> None:
    """The server's window stays full until the publish arrives: the refill it could not
    store meanwhile is lost to it, so it is taken from the gateway's copy too."""
    clock = FakeClock()
    bucket = Bucket(parse_rate_limit("50:1"), clock())
    bucket.take(50, clock())
    allowance = limits_module.LATENCY_ALLOWANCE_S
    assert bucket.delay(50, clock()) == pytest.approx(1.0 + allowance)
    # From a window that is not full, nothing more is taken: the server refills as we do.
    clock.advance(1.0)
    # 25 tokens now: taking 10 leaves 15, and the window is not full before 0.7 s.
    bucket.take(10, clock())
    assert bucket.delay(35, clock()) == pytest.approx(0.4)


def test_a_cut_empties_the_buckets() -> None:
    clock = FakeClock()
    pacer = Pacer(clock)
    pacer.apply(SessionLimits(messages=parse_rate_limit("60:1,1800:60")))
    pacer.cut()
    assert pacer.outbox_delay(telemetry=False, points=0) > 0
    assert pacer.operation_delay() == pytest.approx(1 / 30)


def test_payload_and_inflight_limits() -> None:
    pacer = Pacer(FakeClock())
    assert pacer.payload_limit("v1/devices/me/telemetry", 49152) == 49152
    assert pacer.max_inflight(8) == 8
    pacer.apply(SessionLimits(max_payload_size=8192, max_inflight=3))
    room = pacer.payload_limit("v1/devices/me/telemetry", 49152)
    # Room for the MQTT header: the topic and the packet id.
    assert room == 8192 - len("v1/devices/me/telemetry") - 8
    assert pacer.max_inflight(8) == 3
    assert pacer.max_inflight(2) == 2


def test_session_limits_from_an_answer() -> None:
    answer = {"maxPayloadSize": 8192, "maxInflightMessages": 100,
              "rateLimits": {"messages": "60:1,1800:60", "telemetryMessages": "20:1,600:60",
                             "telemetryDataPoints": "400:1,6000:60"}}
    limits = SessionLimits.from_answer(answer)
    assert limits.max_payload_size == 8192
    assert limits.max_inflight == 100
    assert limits.telemetry_data_points == (Window(400, 1.0), Window(6000, 60.0))
    assert limits.source == "server"
    assert limits.problems == ()
    assert limits.shortest_period_s == 1.0
    assert limits.describe()["rateLimits"] == answer["rateLimits"]
    # Missing or empty means no limit.
    empty = SessionLimits.from_answer({"rateLimits": {"messages": ""}})
    assert empty == SessionLimits(source="server")
    assert empty.shortest_period_s == 0.0


@pytest.mark.parametrize("answer", [
    None, [], "text", 5, {"maxPayloadSize": "big"}, {"maxPayloadSize": -1},
    {"maxInflightMessages": True}, {"rateLimits": []}, {"rateLimits": {"messages": 5}},
    {"rateLimits": {"messages": "5:x"}}, {"maxPayloadSize": 1.5},
])
def test_a_strange_answer_means_no_limit_for_what_cannot_be_read(answer: Any) -> None:
    limits = SessionLimits.from_answer(answer)
    assert limits.problems
    assert all(len(problem) <= 200 for problem in limits.problems)
    json.dumps(limits.describe())


@pytest.mark.parametrize(("answer", "understood"), [
    ({"maxPayloadSize": 65536}, True), ({"rateLimits": {}}, True),
    ({"maxInflightMessages": None}, True), ({"error": "unknown method"}, False), ({}, False),
    ("text", False), (None, False), ([{"rateLimits": {}}], False),
])
def test_an_answer_that_is_not_session_limits_is_told_apart(answer: Any,
                                                            understood: bool) -> None:
    """A server whose rule chain answers the RPC with something else: the gateway then uses
    its configured limits rather than none at all."""
    assert SessionLimits.understood(answer) is understood


def test_records_rate_allowed() -> None:
    pacer = Pacer(FakeClock())
    assert pacer.records_per_s(2.0, 100.0) is None
    pacer.apply(SessionLimits(telemetry_messages=parse_rate_limit("20:1,600:60"),
                              telemetry_data_points=parse_rate_limit("400:1,6000:60")))
    # 100 points/s at 2 points per record, or 10 messages/s of 100 records.
    assert pacer.records_per_s(2.0, 100.0) == pytest.approx(50.0)
    assert pacer.records_per_s(2.0, 1.0) == pytest.approx(10.0)
