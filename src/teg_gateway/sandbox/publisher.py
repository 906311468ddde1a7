"""A bare paho client that publishes prepared payloads as fast as PUBACKs allow.

The benchmarks' baseline: what one MQTT client with no gateway around it gets through the
same server, over the same TLS, with the same window of publishes in flight.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion


def publish_all(host: str, port: int, payloads: Sequence[bytes], *, ca: Path, username: str,
                topic: str, inflight: int, timeout: float = 60.0) -> float:
    """Publish every payload (QoS 1, ``inflight`` at a time) and return when all are
    PUBACKed; returns the monotonic time of the first publish. RuntimeError when the client
    cannot connect or the PUBACKs do not come within ``timeout`` seconds."""
    window = threading.Semaphore(inflight)
    connected = threading.Event()
    done = threading.Event()
    acked = 0

    def on_connect(_client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any,
                   _props: Any) -> None:
        if not reason.is_failure:
            connected.set()

    def on_publish(*_args: Any) -> None:
        nonlocal acked
        acked += 1
        window.release()
        if acked == len(payloads):
            done.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-bare-client",
                         protocol=MQTTProtocolVersion.MQTTv311, reconnect_on_failure=False)
    client.username_pw_set(username)
    client.tls_set_context(ssl.create_default_context(cafile=str(ca)))
    client.max_inflight_messages_set(inflight)
    client.max_queued_messages_set(0)
    client.on_connect = on_connect
    client.on_publish = on_publish
    client.connect(host, port, keepalive=60)
    client.loop_start()
    try:
        if not connected.wait(10.0):
            raise RuntimeError("the bare client did not connect")
        started = time.monotonic()
        deadline = started + timeout
        for payload in payloads:
            if not window.acquire(timeout=max(0.1, deadline - time.monotonic())):
                raise RuntimeError(f"the bare client: no PUBACK within {timeout:g} s")
            client.publish(topic, payload, qos=1)
        if not done.wait(max(0.1, deadline - time.monotonic())):
            raise RuntimeError(f"the bare client: {acked}/{len(payloads)} publishes "
                               "acknowledged")
        return started
    finally:
        client.disconnect()
        client.loop_stop()
