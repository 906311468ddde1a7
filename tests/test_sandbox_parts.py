"""Tests of the sandbox parts themselves: PKI, broker, ThingsBoard stand-in, queue writer.

The broker tests run against a real mosquitto; the stand-in is an MQTT server of its own
(more of its tests in test_thingsboard_server.py). The "device" is a plain paho client.
"""

from __future__ import annotations

import contextlib
import json
import queue
import signal
import sqlite3
import ssl
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from teg_gateway.sandbox.broker import Mosquitto, mosquitto_available
from teg_gateway.sandbox.certs import Pki, make_pki, make_untrusted_ca
from teg_gateway.sandbox.controller import (
    QUEUE_DB_NAME,
    QueueWriter,
    make_records,
    open_queue_db,
)
from teg_gateway.sandbox.process import GatewayProcess, run_command
from teg_gateway.sandbox.thingsboard import FakeThingsBoard

needs_mosquitto = pytest.mark.skipif(
    not mosquitto_available(),
    reason="mosquitto is not installed; install it with `apt-get install -y mosquitto`",
)

WAIT = 5.0


class Device:
    """A plain MQTT client acting as the device, collecting what it receives."""

    def __init__(
        self,
        port: int,
        username: str = "device-token",
        *,
        tls_ca: Path | None = None,
        client_id: str | None = None,
        password: str | None = None,
    ) -> None:
        self.received: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._acked: set[int] = set()
        self._changed = threading.Condition()
        self._connected = threading.Event()
        self._barrier_ids = iter(range(1_000_000, 2_000_000))
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"dev-{uuid.uuid4().hex}",
            reconnect_on_failure=False,
        )
        self.client.username_pw_set(username, password)
        if tls_ca is not None:
            self.client.tls_set_context(ssl.create_default_context(cafile=str(tls_ca)))
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect
        self._disconnected = threading.Event()
        host = "localhost" if tls_ca else "127.0.0.1"
        self.client.connect(host, port)
        self.client.loop_start()
        assert self._connected.wait(WAIT), "the device did not connect"

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if not reason_code.is_failure:
            self._connected.set()

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        with self._changed:
            self._acked.add(mid)
            self._changed.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.received.put((message.topic, bytes(message.payload)))

    def subscribe(self, *topics: str) -> None:
        _, mid = self.client.subscribe([(topic, 1) for topic in topics])
        assert mid is not None
        with self._changed:
            assert self._changed.wait_for(lambda: mid in self._acked, WAIT)

    def publish(self, topic: str, payload: str | bytes) -> None:
        """Publish with QoS 1 and wait for the PUBACK (AssertionError without one)."""
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(WAIT)
        assert info.is_published(), f"no PUBACK for a publish on {topic}"

    def publish_refused(self, topic: str, payload: str | bytes) -> None:
        """Publish with QoS 1: the server must close the connection without PUBACK."""
        info = self.client.publish(topic, payload, qos=1)
        self.wait_disconnected()
        try:
            acknowledged = info.is_published()
        except RuntimeError:  # paho may mark it failed once the connection is gone
            acknowledged = False
        assert not acknowledged, f"the publish on {topic} was acknowledged"

    def expect(self, topic: str) -> bytes:
        """The payload of the next message; it must be on `topic`."""
        got_topic, payload = self.received.get(timeout=WAIT)
        assert got_topic == topic, (got_topic, payload)
        return payload

    def expect_json(self, topic: str) -> Any:
        return json.loads(self.expect(topic))

    def barrier(self) -> list[tuple[str, bytes]]:
        """Messages that arrive before an attribute request round trip completes.

        The stand-in handles messages one by one, in order, so anything it was
        going to answer to earlier publishes arrives before this answer.
        """
        request_id = next(self._barrier_ids)
        self.subscribe(f"v1/devices/me/attributes/response/{request_id}")
        self.publish(f"v1/devices/me/attributes/request/{request_id}", "{}")
        before: list[tuple[str, bytes]] = []
        while True:
            topic, payload = self.received.get(timeout=WAIT)
            if topic == f"v1/devices/me/attributes/response/{request_id}":
                return before
            before.append((topic, payload))

    def _on_disconnect(self, *_args: Any) -> None:
        self._disconnected.set()

    def wait_disconnected(self) -> None:
        assert self._disconnected.wait(WAIT), "the connection was not closed"

    def received_so_far(self) -> list[tuple[str, bytes]]:
        """What has arrived. The stand-in answers a publish before its PUBACK, so after
        `publish` returned, any answer to it is here."""
        got: list[tuple[str, bytes]] = []
        while not self.received.empty():
            got.append(self.received.get_nowait())
        return got

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Mosquitto]:
    if not mosquitto_available():
        pytest.skip("mosquitto is not installed; install it with `apt-get install -y mosquitto`")
    with Mosquitto(tmp_path_factory.mktemp("broker"), pki) as running:
        yield running


@pytest.fixture
def tb(pki: Pki) -> Iterator[FakeThingsBoard]:
    with FakeThingsBoard(pki) as stand_in:
        stand_in.accept_token("device-token")
        yield stand_in


@pytest.fixture
def device(tb: FakeThingsBoard) -> Iterator[Device]:
    client = Device(tb.plain_port)
    yield client
    client.close()


# -- PKI and TLS -----------------------------------------------------------------------


def test_make_pki_reuses_existing_files(tmp_path: Path) -> None:
    first = make_pki(tmp_path)
    contents = [p.read_bytes() for p in (first.ca_cert, first.server_cert, first.server_key)]
    second = make_pki(tmp_path)
    assert second == first
    assert [p.read_bytes() for p in (second.ca_cert, second.server_cert, second.server_key)] == (
        contents
    )
    assert first.server_key.stat().st_mode & 0o077 == 0


def _tls_connect(port: int, cafile: Path) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"tls-{uuid.uuid4().hex}")
    client.tls_set_context(ssl.create_default_context(cafile=str(cafile)))
    try:
        client.connect("localhost", port)
    finally:
        client.disconnect()


@needs_mosquitto
def test_tls_listener_is_verified_with_the_sandbox_ca(broker: Mosquitto, pki: Pki) -> None:
    _tls_connect(broker.tls_port, pki.ca_cert)
    device = Device(broker.tls_port, tls_ca=pki.ca_cert)
    device.close()


@needs_mosquitto
def test_tls_listener_is_rejected_with_an_untrusted_ca(broker: Mosquitto, tmp_path: Path) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        _tls_connect(broker.tls_port, make_untrusted_ca(tmp_path))


def test_stand_in_serves_tls_verified_with_the_sandbox_ca(
    tb: FakeThingsBoard, pki: Pki, tmp_path: Path
) -> None:
    device = Device(tb.tls_port, tls_ca=pki.ca_cert)
    device.publish("v1/devices/me/telemetry", '{"co2": 500}')
    tb.wait_for_telemetry(1, WAIT)
    device.close()
    assert tb.telemetry()[0]["values"] == {"co2": 500}
    assert tb.connections[-1].listener == "tls"
    with pytest.raises(ssl.SSLCertVerificationError):
        _tls_connect(tb.tls_port, make_untrusted_ca(tmp_path))


# -- provisioning ----------------------------------------------------------------------

PROVISION_REQUEST = {
    "deviceName": "teg-1234567",
    "provisionDeviceKey": "the-key",
    "provisionDeviceSecret": "the-secret",
}


@pytest.fixture
def provisioning_device(tb: FakeThingsBoard) -> Iterator[Device]:
    client = Device(tb.plain_port, username="provision")
    client.subscribe("/provision/response")
    yield client
    client.close()


@needs_mosquitto
@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        (
            "success",
            {"status": "SUCCESS", "credentialsType": "ACCESS_TOKEN", "credentialsValue": "tok"},
        ),
        ("not_found", {"status": "NOT_FOUND", "errorMsg": "Provision data was not found!"}),
        ("failure", {"status": "FAILURE", "errorMsg": "Failed to provision device!"}),
    ],
)
def test_provisioning_answers_per_mode(
    tb: FakeThingsBoard, provisioning_device: Device, mode: str, expected: dict[str, Any]
) -> None:
    tb.provision_mode = mode
    tb.access_token = "tok"
    provisioning_device.publish("/provision/request", json.dumps(PROVISION_REQUEST))
    assert provisioning_device.expect_json("/provision/response") == expected
    assert tb.provision_requests == [PROVISION_REQUEST]


@needs_mosquitto
def test_provisioning_with_basic_credentials(
    tb: FakeThingsBoard, provisioning_device: Device
) -> None:
    basic = {"clientId": "c", "userName": "u", "password": "p"}
    tb.basic_credentials = basic
    provisioning_device.publish("/provision/request", json.dumps(PROVISION_REQUEST))
    assert provisioning_device.expect_json("/provision/response") == {
        "status": "SUCCESS",
        "credentialsType": "MQTT_BASIC",
        "credentialsValue": basic,
    }


@needs_mosquitto
def test_provisioning_checks_key_and_secret(
    tb: FakeThingsBoard, provisioning_device: Device
) -> None:
    tb.expected_provision_key = "the-key"
    tb.expected_provision_secret = "the-secret"
    wrong = dict(PROVISION_REQUEST, provisionDeviceSecret="guess")
    provisioning_device.publish("/provision/request", json.dumps(wrong))
    assert provisioning_device.expect_json("/provision/response")["status"] == "NOT_FOUND"
    provisioning_device.publish("/provision/request", json.dumps(PROVISION_REQUEST))
    assert provisioning_device.expect_json("/provision/response")["status"] == "SUCCESS"


@needs_mosquitto
def test_provisioning_silent_mode_never_answers(
    tb: FakeThingsBoard, provisioning_device: Device
) -> None:
    tb.provision_mode = "silent"
    provisioning_device.publish("/provision/request", json.dumps(PROVISION_REQUEST))
    assert provisioning_device.received_so_far() == []
    assert len(tb.provision_requests) == 1


@needs_mosquitto
def test_provisioning_ignores_the_first_requests(
    tb: FakeThingsBoard, provisioning_device: Device
) -> None:
    tb.ignore_first_provision_requests = 2
    for _ in range(2):
        provisioning_device.publish("/provision/request", json.dumps(PROVISION_REQUEST))
    assert provisioning_device.received_so_far() == []
    provisioning_device.publish("/provision/request", json.dumps(PROVISION_REQUEST))
    assert provisioning_device.expect_json("/provision/response")["status"] == "SUCCESS"
    assert len(tb.provision_requests) == 3


# -- telemetry and attributes ----------------------------------------------------------


@needs_mosquitto
def test_telemetry_in_all_three_forms_is_recorded_in_order(
    tb: FakeThingsBoard, device: Device
) -> None:
    device.publish("v1/devices/me/telemetry", '{"co2": 400}')
    device.publish("v1/devices/me/telemetry", '{"ts": 1000, "values": {"co2": 401}}')
    device.publish(
        "v1/devices/me/telemetry",
        '[{"ts": 1001, "values": {"co2": 402}}, {"ts": 1002, "values": {"co2": 403}}]',
    )
    tb.wait_for_telemetry(4, WAIT)
    records = tb.telemetry()
    assert records[0]["values"] == {"co2": 400}
    assert records[0]["ts"] > 1_600_000_000_000  # receive time in ms
    assert records[1:] == [
        {"ts": 1000, "values": {"co2": 401}},
        {"ts": 1001, "values": {"co2": 402}},
        {"ts": 1002, "values": {"co2": 403}},
    ]
    assert tb.telemetry_values("co2") == [400, 401, 402, 403]
    assert tb.publish_count == 3
    assert len(tb.receive_times_ms()) == 4
    tb.clear()
    assert tb.telemetry() == []
    assert tb.publish_count == 0


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ("not json", "bad payload"),
        ('[{"ts": "soon", "values": {}}]', "bad payload"),
        ("[1, 2]", "bad payload"),
        (json.dumps({"blob": "x" * 1000}), "oversize payload"),
    ],
)
def test_bad_and_oversize_telemetry_closes_the_connection(
    tb: FakeThingsBoard, payload: str, reason: str
) -> None:
    tb.max_payload_size = 1000
    device = Device(tb.plain_port)
    device.publish("v1/devices/me/telemetry", '{"co2": 1}')
    info = device.client.publish("v1/devices/me/telemetry", payload, qos=1)
    tb.wait_for(lambda: tb.closes == [reason], WAIT)
    device.wait_disconnected()
    with contextlib.suppress(RuntimeError):  # paho may mark it failed without a connection
        assert not info.is_published()  # closed without PUBACK
    device.close()
    assert tb.telemetry_values("co2") == [1]
    assert tb.publish_count == 1
    assert (tb.bad_payloads, tb.oversize_payloads) == (
        (1, 0) if reason == "bad payload" else (0, 1)
    )


@needs_mosquitto
def test_client_and_shared_attributes(tb: FakeThingsBoard, device: Device) -> None:
    device.subscribe("v1/devices/me/attributes")
    device.publish("v1/devices/me/attributes", '{"FILE_HASHES": {}, "version": "1.0"}')
    # A server, not a broker: the device's own publish does not come back to it.
    assert device.barrier() == []
    tb.wait_for(lambda: tb.client_attributes.get("version") == "1.0", WAIT)

    tb.set_shared({"sw_version": "2.0", "FILES": {}})
    assert device.expect_json("v1/devices/me/attributes") == {"sw_version": "2.0", "FILES": {}}
    tb.delete_shared(["FILES"])
    assert device.expect_json("v1/devices/me/attributes") == {"deleted": ["FILES"]}

    assert device.barrier() == []
    assert tb.shared_attributes == {"sw_version": "2.0"}
    assert tb.client_attributes == {"FILE_HASHES": {}, "version": "1.0"}
    assert tb.attribute_publishes == [{"FILE_HASHES": {}, "version": "1.0"}]


@needs_mosquitto
def test_attribute_request_returns_only_existing_requested_keys(
    tb: FakeThingsBoard, device: Device
) -> None:
    tb.set_shared({"sw_title": "ctl", "sw_version": "2.0"})
    device.publish("v1/devices/me/attributes", '{"FILE_HASHES": {"a": 1}}')
    device.subscribe("v1/devices/me/attributes/response/+")
    device.publish(
        "v1/devices/me/attributes/request/7",
        '{"clientKeys": "FILE_HASHES,missing", "sharedKeys": "sw_version, nope"}',
    )
    assert device.expect_json("v1/devices/me/attributes/response/7") == {
        "client": {"FILE_HASHES": {"a": 1}},
        "shared": {"sw_version": "2.0"},
    }
    device.publish("v1/devices/me/attributes/request/8", '{"sharedKeys": "FILES"}')
    assert device.expect_json("v1/devices/me/attributes/response/8") == {}
    assert tb.attribute_requests[:2] == [
        {
            "request_id": "7",
            "clientKeys": ["FILE_HASHES", "missing"],
            "sharedKeys": ["sw_version", "nope"],
        },
        {"request_id": "8", "clientKeys": [], "sharedKeys": ["FILES"]},
    ]


# -- RPC -------------------------------------------------------------------------------


@needs_mosquitto
def test_rpc_round_trip(tb: FakeThingsBoard, device: Device) -> None:
    def answer(client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        request = json.loads(message.payload)
        request_id = message.topic.rsplit("/", 1)[1]
        reply = {"echo": request["params"], "method": request["method"]}
        client.publish(f"v1/devices/me/rpc/response/{request_id}", json.dumps(reply), qos=1)

    device.client.on_message = answer
    device.subscribe("v1/devices/me/rpc/request/+")
    assert tb.rpc("ping", {"n": 1}, timeout=WAIT) == {"echo": {"n": 1}, "method": "ping"}
    assert tb.rpc("status", timeout=WAIT) == {"echo": {}, "method": "status"}
    assert sorted(tb.rpc_responses) == [1, 2]


@needs_mosquitto
def test_rpc_without_answer_times_out(tb: FakeThingsBoard) -> None:
    with pytest.raises(TimeoutError):
        tb.rpc("nobody_listens", timeout=0.2)


# -- OTA chunks ------------------------------------------------------------------------


@needs_mosquitto
def test_package_chunks_are_served(tb: FakeThingsBoard, device: Device) -> None:
    package = bytes(range(256)) * 10  # 2560 bytes
    tb.add_package("sw", package)
    device.subscribe("v2/sw/response/+/chunk/+", "v2/sw/error")
    device.publish("v2/sw/request/42/chunk/0", "1024")
    assert device.expect("v2/sw/response/42/chunk/0") == package[:1024]
    device.publish("v2/sw/request/42/chunk/2", "1024")
    assert device.expect("v2/sw/response/42/chunk/2") == package[2048:]
    device.publish("v2/sw/request/42/chunk/3", "1024")
    assert device.expect("v2/sw/response/42/chunk/3") == b""
    device.publish("v2/sw/request/42/chunk/0", "")
    assert device.expect("v2/sw/error")
    assert tb.chunk_requests == 4
    assert tb.chunk_history()[0] == ("sw", "42", 0, 1024)


@needs_mosquitto
def test_delayed_chunks_still_arrive(tb: FakeThingsBoard, device: Device) -> None:
    tb.add_package("fw", b"firmware")
    tb.chunk_delay_s = 0.2
    device.subscribe("v2/fw/response/+/chunk/+")
    device.publish("v2/fw/request/1/chunk/0", "4")
    assert device.expect("v2/fw/response/1/chunk/0") == b"firm"


@needs_mosquitto
def test_assign_package_announces_it_in_shared_attributes(tb: FakeThingsBoard) -> None:
    tb.assign_package("sw", "controller", "v1.2", b"abc", checksum_algorithm="MD5")
    assert tb.shared_attributes == {
        "sw_title": "controller",
        "sw_version": "v1.2",
        "sw_size": 3,
        "sw_checksum_algorithm": "MD5",
        "sw_checksum": "900150983cd24fb0d6963f7d28e17f72",
    }


# -- broker and stand-in life cycle ----------------------------------------------------


@needs_mosquitto
def test_broker_restart_keeps_ports(tmp_path: Path) -> None:
    with Mosquitto(tmp_path / "broker") as own_broker:
        port = own_broker.plain_port
        own_broker.stop()
        assert not own_broker.running
        own_broker.start()
        assert own_broker.plain_port == port
        device = Device(port)
        device.publish("v1/devices/me/telemetry", '{"after_restart": true}')
        device.close()


@needs_mosquitto
def test_paused_broker_answers_again_after_resume(broker: Mosquitto) -> None:
    broker.pause()
    try:
        device_thread_result: list[Device] = []
        connecting = threading.Thread(
            target=lambda: device_thread_result.append(Device(broker.plain_port))
        )
        connecting.start()
        connecting.join(0.3)
        assert connecting.is_alive()  # CONNECT is not answered while paused
    finally:
        broker.resume()
    connecting.join(WAIT)
    assert device_thread_result
    device_thread_result[0].close()


def test_stand_in_restart_keeps_ports(tb: FakeThingsBoard) -> None:
    ports = (tb.plain_port, tb.tls_port)
    device = Device(tb.plain_port)
    tb.stop()
    assert not tb.running
    device.wait_disconnected()
    device.close()
    with pytest.raises(ConnectionRefusedError):
        Device(tb.plain_port)
    tb.start()
    assert (tb.plain_port, tb.tls_port) == ports
    device = Device(tb.plain_port)
    device.publish("v1/devices/me/telemetry", '{"after_restart": true}')
    tb.wait_for_telemetry(1, WAIT)
    device.close()


def test_paused_stand_in_answers_again_after_resume(tb: FakeThingsBoard) -> None:
    device = Device(tb.plain_port)
    tb.pause()
    try:
        info = device.client.publish("v1/devices/me/telemetry", '{"frozen": 1}', qos=1)
        # Another session (not the same device: that would push the first one off).
        connecting = threading.Thread(
            target=lambda: Device(tb.plain_port, username="provision").close()
        )
        connecting.start()
        connecting.join(0.3)
        assert connecting.is_alive()  # CONNECT is not answered while paused
        assert not info.is_published()
        assert tb.publish_count == 0
    finally:
        tb.resume()
    connecting.join(WAIT)
    info.wait_for_publish(WAIT)
    assert tb.telemetry_values("frozen") == [1]
    device.close()


def test_kill_connections_drops_every_session(tb: FakeThingsBoard) -> None:
    devices = [Device(tb.plain_port), Device(tb.plain_port, username="provision")]
    tb.kill_connections()
    for device in devices:
        device.wait_disconnected()
        device.close()
    assert tb.closes == ["killed", "killed"]
    Device(tb.plain_port).close()  # the listeners stay


def test_mosquitto_missing_gives_install_hint(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr("teg_gateway.sandbox.broker.find_mosquitto", lambda: None)
    with pytest.raises(RuntimeError, match=r"apt-get install -y mosquitto"):
        Mosquitto(tmp_path)


# -- controller side -------------------------------------------------------------------


def test_queue_writer_creates_the_schema_and_writes(tmp_path: Path) -> None:
    data = tmp_path / "controller"
    with QueueWriter(data) as writer:
        writer.write(make_records(3, ts_ms=5000))
        writer.write_record({"message": "hello", "severity": "INFO"}, ts_ms=6000, type="log")
        writer.health_check(7000)
        writer.health_check(8000)
        assert writer.pending() == 4

    connection = sqlite3.connect(data / QUEUE_DB_NAME)
    assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    rows = connection.execute("SELECT id, type, message FROM messages ORDER BY id").fetchall()
    assert [row[1] for row in rows] == ["telemetry", "telemetry", "telemetry", "log"]
    assert json.loads(rows[0][2]) == {
        "ts": 5000,
        "values": {"seq": 0, "co2": 400, "temperature": 20.0},
    }
    assert json.loads(rows[3][2]) == {
        "ts": 6000,
        "values": {"message": "hello", "severity": "INFO"},
    }
    assert connection.execute("SELECT id, timestamp_ms FROM health_check").fetchall() == [(1, 8000)]
    connection.close()


def test_open_queue_db_matches_the_spec_schema(tmp_path: Path) -> None:
    connection = open_queue_db(tmp_path / "new" / "dir")
    columns = {
        table: [row[1:3] for row in connection.execute(f"PRAGMA table_info({table})")]
        for table in ("messages", "health_check")
    }
    assert columns == {
        "messages": [("id", "INTEGER"), ("type", "TEXT"), ("message", "TEXT")],
        "health_check": [("id", "INTEGER"), ("timestamp_ms", "INTEGER")],
    }
    connection.close()


def test_make_records_are_valid_and_increasing() -> None:
    records = make_records(1000, start_seq=10, ts_ms=1)
    decoded = [json.loads(message) for _, message in records]
    assert [d["values"]["seq"] for d in decoded] == list(range(10, 1010))
    assert [d["ts"] for d in decoded] == list(range(1, 1001))
    assert all(isinstance(d["values"]["temperature"], float) for d in decoded)
    assert {kind for kind, _ in records} == {"telemetry"}


def test_sample_controller_writes_and_stops_on_sigterm(tmp_path: Path) -> None:
    data = tmp_path / "controller"
    process = GatewayProcess(
        tmp_path,
        env={},
        args=["--data", str(data), "--rate", "200", "--log-every", "5"],
        module="teg_gateway.sandbox.controller",
    )
    with process:
        process.wait_for_log("wrote 10 records", WAIT)
        process.signal(signal.SIGTERM)
        assert process.wait(WAIT) == 0
    assert "stopped after" in process.log_text()
    with QueueWriter(data) as writer:
        assert writer.pending() >= 12  # 10 readings and 2 log records


def test_sample_controller_exits_after_count(tmp_path: Path) -> None:
    data = tmp_path / "controller"
    result = run_command(
        tmp_path,
        env={},
        config_toml=None,
        args=["--data", str(data), "--rate", "500", "--count", "20", "--log-every", "0"],
        timeout=30,
        module="teg_gateway.sandbox.controller",
    )
    assert result.returncode == 0, result.stderr
    assert "stopped after 20 records" in result.stdout
    connection = sqlite3.connect(data / QUEUE_DB_NAME)
    assert connection.execute("SELECT COUNT(*) FROM messages").fetchone() == (20,)
    connection.close()


def test_gateway_process_writes_its_config_and_appends_its_log(tmp_path: Path) -> None:
    process = GatewayProcess(
        tmp_path, env={"X": "1"}, config_toml="[x]\ny = 1\n", args=["run"], module="json.tool"
    )
    assert process.command[-3:] == ["--config", str(tmp_path / "gateway.toml"), "run"]
    for _ in range(2):
        process.start()
        process.wait(WAIT)
    assert (tmp_path / "gateway.toml").read_text() == "[x]\ny = 1\n"
    assert process.log_text().count("usage:") == 2  # json.tool rejects the arguments
    with pytest.raises(AssertionError, match="exited with status"):
        process.wait_for_log("never printed", WAIT)
