"""The one MQTT session to ThingsBoard, kept up forever with backoff and jitter."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable

from teg_gateway.backoff import Backoff
from teg_gateway.cloud.credentials import Credentials
from teg_gateway.cloud.provision import cloud_tls, describe_error
from teg_gateway.config import Settings
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

RPC_REQUEST = "v1/devices/me/rpc/request/"
RPC_RESPONSE = "v1/devices/me/rpc/response/"
ATTRIBUTES = "v1/devices/me/attributes"
ATTRIBUTE_REQUEST = "v1/devices/me/attributes/request/"
ATTRIBUTE_RESPONSE = "v1/devices/me/attributes/response/"

BASE_SUBSCRIPTIONS = (RPC_REQUEST + "+", ATTRIBUTES, ATTRIBUTE_RESPONSE + "+")


class CloudSession:
    """Connects, subscribes again on every connect, and tells the gateway about changes.

    ``connected`` is set while a connection is usable; ``connection`` is that connection.
    Components add topics to ``subscriptions`` and shared keys to ``shared_keys`` before
    ``run`` starts, and callbacks to ``on_connect``/``on_disconnect``.
    """

    def __init__(self, settings: Settings, creds: Credentials, client_id: str,
                 on_message: MessageHandler, state: StateFile) -> None:
        self.settings = settings
        self.creds = creds
        self.client_id = client_id
        self.on_message = on_message
        self.state = state
        self.subscriptions: list[str] = list(BASE_SUBSCRIPTIONS)
        self.shared_keys: list[str] = ["sw_title", "sw_version", "FILES"]
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
        tb = self.settings.thingsboard
        backoff = Backoff(tb.reconnect_min_s, tb.reconnect_max_s)
        await keep_connected(self._connect, self._serve, backoff, self._stopping,
                             self._connect_failed, name="ThingsBoard")

    async def _connect(self) -> MqttConnection:
        tb = self.settings.thingsboard
        client_id, username, password = self.creds.login(self.client_id)
        conn = MqttConnection(client_id, username=username, password=password,
                              tls=cloud_tls(self.settings), keepalive=tb.keepalive_s,
                              on_message=self.on_message)
        try:
            await conn.connect(tb.host, tb.port)
            await conn.subscribe(self.subscriptions)
        except BaseException:
            await conn.close()
            raise
        return conn

    def _connect_failed(self, exc: BaseException) -> None:
        tb = self.settings.thingsboard
        if isinstance(exc, ConnectRefused):
            self._record_failure(
                f"ThingsBoard refused the connection ({exc}); check the "
                f"{self.creds.describe()} in {self.settings.access_token_path}", True)
        else:
            self._record_failure(f"cannot connect to {tb.host}:{tb.port}: "
                                 f"{describe_error(exc)}", False)

    async def _serve(self, conn: MqttConnection) -> None:
        tb = self.settings.thingsboard
        self.connects += 1
        if self.connects > 1:
            self.reconnects += 1
        self.connection = conn
        self.connected.set()
        self.last_error = ""
        log.info("ThingsBoard: connected to %s:%d", tb.host, tb.port)
        self.state.update(last_result="connected", last_connected_ms=time.time_ns() // 10**6,
                          host=tb.host, port=tb.port)
        self.request_shared_attributes(self.shared_keys)
        for callback in self.on_connect:
            try:
                callback()
            except Exception:
                log.exception("on-connect handler failed")
        await wait_closed_or(conn, self._stopping)
        self.connected.clear()
        self.connection = None
        for callback in self.on_disconnect:
            try:
                callback()
            except Exception:
                log.exception("on-disconnect handler failed")
        if self._stopping.is_set():
            await conn.close("gateway shutting down")
            self.state.update(last_result="disconnected: the gateway stopped",
                              last_failure_ms=time.time_ns() // 10**6)
            return
        await conn.close()
        self._record_failure(f"connection to {tb.host}:{tb.port} lost: {conn.close_reason}",
                             False)

    def _record_failure(self, text: str, serious: bool) -> None:
        self.last_error = text
        log.log(logging.ERROR if serious else logging.WARNING, "ThingsBoard: %s", text)
        self.state.update(last_result=text, last_failure_ms=time.time_ns() // 10**6)

    def publish(self, topic: str, payload: bytes | str, qos: int = 1) -> asyncio.Future[None]:
        """Publish on the current connection; fails with ConnectionLost when there is none."""
        conn = self.connection
        if conn is None:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            fut.set_exception(ConnectionLost("not connected"))
            return fut
        return conn.publish(topic, payload, qos=qos)

    def request_shared_attributes(self, keys: list[str]) -> int:
        """Ask for shared attributes; the answer arrives on the attribute response topic.

        Returns the request id."""
        self._request_id += 1
        request = {"sharedKeys": ",".join(keys)}
        fut = self.publish(ATTRIBUTE_REQUEST + str(self._request_id), json.dumps(request))
        fut.add_done_callback(_ignore_result)
        return self._request_id

    async def stop(self) -> None:
        """End the session (the connection is closed by ``run``)."""
        self._stopping.set()


def _ignore_result(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()
