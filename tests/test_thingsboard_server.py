"""The ThingsBoard stand-in as an MQTT server: codec, rate limit buckets (fake clock), and
the server's rules against real paho clients and raw sockets (QoS 1, over 127.0.0.1)."""

from __future__ import annotations

import json
import queue
import socket
from collections.abc import Iterator

import pytest

from teg_gateway.sandbox import mqttcodec as mq
from teg_gateway.sandbox.certs import Pki
from teg_gateway.sandbox.ratelimit import RateLimit, parse_limit_spec
from teg_gateway.sandbox.thingsboard import FakeThingsBoard, Limits
from teg_gateway.sandbox.thingsboard import _count_telemetry as count_telemetry
from test_sandbox_parts import WAIT, Device

TELEMETRY = "v1/devices/me/telemetry"
ATTRIBUTES = "v1/devices/me/attributes"
TOKEN = "device-token"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- rate limit buckets -----------------------------------------------------------------


def test_limit_specs_are_parsed_and_bad_ones_refused() -> None:
    assert parse_limit_spec("60:1,1800:60") == [(60, 1.0), (1800, 60.0)]
    assert parse_limit_spec(" 5:0.5 ") == [(5, 0.5)]
    for bad in ("", "60", "60:", "a:1", "0:1", "5:0", "5:-1", "60:1,,2:3"):
        with pytest.raises(ValueError, match="rate limit"):
            parse_limit_spec(bad)
    with pytest.raises(ValueError, match="rate limit"):
        Limits(messages="60/1")


def test_a_bucket_starts_full_and_refills_greedily() -> None:
    clock = FakeClock()
    limit = RateLimit("10:5", clock)  # 2 tokens per second
    assert all(limit.try_consume() for _ in range(10))
    assert not limit.try_consume()
    clock.now += 0.5  # one token back
    assert limit.try_consume()
    assert not limit.try_consume()
    clock.now += 100  # never more than the capacity
    assert limit.available() == 10
    assert limit.try_consume(10)
    assert not limit.try_consume()


def test_every_window_must_have_the_tokens_and_none_are_taken_otherwise() -> None:
    clock = FakeClock()
    limit = RateLimit("3:1,5:60", clock)
    assert [limit.try_consume() for _ in range(4)] == [True, True, True, False]
    clock.now += 1  # the first window is full again, the second has 2 left (+1/12 s)
    assert [limit.try_consume() for _ in range(3)] == [True, True, False]
    assert limit.available() < 1
    clock.now += 12  # one token for the long window
    assert limit.try_consume()
    assert not limit.try_consume(3)  # all or nothing: asks more than any window has


def test_a_request_larger_than_a_window_never_passes() -> None:
    limit = RateLimit("100:1", FakeClock())
    assert not limit.try_consume(101)
    assert limit.try_consume(100)


@pytest.mark.parametrize(("document", "counted"), [
    ([{"ts": 1, "values": {"a": 1, "b": 2}}, {"ts": 2, "values": {}}], (2, 2)),
    ([{"ts": 1, "values": {"a": 1}}, {"x": 1, "y": 2}], (2, 3)),  # mixed forms
    ([{"ts": 1, "values": {"a": 1}}, {"ts": 2}], (2, 2)),  # no "values": a flat record
    ({"ts": 1, "values": {"a": 1}}, (1, 1)),
    ({"a": 1, "b": {"nested": 1}}, (1, 2)),
    ([], (0, 0)),
])
def test_records_and_data_points_of_every_telemetry_form(document: object,
                                                          counted: tuple[int, int]) -> None:
    assert count_telemetry(document) == counted


@pytest.mark.parametrize("document", [
    [{"ts": True, "values": {}}], [{"ts": "1", "values": {}}], [{"ts": 1, "values": []}],
    [1], ["x"], [[]], 5, "text", None,
])
def test_invalid_telemetry_forms(document: object) -> None:
    with pytest.raises(ValueError):
        count_telemetry(document)


# -- codec ------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [0, 1, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152,
                                    268_435_455])
def test_remaining_length_round_trip(length: int) -> None:
    encoded = mq.encode_remaining_length(length)
    assert len(encoded) == 1 + (length >= 128) + (length >= 16_384) + (length >= 2_097_152)
    assert mq.decode_remaining_length(b"\x30" + encoded, 1) == (length, 1 + len(encoded))
    assert mq.decode_remaining_length(b"\x30" + encoded[:-1], 1) is None


def test_remaining_length_of_five_bytes_is_a_protocol_error() -> None:
    with pytest.raises(mq.ProtocolError):
        mq.decode_remaining_length(b"\x30\xff\xff\xff\xff\x01", 1)
    with pytest.raises(ValueError):
        mq.encode_remaining_length(268_435_456)


def test_frames_are_split_whatever_the_chunking() -> None:
    stream = (mq.encode_publish("a/b", b"x" * 300, 1, 7) + mq.PINGRESP_PACKET
              + mq.encode_puback(9))
    decoder = mq.FrameDecoder()
    frames = [frame for byte in stream for frame in decoder.feed(bytes((byte,)))]
    assert [f.packet_type for f in frames] == [mq.PUBLISH, mq.PINGRESP, mq.PUBACK]
    publish = mq.parse_publish(frames[0].flags, frames[0].body)
    assert (publish.topic, publish.payload, publish.qos, publish.packet_id) == (
        "a/b", b"x" * 300, 1, 7)
    assert mq.parse_packet_id(frames[2].body) == 9
    assert decoder.buffered == 0
    assert mq.FrameDecoder().feed(stream) == frames


def test_a_frame_over_the_limit_is_refused_from_its_header() -> None:
    decoder = mq.FrameDecoder(max_body=100)
    header = mq.encode_publish("t", b"x" * 200)[:3]  # the body has not arrived
    with pytest.raises(mq.FrameTooLarge) as raised:
        decoder.feed(header)
    assert (raised.value.packet_type, raised.value.length) == (mq.PUBLISH, 203)


def test_connect_and_subscribe_parse() -> None:
    frame = mq.FrameDecoder().feed(
        mq.encode_connect("cid", username="u", password=b"p", keepalive=30))[0]
    connect = mq.parse_connect(frame.body)
    assert (connect.protocol_name, connect.protocol_level, connect.client_id, connect.username,
            connect.password, connect.keepalive, connect.clean_session) == (
        "MQTT", 4, "cid", "u", b"p", 30, True)
    frame = mq.FrameDecoder().feed(mq.encode_subscribe(3, [("a/+", 1), ("#", 0)]))[0]
    assert mq.parse_subscribe(frame.flags, frame.body) == (3, [("a/+", 1), ("#", 0)])
    with pytest.raises(mq.ProtocolError):
        mq.parse_subscribe(0, frame.body)
    with pytest.raises(mq.ProtocolError):
        mq.parse_publish(0, b"\x00\x03a/#")


@pytest.mark.parametrize(("topic_filter", "topic", "matches"), [
    ("v1/devices/me/rpc/request/+", "v1/devices/me/rpc/request/12", True),
    ("v1/devices/me/rpc/request/+", "v1/devices/me/rpc/request/12/x", False),
    ("v2/+/response/+/chunk/+", "v2/fw/response/1/chunk/0", True),
    ("#", "a/b", True),
    ("a/#", "a", True),
    ("a/+", "a", False),
    ("v1/devices/me/attributes", "v1/devices/me/attributes", True),
    ("v1/devices/me/attributes", "v1/devices/me/attributes/response/1", False),
])
def test_topic_filters(topic_filter: str, topic: str, matches: bool) -> None:
    assert mq.valid_filter(topic_filter)
    assert mq.topic_matches(topic_filter, topic) is matches


def test_invalid_filters() -> None:
    assert not any(mq.valid_filter(f) for f in ("", "a/#/b", "a/b#", "a+/b"))


# -- the server -------------------------------------------------------------------------


@pytest.fixture
def tb(pki: Pki) -> Iterator[FakeThingsBoard]:
    with FakeThingsBoard(pki) as stand_in:
        stand_in.accept_token(TOKEN)
        yield stand_in


def raw_connect(port: int, client_id: str = "raw", *, username: str | None = TOKEN,
                password: bytes | None = None, keepalive: int = 60,
                level: int = 4) -> tuple[socket.socket, int]:
    """A raw CONNECT; returns the socket and the CONNACK return code."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    sock.sendall(mq.encode_connect(client_id, username=username, password=password,
                                   keepalive=keepalive, protocol_level=level))
    connack = recv_exactly(sock, 4)
    assert connack[:2] == b"\x20\x02", connack
    return sock, connack[3]


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closes the socket (within WAIT) without sending anything more."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    finally:
        sock.close()


def json_of_size(size: int) -> str:
    text = '{"k":"' + "x" * (size - 8) + '"}'
    assert len(text) == size
    return text


def session_limits_of(device: Device, request_id: int = 1) -> object:
    device.publish(f"v1/devices/me/rpc/request/{request_id}",
                   '{"method": "getSessionLimits", "params": {}}')
    return device.expect_json(f"v1/devices/me/rpc/response/{request_id}")


def test_messages_limit_closes_without_puback_when_exceeded_and_not_before(
        tb: FakeThingsBoard) -> None:
    tb.set_limits(messages="4:3600")
    device = Device(tb.plain_port)
    for n in range(3):
        device.publish(ATTRIBUTES, json.dumps({"n": n}))
    assert session_limits_of(device) == {  # the request counts too: the 4th message
        "maxPayloadSize": 65536, "maxInflightMessages": 100,
        "rateLimits": {"messages": "4:3600"}}
    device.publish_refused(ATTRIBUTES, '{"n": 3}')
    device.close()
    assert tb.closes == ["rate limit: messages"]
    assert tb.rate_limit_closes == 1
    assert [p["n"] for p in tb.attribute_publishes] == [0, 1, 2]


def test_telemetry_messages_limit_counts_only_telemetry(tb: FakeThingsBoard) -> None:
    tb.set_limits(telemetry_messages="2:3600")
    device = Device(tb.plain_port)
    device.publish(TELEMETRY, '{"a": 1}')
    for n in range(5):
        device.publish(ATTRIBUTES, json.dumps({"n": n}))
    device.publish(TELEMETRY, '[{"ts": 1, "values": {"a": 2}}, {"ts": 2, "values": {"a": 3}}]')
    device.publish_refused(TELEMETRY, '{"a": 4}')
    device.close()
    assert tb.closes == ["rate limit: telemetryMessages"]
    assert tb.telemetry_values("a") == [1, 2, 3]


def test_data_points_are_counted_per_key_of_every_record(tb: FakeThingsBoard) -> None:
    tb.set_limits(telemetry_data_points="10:3600")
    device = Device(tb.plain_port)
    device.publish(TELEMETRY, json.dumps([{"ts": 1, "values": {"a": 1, "b": 2, "c": 3}},
                                          {"ts": 2, "values": {"a": 4, "b": 5, "c": 6}}]))
    device.publish(TELEMETRY, '{"d": 1, "e": 2, "f": 3, "g": 4}')  # 10 of 10
    device.publish_refused(TELEMETRY, '{"h": 1}')
    device.close()
    assert tb.closes == ["rate limit: telemetryDataPoints"]
    assert tb.record_count == 3
    assert tb.publish_count == 2


def test_rate_limits_are_kept_per_device_across_reconnects(tb: FakeThingsBoard) -> None:
    tb.set_limits(messages="2:3600")
    tb.accept_token("other-device")
    first = Device(tb.plain_port)
    first.publish(TELEMETRY, '{"a": 1}')
    first.publish(TELEMETRY, '{"a": 2}')
    first.publish_refused(TELEMETRY, '{"a": 3}')
    first.close()
    again = Device(tb.plain_port)  # same device: its bucket is still empty
    again.publish_refused(TELEMETRY, '{"a": 4}')
    again.close()
    other = Device(tb.plain_port, username="other-device")  # another device: its own bucket
    other.publish(TELEMETRY, '{"a": 5}')
    other.close()
    assert tb.telemetry_values("a") == [1, 2, 5]
    assert tb.closes == ["rate limit: messages"] * 2


def test_limits_lowered_between_two_connections_take_effect(tb: FakeThingsBoard) -> None:
    device = Device(tb.plain_port)
    for n in range(5):
        device.publish(TELEMETRY, json.dumps({"n": n}))
    device.close()
    tb.set_limits(Limits(telemetry_messages="1:3600", max_payload_size=2000))
    device = Device(tb.plain_port)
    assert session_limits_of(device) == {
        "maxPayloadSize": 2000, "maxInflightMessages": 100,
        "rateLimits": {"telemetryMessages": "1:3600"}}
    device.publish(TELEMETRY, '{"n": 5}')
    device.publish_refused(TELEMETRY, '{"n": 6}')
    device.close()
    assert tb.telemetry_values("n") == [0, 1, 2, 3, 4, 5]


def test_session_limits_answer_and_an_older_server_that_does_not_answer(
        tb: FakeThingsBoard) -> None:
    tb.set_limits(Limits(messages="60:1,1800:60", telemetry_messages="30:1",
                         telemetry_data_points="1000:1", max_payload_size=32768,
                         max_inflight_messages=7))
    device = Device(tb.plain_port)
    assert session_limits_of(device, 5) == {
        "maxPayloadSize": 32768, "maxInflightMessages": 7,
        "rateLimits": {"messages": "60:1,1800:60", "telemetryMessages": "30:1",
                       "telemetryDataPoints": "1000:1"}}
    tb.answer_session_limits = False
    device.publish("v1/devices/me/rpc/request/6", '{"method": "getSessionLimits"}')
    assert device.barrier() == []  # acknowledged, never answered
    device.close()
    assert [(r["request_id"], r["method"]) for r in tb.client_rpc_requests] == [
        ("5", "getSessionLimits"), ("6", "getSessionLimits")]


def test_session_limits_without_rate_limits(tb: FakeThingsBoard) -> None:
    device = Device(tb.plain_port)
    assert session_limits_of(device) == {"maxPayloadSize": 65536, "maxInflightMessages": 100,
                                         "rateLimits": {}}
    device.close()


def test_client_side_and_server_side_rpc_are_told_apart(tb: FakeThingsBoard) -> None:
    device = Device(tb.plain_port)
    device.subscribe("v1/devices/me/rpc/request/+")
    # Client-side: the device asks; recorded, forwarded to no one, not sent back.
    device.publish("v1/devices/me/rpc/request/1", '{"method": "getTime", "params": {}}')
    assert device.barrier() == []
    assert tb.client_rpc_requests == [{"request_id": "1", "method": "getTime", "params": {}}]
    # Server-side: the server asks on the same topic; the device answers on the response one.
    request_id = tb.rpc_async("ping", {"n": 1})
    topic = f"v1/devices/me/rpc/request/{request_id}"
    assert device.expect_json(topic) == {"method": "ping", "params": {"n": 1}}
    device.publish(f"v1/devices/me/rpc/response/{request_id}", '{"pong": 1}')
    assert tb.wait_rpc_response(request_id, WAIT) == {"pong": 1}
    assert len(tb.client_rpc_requests) == 1
    device.close()


def test_a_client_side_rpc_that_is_not_json_closes(tb: FakeThingsBoard) -> None:
    device = Device(tb.plain_port)
    device.publish_refused("v1/devices/me/rpc/request/1", "getSessionLimits")
    device.close()
    assert tb.closes == ["bad payload"]


def test_the_device_never_gets_its_own_publishes(tb: FakeThingsBoard) -> None:
    device = Device(tb.plain_port)
    device.subscribe("#")
    device.publish(TELEMETRY, '{"a": 1}')
    device.publish(ATTRIBUTES, '{"b": 2}')
    device.publish("v1/devices/me/rpc/response/77", '{"c": 3}')
    assert device.barrier() == []
    device.close()


@pytest.mark.parametrize("topic", [ATTRIBUTES, "v1/devices/me/rpc/response/1",
                                   "v2/fw/request/1/chunk/0", "somewhere/else"])
def test_an_oversize_publish_closes_whatever_the_topic(tb: FakeThingsBoard, topic: str) -> None:
    tb.max_payload_size = 100
    device = Device(tb.plain_port)
    device.publish(topic, json_of_size(100))  # at the limit: fine
    device.publish_refused(topic, json_of_size(101))
    device.close()
    assert tb.closes == ["oversize payload"]
    assert tb.oversize_closes == tb.oversize_payloads == 1


def test_a_huge_publish_is_refused_before_its_body_arrives(tb: FakeThingsBoard) -> None:
    tb.max_payload_size = 1000
    sock, code = raw_connect(tb.plain_port)
    assert code == 0
    sock.sendall(mq.encode_publish(TELEMETRY, b"x" * 200_000, 1, 1)[:1000])
    assert closed_by_server(sock)
    assert tb.closes == ["oversize payload"]


def test_invalid_attributes_close(tb: FakeThingsBoard) -> None:
    device = Device(tb.plain_port)
    device.publish_refused(ATTRIBUTES, "[1, 2]")
    device.close()
    assert tb.closes == ["bad payload"]
    assert tb.bad_payload_closes == tb.bad_payloads == 1


def test_unknown_topics_are_acknowledged_and_dropped(tb: FakeThingsBoard) -> None:
    device = Device(tb.plain_port)
    device.publish("v1/devices/me/claim", "{}")
    device.close()
    assert tb.unknown_publishes == ["v1/devices/me/claim"]
    assert tb.closes == []


# -- authentication and sessions ----------------------------------------------------------


def test_unknown_credentials_are_refused(tb: FakeThingsBoard) -> None:
    sock, code = raw_connect(tb.plain_port, username="who-knows")
    assert code == mq.REFUSED_NOT_AUTHORIZED
    assert closed_by_server(sock)
    sock, code = raw_connect(tb.plain_port, username=None)
    assert code == mq.REFUSED_NOT_AUTHORIZED
    sock.close()
    assert [(r.username, r.return_code, r.kind) for r in tb.connections] == [
        ("who-knows", 5, "refused"), (None, 5, "refused")]
    assert tb.connection_count == 0
    assert tb.connected_usernames() == []


def test_basic_credentials(tb: FakeThingsBoard) -> None:
    tb.accept_basic("cid", "user", "secret")
    sock, code = raw_connect(tb.plain_port, "cid", username="user", password=b"wrong")
    assert code == mq.REFUSED_BAD_USERNAME_OR_PASSWORD
    sock.close()
    sock, code = raw_connect(tb.plain_port, "other-cid", username="user", password=b"secret")
    assert code == mq.REFUSED_NOT_AUTHORIZED
    sock.close()
    device = Device(tb.plain_port, "user", client_id="cid", password="secret")
    device.publish(TELEMETRY, '{"basic": 1}')
    device.close()
    assert tb.connected_usernames() == [("cid", "user")]


def test_only_mqtt_3_1_1_is_served(tb: FakeThingsBoard) -> None:
    sock, code = raw_connect(tb.plain_port, level=5)
    assert code == mq.REFUSED_PROTOCOL_VERSION
    assert closed_by_server(sock)


def test_provisioned_credentials_are_accepted_afterwards(tb: FakeThingsBoard) -> None:
    provisioning = Device(tb.plain_port, username="provision")
    provisioning.subscribe("/provision/response")
    provisioning.publish("/provision/request", json.dumps({
        "deviceName": "d", "provisionDeviceKey": "k", "provisionDeviceSecret": "s",
        "credentialsType": "ACCESS_TOKEN", "token": "chosen-token"}))
    assert provisioning.expect_json("/provision/response")["credentialsValue"] == "chosen-token"
    provisioning.close()
    device = Device(tb.plain_port, username="chosen-token")
    device.close()
    assert [login[1] for login in tb.connected_usernames()] == ["provision", "chosen-token"]


def test_the_provisioning_session_may_only_provision(tb: FakeThingsBoard) -> None:
    sock, code = raw_connect(tb.plain_port, username="provision")
    assert code == 0
    sock.sendall(mq.encode_subscribe(1, [(ATTRIBUTES, 1), ("/provision/response", 1)]))
    assert recv_exactly(sock, 6) == mq.encode_suback(1, [mq.SUBACK_FAILURE, 1])
    sock.sendall(mq.encode_publish(TELEMETRY, b'{"a": 1}', 1, 2))
    assert closed_by_server(sock)
    assert tb.closes == ["provisioning session: topic not allowed"]
    assert tb.publish_count == 0


def test_one_session_per_device(tb: FakeThingsBoard) -> None:
    first = Device(tb.plain_port)
    second = Device(tb.plain_port)  # same token, another client id
    first.wait_disconnected()
    second.publish(TELEMETRY, '{"second": 1}')
    assert tb.closes == ["session taken over"]
    assert len(tb.active_sessions()) == 1
    first.close()
    second.close()


def test_a_silent_client_is_closed_after_one_and_a_half_keepalives(tb: FakeThingsBoard) -> None:
    sock, code = raw_connect(tb.plain_port, keepalive=1)
    assert code == 0
    assert closed_by_server(sock)
    assert tb.closes == ["keepalive timeout"]


def test_ping_keeps_the_session(tb: FakeThingsBoard) -> None:
    sock, _ = raw_connect(tb.plain_port)
    sock.sendall(bytes((mq.PINGREQ << 4, 0)))
    assert recv_exactly(sock, 2) == mq.PINGRESP_PACKET
    sock.sendall(bytes((mq.DISCONNECT << 4, 0)))
    assert closed_by_server(sock)
    assert tb.closes == []


def test_pushes_while_paused_arrive_after_resume(tb: FakeThingsBoard) -> None:
    device = Device(tb.plain_port)
    device.subscribe(ATTRIBUTES)
    tb.pause()
    tb.set_shared({"during_pause": 1})
    with pytest.raises(queue.Empty):
        device.received.get(timeout=0.3)
    tb.resume()
    assert device.expect_json(ATTRIBUTES) == {"during_pause": 1}
    device.close()


def test_tls_listener_serves_with_the_sandbox_certificate(tb: FakeThingsBoard, pki: Pki) -> None:
    device = Device(tb.tls_port, tls_ca=pki.ca_cert)
    device.publish(TELEMETRY, '{"tls": 1}')
    device.close()
    assert [r.listener for r in tb.connections] == ["tls"]
    assert tb.telemetry_values("tls") == [1]
