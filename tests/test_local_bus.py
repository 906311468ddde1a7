"""The local MQTT bus (thin-edge.io topic scheme): the mapping as pure functions, then a real
gateway process against a real mosquitto playing the device's own broker.

The helpers here (``BusClient``, ``retained``, ``local_config``) are shared with
test_restart.py and test_rpc.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

from conftest import GatewayFactory, needs_mosquitto
from teg_gateway.local import topics
from teg_gateway.local.bus import HEALTH_CHECK_TOPIC, HEALTH_TOPIC, SERVICE_TOPIC
from teg_gateway.local.topics import Mapped, MappingError, Topic, map_message, parse
from teg_gateway.sandbox.broker import Mosquitto
from teg_gateway.sandbox.controller import QueueWriter
from teg_gateway.sandbox.process import GatewayProcess
from teg_gateway.sandbox.thingsboard import FakeThingsBoard
from test_forwarding import WAIT, wait_connected, wait_until

# -- helpers shared with test_restart.py and test_rpc.py -----------------------------------

MessageHook = Callable[[str, bytes], None]


def local_config(local: Mosquitto) -> dict[str, dict[str, Any]]:
    """Settings that point the gateway at ``local`` and make it reconnect quickly."""
    return {"local_mqtt": {"enabled": True, "host": local.host, "port": local.plain_port,
                           "reconnect_max_s": 1.0}}


def _client(client_id: str) -> mqtt.Client:
    return mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                       protocol=MQTTProtocolVersion.MQTTv311)


class BusClient:
    """A paho client on the local broker that records every message it receives, in order.

    ``hook`` runs on paho's thread for each message, as soon as it arrives (before it is
    recorded), so a test can look at the world at that instant.
    """

    def __init__(self, broker: Mosquitto, subscriptions: Sequence[str] = (),
                 hook: MessageHook | None = None) -> None:
        self.broker = broker
        self.subscriptions = list(subscriptions)
        self.hook = hook
        self.messages: list[tuple[str, bytes]] = []
        self._changed = threading.Condition()
        self._subacks: set[int] = set()
        self.client = _client(f"test-bus-{uuid.uuid4().hex[:10]}")
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        payload = bytes(msg.payload)
        if self.hook is not None:
            self.hook(msg.topic, payload)
        with self._changed:
            self.messages.append((msg.topic, payload))
            self._changed.notify_all()

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, mid: int, _rc: list[ReasonCode],
                      _p: Any) -> None:
        with self._changed:
            self._subacks.add(mid)
            self._changed.notify_all()

    def start(self) -> BusClient:
        self.client.connect(self.broker.host, self.broker.plain_port, keepalive=30)
        self.client.loop_start()
        for topic in self.subscriptions:
            self.subscribe(topic)
        return self

    def subscribe(self, topic: str) -> None:
        _rc, mid = self.client.subscribe(topic, qos=1)
        with self._changed:
            assert self._changed.wait_for(lambda: mid in self._subacks, WAIT), \
                f"no SUBACK for {topic}"

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> BusClient:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def publish(self, topic: str, payload: bytes | str | dict[str, Any],
                retain: bool = False) -> None:
        """Publish with QoS 1 and wait until the broker acknowledged it."""
        data = json.dumps(payload).encode() if isinstance(payload, dict) else payload
        info = self.client.publish(topic, data, qos=1, retain=retain)
        info.wait_for_publish(WAIT)
        assert info.is_published(), f"publish to {topic} not acknowledged"

    def payloads(self, topic: str) -> list[bytes]:
        with self._changed:
            return [p for t, p in self.messages if t == topic]

    def documents(self, topic: str) -> list[Any]:
        """The payloads of ``topic`` decoded as JSON (an empty payload is None)."""
        return [json.loads(p) if p else None for p in self.payloads(topic)]

    def wait_for(self, predicate: Callable[[], bool], what: str,
                 gateway: GatewayProcess | None = None, timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    tail = f"\n--- gateway log ---\n{gateway.log_tail(60)}" if gateway else ""
                    raise AssertionError(f"not within {timeout:g} s: {what}; received on the "
                                         f"local bus: {self.messages}{tail}")
                self._changed.wait(min(remaining, 0.1))

    def wait_for_document(self, topic: str, predicate: Callable[[Any], bool], what: str,
                          gateway: GatewayProcess | None = None,
                          timeout: float = WAIT) -> Any:
        """Wait for a JSON payload on ``topic`` that satisfies ``predicate``; return it."""
        found: list[Any] = []

        def check() -> bool:
            found[:] = [d for d in self.documents(topic) if predicate(d)]
            return bool(found)

        self.wait_for(check, what, gateway, timeout)
        return found[0]


def retained(broker: Mosquitto, topic_filter: str) -> dict[str, bytes]:
    """Every retained message matching ``topic_filter`` now, by topic.

    mosquitto sends the retained messages of a subscription before it handles the next
    packet of the same client, so a message published to a private topic after the
    subscription marks the end of them: no waiting on the clock.
    """
    marker = f"test/marker/{uuid.uuid4().hex}"
    found: dict[str, bytes] = {}
    done = threading.Event()
    client = _client(f"test-retained-{uuid.uuid4().hex[:10]}")

    def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == marker:
            done.set()
        elif msg.retain:
            found[msg.topic] = bytes(msg.payload)

    client.on_message = on_message
    client.connect(broker.host, broker.plain_port, keepalive=30)
    client.loop_start()
    try:
        client.subscribe([(topic_filter, 1), (marker, 1)])
        client.publish(marker, b"end", qos=1)
        assert done.wait(WAIT), "the marker message did not come back"
    finally:
        client.disconnect()
        client.loop_stop()
    return found


@pytest.fixture
def local_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """The device's own broker: plain MQTT, no TLS (as on a thin-edge.io device)."""
    with Mosquitto(tmp_path / "local") as running:
        yield running


# -- the mapping (pure functions) ---------------------------------------------------------

MAIN = "te/device/main//"


def mapped(topic: str, payload: bytes | str | dict[str, Any]) -> Mapped | None:
    data = json.dumps(payload).encode() if isinstance(payload, dict) else (
        payload.encode() if isinstance(payload, str) else payload)
    parsed = parse(topic)
    assert parsed is not None, topic
    return map_message(parsed, data)


def test_parse_knows_the_main_device_and_its_services_only() -> None:
    assert parse(f"{MAIN}/m/env") == Topic(None, ("m", "env"))
    assert parse("te/device/main/service/pump/status/health") == Topic(
        "pump", ("status", "health"))
    assert parse(f"{MAIN}/cmd/restart/abc") == Topic(None, ("cmd", "restart", "abc"))
    assert parse("te/device/child01///m/env") is None     # a child device
    assert parse("te/device/main/other/x/m/env") is None  # not a service
    assert parse("te/device/main/service//m/env") is None  # a service without a name
    assert parse("te/device/main//") is None               # no channel
    assert parse("tedge/measurements") is None
    assert parse("v1/devices/me/telemetry") is None


def test_measurements_are_telemetry_flattened_with_the_time_as_ts() -> None:
    result = mapped(f"{MAIN}/m/env", {"temperature": 21.5, "pressure": {"in": 1, "out": 2},
                                      "time": "2024-01-02T03:04:05Z"})
    assert result == Mapped(telemetry={"temperature": 21.5, "pressure.in": 1,
                                       "pressure.out": 2}, ts_ms=1704164645000)
    assert mapped(f"{MAIN}/m/env", {"t": 1, "time": 1700000000.5}) == Mapped(
        telemetry={"t": 1}, ts_ms=1700000000500)
    assert mapped(f"{MAIN}/m/env", {"t": 1, "time": "2024-01-02T03:04:05.250+01:00"}) == \
        Mapped(telemetry={"t": 1}, ts_ms=1704161045250)
    assert mapped(f"{MAIN}/m/env", {"t": 1}) == Mapped(telemetry={"t": 1}, ts_ms=None)
    # The measurement type is not part of the keys; a service's keys get its prefix.
    assert mapped("te/device/main/service/pump/m/flow", {"rate": 3, "x": {"y": True}}) == \
        Mapped(telemetry={"pump.rate": 3, "pump.x.y": True})


@pytest.mark.parametrize(("payload", "reason"), [
    (b"not json", "measurement is not valid JSON"),
    (b"[1, 2]", "measurement is not a JSON object"),
    (b"", "measurement is not valid JSON"),
    (b'{"time": 1700000000}', "measurement has no values"),
    (b'{"t": 1, "time": "yesterday"}', "time 'yesterday' is not RFC 3339"),
    (b'{"t": 1, "time": true}', "time must be RFC 3339 text or Unix seconds"),
    (b'{"t": 1, "time": [1]}', "time must be RFC 3339 text or Unix seconds"),
    (b'{"t": 1, "time": NaN}', "time is not a finite number"),
])
def test_a_bad_measurement_is_refused_with_the_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(MappingError) as refused:
        mapped(f"{MAIN}/m/env", payload)
    assert str(refused.value) == reason


def test_events_are_telemetry_named_after_their_type() -> None:
    assert mapped(f"{MAIN}/e/door", {"text": "door open", "user": "ann", "where": {"floor": 2},
                                     "time": 1700000000}) == Mapped(
        telemetry={"event.door": "door open", "event.door.user": "ann",
                   "event.door.where.floor": 2}, ts_ms=1700000000000)
    # Without a text, the type is the text; an empty payload is an event too.
    assert mapped(f"{MAIN}/e/boot", {}) == Mapped(telemetry={"event.boot": "boot"})
    assert mapped(f"{MAIN}/e/boot", b"") == Mapped(telemetry={"event.boot": "boot"})
    assert mapped("te/device/main/service/pump/e/stall", {"text": "stalled"}) == Mapped(
        telemetry={"pump.event.stall": "stalled"})
    with pytest.raises(MappingError, match="event is not a JSON object"):
        mapped(f"{MAIN}/e/door", b'"open"')


def test_alarms_are_telemetry_with_status_severity_and_text() -> None:
    assert mapped(f"{MAIN}/a/overheat", {"text": "too hot", "severity": "critical",
                                         "temp": 99}) == Mapped(
        telemetry={"alarm.overheat.status": "active", "alarm.overheat.severity": "critical",
                   "alarm.overheat.text": "too hot", "alarm.overheat.temp": 99})
    assert mapped(f"{MAIN}/a/overheat", {}) == Mapped(telemetry={
        "alarm.overheat.status": "active", "alarm.overheat.severity": "major",
        "alarm.overheat.text": "overheat"})
    # An empty (retained) payload clears the alarm.
    assert mapped(f"{MAIN}/a/overheat", b"") == Mapped(
        telemetry={"alarm.overheat.status": "cleared"})
    assert mapped("te/device/main/service/pump/a/dry", b"") == Mapped(
        telemetry={"pump.alarm.dry.status": "cleared"})
    with pytest.raises(MappingError, match="alarm is not valid JSON"):
        mapped(f"{MAIN}/a/overheat", b"{")


def test_twin_fragments_are_client_attributes() -> None:
    assert mapped(f"{MAIN}/twin/location", {"lat": 1.5, "lon": 2}) == Mapped(
        attributes={"location": {"lat": 1.5, "lon": 2}})
    assert mapped(f"{MAIN}/twin/name", b'"kitchen"') == Mapped(attributes={"name": "kitchen"})
    assert mapped(f"{MAIN}/twin/name", b"") == Mapped(attributes={"name": None})
    assert mapped("te/device/main/service/pump/twin/model", b'"P1"') == Mapped(
        attributes={"pump.model": "P1"})
    with pytest.raises(MappingError, match="twin value is not valid JSON"):
        mapped(f"{MAIN}/twin/name", b"kitchen")


def test_service_health_is_telemetry_and_other_channels_are_not_forwarded() -> None:
    assert mapped("te/device/main/service/pump/status/health", {"status": "up", "pid": 7}) == \
        Mapped(telemetry={"service.pump.status": "up"})
    assert mapped("te/device/main/service/pump/status/health", b"") == Mapped(
        telemetry={"service.pump.status": "down"})
    with pytest.raises(MappingError, match="health status has no status text"):
        mapped("te/device/main/service/pump/status/health", {"status": 1})
    for topic in (f"{MAIN}/status/health", f"{MAIN}/cmd/restart", f"{MAIN}/cmd/restart/x",
                  f"{MAIN}/m/env/extra", f"{MAIN}/e", "te/device/main/service/pump/cmd/x/y"):
        assert mapped(topic, {"status": "up"}) is None, topic


def test_the_subscriptions_cover_what_is_mapped() -> None:
    """Every mapped channel of the main device and of a service is subscribed to."""
    subscribed = set(topics.SUBSCRIPTIONS)
    for kind in ("m", "e", "a", "twin"):
        assert f"{MAIN}/{kind}/+" in subscribed
        assert f"te/device/main/service/+/{kind}/+" in subscribed
    assert "te/device/main/service/+/status/health" in subscribed
    assert topics.command_topic("restart") == topics.RESTART_CAPABILITY
    assert topics.HEALTH_CHECK_ALL in subscribed


# -- the bus object on a real broker -------------------------------------------------------

@needs_mosquitto
def test_a_retained_health_is_forwarded_but_is_no_sign_of_life(local_broker: Mosquitto) -> None:
    """On every connect the broker sends its stored copy of a service's health again: that
    copy goes to ThingsBoard (once) but says nothing about the service now; a live
    message does. Health checks are asked for on the bus."""
    from teg_gateway.config import LocalMqttSettings
    from teg_gateway.local.bus import LocalBus

    pump = "te/device/main/service/pump/status/health"
    asked: list[str] = []
    with BusClient(local_broker, ["te/device/main/service/pump/cmd/health/check",
                                  topics.HEALTH_CHECK_ALL],
                   hook=lambda topic, _payload: asked.append(topic)) as device:
        device.publish(pump, {"status": "up"}, retain=True)  # from before the gateway
        signs: list[tuple[str, str]] = []
        forwarded: list[Mapped] = []

        async def main() -> None:
            settings = LocalMqttSettings(host=local_broker.host, port=local_broker.plain_port,
                                         reconnect_max_s=1.0)
            bus = LocalBus(settings, forwarded.append, [],
                           lambda name, status: signs.append((name, status)))
            task = asyncio.create_task(bus.run())
            try:
                await asyncio.wait_for(bus.connected.wait(), WAIT)
                await until(lambda: bool(forwarded), "the retained health forwarded")
                assert signs == []
                bus.request_health_check("pump")
                bus.request_health_check(None)
                await until(lambda: len(asked) == 2, "the health checks on the bus")
                await asyncio.to_thread(device.publish, pump, {"status": "up"}, True)
                await until(lambda: bool(signs), "the live health")
            finally:
                await bus.stop()
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

        asyncio.run(main())
    assert signs == [("pump", "up")]
    assert [m.telemetry for m in forwarded] == [{"service.pump.status": "up"}]  # not twice
    assert asked == ["te/device/main/service/pump/cmd/health/check", topics.HEALTH_CHECK_ALL]


async def until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        assert time.monotonic() < deadline, f"not within {WAIT} s: {what}"
        await asyncio.sleep(0.02)


# -- a real gateway on a real local broker ------------------------------------------------

REGISTRATION = {"@type": "service", "name": "teg-gateway", "type": "service"}


def is_up(doc: Any) -> bool:
    return isinstance(doc, dict) and doc.get("status") == "up"


def is_down(doc: Any) -> bool:
    return isinstance(doc, dict) and doc.get("status") == "down"


@needs_mosquitto
def test_registers_as_a_service_with_health_and_answers_health_checks(
        make_gateway: GatewayFactory, local_broker: Mosquitto) -> None:
    with BusClient(local_broker, [SERVICE_TOPIC, HEALTH_TOPIC]) as bus:
        gateway = make_gateway(config=local_config(local_broker))
        gateway.start()
        up = bus.wait_for_document(HEALTH_TOPIC, is_up, "health up", gateway)
        assert up["pid"] == gateway.pid
        assert isinstance(up["time"], float | int)
        bus.wait_for(lambda: bus.documents(SERVICE_TOPIC) == [REGISTRATION],
                     "the service registration", gateway)
        snapshot = retained(local_broker, "te/#")
        assert json.loads(snapshot[SERVICE_TOPIC]) == REGISTRATION
        assert is_up(json.loads(snapshot[HEALTH_TOPIC]))
        assert snapshot[topics.RESTART_CAPABILITY] == b"{}"

        # A health check of the service, and of every service of the main device.
        for check in (HEALTH_CHECK_TOPIC, topics.HEALTH_CHECK_ALL):
            answered = len(bus.payloads(HEALTH_TOPIC)) + 1
            bus.publish(check, b"{}")
            bus.wait_for(lambda: len(bus.payloads(HEALTH_TOPIC)) == answered,  # noqa: B023
                         f"an answer to the health check on {check}", gateway)
            assert is_up(bus.documents(HEALTH_TOPIC)[-1])

        assert gateway.stop() == 0
        bus.wait_for(lambda: is_down(bus.documents(HEALTH_TOPIC)[-1]),
                     "health down once the gateway stopped")
        assert is_down(json.loads(retained(local_broker, HEALTH_TOPIC)[HEALTH_TOPIC]))


@needs_mosquitto
def test_the_last_will_says_down_when_the_gateway_dies(make_gateway: GatewayFactory,
                                                        local_broker: Mosquitto) -> None:
    with BusClient(local_broker, [HEALTH_TOPIC]) as bus:
        gateway = make_gateway(config=local_config(local_broker))
        gateway.start()
        bus.wait_for_document(HEALTH_TOPIC, is_up, "health up", gateway)
        gateway.kill()
        bus.wait_for(lambda: is_down(bus.documents(HEALTH_TOPIC)[-1]),
                     "the last will: health down")
    assert is_down(json.loads(retained(local_broker, HEALTH_TOPIC)[HEALTH_TOPIC]))


def telemetry_with(thingsboard: FakeThingsBoard, key: str) -> list[dict[str, Any]]:
    return [r for r in thingsboard.telemetry() if key in r["values"]]


@needs_mosquitto
def test_main_device_and_service_data_reach_thingsboard(make_gateway: GatewayFactory,
                                                       thingsboard: FakeThingsBoard,
                                                       local_broker: Mosquitto) -> None:
    gateway = make_gateway(config=local_config(local_broker))
    gateway.start()
    wait_connected(thingsboard, gateway)
    with BusClient(local_broker, [HEALTH_TOPIC]) as bus:
        bus.wait_for_document(HEALTH_TOPIC, is_up, "health up", gateway)
        bus.publish(f"{MAIN}/m/env", {"temperature": 21.5, "inner": {"a": 1},
                                      "time": "2024-01-02T03:04:05Z"})
        bus.publish(f"{MAIN}/m/bad", b"not json")           # refused, logged
        bus.publish("te/device/child01///m/env", {"child_value": 1})  # not the main device
        bus.publish(f"{MAIN}/e/door", {"text": "door open", "user": "ann",
                                       "time": 1700000000})
        bus.publish(f"{MAIN}/a/overheat", {"text": "too hot", "severity": "critical"},
                    retain=True)
        bus.publish(f"{MAIN}/twin/location", {"lat": 1.5, "lon": 2}, retain=True)
        bus.publish("te/device/main/service/pump/m/flow", {"rate": 3})
        bus.publish("te/device/main/service/pump/status/health", {"status": "up"},
                    retain=True)
        # A repeat is a sign of life for supervision, but not news for ThingsBoard.
        bus.publish("te/device/main/service/pump/status/health", {"status": "up"},
                    retain=True)
        bus.publish(f"{MAIN}/m/sentinel", {"sentinel": 1})

        wait_until(lambda: bool(telemetry_with(thingsboard, "sentinel")),
                   "the measurements reach ThingsBoard", gateway)
        env = telemetry_with(thingsboard, "temperature")
        assert env == [{"ts": 1704164645000, "values": {"temperature": 21.5, "inner.a": 1}}]
        assert telemetry_with(thingsboard, "event.door") == [
            {"ts": 1700000000000, "values": {"event.door": "door open",
                                             "event.door.user": "ann"}}]
        assert [r["values"] for r in telemetry_with(thingsboard, "alarm.overheat.status")] == [
            {"alarm.overheat.status": "active", "alarm.overheat.severity": "critical",
             "alarm.overheat.text": "too hot"}]
        assert [r["values"] for r in telemetry_with(thingsboard, "pump.rate")] == [
            {"pump.rate": 3}]
        assert thingsboard.telemetry_values("service.pump.status") == ["up"]
        assert not telemetry_with(thingsboard, "child_value")
        wait_until(lambda: thingsboard.client_attributes.get("location") == {
            "lat": 1.5, "lon": 2}, "the twin value as a client attribute", gateway)
        # Bad input has no outcome but the one clear line an operator reads.
        gateway.wait_for_log("local message on te/device/main///m/bad refused: measurement "
                             "is not valid JSON")

        # Clearing an alarm and a twin value (empty retained payloads).
        bus.publish(f"{MAIN}/a/overheat", b"", retain=True)
        bus.publish(f"{MAIN}/twin/location", b"", retain=True)
        wait_until(lambda: thingsboard.telemetry_values("alarm.overheat.status")
                   == ["active", "cleared"], "the alarm is cleared", gateway)
        wait_until(lambda: "location" in thingsboard.client_attributes
                   and thingsboard.client_attributes["location"] is None,
                   "the twin value is removed", gateway)


@needs_mosquitto
def test_retained_values_are_forwarded_once_across_reconnects(make_gateway: GatewayFactory,
                                                              thingsboard: FakeThingsBoard,
                                                              local_broker: Mosquitto) -> None:
    """A takeover of the gateway's local session makes it reconnect: the retained alarm and
    twin value come again and are not forwarded again; its health ends up "up"."""
    with BusClient(local_broker, [HEALTH_TOPIC]) as bus:
        bus.publish(f"{MAIN}/a/door", {"text": "door ajar"}, retain=True)
        bus.publish(f"{MAIN}/twin/firmware", b'"1.2.3"', retain=True)
        gateway = make_gateway(config=local_config(local_broker))
        gateway.start()
        wait_connected(thingsboard, gateway)
        up = bus.wait_for_document(HEALTH_TOPIC, is_up, "health up", gateway)
        wait_until(lambda: thingsboard.telemetry_values("alarm.door.status") == ["active"],
                   "the retained alarm is forwarded", gateway)

        # Take the session over with the gateway's own client id.
        ups = sum(1 for doc in bus.documents(HEALTH_TOPIC) if doc and is_up(doc))
        intruder = _client(f"teg-gateway-{up['pid']}")
        intruder.connect(local_broker.host, local_broker.plain_port)
        intruder.loop_start()
        wait_until(intruder.is_connected, "the intruder takes the session over", gateway)
        intruder.disconnect()
        intruder.loop_stop()
        # Its health "up" again, on a session of its own.
        bus.wait_for(lambda: sum(1 for doc in bus.documents(HEALTH_TOPIC)
                                 if doc and is_up(doc)) > ups,
                     "the gateway connects to the local broker again", gateway)

        bus.publish(f"{MAIN}/m/sentinel", {"sentinel": 2})
        wait_until(lambda: bool(telemetry_with(thingsboard, "sentinel")),
                   "a measurement after the reconnect", gateway)
        assert thingsboard.telemetry_values("alarm.door.status") == ["active"]
        assert [a for a in thingsboard.attribute_publishes if "firmware" in a] == [
            {"firmware": "1.2.3"}]
        # Whatever the takeover made the broker say, the last word is the new session's.
        assert is_up(json.loads(retained(local_broker, HEALTH_TOPIC)[HEALTH_TOPIC]))


@needs_mosquitto
def test_an_absent_local_broker_holds_nothing_up(make_gateway: GatewayFactory,
                                                 thingsboard: FakeThingsBoard,
                                                 queue_writer: QueueWriter,
                                                 tmp_path: Path) -> None:
    local = Mosquitto(tmp_path / "late-local")  # ports chosen, not started yet
    try:
        gateway = make_gateway(config=local_config(local))
        gateway.start()
        queue_writer.write_record({"seq": 1})
        wait_connected(thingsboard, gateway)
        wait_until(lambda: thingsboard.telemetry_values("seq") == [1],
                   "a controller record is forwarded without the local broker", gateway)
        status = thingsboard.rpc("status")["message"]
        assert status["local_broker"] == "not connected"

        local.start()
        wait_until(lambda: HEALTH_TOPIC in retained(local, HEALTH_TOPIC),
                   "the gateway connects to the local broker once it is there", gateway)
        assert retained(local, topics.RESTART_CAPABILITY) == {topics.RESTART_CAPABILITY: b"{}"}
        assert thingsboard.rpc("status")["message"]["local_broker"] == "connected"

        # The broker goes away and comes back empty (no persistence): the gateway registers
        # again.
        local.restart()
        wait_until(lambda: topics.RESTART_CAPABILITY in retained(local, topics.RESTART_CAPABILITY),
                   "the gateway registers again after a broker restart", gateway)
        assert is_up(json.loads(retained(local, HEALTH_TOPIC)[HEALTH_TOPIC]))
        assert gateway.running
    finally:
        local.stop()


@needs_mosquitto
def test_a_100_kb_local_message_is_a_dead_letter_and_blocks_nothing(
        make_gateway: GatewayFactory, thingsboard: FakeThingsBoard, local_broker: Mosquitto,
        data_dir: Path, report: Callable[[str], None]) -> None:
    """ThingsBoard closes the connection on a publish above its maximum: a local message too
    large for one publish must never reach the forwarder, whatever path it takes."""
    gateway = make_gateway(config=local_config(local_broker))
    gateway.start()
    wait_connected(thingsboard, gateway)
    with BusClient(local_broker, [HEALTH_TOPIC]) as bus:
        bus.wait_for_document(HEALTH_TOPIC, is_up, "health up", gateway)
        bus.publish(f"{MAIN}/m/diag", {"blob": "x" * 100_000})
        for seq in range(300):
            bus.publish(f"{MAIN}/m/env", {"seq": seq})
        started = time.monotonic()
        wait_until(lambda: len(thingsboard.telemetry_values("seq")) >= 300,
                   "the 300 records behind the large message arrive", gateway)
        arrived_s = time.monotonic() - started
    ping_started = time.monotonic()
    assert thingsboard.rpc("ping", timeout=10.0)
    ping_ms = (time.monotonic() - ping_started) * 1000
    assert sorted(thingsboard.telemetry_values("seq")) == list(range(300))
    assert thingsboard.closes == []
    conn = sqlite3.connect(data_dir / "outbox.db")
    try:
        [(reason,)] = conn.execute("SELECT reason FROM dead_letter").fetchall()
    finally:
        conn.close()
    assert "larger than" in reason
    report(f"100 KB local message: dead letter ({reason}); the 300 records behind it arrived "
           f"{arrived_s:.1f} s after the last was published, ping {ping_ms:.0f} ms, no cut")
