"""A ThingsBoard stand-in: an MQTT 3.1.1 *server* playing ThingsBoard's device transport.

`FakeThingsBoard` listens on 127.0.0.1 (a plain listener and, given the sandbox PKI, a TLS
listener) and plays ThingsBoard's part for the device ("me", SPEC.md sections 2, 3
and 6). Like ThingsBoard, and unlike a broker, it is the other end of the device's
connection, not a router between clients:

- it consumes what the device publishes and never sends a device's own publish back;
- it authenticates: user name ``provision`` opens a provisioning session (only
  ``/provision/request`` may be published there); any other login must be a known access
  token (the user name) or known MQTT_BASIC credentials (client id, user name, password):
  `access_token`, `basic_credentials`, whatever it handed out by provisioning, and what
  `accept_token` / `accept_basic` add. Anything else is refused with CONNACK return code 4
  (a known MQTT_BASIC user with a wrong password) or 5, and the connection is closed;
- one session per device: a second login with the same credentials pushes the first off;
- it closes the connection, without PUBACK, on any violation: a payload larger than
  `Limits.max_payload_size`, telemetry or attributes that are not valid JSON of the right
  form, a publish that would exceed a rate limit (`Limits`: ``messages``,
  ``telemetryMessages``, ``telemetryDataPoints``, each ``"N:S,N:S"``; kept per device,
  across reconnects), or a protocol error. `closes` says why, in order;
- it tells client-side RPC (a request the device publishes on
  ``v1/devices/me/rpc/request/<id>``, e.g. ``getSessionLimits``) from server-side RPC (a
  request it publishes there to the device), and answers ``getSessionLimits`` with the
  configured limits unless `answer_session_limits` is off (an older server).

Answers to a request (attributes, ``getSessionLimits``, OTA chunks, provisioning) go to the
session that asked, subscribed or not, as ThingsBoard does; shared attribute updates and
server-side RPCs go to the device sessions subscribed to their topic. Publishes on topics
it does not know are acknowledged and dropped (`unknown_publishes`).
`Limits.max_inflight_messages` is reported to ``getSessionLimits`` but not enforced: the
server acknowledges each publish as soon as it has read it.

What it does not model: persistent sessions (every session is clean; nothing is kept for
a device while it is offline), QoS 2 (the connection is closed), retained messages and
wills (ignored), X.509 device credentials, device profiles, rule chains (client-side RPCs
other than ``getSessionLimits`` are only recorded), several devices (every device
session feeds the same records), and the server's own QoS 1 retransmission (the device
is expected to acknowledge on the same connection). `pause()` freezes the server after
the TLS handshake; a frozen real server would not finish the handshake either.

The server runs an asyncio event loop in a background thread; the test-facing API is
synchronous and thread-safe (records are guarded by a lock and returned as copies).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import operator
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

from teg_gateway.sandbox import mqttcodec as mq
from teg_gateway.sandbox.broker import free_tcp_ports
from teg_gateway.sandbox.certs import Pki
from teg_gateway.sandbox.ratelimit import Clock, RateLimit, parse_limit_spec

log = logging.getLogger(__name__)

PROVISION_REQUEST_TOPIC = "/provision/request"
PROVISION_RESPONSE_TOPIC = "/provision/response"
PROVISION_USERNAME = "provision"
TELEMETRY_TOPIC = "v1/devices/me/telemetry"
ATTRIBUTES_TOPIC = "v1/devices/me/attributes"
ATTRIBUTE_REQUEST_PREFIX = "v1/devices/me/attributes/request/"
ATTRIBUTE_RESPONSE_PREFIX = "v1/devices/me/attributes/response/"
RPC_REQUEST_PREFIX = "v1/devices/me/rpc/request/"
RPC_RESPONSE_PREFIX = "v1/devices/me/rpc/response/"
SESSION_LIMITS_METHOD = "getSessionLimits"

PROVISION_MODES = ("success", "not_found", "failure", "silent")
PACKAGE_KINDS = ("sw", "fw")
DEFAULT_MAX_PAYLOAD_SIZE = 65536
DEFAULT_MAX_INFLIGHT_MESSAGES = 100
CONNECT_TIMEOUT_S = 10.0
HOUSEKEEPING_PERIOD_S = 0.25

# Why the server closed a connection (the entries of `closes`).
CLOSE_RATE_MESSAGES = "rate limit: messages"
CLOSE_RATE_TELEMETRY_MESSAGES = "rate limit: telemetryMessages"
CLOSE_RATE_DATA_POINTS = "rate limit: telemetryDataPoints"
CLOSE_OVERSIZE = "oversize payload"
CLOSE_BAD_PAYLOAD = "bad payload"
CLOSE_NOT_AUTHORIZED = "not authorized"
CLOSE_PROVISION_TOPIC = "provisioning session: topic not allowed"
CLOSE_TAKEN_OVER = "session taken over"
CLOSE_KEEPALIVE = "keepalive timeout"
CLOSE_PROTOCOL = "protocol error"
CLOSE_KILLED = "killed"

_CHUNK_REQUEST = re.compile(r"^v2/(sw|fw)/request/([^/]+)/chunk/(\d+)$")
_HASHLIB_ALGORITHMS = {"MD5": "md5", "SHA256": "sha256", "SHA384": "sha384", "SHA512": "sha512"}
# Beyond the payload, a PUBLISH body holds the topic (at most 2 + 65535 bytes) and an id.
_PUBLISH_OVERHEAD = 2 + 65535 + 2

_T = TypeVar("_T")
DeviceKey = tuple[str, ...]


@dataclass(frozen=True)
class Limits:
    """What ThingsBoard enforces per device; a rate limit of None is no limit.

    Each rate limit is ``"N:S,N:S,..."``: N tokens per S seconds, all windows at once.
    ``messages`` counts every publish of a device session, ``telemetry_messages`` every
    telemetry publish, ``telemetry_data_points`` every key of every telemetry record.
    """

    messages: str | None = None
    telemetry_messages: str | None = None
    telemetry_data_points: str | None = None
    max_payload_size: int = DEFAULT_MAX_PAYLOAD_SIZE
    max_inflight_messages: int = DEFAULT_MAX_INFLIGHT_MESSAGES

    def __post_init__(self) -> None:
        for spec in (self.messages, self.telemetry_messages, self.telemetry_data_points):
            if spec is not None:
                parse_limit_spec(spec)
        if self.max_payload_size <= 0:
            raise ValueError(f"max_payload_size must be positive, not {self.max_payload_size}")
        if self.max_inflight_messages <= 0:
            raise ValueError("max_inflight_messages must be positive, "
                             f"not {self.max_inflight_messages}")

    def session_limits(self) -> dict[str, Any]:
        """The answer to ``getSessionLimits``, as ThingsBoard gives it."""
        rate_limits = {name: spec for name, spec in (
            ("messages", self.messages),
            ("telemetryMessages", self.telemetry_messages),
            ("telemetryDataPoints", self.telemetry_data_points),
        ) if spec is not None}
        return {"maxPayloadSize": self.max_payload_size,
                "maxInflightMessages": self.max_inflight_messages,
                "rateLimits": rate_limits}


@dataclass(frozen=True)
class ConnectionRecord:
    """One CONNECT the server answered."""

    client_id: str
    username: str | None
    listener: str  # "tls" or "plain"
    return_code: int  # the CONNACK return code, 0 = accepted
    kind: str  # "device", "provision" or "refused"

    @property
    def accepted(self) -> bool:
        return self.return_code == mq.ACCEPTED


class _Violation(Exception):
    """The device broke a rule: the server closes the connection without PUBACK."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class _DeviceBuckets:
    """The three rate limits of one device, built from the `Limits` in force."""

    def __init__(self, limits: Limits, clock: Clock) -> None:
        def make(spec: str | None) -> RateLimit | None:
            return RateLimit(spec, clock) if spec is not None else None

        self.messages = make(limits.messages)
        self.telemetry_messages = make(limits.telemetry_messages)
        self.data_points = make(limits.telemetry_data_points)

    def check_message(self) -> None:
        _take(self.messages, 1, CLOSE_RATE_MESSAGES, "message")

    def check_telemetry(self, data_points: int) -> None:
        self.check_message()
        _take(self.telemetry_messages, 1, CLOSE_RATE_TELEMETRY_MESSAGES, "telemetry message")
        _take(self.data_points, data_points, CLOSE_RATE_DATA_POINTS, "data points")


def _take(limit: RateLimit | None, tokens: int, reason: str, what: str) -> None:
    if limit is not None and not limit.try_consume(tokens):
        raise _Violation(reason, f"{tokens} {what}, {limit.available():.1f} available, "
                                 f"limit {limit.spec}")


class _Session(asyncio.Protocol):
    """One client connection. Runs on the server's event loop only."""

    def __init__(self, server: FakeThingsBoard, listener: str) -> None:
        self.server = server
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.decoder = mq.FrameDecoder()
        self.kind = ""  # "device" or "provision" once CONNECT is accepted
        self.device_key: DeviceKey | None = None
        self.client_id = ""
        self.username: str | None = None
        self.keepalive = 0
        self.opened = self.last_seen = time.monotonic()
        self.subscriptions: dict[str, int] = {}
        self.closing = False
        self.held_out: list[bytes] = []  # written while the server is paused
        self.held_in: list[bytes] = []  # read while the server is paused
        self._packet_ids = itertools.cycle(range(1, 65536))
        self.unacked: set[int] = set()

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server._sessions.add(self)
        if self.server._paused:
            transport.pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.server._session_gone(self)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        if self.server._paused:
            self.held_in.append(data)
            return
        self.last_seen = time.monotonic()
        self.decoder.max_body = self.server._limits.max_payload_size + _PUBLISH_OVERHEAD
        try:
            frames = self.decoder.feed(data)
        except mq.FrameTooLarge as error:
            if error.packet_type == mq.PUBLISH:
                self.server._count_oversize()
                self.close(CLOSE_OVERSIZE, f"a {error.length} byte PUBLISH")
            else:
                self.close(CLOSE_PROTOCOL, str(error))
            return
        except mq.ProtocolError as error:
            self.close(CLOSE_PROTOCOL, str(error))
            return
        for frame in frames:
            if self.closing:
                return
            try:
                self._handle(frame)
            except _Violation as violation:
                self.close(violation.reason, violation.detail)
            except mq.ProtocolError as error:
                self.close(CLOSE_PROTOCOL, str(error))
            except Exception:
                log.exception("FakeThingsBoard: failed to handle a packet of type %d",
                              frame.packet_type)
                self.close(CLOSE_PROTOCOL, "internal error")

    # -- packets ---------------------------------------------------------------------

    def _handle(self, frame: mq.Frame) -> None:
        kind = frame.packet_type
        if kind == mq.PUBLISH:
            if not self.kind:
                raise mq.ProtocolError("PUBLISH before CONNECT")
            publish = mq.parse_publish(frame.flags, frame.body)
            if publish.qos > 1:
                raise mq.ProtocolError("QoS 2 is not supported")
            self.server._on_publish(self, publish)
            if publish.qos == 1 and not self.closing:
                assert publish.packet_id is not None
                self.send(mq.encode_puback(publish.packet_id))
        elif kind == mq.PUBACK:
            self.unacked.discard(mq.parse_packet_id(frame.body))
        elif kind == mq.CONNECT:
            if self.kind:
                raise mq.ProtocolError("a second CONNECT")
            self.server._on_connect(self, mq.parse_connect(frame.body))
        elif not self.kind:
            raise mq.ProtocolError(f"packet type {kind} before CONNECT")
        elif kind == mq.SUBSCRIBE:
            packet_id, wanted = mq.parse_subscribe(frame.flags, frame.body)
            codes = [self._subscribe(topic_filter, qos) for topic_filter, qos in wanted]
            self.send(mq.encode_suback(packet_id, codes))
        elif kind == mq.UNSUBSCRIBE:
            packet_id, filters = mq.parse_unsubscribe(frame.flags, frame.body)
            for topic_filter in filters:
                self.subscriptions.pop(topic_filter, None)
            self.send(mq.encode_unsuback(packet_id))
        elif kind == mq.PINGREQ:
            self.send(mq.PINGRESP_PACKET)
        elif kind == mq.DISCONNECT:
            self.closing = True
            if self.transport is not None:
                self.transport.close()
        else:
            raise mq.ProtocolError(f"unexpected packet type {kind}")

    def _subscribe(self, topic_filter: str, qos: int) -> int:
        if not mq.valid_filter(topic_filter):
            return mq.SUBACK_FAILURE
        if self.kind == "provision" and topic_filter != PROVISION_RESPONSE_TOPIC:
            return mq.SUBACK_FAILURE
        granted = min(qos, 1)
        self.subscriptions[topic_filter] = granted
        return granted

    # -- writing ---------------------------------------------------------------------

    def granted_qos(self, topic: str) -> int | None:
        """The QoS of the best subscription matching `topic`; None when none matches."""
        best: int | None = None
        for topic_filter, qos in self.subscriptions.items():
            if mq.topic_matches(topic_filter, topic) and (best is None or qos > best):
                best = qos
        return best

    def publish(self, topic: str, payload: bytes, qos: int) -> None:
        if self.closing:
            return
        packet_id: int | None = None
        if qos:
            packet_id = next(self._packet_ids)
            self.unacked.add(packet_id)
        self.send(mq.encode_publish(topic, payload, qos, packet_id))

    def send(self, data: bytes) -> None:
        if self.closing or self.transport is None:
            return
        if self.server._paused:
            self.held_out.append(data)
        else:
            self.transport.write(data)

    def close(self, reason: str, detail: str = "", *, abort: bool = False) -> None:
        """Close the connection (server-initiated), recording why."""
        if self.closing:
            return
        self.closing = True
        self.server._record_close(self, reason, detail)
        if self.transport is not None:
            if abort or self.server._paused:
                self.transport.abort()
            else:
                self.transport.close()

    def freeze(self) -> None:
        if self.transport is not None and not self.closing:
            self.transport.pause_reading()

    def thaw(self) -> None:
        self.last_seen = time.monotonic()
        if self.transport is None or self.closing:
            return
        held_out, self.held_out = self.held_out, []
        for data in held_out:
            self.transport.write(data)
        held_in, self.held_in = self.held_in, []
        for data in held_in:
            self.data_received(data)
        if not self.closing:
            self.transport.resume_reading()


class FakeThingsBoard:
    """ThingsBoard's device MQTT transport for one device, as a real MQTT server.

    Ports are chosen at construction and kept across `stop()`/`start()`, so a device can
    reconnect to the same port after a simulated outage. The plain attributes below
    configure how it answers and may be changed at any time.
    """

    host = "127.0.0.1"
    tls_hostname = "localhost"

    def __init__(
        self,
        pki: Pki | None = None,
        *,
        limits: Limits | None = None,
        clock: Clock = time.monotonic,
        keep_telemetry: bool = True,
        on_telemetry: Callable[[bytes, float], None] | None = None,
    ) -> None:
        self.pki = pki
        ports = free_tcp_ports(2 if pki else 1, self.host)
        self._plain_port = ports[0]
        self._tls_port = ports[1] if pki else None

        # How to answer provisioning: "success", "not_found", "failure" or "silent".
        self.provision_mode = "success"
        self.access_token = "sandbox-access-token"
        # {"clientId", "userName", "password"}: answer MQTT_BASIC instead of a token.
        self.basic_credentials: dict[str, str] | None = None
        self.ignore_first_provision_requests = 0
        self.expected_provision_key: str | None = None
        self.expected_provision_secret: str | None = None
        # Delay before each OTA chunk answer, to let tests interrupt a download.
        self.chunk_delay_s = 0.0
        # Whether to answer the client-side RPC getSessionLimits (older servers do not).
        self.answer_session_limits = True
        # Telemetry payloads are kept (and parsed when asked for) unless this is False;
        # `on_telemetry(payload, wall clock seconds)` sees every accepted one either way.
        self.keep_telemetry = keep_telemetry
        self.on_telemetry = on_telemetry

        self._limits = limits or Limits()
        self._clock = clock
        self._lock = threading.Lock()
        self._rpc_answered = threading.Condition(self._lock)
        self._rpc_ids = itertools.count(1)
        self._packages: dict[str, bytes] = {}
        self._shared: dict[str, Any] = {}
        self._accepted_tokens: set[str] = set()
        self._accepted_basic: list[dict[str, str]] = []
        self._connections: list[ConnectionRecord] = []
        self._reset_records()

        # Event loop side (touched on the loop thread only, except where noted).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._servers: list[asyncio.Server] = []
        self._sessions: set[_Session] = set()
        self._by_device: dict[DeviceKey, _Session] = {}
        self._buckets: dict[DeviceKey, _DeviceBuckets] = {}
        self._timers: set[asyncio.TimerHandle] = set()
        self._housekeeping: asyncio.Task[None] | None = None
        self._paused = False

    def _reset_records(self) -> None:
        # (wall clock ms, monotonic ms, payload, records) of every telemetry publish
        self._telemetry_log: list[tuple[int, float, bytes, int]] = []
        self._telemetry: list[dict[str, Any]] = []
        self._receive_times_ms: list[float] = []
        self._parsed_upto = 0
        self._record_count = 0
        self._publish_count = 0
        self._bad_payloads = 0
        self._oversize_payloads = 0
        self._client_attributes: dict[str, Any] = {}
        self._attribute_publishes: list[dict[str, Any]] = []
        self._attribute_requests: list[dict[str, Any]] = []
        self._provision_requests: list[dict[str, Any]] = []
        self._rpc_responses: dict[int, Any] = {}
        self._client_rpc_requests: list[dict[str, Any]] = []
        self._chunk_log: list[tuple[str, str, int, int]] = []
        self._unknown_publishes: list[str] = []
        self._closes: list[str] = []

    # -- ports and life cycle -------------------------------------------------------

    @property
    def plain_port(self) -> int:
        """Port of the plain (unencrypted) listener."""
        return self._plain_port

    @property
    def tls_port(self) -> int:
        """Port of the TLS listener; RuntimeError when constructed without a Pki."""
        if self._tls_port is None:
            raise RuntimeError("this stand-in has no TLS listener (constructed without a Pki)")
        return self._tls_port

    @property
    def running(self) -> bool:
        """Whether the listeners are open (paused counts as running)."""
        return self._thread is not None

    @property
    def native_thread_id(self) -> int | None:
        """The operating system's id of the server's network thread (None when stopped)."""
        return self._thread.native_id if self._thread is not None else None

    @property
    def connected(self) -> bool:
        """Kept for older tests: the server is up (it needs no broker connection)."""
        return self.running

    def wait_ready(self, timeout: float = 10.0) -> bool:
        """Kept for older tests: True once the listeners are open."""
        return self.running

    def start(self, timeout: float = 10.0) -> None:
        """Open the listeners (on the ports chosen at construction) in a background thread."""
        if self._thread is not None:
            return
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=self._run_loop, args=(loop,),
                                  name="fake-thingsboard", daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread
        try:
            asyncio.run_coroutine_threadsafe(self._open(timeout), loop).result(timeout + 5)
        except BaseException as error:
            self.stop()
            raise RuntimeError(f"FakeThingsBoard could not listen on {self.host}: {error}") \
                from error

    def stop(self, timeout: float = 10.0) -> None:
        """Close every connection and the listeners (an outage); records are kept."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._close(), loop).result(timeout)
        except (concurrent.futures.TimeoutError, RuntimeError):
            log.warning("FakeThingsBoard: the server did not close cleanly")
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        self._loop = self._thread = None

    def restart(self) -> None:
        """Stop and start again on the same ports."""
        self.stop()
        self.start()

    def pause(self) -> None:
        """Freeze: connections stay open (new ones are accepted) but nothing is read or
        answered until `resume()`; what the server would send meanwhile is held back."""
        self._call(self._pause)

    def resume(self) -> None:
        """Unfreeze a paused server: held input is processed, held output sent."""
        self._call(self._resume)

    @property
    def paused(self) -> bool:
        return self._paused

    def kill_connections(self) -> None:
        """Drop every connection abruptly (TCP reset, no MQTT goodbye); listeners stay."""
        self._call(self._kill_all)

    def __enter__(self) -> FakeThingsBoard:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def clear(self) -> None:
        """Forget everything recorded (telemetry, attributes, requests, RPC answers, counters,
        closes). Shared attributes, packages, accepted credentials, rate limit buckets and
        the connection log stay."""
        with self._lock:
            self._reset_records()

    # -- limits ----------------------------------------------------------------------

    @property
    def limits(self) -> Limits:
        """The limits in force."""
        return self._limits

    def set_limits(self, limits: Limits | None = None, **changes: Any) -> None:
        """Replace the limits (`limits`, or the current ones with `changes`, e.g.
        ``set_limits(messages="5:60")``). Changed rate limits start with full buckets
        for every device, as when ThingsBoard applies a new device profile."""
        new = dataclasses.replace(limits or self._limits, **changes)
        old = self._limits
        self._limits = new
        rates = ("messages", "telemetry_messages", "telemetry_data_points")
        if any(getattr(old, name) != getattr(new, name) for name in rates):
            self._call_soon(self._buckets.clear)

    @property
    def max_payload_size(self) -> int:
        """Largest payload accepted; a larger publish closes the connection."""
        return self._limits.max_payload_size

    @max_payload_size.setter
    def max_payload_size(self, size: int) -> None:
        self.set_limits(max_payload_size=size)

    # -- credentials -----------------------------------------------------------------

    def accept_token(self, token: str) -> None:
        """Accept `token` as an access token (besides `access_token` and provisioned ones)."""
        with self._lock:
            self._accepted_tokens.add(token)

    def accept_basic(self, client_id: str = "", username: str = "", password: str = "") -> None:
        """Accept MQTT_BASIC credentials; an empty client id or password is not checked."""
        with self._lock:
            self._accepted_basic.append(
                {"clientId": client_id, "userName": username, "password": password})

    # -- recorded state ------------------------------------------------------------

    def telemetry(self) -> list[dict[str, Any]]:
        """Every telemetry record received, in order, as `{"ts": int, "values": dict}`."""
        with self._lock:
            self._parse_telemetry()
            return [dict(record) for record in self._telemetry]

    def telemetry_values(self, key: str) -> list[Any]:
        """The values of `key` in the telemetry records that carry it, in order."""
        with self._lock:
            self._parse_telemetry()
            return [r["values"][key] for r in self._telemetry if key in r["values"]]

    def receive_times_ms(self) -> list[float]:
        """Monotonic receive time (ms) of each telemetry record, parallel to `telemetry()`."""
        with self._lock:
            self._parse_telemetry()
            return list(self._receive_times_ms)

    def telemetry_payloads(self) -> list[tuple[float, bytes]]:
        """(wall clock seconds, payload) of every telemetry publish received, in order."""
        with self._lock:
            return [(wall_ms / 1000, payload) for wall_ms, _, payload, _ in self._telemetry_log]

    @property
    def record_count(self) -> int:
        """Number of telemetry records received (without parsing them again)."""
        with self._lock:
            return self._record_count

    @property
    def publish_count(self) -> int:
        """Number of telemetry publishes received (one may carry many records)."""
        with self._lock:
            return self._publish_count

    @property
    def bad_payloads(self) -> int:
        """Number of publishes refused because their payload was invalid."""
        with self._lock:
            return self._bad_payloads

    @property
    def oversize_payloads(self) -> int:
        """Number of publishes refused because they exceeded `max_payload_size`."""
        with self._lock:
            return self._oversize_payloads

    @property
    def client_attributes(self) -> dict[str, Any]:
        """Client attributes as merged from the device's publishes."""
        with self._lock:
            return dict(self._client_attributes)

    @property
    def attribute_publishes(self) -> list[dict[str, Any]]:
        """Every client attribute publish, in order."""
        with self._lock:
            return list(self._attribute_publishes)

    @property
    def attribute_requests(self) -> list[dict[str, Any]]:
        """Attribute requests as `{"request_id", "clientKeys": [...], "sharedKeys": [...]}`."""
        with self._lock:
            return list(self._attribute_requests)

    @property
    def provision_requests(self) -> list[dict[str, Any]]:
        """Every provisioning request received, in order."""
        with self._lock:
            return list(self._provision_requests)

    @property
    def shared_attributes(self) -> dict[str, Any]:
        """The shared attributes the server holds for the device."""
        with self._lock:
            return dict(self._shared)

    @property
    def rpc_responses(self) -> dict[int, Any]:
        """Answers to server-side RPCs, by request id."""
        with self._lock:
            return dict(self._rpc_responses)

    @property
    def client_rpc_requests(self) -> list[dict[str, Any]]:
        """Client-side RPC requests (published by the device), in order, as
        `{"request_id": str, "method": str, "params": ...}`."""
        with self._lock:
            return list(self._client_rpc_requests)

    @property
    def chunk_requests(self) -> int:
        """Number of OTA chunk requests received."""
        with self._lock:
            return len(self._chunk_log)

    def chunk_history(self) -> list[tuple[str, str, int, int]]:
        """Every chunk request as (kind, request id, chunk number, chunk size)."""
        with self._lock:
            return list(self._chunk_log)

    @property
    def unknown_publishes(self) -> list[str]:
        """Topics of device publishes the server does not know (acknowledged, dropped)."""
        with self._lock:
            return list(self._unknown_publishes)

    @property
    def closes(self) -> list[str]:
        """Why the server closed connections, in order (the CLOSE_* reasons)."""
        with self._lock:
            return list(self._closes)

    def close_count(self, prefix: str) -> int:
        """Number of server-initiated closes whose reason starts with `prefix`."""
        with self._lock:
            return sum(1 for reason in self._closes if reason.startswith(prefix))

    @property
    def rate_limit_closes(self) -> int:
        return self.close_count("rate limit")

    @property
    def oversize_closes(self) -> int:
        return self.close_count(CLOSE_OVERSIZE)

    @property
    def bad_payload_closes(self) -> int:
        return self.close_count(CLOSE_BAD_PAYLOAD)

    @property
    def connections(self) -> list[ConnectionRecord]:
        """Every CONNECT answered (accepted or refused), oldest first."""
        with self._lock:
            return list(self._connections)

    @property
    def connection_count(self) -> int:
        """Number of accepted connections (device and provisioning sessions)."""
        with self._lock:
            return sum(1 for record in self._connections if record.accepted)

    def connected_usernames(self) -> list[tuple[str, str]]:
        """(client id, user name) of every accepted connection, oldest first."""
        with self._lock:
            return [(r.client_id, r.username or "") for r in self._connections if r.accepted]

    def active_sessions(self) -> list[tuple[str, str]]:
        """(client id, user name) of the sessions open now."""
        return self._call(lambda: [(s.client_id, s.username or "") for s in self._sessions
                                   if s.kind and not s.closing]) if self.running else []

    # -- server actions --------------------------------------------------------------

    def set_shared(self, attributes: Mapping[str, Any]) -> None:
        """Merge `attributes` into the shared attributes and push them to the device."""
        with self._lock:
            self._shared.update(attributes)
        self._push(ATTRIBUTES_TOPIC, json.dumps(dict(attributes)).encode())

    def delete_shared(self, keys: Iterable[str]) -> None:
        """Delete shared attributes and tell the device with `{"deleted": [...]}`."""
        deleted = list(keys)
        with self._lock:
            for key in deleted:
                self._shared.pop(key, None)
        self._push(ATTRIBUTES_TOPIC, json.dumps({"deleted": deleted}).encode())

    def rpc_async(self, method: str, params: object = None) -> int:
        """Send a server-side RPC request; returns its id (see `rpc_responses`).

        `params=None` is sent as `{}`, as ThingsBoard does for an RPC without parameters.
        """
        with self._lock:
            request_id = next(self._rpc_ids)
        payload = {"method": method, "params": {} if params is None else params}
        self._push(f"{RPC_REQUEST_PREFIX}{request_id}", json.dumps(payload).encode())
        return request_id

    def rpc_raw(self, payload: bytes | str) -> int:
        """Send a server-side RPC request with exactly `payload` (malformed ones too)."""
        with self._lock:
            request_id = next(self._rpc_ids)
        raw = payload.encode() if isinstance(payload, str) else bytes(payload)
        self._push(f"{RPC_REQUEST_PREFIX}{request_id}", raw)
        return request_id

    def publish_to_device(self, topic: str, payload: bytes | str) -> None:
        """Send `payload` on `topic` to every device session subscribed to it."""
        self._push(topic, payload.encode() if isinstance(payload, str) else bytes(payload))

    def wait_rpc_response(self, request_id: int, timeout: float = 10.0) -> Any:
        """Wait for the answer to RPC `request_id`; TimeoutError when none comes in time."""
        deadline = time.monotonic() + timeout
        with self._rpc_answered:
            while request_id not in self._rpc_responses:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no answer to RPC {request_id} within {timeout:g} s")
                self._rpc_answered.wait(remaining)
            return self._rpc_responses[request_id]

    def rpc(self, method: str, params: object = None, timeout: float = 10.0) -> Any:
        """Send a server-side RPC and return the device's decoded answer."""
        return self.wait_rpc_response(self.rpc_async(method, params), timeout)

    def add_package(self, kind: str, data: bytes) -> None:
        """Store the OTA package served in chunks for `kind` ("sw" or "fw")."""
        if kind not in PACKAGE_KINDS:
            raise ValueError(f"package kind must be one of {PACKAGE_KINDS}, not {kind!r}")
        with self._lock:
            self._packages[kind] = bytes(data)

    def assign_package(
        self,
        kind: str,
        title: str,
        version: str,
        data: bytes,
        *,
        checksum_algorithm: str = "SHA256",
        checksum: str | None = None,
    ) -> None:
        """Store a package and announce it as ThingsBoard does, through shared attributes.

        Sets `<kind>_title`, `_version`, `_size`, `_checksum_algorithm` and
        `_checksum`. The checksum is computed for MD5 and SHA256/384/512; pass
        `checksum` for the other algorithms.
        """
        if checksum is None:
            name = _HASHLIB_ALGORITHMS.get(checksum_algorithm)
            if name is None:
                raise ValueError(f"pass the checksum explicitly for {checksum_algorithm}")
            checksum = hashlib.new(name, data).hexdigest()
        self.add_package(kind, data)
        self.set_shared(
            {
                f"{kind}_title": title,
                f"{kind}_version": version,
                f"{kind}_size": len(data),
                f"{kind}_checksum_algorithm": checksum_algorithm,
                f"{kind}_checksum": checksum,
            }
        )

    # -- waiting -------------------------------------------------------------------

    def wait_for(
        self,
        predicate: Callable[[], bool],
        timeout: float = 10.0,
        interval: float = 0.02,
        message: str | None = None,
    ) -> None:
        """Poll `predicate` until true; AssertionError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(message or f"condition not met within {timeout:g} s")
            time.sleep(interval)

    def wait_for_telemetry(self, count: int, timeout: float = 10.0) -> None:
        """Wait until at least `count` telemetry records have arrived."""

        def enough() -> bool:
            with self._lock:
                return self._record_count >= count

        try:
            self.wait_for(enough, timeout)
        except AssertionError:
            with self._lock:
                got = self._record_count
            raise AssertionError(
                f"expected {count} telemetry records within {timeout:g} s, got {got}"
            ) from None

    def wait_for_session(self, timeout: float = 10.0) -> None:
        """Wait until a device session is open."""
        self.wait_for(lambda: any(user != PROVISION_USERNAME
                                  for _, user in self.active_sessions()),
                      timeout, message=f"no device session within {timeout:g} s")

    # -- event loop plumbing ---------------------------------------------------------

    @staticmethod
    def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            loop.close()

    def _call(self, fn: Callable[[], _T], timeout: float = 10.0) -> _T:
        """Run `fn` on the event loop and return its result (RuntimeError when stopped)."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("FakeThingsBoard is not running")

        async def run() -> _T:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), loop).result(timeout)

    def _call_soon(self, fn: Callable[[], object]) -> None:
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(fn)
        else:
            fn()

    async def _open(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        listeners: list[tuple[str, int, ssl.SSLContext | None]] = [
            ("plain", self._plain_port, None)]
        if self.pki is not None and self._tls_port is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.load_cert_chain(self.pki.server_cert, self.pki.server_key)
            listeners.append(("tls", self._tls_port, context))
        deadline = time.monotonic() + timeout
        for name, port, tls in listeners:
            while True:
                try:
                    server = await loop.create_server(
                        functools.partial(_Session, self, name),
                        self.host, port, ssl=tls, reuse_address=True,
                        ssl_handshake_timeout=10.0 if tls else None)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.1)
            self._servers.append(server)
        self._paused = False
        self._housekeeping = loop.create_task(self._housekeep())

    async def _close(self) -> None:
        for server in self._servers:
            server.close()
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            self._housekeeping = None
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        for session in list(self._sessions):
            session.closing = True
            if session.transport is not None:
                session.transport.abort()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        await asyncio.sleep(0)
        self._sessions.clear()
        self._by_device.clear()
        self._paused = False

    async def _housekeep(self) -> None:
        while True:
            await asyncio.sleep(HOUSEKEEPING_PERIOD_S)
            if self._paused:
                continue
            now = time.monotonic()
            for session in list(self._sessions):
                if session.closing:
                    continue
                if not session.kind and now - session.opened > CONNECT_TIMEOUT_S:
                    session.close(CLOSE_PROTOCOL, "no CONNECT in time")
                elif session.keepalive and now - session.last_seen > 1.5 * session.keepalive:
                    session.close(CLOSE_KEEPALIVE, f"{session.keepalive} s keepalive")

    def _pause(self) -> None:
        self._paused = True
        for session in self._sessions:
            session.freeze()

    def _resume(self) -> None:
        self._paused = False
        for session in list(self._sessions):
            session.thaw()

    def _kill_all(self) -> None:
        for session in list(self._sessions):
            session.close(CLOSE_KILLED, abort=True)

    def _session_gone(self, session: _Session) -> None:
        self._sessions.discard(session)
        if session.device_key is not None and self._by_device.get(session.device_key) is session:
            del self._by_device[session.device_key]

    def _record_close(self, session: _Session, reason: str, detail: str) -> None:
        log.info("FakeThingsBoard: closing the connection of %r: %s%s", session.client_id,
                 reason, f" ({detail})" if detail else "")
        with self._lock:
            self._closes.append(reason)

    def _push(self, topic: str, payload: bytes) -> None:
        """Send to every device session subscribed to `topic` (from any thread)."""

        def push() -> None:
            for session in list(self._sessions):
                if session.kind == "device" and not session.closing:
                    qos = session.granted_qos(topic)
                    if qos is not None:
                        session.publish(topic, payload, qos)

        if self._loop is not None:
            self._call_soon(push)

    def _later(self, delay: float, fn: Callable[[], None]) -> None:
        loop = asyncio.get_running_loop()

        def fire() -> None:
            self._timers.discard(handle)
            fn()

        handle = loop.call_later(delay, fire)
        self._timers.add(handle)

    @staticmethod
    def _reply(session: _Session, topic: str, payload: bytes) -> None:
        """Answer a request on the session that made it, as ThingsBoard does, whether or
        not the device subscribed (with the subscription's QoS when it did)."""
        session.publish(topic, payload, session.granted_qos(topic) or 0)

    # -- CONNECT ---------------------------------------------------------------------

    def _on_connect(self, session: _Session, connect: mq.Connect) -> None:
        if connect.protocol_name != "MQTT" or connect.protocol_level != 4:
            session.send(mq.encode_connack(mq.REFUSED_PROTOCOL_VERSION))
            raise _Violation(CLOSE_PROTOCOL, f"protocol {connect.protocol_name!r} level "
                             f"{connect.protocol_level} (only MQTT 3.1.1 is served)")
        if not connect.client_id and not connect.clean_session:
            session.send(mq.encode_connack(mq.REFUSED_IDENTIFIER))
            raise _Violation(CLOSE_PROTOCOL, "an empty client id needs a clean session")
        code, kind, key = self._authenticate(connect)
        session.client_id, session.username = connect.client_id, connect.username
        with self._lock:
            self._connections.append(ConnectionRecord(
                connect.client_id, connect.username, session.listener, code, kind))
        if code != mq.ACCEPTED:
            session.send(mq.encode_connack(code))
            raise _Violation(CLOSE_NOT_AUTHORIZED, f"user {connect.username!r}")
        session.kind, session.device_key, session.keepalive = kind, key, connect.keepalive
        if key is not None:
            previous = self._by_device.get(key)
            if previous is not None and previous is not session:
                previous.close(CLOSE_TAKEN_OVER, f"by {connect.client_id!r}", abort=True)
            self._by_device[key] = session
        session.send(mq.encode_connack(mq.ACCEPTED))

    def _authenticate(self, connect: mq.Connect) -> tuple[int, str, DeviceKey | None]:
        """(CONNACK code, session kind, device key) for a CONNECT."""
        username = connect.username
        password = (connect.password or b"").decode("utf-8", errors="replace")
        if username == PROVISION_USERNAME and not password:
            return mq.ACCEPTED, "provision", None
        with self._lock:
            tokens = self._accepted_tokens | {self.access_token}
            basics = list(self._accepted_basic)
        if self.basic_credentials is not None:
            basics.append(dict(self.basic_credentials))
        if username and not password and username in tokens:
            return mq.ACCEPTED, "device", ("token", username)
        known_user = False
        for basic in basics:
            client_id = basic.get("clientId") or ""
            user = basic.get("userName") or ""
            secret = basic.get("password") or ""
            if not client_id and not user:
                continue
            if (client_id and client_id != connect.client_id) or (user and user != username):
                continue
            known_user = True
            if secret == password:
                return mq.ACCEPTED, "device", ("basic", client_id, user)
        if known_user:
            return mq.REFUSED_BAD_USERNAME_OR_PASSWORD, "refused", None
        return mq.REFUSED_NOT_AUTHORIZED, "refused", None

    # -- PUBLISH ---------------------------------------------------------------------

    def _on_publish(self, session: _Session, publish: mq.Publish) -> None:
        """Handle a device's publish; raises _Violation to close without PUBACK."""
        topic, payload = publish.topic, publish.payload
        limits = self._limits
        if len(payload) > limits.max_payload_size:
            self._count_oversize()
            raise _Violation(CLOSE_OVERSIZE, f"{len(payload)} bytes on {topic} "
                             f"(limit {limits.max_payload_size})")
        if session.kind == "provision":
            if topic != PROVISION_REQUEST_TOPIC:
                raise _Violation(CLOSE_PROVISION_TOPIC, topic)
            self._handle_provision_request(session, payload)
            return
        assert session.device_key is not None
        buckets = self._buckets.get(session.device_key)
        if buckets is None:
            buckets = self._buckets[session.device_key] = _DeviceBuckets(limits, self._clock)
        if topic == TELEMETRY_TOPIC:
            self._handle_telemetry(payload, buckets)
            return
        buckets.check_message()
        if topic == ATTRIBUTES_TOPIC:
            self._handle_client_attributes(payload)
        elif topic.startswith(ATTRIBUTE_REQUEST_PREFIX):
            self._handle_attribute_request(
                session, topic.removeprefix(ATTRIBUTE_REQUEST_PREFIX), payload)
        elif topic.startswith(RPC_RESPONSE_PREFIX):
            self._handle_rpc_response(topic.removeprefix(RPC_RESPONSE_PREFIX), payload)
        elif topic.startswith(RPC_REQUEST_PREFIX):
            self._handle_client_rpc(session, topic.removeprefix(RPC_REQUEST_PREFIX), payload)
        elif match := _CHUNK_REQUEST.match(topic):
            kind, request_id, chunk = match.groups()
            self._handle_chunk_request(session, kind, request_id, int(chunk), payload)
        else:
            log.info("FakeThingsBoard: publish on unknown topic %s dropped", topic)
            with self._lock:
                self._unknown_publishes.append(topic)

    def _count_oversize(self) -> None:
        with self._lock:
            self._oversize_payloads += 1

    def _bad_payload(self, topic: str, payload: bytes, why: str) -> _Violation:
        log.warning("FakeThingsBoard: bad payload on %s (%s): %.200r", topic, why, payload)
        with self._lock:
            self._bad_payloads += 1
        return _Violation(CLOSE_BAD_PAYLOAD, f"{topic}: {why}")

    def _handle_telemetry(self, payload: bytes, buckets: _DeviceBuckets) -> None:
        try:
            records, data_points = _count_telemetry(json.loads(payload))
        except ValueError as error:
            raise self._bad_payload(TELEMETRY_TOPIC, payload, str(error)) from None
        if log.isEnabledFor(logging.DEBUG):
            log.debug("FakeThingsBoard: telemetry, %d records, %d data points, %d bytes",
                      records, data_points, len(payload))
        buckets.check_telemetry(data_points)
        wall = time.time()
        with self._lock:
            self._publish_count += 1
            self._record_count += records
            if self.keep_telemetry:
                self._telemetry_log.append(
                    (int(wall * 1000), time.monotonic() * 1000, payload, records))
        if self.on_telemetry is not None:
            self.on_telemetry(payload, wall)

    def _parse_telemetry(self) -> None:
        """Parse the telemetry payloads not parsed yet (the lock is held)."""
        log_entries = self._telemetry_log
        for wall_ms, mono_ms, payload, _ in log_entries[self._parsed_upto:]:
            records = _telemetry_records(json.loads(payload), wall_ms)
            self._telemetry.extend(records)
            self._receive_times_ms.extend([mono_ms] * len(records))
        self._parsed_upto = len(log_entries)

    def _handle_client_attributes(self, payload: bytes) -> None:
        try:
            attributes = json.loads(payload)
        except ValueError as error:
            raise self._bad_payload(ATTRIBUTES_TOPIC, payload, str(error)) from None
        if not isinstance(attributes, dict):
            raise self._bad_payload(ATTRIBUTES_TOPIC, payload, "not a JSON object")
        with self._lock:
            self._attribute_publishes.append(attributes)
            self._client_attributes.update(attributes)

    def _handle_provision_request(self, session: _Session, payload: bytes) -> None:
        try:
            request = json.loads(payload)
        except ValueError as error:
            raise self._bad_payload(PROVISION_REQUEST_TOPIC, payload, str(error)) from None
        if not isinstance(request, dict):
            raise self._bad_payload(PROVISION_REQUEST_TOPIC, payload, "not a JSON object")
        with self._lock:
            self._provision_requests.append(request)
            ignored = len(self._provision_requests) <= self.ignore_first_provision_requests
        if ignored or self.provision_mode == "silent":
            return
        answer = self._provision_answer(request)
        if answer.get("status") == "SUCCESS":
            value = answer["credentialsValue"]
            if answer["credentialsType"] == "ACCESS_TOKEN":
                self.accept_token(str(value))
            else:
                self.accept_basic(str(value.get("clientId") or ""),
                                  str(value.get("userName") or ""),
                                  str(value.get("password") or ""))
        self._reply(session, PROVISION_RESPONSE_TOPIC, json.dumps(answer).encode())

    def _provision_answer(self, request: dict[str, Any]) -> dict[str, Any]:
        key_ok = self.expected_provision_key in (None, request.get("provisionDeviceKey"))
        secret_ok = self.expected_provision_secret in (None, request.get("provisionDeviceSecret"))
        if not (key_ok and secret_ok) or self.provision_mode == "not_found":
            return {"status": "NOT_FOUND", "errorMsg": "Provision data was not found!"}
        if self.provision_mode == "failure":
            return {"status": "FAILURE", "errorMsg": "Failed to provision device!"}
        if self.provision_mode != "success":
            raise ValueError(f"unknown provision_mode {self.provision_mode!r}")
        # Credentials the device chose itself win, as in ThingsBoard.
        if request.get("credentialsType") == "MQTT_BASIC":
            basic = {
                "clientId": request.get("clientId"),
                "userName": request.get("username"),
                "password": request.get("password"),
            }
            return _provision_success("MQTT_BASIC", basic)
        if request.get("credentialsType") == "ACCESS_TOKEN" and request.get("token"):
            return _provision_success("ACCESS_TOKEN", request["token"])
        if self.basic_credentials is not None:
            return _provision_success("MQTT_BASIC", dict(self.basic_credentials))
        return _provision_success("ACCESS_TOKEN", self.access_token)

    def _handle_attribute_request(self, session: _Session, request_id: str,
                                  payload: bytes) -> None:
        topic = ATTRIBUTE_REQUEST_PREFIX + request_id
        try:
            request = json.loads(payload) if payload.strip() else {}
            if not isinstance(request, dict):
                raise ValueError("not a JSON object")
            client_keys = _key_list(request.get("clientKeys"))
            shared_keys = _key_list(request.get("sharedKeys"))
        except ValueError as error:
            raise self._bad_payload(topic, payload, str(error)) from None
        answer: dict[str, dict[str, Any]] = {}
        with self._lock:
            self._attribute_requests.append(
                {"request_id": request_id, "clientKeys": client_keys, "sharedKeys": shared_keys}
            )
            client = _pick(self._client_attributes, client_keys)
            shared = _pick(self._shared, shared_keys)
        if client:
            answer["client"] = client
        if shared:
            answer["shared"] = shared
        self._reply(session, ATTRIBUTE_RESPONSE_PREFIX + request_id, json.dumps(answer).encode())

    def _handle_rpc_response(self, request_id: str, payload: bytes) -> None:
        topic = RPC_RESPONSE_PREFIX + request_id
        try:
            number = int(request_id)
        except ValueError:
            self._bad_payload(topic, payload, "request id is not a number")
            return
        try:
            answer: Any = json.loads(payload)
        except ValueError as error:
            # ThingsBoard passes the text on; keep it so a test can see it.
            self._bad_payload(topic, payload, str(error))
            answer = payload.decode("utf-8", errors="replace")
        with self._rpc_answered:
            self._rpc_responses[number] = answer
            self._rpc_answered.notify_all()

    def _handle_client_rpc(self, session: _Session, request_id: str, payload: bytes) -> None:
        topic = RPC_REQUEST_PREFIX + request_id
        try:
            request = json.loads(payload)
        except ValueError as error:
            raise self._bad_payload(topic, payload, str(error)) from None
        if not isinstance(request, dict) or not isinstance(request.get("method"), str):
            raise self._bad_payload(topic, payload, "not a JSON object with a method")
        method = request["method"]
        with self._lock:
            self._client_rpc_requests.append(
                {"request_id": request_id, "method": method, "params": request.get("params")})
        if method == SESSION_LIMITS_METHOD and self.answer_session_limits:
            answer = json.dumps(self._limits.session_limits()).encode()
            self._reply(session, RPC_RESPONSE_PREFIX + request_id, answer)

    def _handle_chunk_request(self, session: _Session, kind: str, request_id: str, chunk: int,
                              payload: bytes) -> None:
        error_topic = f"v2/{kind}/error"
        text = payload.decode("ascii", errors="replace").strip()
        size = int(text) if text.isdigit() else 0
        with self._lock:
            self._chunk_log.append((kind, request_id, chunk, size))
            package = self._packages.get(kind)
        if size <= 0:
            self._reply(session, error_topic, f"Invalid chunk size: {text!r}".encode())
            return
        if package is None:
            self._reply(session, error_topic, f"No {kind} package assigned to the device".encode())
            return
        data = package[chunk * size : (chunk + 1) * size]
        topic = f"v2/{kind}/response/{request_id}/chunk/{chunk}"
        delay = self.chunk_delay_s
        if delay <= 0:
            self._reply(session, topic, data)
        else:
            self._later(delay, lambda: self._reply(session, topic, data))


_GET_TS = operator.itemgetter("ts")
_GET_VALUES = operator.itemgetter("values")


def _count_telemetry(document: Any) -> tuple[int, int]:
    """(records, data points) of a telemetry payload in any of its three forms;
    ValueError if it is not one of them."""
    if type(document) is list:
        # The gateway's form, an array of {"ts", "values"}, checked with loops in C.
        try:
            if set(map(type, document)) <= {dict}:
                values = list(map(_GET_VALUES, document))
                if (set(map(type, map(_GET_TS, document))) <= {int}
                        and set(map(type, values)) <= {dict}):
                    return len(document), sum(map(len, values))
        except KeyError:
            pass  # a record without "ts" or "values": the flat form, or an error
    items = document if isinstance(document, list) else [document]
    data_points = 0
    for item in items:
        if not isinstance(item, dict):
            raise ValueError("a telemetry record must be a JSON object")
        if "ts" in item and "values" in item:
            ts, values = item["ts"], item["values"]
            if isinstance(ts, bool) or not isinstance(ts, int):
                raise ValueError(f"ts must be an integer of milliseconds, not {ts!r}")
            if not isinstance(values, dict):
                raise ValueError("values must be a JSON object")
            data_points += len(values)
        else:
            data_points += len(item)
    return len(items), data_points


def _telemetry_records(document: Any, now_ms: int) -> list[dict[str, Any]]:
    """The records of a valid telemetry payload, each as `{"ts", "values"}`."""
    items = document if isinstance(document, list) else [document]
    return [{"ts": item["ts"], "values": item["values"]}
            if "ts" in item and "values" in item else {"ts": now_ms, "values": item}
            for item in items]


def _provision_success(credentials_type: str, value: Any) -> dict[str, Any]:
    return {"status": "SUCCESS", "credentialsType": credentials_type, "credentialsValue": value}


def _pick(attributes: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    return {key: attributes[key] for key in keys if key in attributes}


def _key_list(keys: Any) -> list[str]:
    """Keys of an attribute request: a comma-separated string (or a list); None is none."""
    if keys is None:
        return []
    if isinstance(keys, str):
        return [key.strip() for key in keys.split(",") if key.strip()]
    if isinstance(keys, list) and all(isinstance(key, str) for key in keys):
        return list(keys)
    raise ValueError(f"attribute keys must be a comma-separated string, not {keys!r}")

