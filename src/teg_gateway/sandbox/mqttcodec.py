"""The server side of MQTT 3.1.1 framing: what the ThingsBoard stand-in reads and writes.

Only what a device-facing server needs: CONNECT/CONNACK, PUBLISH (QoS 0 and 1) both ways,
PUBACK both ways, SUBSCRIBE/SUBACK, UNSUBSCRIBE/UNSUBACK, PINGREQ/PINGRESP and
DISCONNECT. QoS 2, wills and retained messages are parsed far enough to be refused or
ignored. Every parse function takes a packet body (the bytes after the fixed header) and
raises `ProtocolError` on anything malformed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

CONNECT = 1
CONNACK = 2
PUBLISH = 3
PUBACK = 4
PUBREC = 5
PUBREL = 6
PUBCOMP = 7
SUBSCRIBE = 8
SUBACK = 9
UNSUBSCRIBE = 10
UNSUBACK = 11
PINGREQ = 12
PINGRESP = 13
DISCONNECT = 14

# CONNACK return codes (MQTT 3.1.1, section 3.2.2.3).
ACCEPTED = 0
REFUSED_PROTOCOL_VERSION = 1
REFUSED_IDENTIFIER = 2
REFUSED_SERVER_UNAVAILABLE = 3
REFUSED_BAD_USERNAME_OR_PASSWORD = 4
REFUSED_NOT_AUTHORIZED = 5

SUBACK_FAILURE = 0x80
MAX_REMAINING_LENGTH = 268_435_455

PINGRESP_PACKET = bytes((PINGRESP << 4, 0))

_U16 = struct.Struct("!H")


class ProtocolError(Exception):
    """The peer sent something that is not valid MQTT 3.1.1."""


class FrameTooLarge(ProtocolError):
    """A packet announced a body larger than the decoder accepts."""

    def __init__(self, packet_type: int, length: int, limit: int) -> None:
        super().__init__(f"a packet of type {packet_type} with {length} bytes (limit {limit})")
        self.packet_type = packet_type
        self.length = length


@dataclass(frozen=True)
class Frame:
    """One control packet: its type, the 4 flag bits of the first byte, and its body."""

    packet_type: int
    flags: int
    body: bytes


@dataclass(frozen=True)
class Connect:
    protocol_name: str
    protocol_level: int
    clean_session: bool
    keepalive: int
    client_id: str
    username: str | None
    password: bytes | None
    will_topic: str | None
    will_payload: bytes | None


@dataclass(frozen=True)
class Publish:
    topic: str
    payload: bytes
    qos: int
    packet_id: int | None
    retain: bool
    dup: bool


# -- framing ------------------------------------------------------------------------------


def encode_remaining_length(length: int) -> bytes:
    """The variable-length encoding of a packet's remaining length (1 to 4 bytes)."""
    if not 0 <= length <= MAX_REMAINING_LENGTH:
        raise ValueError(f"remaining length out of range: {length}")
    out = bytearray()
    while True:
        digit, length = length & 0x7F, length >> 7
        if length:
            out.append(digit | 0x80)
        else:
            out.append(digit)
            return bytes(out)


def decode_remaining_length(data: bytes | bytearray, start: int) -> tuple[int, int] | None:
    """(length, index of the first body byte) of the varint at `start`; None if incomplete."""
    length = 0
    shift = 0
    index = start
    end = len(data)
    while True:
        if index >= end:
            return None
        byte = data[index]
        index += 1
        length |= (byte & 0x7F) << shift
        if byte < 0x80:
            return length, index
        shift += 7
        if shift >= 28:
            raise ProtocolError("remaining length longer than 4 bytes")


class FrameDecoder:
    """Splits a byte stream into frames. `max_body` bounds a packet's announced size,
    checked as soon as its header is complete (before the body has arrived)."""

    def __init__(self, max_body: int = MAX_REMAINING_LENGTH) -> None:
        self.max_body = max_body
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        """Append `data`; return every frame now complete, in order."""
        buffer = self._buffer
        buffer += data
        frames: list[Frame] = []
        position = 0
        size = len(buffer)
        while size - position >= 2:
            first = buffer[position]
            header = decode_remaining_length(buffer, position + 1)
            if header is None:
                break
            length, body_start = header
            if length > self.max_body:
                del buffer[:position]
                raise FrameTooLarge(first >> 4, length, self.max_body)
            body_end = body_start + length
            if body_end > size:
                break
            frames.append(Frame(first >> 4, first & 0x0F, bytes(buffer[body_start:body_end])))
            position = body_end
        if position:
            del buffer[:position]
        return frames

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return len(self._buffer)


def packet(packet_type: int, flags: int, body: bytes) -> bytes:
    """A whole control packet: fixed header and body."""
    return bytes(((packet_type << 4) | flags,)) + encode_remaining_length(len(body)) + body


# -- reading ------------------------------------------------------------------------------


class _Reader:
    def __init__(self, body: bytes) -> None:
        self.body = body
        self.index = 0

    def u8(self) -> int:
        if self.index >= len(self.body):
            raise ProtocolError("packet too short")
        value = self.body[self.index]
        self.index += 1
        return value

    def u16(self) -> int:
        if self.index + 2 > len(self.body):
            raise ProtocolError("packet too short")
        (value,) = _U16.unpack_from(self.body, self.index)
        self.index += 2
        return int(value)

    def binary(self) -> bytes:
        length = self.u16()
        if self.index + length > len(self.body):
            raise ProtocolError("string longer than its packet")
        value = self.body[self.index : self.index + length]
        self.index += length
        return value

    def text(self) -> str:
        raw = self.binary()
        try:
            value = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("a string is not valid UTF-8") from None
        if "\x00" in value:
            raise ProtocolError("a string contains U+0000")
        return value

    def rest(self) -> bytes:
        value = self.body[self.index :]
        self.index = len(self.body)
        return value

    @property
    def done(self) -> bool:
        return self.index >= len(self.body)


def parse_connect(body: bytes) -> Connect:
    """A CONNECT body. The protocol level is returned as is; the caller refuses
    anything but 4 (3.1.1) with return code 1."""
    reader = _Reader(body)
    name = reader.text()
    level = reader.u8()
    flags = reader.u8()
    if flags & 0x01:
        raise ProtocolError("reserved CONNECT flag set")
    keepalive = reader.u16()
    client_id = reader.text()
    will_topic: str | None = None
    will_payload: bytes | None = None
    if flags & 0x04:
        will_topic = reader.text()
        will_payload = reader.binary()
    elif flags & 0x38:
        raise ProtocolError("will QoS or retain set without a will")
    username = reader.text() if flags & 0x80 else None
    password = reader.binary() if flags & 0x40 else None
    if password is not None and username is None and level == 4:
        raise ProtocolError("password without a user name")
    return Connect(name, level, bool(flags & 0x02), keepalive, client_id, username, password,
                   will_topic, will_payload)


def parse_publish(flags: int, body: bytes) -> Publish:
    qos = (flags >> 1) & 0x03
    if qos == 3:
        raise ProtocolError("PUBLISH with QoS 3")
    reader = _Reader(body)
    topic = reader.text()
    if not topic or "+" in topic or "#" in topic:
        raise ProtocolError(f"invalid PUBLISH topic {topic!r}")
    packet_id = reader.u16() if qos else None
    if packet_id == 0:
        raise ProtocolError("PUBLISH with packet id 0")
    return Publish(topic, reader.rest(), qos, packet_id, bool(flags & 0x01), bool(flags & 0x08))


def parse_packet_id(body: bytes) -> int:
    """The packet id of a PUBACK (or any packet that carries only one)."""
    if len(body) != 2:
        raise ProtocolError(f"expected a 2 byte packet id, got {len(body)} bytes")
    return int(_U16.unpack(body)[0])


def parse_subscribe(flags: int, body: bytes) -> tuple[int, list[tuple[str, int]]]:
    """(packet id, [(topic filter, requested QoS)])."""
    if flags != 0x02:
        raise ProtocolError("SUBSCRIBE with wrong fixed header flags")
    reader = _Reader(body)
    packet_id = reader.u16()
    wanted: list[tuple[str, int]] = []
    while not reader.done:
        topic_filter = reader.text()
        qos = reader.u8()
        if qos > 2:
            raise ProtocolError(f"SUBSCRIBE with QoS byte {qos}")
        wanted.append((topic_filter, qos))
    if not wanted:
        raise ProtocolError("SUBSCRIBE without a topic filter")
    return packet_id, wanted


def parse_unsubscribe(flags: int, body: bytes) -> tuple[int, list[str]]:
    """(packet id, [topic filter])."""
    if flags != 0x02:
        raise ProtocolError("UNSUBSCRIBE with wrong fixed header flags")
    reader = _Reader(body)
    packet_id = reader.u16()
    filters: list[str] = []
    while not reader.done:
        filters.append(reader.text())
    if not filters:
        raise ProtocolError("UNSUBSCRIBE without a topic filter")
    return packet_id, filters


def valid_filter(topic_filter: str) -> bool:
    """Whether `topic_filter` is a well-formed MQTT topic filter."""
    if not topic_filter:
        return False
    levels = topic_filter.split("/")
    for position, level in enumerate(levels):
        if "#" in level and (level != "#" or position != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether `topic` matches `topic_filter` (with `+` and `#` wildcards)."""
    if topic_filter == topic:
        return True
    filter_levels = topic_filter.split("/")
    topic_levels = topic.split("/")
    for position, level in enumerate(filter_levels):
        if level == "#":
            return True
        if position >= len(topic_levels):
            return False
        if level != "+" and level != topic_levels[position]:
            return False
    return len(filter_levels) == len(topic_levels)


# -- writing ------------------------------------------------------------------------------


def encode_connack(return_code: int, session_present: bool = False) -> bytes:
    return packet(CONNACK, 0, bytes((1 if session_present else 0, return_code)))


def encode_publish(topic: str, payload: bytes, qos: int = 0, packet_id: int | None = None,
                   retain: bool = False) -> bytes:
    encoded_topic = topic.encode("utf-8")
    head = _U16.pack(len(encoded_topic)) + encoded_topic
    if qos:
        if packet_id is None:
            raise ValueError("a QoS 1 PUBLISH needs a packet id")
        head += _U16.pack(packet_id)
    flags = (qos << 1) | (1 if retain else 0)
    return packet(PUBLISH, flags, head + payload)


def encode_puback(packet_id: int) -> bytes:
    return packet(PUBACK, 0, _U16.pack(packet_id))


def encode_suback(packet_id: int, codes: list[int]) -> bytes:
    return packet(SUBACK, 0, _U16.pack(packet_id) + bytes(codes))


def encode_unsuback(packet_id: int) -> bytes:
    return packet(UNSUBACK, 0, _U16.pack(packet_id))


# Client-side encoders, for tests that speak raw MQTT to the server.


def encode_connect(client_id: str, *, username: str | None = None,
                   password: bytes | None = None, keepalive: int = 60,
                   clean_session: bool = True, protocol_level: int = 4) -> bytes:
    flags = (0x02 if clean_session else 0) | (0x80 if username is not None else 0)
    flags |= 0x40 if password is not None else 0
    body = _string(b"MQTT") + bytes((protocol_level, flags)) + _U16.pack(keepalive)
    body += _string(client_id.encode())
    if username is not None:
        body += _string(username.encode())
    if password is not None:
        body += _string(password)
    return packet(CONNECT, 0, body)


def encode_subscribe(packet_id: int, filters: list[tuple[str, int]]) -> bytes:
    body = _U16.pack(packet_id)
    for topic_filter, qos in filters:
        body += _string(topic_filter.encode()) + bytes((qos,))
    return packet(SUBSCRIBE, 0x02, body)


def _string(raw: bytes) -> bytes:
    return _U16.pack(len(raw)) + raw
