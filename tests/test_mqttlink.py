"""The MQTT connection driven by the event loop, against a real mosquitto over TLS: no
network thread, large publishes that fill the socket (written on writability), every
PUBACK, messages in, a clean close, and a broker that goes away."""

from __future__ import annotations

import asyncio
import threading

from teg_gateway.mqttlink import ConnectionLost, MqttConnection, tls_context
from teg_gateway.sandbox.broker import Mosquitto
from teg_gateway.sandbox.certs import Pki


def network_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("paho")]


async def connected(broker: Mosquitto, pki: Pki, name: str,
                    on_message: object = None) -> MqttConnection:
    conn = MqttConnection(name, tls=tls_context(str(pki.ca_cert)),
                          on_message=on_message)  # type: ignore[arg-type]
    await conn.connect(broker.tls_hostname, broker.tls_port, timeout=10)
    return conn


def test_publishes_and_messages_go_through_the_loop_without_a_network_thread(
        broker: Mosquitto, pki: Pki) -> None:
    received: list[bytes] = []
    count, size = 300, 48_000  # more than a socket buffer takes at once

    async def run() -> None:
        sub = await connected(broker, pki, "sub", lambda _t, p: received.append(p))
        await sub.subscribe(["t/#"])
        pub = await connected(broker, pki, "pub")
        assert network_threads() == []
        futures = [pub.publish(f"t/{i}", i.to_bytes(4, "big") + b"x" * size)
                   for i in range(count)]
        await asyncio.wait_for(asyncio.gather(*futures), 60)
        for _ in range(600):
            if len(received) == count:
                break
            await asyncio.sleep(0.05)
        await pub.close()
        await sub.close()
        assert pub.closed.is_set() and sub.closed.is_set()
        assert pub.close_reason == "closed by the gateway"
        assert pub.publish("t/late", b"x").exception() is not None

    asyncio.run(run())
    assert sorted(int.from_bytes(p[:4], "big") for p in received) == list(range(count))
    assert all(len(p) == size + 4 for p in received)


def test_a_broker_that_goes_away_ends_the_connection_and_its_publishes(
        broker: Mosquitto, pki: Pki) -> None:
    async def run() -> None:
        conn = await connected(broker, pki, "lost")
        await asyncio.wait_for(conn.publish("t/a", b"1"), 10)
        broker.stop()
        await asyncio.wait_for(conn.closed.wait(), 30)
        failed = conn.publish("t/b", b"2")
        assert isinstance(failed.exception(), ConnectionLost)
        await conn.close()  # closing a lost connection again is harmless

    asyncio.run(run())


def test_keepalive_pings_go_out_from_the_loop(broker: Mosquitto, pki: Pki) -> None:
    """With a 1 s keepalive and nothing to send, the broker closes a silent client within
    a few seconds (it checks keepalives coarsely): the loop's timer sends the pings."""
    async def run() -> None:
        conn = MqttConnection("quiet", tls=tls_context(str(pki.ca_cert)), keepalive=1)
        await conn.connect(broker.tls_hostname, broker.tls_port, timeout=10)
        await asyncio.sleep(10)
        assert not conn.closed.is_set(), conn.close_reason
        await asyncio.wait_for(conn.publish("t/a", b"1"), 10)
        await conn.close()

    asyncio.run(run())
