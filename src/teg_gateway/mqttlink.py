"""One MQTT connection (a paho-mqtt client) driven by the asyncio event loop.

paho has no network thread here: once connected, the event loop watches its socket
(``loop_read`` when readable, ``loop_write`` while paho has bytes queued, ``loop_misc`` on
a timer for the keepalive), a publish is written at once from the loop, and paho's
callbacks, which then run on the loop's thread, are queued with ``call_soon``. Only the
blocking connect (TCP and TLS handshake) runs in a worker thread. A connection object
lives for one network connection only: paho's own reconnect is off, and the owner makes
a new one (with its own backoff) after a loss. Unacknowledged publishes are therefore
never resent by paho behind the outbox's back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

from teg_gateway.backoff import Backoff

log = logging.getLogger(__name__)

MessageHandler = Callable[[str, bytes], None]

# How often paho's keepalive bookkeeping runs (a PINGREQ goes out at most this late; at
# most half the keepalive).
MISC_EVERY_S = 5.0


class ConnectionLost(Exception):
    """The connection closed before the operation completed."""


class ConnectRefused(Exception):
    """The broker answered CONNECT with a refusal (bad credentials, for example)."""


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


def tls_context(ca_cert: str | None) -> ssl.SSLContext:
    """A client context that verifies the server certificate and host name."""
    ctx = ssl.create_default_context(cafile=ca_cert or None)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class MqttConnection:
    """A single MQTT 3.1.1 connection with asyncio futures for PUBACK and SUBACK."""

    def __init__(
        self,
        client_id: str,
        *,
        username: str | None = None,
        password: str | None = None,
        tls: ssl.SSLContext | None = None,
        keepalive: int = 60,
        on_message: MessageHandler | None = None,
        on_retained: MessageHandler | None = None,
        will: Will | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True,
            protocol=MQTTProtocolVersion.MQTTv311, reconnect_on_failure=False)
        if username is not None:
            self.client.username_pw_set(username, password)
        if tls is not None:
            self.client.tls_set_context(tls)
        if will is not None:
            self.client.will_set(will.topic, will.payload, will.qos, will.retain)
        # The gateway bounds what it has in flight itself: paho's own window is opened wide
        # (and its queue left unlimited, which is what 0 means) so it never holds a
        # publish back behind the gateway's accounting.
        self.client.max_inflight_messages_set(65535)
        self.client.max_queued_messages_set(0)
        self.keepalive = keepalive
        self._on_message = on_message
        # A retained message delivered because of a new subscription (the broker's stored
        # copy, not a live publish) goes to ``on_retained`` when one is given.
        self._on_retained = on_retained or on_message
        self._connack: asyncio.Future[None] = self._loop.create_future()
        self.closed = asyncio.Event()
        self.close_reason = ""
        # Whether the gateway closed the connection itself, and how many publishes were
        # still waiting for their PUBACK when it closed.
        self.closed_by_gateway = False
        self.unacked_at_close = 0
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._subacks: dict[int, asyncio.Future[list[int]]] = {}
        self._loop_thread = threading.get_ident()
        self._fd = -1  # the socket the loop watches (-1: none)
        self._writing = False
        self._misc: asyncio.TimerHandle | None = None
        c = self.client
        c.on_connect = self._thread_on_connect
        c.on_disconnect = self._thread_on_disconnect
        c.on_publish = self._thread_on_publish
        c.on_subscribe = self._thread_on_subscribe
        c.on_message = self._thread_on_message
        c.on_socket_close = self._on_socket_close

    # -- paho's callbacks: queued on the event loop -------------------------------------

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        # RuntimeError: the event loop is closed, nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            if threading.get_ident() == self._loop_thread:
                self._loop.call_soon(fn, *args)
            else:
                self._loop.call_soon_threadsafe(fn, *args)

    # -- paho's socket, watched by the event loop -------------------------------------------

    def _attach(self) -> None:
        sock = self.client.socket()
        if sock is None:
            raise ConnectionLost(self.close_reason or "the connection closed")
        self._fd = sock.fileno()
        self._loop.add_reader(self._fd, self._readable)
        self._misc = self._loop.call_later(self._misc_every_s(), self._tick)
        self._flush()  # the CONNECT may not be written completely yet

    def _detach(self) -> None:
        if self._misc is not None:
            self._misc.cancel()
            self._misc = None
        fd, self._fd = self._fd, -1
        if fd >= 0:
            self._loop.remove_reader(fd)
            if self._writing:
                self._loop.remove_writer(fd)
        self._writing = False

    def _on_socket_close(self, _c: mqtt.Client, _u: Any, sock: Any) -> None:
        # Called by paho just before it closes the socket (on the loop's thread once
        # attached): stop watching it first.
        if self._fd >= 0 and threading.get_ident() == self._loop_thread:
            self._detach()

    def _readable(self) -> None:
        client = self.client
        rc = client.loop_read()
        sock = client.socket()
        # With TLS, records already read and decrypted wait in the SSL object, where the
        # socket's readiness does not show them.
        while (rc == MQTTErrorCode.MQTT_ERR_SUCCESS and isinstance(sock, ssl.SSLSocket)
               and sock.pending() and client.socket() is sock):
            rc = client.loop_read()
        self._flush()

    def _writable(self) -> None:
        self.client.loop_write()
        self._flush()

    def _flush(self) -> None:
        """Write what paho has queued; watch for writability while some is left."""
        client = self.client
        if self._fd < 0:
            return
        if client.want_write():
            client.loop_write()
        want = self._fd >= 0 and client.want_write()
        if want != self._writing:
            if want:
                self._loop.add_writer(self._fd, self._writable)
            else:
                self._loop.remove_writer(self._fd)
            self._writing = want

    def _misc_every_s(self) -> float:
        return min(MISC_EVERY_S, max(0.5, self.keepalive / 2))

    def _tick(self) -> None:
        self._misc = None
        self.client.loop_misc()
        if self._fd >= 0:
            self._flush()
            self._misc = self._loop.call_later(self._misc_every_s(), self._tick)

    def _thread_on_connect(self, _c: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode,
                           _p: Any) -> None:
        self._post(self._on_connack, rc.is_failure, str(rc))

    def _thread_on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode,
                              _p: Any) -> None:
        self._post(self._on_closed, str(rc))

    def _thread_on_publish(self, _c: mqtt.Client, _u: Any, mid: int, _rc: ReasonCode,
                           _p: Any) -> None:
        self._post(self._on_puback, mid)

    def _thread_on_subscribe(self, _c: mqtt.Client, _u: Any, mid: int,
                             rcs: list[ReasonCode], _p: Any) -> None:
        self._post(self._on_suback, mid, [rc.value for rc in rcs])

    def _thread_on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        self._post(self._deliver, msg.topic, msg.payload, bool(msg.retain))

    # -- event loop side ------------------------------------------------------------------

    def _on_connack(self, failed: bool, reason: str) -> None:
        if self._connack.done():
            return
        if failed:
            self._connack.set_exception(ConnectRefused(reason))
        else:
            self._connack.set_result(None)

    def _on_closed(self, reason: str) -> None:
        self._detach()
        if self.closed.is_set():
            return
        self.close_reason = self.close_reason or reason
        self.unacked_at_close = sum(1 for fut in self._pending.values() if not fut.done())
        self.closed.set()
        if not self._connack.done():
            self._connack.set_exception(ConnectionLost(reason))
            # Marked as retrieved: after a failed connect nobody waits for it any more, and
            # asyncio would log an ERROR ("never retrieved") for every failed attempt.
            self._connack.exception()
        error = ConnectionLost(self.close_reason)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(error)
        for sub in self._subacks.values():
            if not sub.done():
                sub.set_exception(error)
        self._pending.clear()
        self._subacks.clear()

    def _on_puback(self, mid: int) -> None:
        fut = self._pending.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _on_suback(self, mid: int, codes: list[int]) -> None:
        fut = self._subacks.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(codes)

    def _deliver(self, topic: str, payload: bytes, retained: bool) -> None:
        handler = self._on_retained if retained else self._on_message
        if handler is None:
            return
        try:
            handler(topic, payload)
        except Exception:  # a handler bug must not kill the connection
            log.exception("handling a message on %s failed", topic)

    # -- public API -----------------------------------------------------------------------

    async def connect(self, host: str, port: int, timeout: float = 30.0) -> None:
        """Open the connection and wait for CONNACK. Raises OSError, ssl.SSLError,
        ConnectRefused, ConnectionLost or TimeoutError."""
        self.client.connect_timeout = min(timeout, 30.0)
        await asyncio.to_thread(self.client.connect, host, port, self.keepalive)
        sock = self.client.socket()
        if isinstance(sock, socket.socket):
            # A publish goes out at once, not held back to be merged with the next one:
            # lower latency, and the server sees publishes when the pacing sent them.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self._attach()
            await asyncio.wait_for(asyncio.shield(self._connack), timeout)
        except BaseException:
            await self.close()
            raise

    @property
    def connected(self) -> bool:
        return self._connack.done() and not self._connack.exception() and not self.closed.is_set()

    def publish(self, topic: str, payload: bytes | str, qos: int = 1,
                retain: bool = False) -> asyncio.Future[None]:
        """Send a message; the future completes on PUBACK (QoS 1) or when written (QoS 0),
        and fails with ConnectionLost if the connection closes first."""
        fut: asyncio.Future[None] = self._loop.create_future()
        if self.closed.is_set():
            fut.set_exception(ConnectionLost(self.close_reason or "not connected"))
            return fut
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            fut.set_exception(ConnectionLost(mqtt.error_string(info.rc)))
            return fut
        self._pending[info.mid] = fut
        self._flush()  # paho wrote what the socket took: watch for the rest
        return fut

    async def subscribe(self, topics: list[str], qos: int = 1, timeout: float = 10.0) -> None:
        """Subscribe and wait for SUBACK; a refused topic raises ConnectRefused."""
        if not topics:
            return
        fut: asyncio.Future[list[int]] = self._loop.create_future()
        rc, mid = self.client.subscribe([(t, qos) for t in topics])
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise ConnectionLost(mqtt.error_string(rc))
        self._flush()
        self._subacks[mid] = fut
        codes = await asyncio.wait_for(fut, timeout)
        refused = [t for t, code in zip(topics, codes, strict=False) if code >= 0x80]
        if refused:
            raise ConnectRefused(f"subscription refused for {', '.join(refused)}")

    async def close(self, reason: str = "closed by the gateway", wait: float = 3.0) -> None:
        """Send DISCONNECT and close the socket.

        If the DISCONNECT cannot be written within ``wait`` seconds (a broker that stopped
        reading), the socket is shut down under paho and closed.
        """
        if not self.close_reason:
            self.close_reason = reason
        if not self.closed.is_set():
            self.closed_by_gateway = True
        self.client.disconnect()
        self._flush()
        if self.client.socket() is not None and not self.closed.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.closed.wait(), wait)
        sock = self.client.socket()
        if sock is not None:
            if isinstance(sock, socket.socket):
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)
            with contextlib.suppress(Exception):
                self.client.loop_read()  # paho sees the end and closes its socket
        self._on_closed(reason)


# A connection that stayed up this long resets the reconnect backoff.
STABLE_AFTER_S = 60.0

CONNECT_ERRORS = (OSError, ConnectionLost, ConnectRefused, TimeoutError)


async def keep_connected(
    connect: Callable[[], Awaitable[MqttConnection]],
    serve: Callable[[MqttConnection], Awaitable[float | None]],
    backoff: Backoff,
    stopping: asyncio.Event,
    on_failure: Callable[[BaseException], None],
    *,
    name: str,
    log_level: int = logging.INFO,
) -> None:
    """Connect, serve until the connection ends, wait a backoff delay, and again, until
    ``stopping`` is set. ``connect`` raises one of CONNECT_ERRORS when it fails; ``serve``
    may return the shortest delay before the next attempt. ``name`` and ``log_level`` are
    for the "reconnecting in" log line."""
    while not stopping.is_set():
        at_least: float | None = None
        try:
            conn = await connect()
        except CONNECT_ERRORS as exc:
            on_failure(exc)
        else:
            started = time.monotonic()
            at_least = await serve(conn)
            if time.monotonic() - started >= STABLE_AFTER_S:
                backoff.reset()
        if stopping.is_set():
            break
        delay = max(backoff.next_delay(), at_least or 0.0)
        log.log(log_level, "%s: reconnecting in %.1f s", name, delay)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), delay)


async def wait_closed_or(conn: MqttConnection, event: asyncio.Event) -> None:
    """Return when the connection closed or ``event`` was set."""
    waits = {asyncio.ensure_future(conn.closed.wait()), asyncio.ensure_future(event.wait())}
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for fut in waits:
        fut.cancel()
