"""The one MQTT session to ThingsBoard, kept up forever with backoff and jitter."""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from teg_gateway.backoff import Backoff
from teg_gateway.clock import Clock
from teg_gateway.cloud import topics
from teg_gateway.cloud.credentials import Credentials
from teg_gateway.cloud.limits import Pacer, SessionLimits
from teg_gateway.cloud.provision import cloud_tls, describe_error
from teg_gateway.config import ThingsBoardSettings
from teg_gateway.mqttlink import (
    ConnectionLost,
    ConnectRefused,
    MessageHandler,
    MqttConnection,
    keep_connected,
    wait_closed_or,
)
from teg_gateway.store.state import StateFile

log = logging.getLogger(__name__)

# How long to wait for the answer to getSessionLimits; an older server never answers.
SESSION_LIMITS_WAIT_S = 3.0
# After the server cut the connection with publishes in flight, never come back sooner.
CUT_MIN_DELAY_S = 1.0


class CloudSession:
    """Connects, subscribes again on every connect, and tells the gateway about changes.

    ``connected`` is set while a connection is usable; ``connection`` is that connection.
    ``ready`` is set once the session limits of the connection are known too (from the
    server's answer to ``getSessionLimits``, else from the configuration): telemetry waits
    for it. Components add topics to ``subscriptions`` and shared keys to ``shared_keys``
    before ``run`` starts, and callbacks to ``on_connect``/``on_disconnect``/``on_limits``.

    Every publish through ``publish`` (RPC replies, requests) is paced as an operation:
    it may use the whole ``messages`` budget, and waits only when that is used up.
    """

    def __init__(self, settings: ThingsBoardSettings, creds: Credentials, client_id: str,
                 on_message: MessageHandler, state: StateFile, *, token_path: Path,
                 clock: Clock | None = None, pacer: Pacer | None = None) -> None:
        self.settings = settings
        self.token_path = token_path
        self.clock = clock or Clock()
        self.creds = creds
        self.client_id = client_id
        self.on_message = on_message
        self.state = state
        tb = settings
        self.configured_limits = SessionLimits.from_settings(
            tb.rate_limits_messages, tb.rate_limits_telemetry_messages,
            tb.rate_limits_telemetry_data_points, tb.max_payload_bytes)
        self.pacer = pacer or Pacer(self.clock.monotonic)
        self.on_limits: list[Callable[[SessionLimits], None]] = []
        self.ready = asyncio.Event()
        self.rate_limit_disconnects = 0
        self._client_rpc_id = 0
        self._client_rpc: dict[str, tuple[asyncio.Future[Any], bytes]] = {}
        self._operations: deque[tuple[str, bytes | str, int, asyncio.Future[None]]] = deque()
        self._operations_timer: asyncio.TimerHandle | None = None
        self.subscriptions: list[str] = list(topics.SESSION_SUBSCRIPTIONS)
        self.shared_keys: list[str] = []
        self.on_connect: list[Callable[[], None]] = []
        self.on_disconnect: list[Callable[[], None]] = []
        self.connected = asyncio.Event()
        self.connection: MqttConnection | None = None
        self.reconnects = 0
        self.connects = 0
        self.last_error = ""
        self._request_id = 0
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        tb = self.settings
        backoff = Backoff(tb.reconnect_min_s, tb.reconnect_max_s)
        await keep_connected(self._connect, self._serve, backoff, self._stopping,
                             self._connect_failed, name="ThingsBoard")

    async def _connect(self) -> MqttConnection:
        tb = self.settings
        client_id, username, password = self.creds.login(self.client_id)
        conn = MqttConnection(client_id, username=username, password=password,
                              tls=cloud_tls(self.settings), keepalive=tb.keepalive_s,
                              on_message=self._route)
        try:
            await conn.connect(tb.host, tb.port)
            await conn.subscribe(self.subscriptions)
        except BaseException:
            await conn.close()
            raise
        return conn

    def _connect_failed(self, exc: BaseException) -> None:
        tb = self.settings
        if isinstance(exc, ConnectRefused):
            self._record_failure(
                f"ThingsBoard refused the connection ({exc}); check the "
                f"{self.creds.describe()} in {self.token_path}", True)
        else:
            self._record_failure(f"cannot connect to {tb.host}:{tb.port}: "
                                 f"{describe_error(exc)}", False)

    async def _serve(self, conn: MqttConnection) -> float | None:
        tb = self.settings
        self.connects += 1
        if self.connects > 1:
            self.reconnects += 1
        self.connection = conn
        self.connected.set()
        self.last_error = ""
        log.info("ThingsBoard: connected to %s:%d", tb.host, tb.port)
        self.state.update(last_result="connected", last_connected_ms=self.clock.now_ms(),
                          host=tb.host, port=tb.port)
        limits = asyncio.ensure_future(self._resolve_limits())
        if self.shared_keys:
            self.request_shared_attributes(self.shared_keys)
        for callback in self.on_connect:
            try:
                callback()
            except Exception:
                log.exception("on-connect handler failed")
        await wait_closed_or(conn, self._stopping)
        self.connected.clear()
        self.ready.clear()
        self.connection = None
        limits.cancel()
        self._fail_operations(ConnectionLost(conn.close_reason or "connection closed"))
        for callback in self.on_disconnect:
            try:
                callback()
            except Exception:
                log.exception("on-disconnect handler failed")
        if self._stopping.is_set():
            await conn.close("gateway shutting down")
            self.state.update(last_result="disconnected: the gateway stopped",
                              last_failure_ms=self.clock.now_ms())
            return None
        await conn.close()
        if conn.closed_by_gateway or not conn.unacked_at_close:
            self._record_failure(f"connection to {tb.host}:{tb.port} lost: "
                                 f"{conn.close_reason}", False)
            return None
        # ThingsBoard answers a publish over any limit by closing the connection without
        # a PUBACK: assume that happened, spend nothing until the buckets refill, and come
        # back no sooner than the shortest window.
        self.rate_limit_disconnects += 1
        self.pacer.cut()
        delay = max(CUT_MIN_DELAY_S, self.pacer.limits.shortest_period_s)
        self._record_failure(
            f"ThingsBoard closed the connection with {conn.unacked_at_close} publish(es) "
            f"awaiting PUBACK ({conn.close_reason}): a rate or size limit was probably "
            f"exceeded; reconnecting in {delay:g} s at the earliest and asking the limits "
            "again", False)
        return delay

    async def _resolve_limits(self) -> None:
        """Ask the server for the session limits; after a short wait without an answer,
        use the configured ones. Then telemetry may flow (``ready``)."""
        try:
            answer = await asyncio.wait_for(self.client_rpc("getSessionLimits", {}),
                                            SESSION_LIMITS_WAIT_S)
        except (TimeoutError, ConnectionLost):
            limits = self.configured_limits
            log.info("ThingsBoard: no answer to getSessionLimits within %.0f s; using the "
                     "configured limits", SESSION_LIMITS_WAIT_S)
        else:
            if SessionLimits.understood(answer):
                limits = SessionLimits.from_answer(answer)
            else:
                limits = self.configured_limits
                log.warning("ThingsBoard: the answer to getSessionLimits is not session limits "
                            "(%.200s); using the configured limits", answer)
            for problem in limits.problems:
                log.warning("ThingsBoard: getSessionLimits: %s (ignored)", problem)
        self.pacer.apply(limits)
        self.state.update(session_limits=limits.describe())
        self.ready.set()
        for callback in self.on_limits:
            try:
                callback(limits)
            except Exception:
                log.exception("on-limits handler failed")

    async def client_rpc(self, method: str, params: Any) -> Any:
        """A client-side RPC: the device asks the server; returns the decoded answer.

        Its ids are a sequence of their own, apart from the server's RPC requests."""
        self._client_rpc_id += 1
        request_id = str(self._client_rpc_id)
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        request = json.dumps({"method": method, "params": params}).encode()
        self._client_rpc[request_id] = (answer, request)
        try:
            await self.publish(topics.RPC_REQUEST + request_id, request)
            return await answer
        finally:
            self._client_rpc.pop(request_id, None)

    def _route(self, topic: str, payload: bytes) -> None:
        if topic.startswith(topics.RPC_REQUEST):
            pending = self._client_rpc.get(topic[len(topics.RPC_REQUEST):])
            if pending is not None and pending[1] == payload:
                # Our own request, routed back by a broker (ThingsBoard never does that):
                # not a command from the server.
                return
        if topic.startswith(topics.RPC_RESPONSE):
            request_id = topic[len(topics.RPC_RESPONSE):]
            answer = self._client_rpc.get(request_id, (None, b""))[0]
            if answer is None or answer.done():
                log.debug("answer to an unknown client-side RPC %.50s ignored", request_id)
                return
            try:
                answer.set_result(json.loads(payload))
            except ValueError:
                answer.set_result(payload.decode("utf-8", errors="replace"))
            return
        self.on_message(topic, payload)

    def _record_failure(self, text: str, serious: bool) -> None:
        self.last_error = text
        log.log(logging.ERROR if serious else logging.WARNING, "ThingsBoard: %s", text)
        self.state.update(last_result=text, last_failure_ms=self.clock.now_ms())

    def publish(self, topic: str, payload: bytes | str, qos: int = 1) -> asyncio.Future[None]:
        """Publish an operation's message on the current connection, paced under the
        ``messages`` limit (in order, ahead of telemetry); fails with ConnectionLost when
        there is no connection or it closes first."""
        conn = self.connection
        if conn is None:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            fut.set_exception(ConnectionLost("not connected"))
            return fut
        if not self._operations and self.pacer.operation_delay() <= 0:
            self.pacer.take_operation()
            return conn.publish(topic, payload, qos=qos)
        waiting: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._operations.append((topic, payload, qos, waiting))
        self._send_operations()
        return waiting

    def _send_operations(self) -> None:
        """Send the operations that waited for tokens, as the tokens come."""
        self._operations_timer = None
        conn = self.connection
        while self._operations:
            if conn is None:
                self._fail_operations(ConnectionLost("not connected"))
                return
            delay = self.pacer.operation_delay()
            if delay > 0:
                self._operations_timer = asyncio.get_running_loop().call_later(
                    delay, self._send_operations)
                return
            topic, payload, qos, waiting = self._operations.popleft()
            if waiting.done():
                continue
            self.pacer.take_operation()
            _chain(conn.publish(topic, payload, qos=qos), waiting)

    def _fail_operations(self, error: BaseException) -> None:
        if self._operations_timer is not None:
            self._operations_timer.cancel()
            self._operations_timer = None
        while self._operations:
            waiting = self._operations.popleft()[3]
            if not waiting.done():
                waiting.set_exception(error)
                # Nobody may be waiting for it any more; do not log "never retrieved".
                waiting.exception()

    def request_shared_attributes(self, keys: list[str]) -> int:
        """Ask for shared attributes; the answer arrives on the attribute response topic.

        Returns the request id."""
        self._request_id += 1
        request = {"sharedKeys": ",".join(keys)}
        fut = self.publish(topics.ATTRIBUTE_REQUEST + str(self._request_id),
                           json.dumps(request))
        fut.add_done_callback(_ignore_result)
        return self._request_id

    async def stop(self) -> None:
        """End the session (the connection is closed by ``run``)."""
        self._stopping.set()


def _ignore_result(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()


def _chain(source: asyncio.Future[None], target: asyncio.Future[None]) -> None:
    """Complete ``target`` as ``source`` completes."""

    def copy(done: asyncio.Future[None]) -> None:
        if target.done():
            return
        if done.cancelled():
            target.cancel()
        elif done.exception() is not None:
            target.set_exception(done.exception())  # type: ignore[arg-type]
        else:
            target.set_result(None)

    source.add_done_callback(copy)
