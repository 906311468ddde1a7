"""The whole chain once: provision, forward, answer an RPC, shut down cleanly."""

from __future__ import annotations

from conftest import GatewayFactory, needs_mosquitto
from teg_gateway.sandbox.controller import QueueWriter, make_records
from teg_gateway.sandbox.thingsboard import FakeThingsBoard


@needs_mosquitto
def test_records_reach_thingsboard(make_gateway: GatewayFactory, thingsboard: FakeThingsBoard,
                                   queue_writer: QueueWriter) -> None:
    queue_writer.write(make_records(1000))
    gateway = make_gateway()
    gateway.start()
    thingsboard.wait_for(lambda: len(thingsboard.telemetry_values("seq")) >= 1000, timeout=30)
    assert sorted(thingsboard.telemetry_values("seq")) == list(range(1000))
    assert thingsboard.rpc("ping") == {"message": "pong"}
    assert gateway.stop() == 0
