"""The device's local MQTT bus (thin-edge.io topic scheme).

A second MQTT session, to the broker on the device (default 127.0.0.1:1883). The gateway
registers itself as the service ``teg-gateway``, keeps its health retained with a last
will, answers health checks, and maps measurements, events, alarms, twin fragments and
service health of the main device into the outbox. It keeps retrying when the broker is
absent and never holds up the rest of the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable

from teg_gateway.backoff import Backoff
from teg_gateway.config import LocalMqttSettings
from teg_gateway.local import topics
from teg_gateway.local.topics import Mapped, MappingError
from teg_gateway.mqttlink import (
    ConnectionLost,
    MqttConnection,
    Will,
    keep_connected,
    wait_closed_or,
)
from teg_gateway.operations.engine import LocalCommand

log = logging.getLogger(__name__)

SERVICE_NAME = "teg-gateway"
SERVICE_TOPIC = "te/" + topics.service_topic_id(SERVICE_NAME)
HEALTH_TOPIC = SERVICE_TOPIC + "/status/health"
HEALTH_CHECK_TOPIC = SERVICE_TOPIC + "/cmd/health/check"

class LocalBus:
    """Keeps the local session up and routes what arrives.

    ``on_mapped`` receives what goes to ThingsBoard; ``commands`` are the operations'
    commands of the main device (``te/device/main///cmd/<name>/<id>``), each announced
    with its retained capability on every connect; ``on_service_health`` a service's
    health (name, status). ``connected`` (set while the session is up) may be handed in,
    so that the operations can be built before the bus that serves their commands.
    """

    def __init__(self, settings: LocalMqttSettings,
                 on_mapped: Callable[[Mapped], None],
                 commands: list[LocalCommand],
                 on_service_health: Callable[[str, str], None],
                 connected: asyncio.Event | None = None) -> None:
        self.settings = settings
        self.on_mapped = on_mapped
        self.commands = {c.name: c for c in commands}
        self.on_service_health = on_service_health
        self.on_connect: list[Callable[[], None]] = []
        self.connected = connected if connected is not None else asyncio.Event()
        self.connection: MqttConnection | None = None
        self.mapped = 0
        self._stopping = asyncio.Event()
        # Retained alarms, twin values and health come again on every connect: forward
        # only what changed.
        self._last_retained: dict[str, bytes] = {}
        self._absence_said = False

    async def run(self) -> None:
        backoff = Backoff(min(1.0, self.settings.reconnect_max_s), self.settings.reconnect_max_s)
        await keep_connected(self._connect, self._serve, backoff, self._stopping,
                             self._connect_failed, name="local broker",
                             log_level=logging.DEBUG)

    async def _connect(self) -> MqttConnection:
        will = Will(HEALTH_TOPIC, json.dumps({"status": "down"}).encode())
        conn = MqttConnection(f"{SERVICE_NAME}-{os.getpid()}", will=will,
                              on_message=self._on_live, on_retained=self._on_retained)
        try:
            await conn.connect(self.settings.host, self.settings.port, timeout=10.0)
            await conn.subscribe([*topics.SUBSCRIPTIONS, HEALTH_CHECK_TOPIC,
                                  *(topics.command_topic(name) + "/+"
                                    for name in self.commands)])
        except BaseException:
            await conn.close()
            raise
        return conn

    def _connect_failed(self, exc: BaseException) -> None:
        # Said once at INFO (a device without a local broker is a normal set-up), then
        # only at DEBUG on every retry.
        level = logging.DEBUG if self._absence_said else logging.INFO
        self._absence_said = True
        log.log(level, "local broker %s:%d not reachable (%s); retrying in the background "
                "(local_mqtt.enabled = false turns this off)", self.settings.host,
                self.settings.port, exc)

    async def _serve(self, conn: MqttConnection) -> None:
        log.info("local broker: connected to %s:%d", self.settings.host, self.settings.port)
        self._absence_said = False
        self.connection = conn
        self.connected.set()
        conn.publish(SERVICE_TOPIC, json.dumps(
            {"@type": "service", "name": SERVICE_NAME, "type": "service"}), retain=True)
        for command in self.commands.values():
            conn.publish(topics.command_topic(command.name),
                         json.dumps(command.capability).encode(), retain=True)
        # Health "up" goes last: once it is seen, the registration and the
        # capabilities published before it are on the broker too.
        self.publish_health()
        for callback in self.on_connect:
            try:
                callback()
            except Exception:
                log.exception("local bus on-connect handler failed")
        await wait_closed_or(conn, self._stopping)
        self.connected.clear()
        self.connection = None
        if self._stopping.is_set():
            await conn.close("gateway shutting down")
        else:
            log.warning("local broker: connection lost (%s)", conn.close_reason)
            await conn.close()

    def publish_health(self) -> None:
        self.publish(HEALTH_TOPIC, json.dumps(
            {"status": "up", "pid": os.getpid(), "time": round(time.time(), 3)}).encode(),
            retain=True).add_done_callback(_ignore)

    def publish(self, topic: str, payload: bytes, retain: bool = False,
                qos: int = 1) -> asyncio.Future[None]:
        conn = self.connection
        if conn is None:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            fut.set_exception(ConnectionLost("local broker not connected"))
            return fut
        return conn.publish(topic, payload, qos=qos, retain=retain)

    async def stop(self) -> None:
        """Say ``down`` (retained), then close."""
        if self.connection is not None:
            with contextlib.suppress(ConnectionLost, TimeoutError):
                await asyncio.wait_for(self.publish(
                    HEALTH_TOPIC, json.dumps({"status": "down"}).encode(), retain=True), 2.0)
        self._stopping.set()

    def request_health_check(self, service: str | None) -> None:
        """Ask ``service`` (every service of the main device when None) to publish its
        health now; nothing when the broker is not connected."""
        if self.connection is None:
            return
        topic = (f"te/{topics.service_topic_id(service)}/cmd/health/check" if service
                 else topics.HEALTH_CHECK_ALL)
        self.publish(topic, b"{}").add_done_callback(_ignore)

    def _on_live(self, topic: str, payload: bytes) -> None:
        self._route(topic, payload, live=True)

    def _on_retained(self, topic: str, payload: bytes) -> None:
        self._route(topic, payload, live=False)

    def _route(self, topic: str, payload: bytes, live: bool) -> None:
        if topic in (HEALTH_CHECK_TOPIC, topics.HEALTH_CHECK_ALL):
            self.publish_health()
            return
        parsed = topics.parse(topic)
        if parsed is None:
            return
        if parsed.service is None and parsed.channel[0] == "cmd" and \
                len(parsed.channel) == 3 and parsed.channel[1] in self.commands:
            try:
                self.commands[parsed.channel[1]].handle(parsed.channel[2], payload)
            except Exception:
                log.exception("local command on %s failed", topic)
            return
        if parsed.channel == ("status", "health") and parsed.service:
            if parsed.service == SERVICE_NAME:
                return
            # Every live health message is a sign of life, even one equal to the last:
            # only the forwarding to ThingsBoard below skips repeats. A retained copy
            # (sent again on every connect) says nothing about now.
            if live:
                self.on_service_health(parsed.service, _health_status(payload))
        retained_kind = parsed.channel[0] in ("a", "twin") or parsed.channel == (
            "status", "health")
        if retained_kind:
            if self._last_retained.get(topic) == payload:
                return
            self._last_retained[topic] = payload
        try:
            mapped = topics.map_message(parsed, payload)
        except MappingError as exc:
            log.warning("local message on %s refused: %s", topic, exc)
            return
        if mapped is not None:
            self.mapped += 1
            self.on_mapped(mapped)


def _health_status(payload: bytes) -> str:
    try:
        value = json.loads(payload) if payload else {}
    except (ValueError, RecursionError):
        return "unknown"
    status = value.get("status") if isinstance(value, dict) else None
    return status if isinstance(status, str) else "unknown"


def _ignore(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()
