"""An example operation written from docs/architecture.md ("Adding an operation"): an
``echo`` te/ command and an ``echo`` RPC method, defined here and exercised against a real
mosquitto (the local bus) and the ThingsBoard router (no broker needed for that side).

``te/device/main///cmd/echo/<id>``, capability ``{}``: ``init`` → ``executing`` →
``successful`` with the request's fields kept and ``"echoed": true``; an ``init`` with
``"fail": true`` ends ``failed`` with a reason. A command left ``executing`` by an earlier
run is finished when a new instance runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from conftest import needs_mosquitto
from teg_gateway.clock import Clock
from teg_gateway.cloud.topics import RPC_REQUEST
from teg_gateway.config import LocalMqttSettings
from teg_gateway.local.bus import LocalBus
from teg_gateway.local.topics import command_topic
from teg_gateway.operations.engine import (
    Command,
    CommandChannel,
    CommandFailed,
    CommandOperation,
    CommandRepository,
    Nothing,
)
from teg_gateway.operations.rpc import Method
from teg_gateway.sandbox.broker import Mosquitto
from teg_gateway.store.state import state_dir
from test_forwarding import WAIT
from test_local_bus import BusClient, retained
from test_routing import RepliesKept

# -- the example operation ----------------------------------------------------------------

FAIL_REASON = "The requester asked the echo to fail"
RESTARTED = "finished after a restart of the gateway"

Report = Callable[[dict[str, Any]], None]


@dataclass
class EchoJob:
    """The typed view of an echo request (every field of the request also goes back
    unchanged with each state)."""

    #: The requester asks for a failure.
    fail: bool = False


class EchoOperation(CommandOperation[EchoJob]):
    """``te/device/main///cmd/echo/<id>`` and the RPC ``echo``."""

    name = "echo"
    capability: ClassVar[dict[str, Any]] = {}
    payload_type = EchoJob

    def __init__(self, state_path: Path, channel: CommandChannel, report: Report,
                 clock: Clock) -> None:
        super().__init__(state_path, channel, clock=clock)
        self.report = report

    async def execute(self, cmd: Command[EchoJob]) -> dict[str, Any]:
        if cmd.payload.fail:
            raise CommandFailed(FAIL_REASON)
        return {"echoed": True}

    async def resume(self, cmd: Command[EchoJob]) -> dict[str, Any]:
        return {**await self.execute(cmd), "note": RESTARTED}

    def on_state(self, cmd: Command[EchoJob]) -> None:
        values = {"echo_status": cmd.status.value, "echo_id": cmd.id}
        if cmd.final:
            values["echo_reason"] = cmd.reason
        self.report(values)

    def rpc_methods(self) -> list[Method]:
        return [Method("echo", "answers with its params and \"echoed\": true", self._rpc_echo,
                       {"*": "anything"})]

    async def _rpc_echo(self, params: dict[str, Any]) -> Any:
        return {**params, "echoed": True}


# -- running it on a real local bus ------------------------------------------------------


async def with_bus(broker: Mosquitto, data_dir: Path, reports: list[dict[str, Any]],
                   body: Callable[[EchoOperation], Awaitable[None]]) -> None:
    """Build the operation and a LocalBus serving its commands (as gateway.py would), run
    both, run ``body``, then shut down."""
    clock = Clock()
    connected = asyncio.Event()
    bus: LocalBus | None = None

    def publish(topic: str, payload: bytes) -> asyncio.Future[None]:
        assert bus is not None
        return bus.publish(topic, payload, retain=True)

    op = EchoOperation(state_dir(data_dir) / "echo.json",
                       CommandChannel(publish, connected, clock), reports.append, clock)
    bus = LocalBus(LocalMqttSettings(host=broker.host, port=broker.plain_port,
                                     reconnect_max_s=1.0),
                   on_mapped=lambda _m: None, commands=op.local_commands(),
                   on_service_health=lambda _n, _s: None, connected=connected)
    running = asyncio.ensure_future(bus.run())
    try:
        await asyncio.wait_for(connected.wait(), WAIT)
        await op.run()
        await body(op)
    finally:
        await op.close()
        await bus.stop()
        await asyncio.wait_for(running, WAIT)


def states(device: BusClient, command_id: str) -> list[Any]:
    return device.documents(f"{command_topic('echo')}/{command_id}")


def is_final(doc: Any) -> bool:
    return isinstance(doc, dict) and doc.get("status") in ("successful", "failed")


async def all_delivered(op: EchoOperation) -> None:
    async with asyncio.timeout(WAIT):
        while any(not c.delivered for c in op.repo.commands.values()):
            await asyncio.sleep(0.02)


def stored(data_dir: Path) -> dict[str, dict[str, Any]]:
    value = json.loads((state_dir(data_dir) / "echo.json").read_text())
    return {row["id"]: row for row in value["commands"]}


@needs_mosquitto
def test_echo_runs_init_executing_successful_and_failed(broker: Mosquitto,
                                                         tmp_path: Path) -> None:
    topic = command_topic("echo")
    reports: list[dict[str, Any]] = []
    with BusClient(broker, [f"{topic}/+"]) as device:

        async def body(op: EchoOperation) -> None:
            await asyncio.to_thread(device.publish, f"{topic}/ok",
                                    {"status": "init", "text": "hi", "n": 1}, True)
            await asyncio.to_thread(device.publish, f"{topic}/bad",
                                    {"status": "init", "fail": True, "n": 2}, True)
            await asyncio.to_thread(device.publish, f"{topic}/typo",
                                    {"status": "init", "fail": "yes"}, True)
            for command_id in ("ok", "bad", "typo"):
                await asyncio.to_thread(
                    device.wait_for_document, f"{topic}/{command_id}", is_final,
                    f"the final state of {command_id}")
            await all_delivered(op)

        asyncio.run(with_bus(broker, tmp_path, reports, body))

        assert retained(broker, topic)[topic] == b"{}"  # the capability
        assert states(device, "ok") == [
            {"status": "init", "text": "hi", "n": 1},
            {"text": "hi", "n": 1, "status": "executing"},
            {"text": "hi", "n": 1, "status": "successful", "echoed": True}]
        assert states(device, "bad") == [
            {"status": "init", "fail": True, "n": 2},
            {"fail": True, "n": 2, "status": "executing"},
            {"fail": True, "n": 2, "status": "failed", "reason": FAIL_REASON}]
        typo = states(device, "typo")
        assert typo[-1]["status"] == "failed"
        assert typo[-1]["reason"] == "echo.fail must be true or false"
        assert typo[-1]["fail"] == "yes"  # the request's field went back unchanged

    rows = stored(tmp_path)
    assert {k: (r["status"], r["delivered"]) for k, r in rows.items()} == {
        "ok": ("successful", True), "bad": ("failed", True), "typo": ("failed", True)}
    finals = {r["echo_id"]: r["echo_status"] for r in reports if "echo_reason" in r}
    assert finals == {"ok": "successful", "bad": "failed", "typo": "failed"}


@needs_mosquitto
def test_a_command_left_executing_is_finished_by_a_new_instance(broker: Mosquitto,
                                                                tmp_path: Path) -> None:
    # What an earlier run left on disk: executing, nothing published after it.
    earlier: CommandRepository[EchoJob, Nothing] = CommandRepository(
        state_dir(tmp_path) / "echo.json", EchoJob, Nothing)
    earlier.load()
    earlier.create("left", EchoJob(), extra={"n": 7})
    earlier.create("left-failing", EchoJob(fail=True), extra={"fail": True})
    assert {r["status"] for r in stored(tmp_path).values()} == {"executing"}

    topic = command_topic("echo")
    reports: list[dict[str, Any]] = []
    with BusClient(broker, [f"{topic}/+"]) as device:

        async def body(op: EchoOperation) -> None:
            await all_delivered(op)

        asyncio.run(with_bus(broker, tmp_path, reports, body))
        device.wait_for(lambda: len(states(device, "left")) == 1
                        and len(states(device, "left-failing")) == 1,
                        "both outcomes on the bus")
        assert states(device, "left") == [
            {"n": 7, "note": RESTARTED, "status": "successful", "echoed": True}]
        assert states(device, "left-failing") == [
            {"fail": True, "status": "failed", "reason": FAIL_REASON}]

    rows = stored(tmp_path)
    assert (rows["left"]["status"], rows["left"]["delivered"]) == ("successful", True)
    assert (rows["left-failing"]["status"], rows["left-failing"]["delivered"]) == (
        "failed", True)
    assert [r["echo_status"] for r in reports] == ["successful", "failed"]


def test_the_rpc_method_is_answered_by_the_router(tmp_path: Path) -> None:
    async def scenario() -> list[tuple[str, dict[str, Any]]]:
        connected = asyncio.Event()

        def no_bus(_topic: str, _payload: bytes) -> asyncio.Future[None]:
            raise AssertionError("nothing is published on the local bus here")

        op = EchoOperation(state_dir(tmp_path) / "echo.json",
                           CommandChannel(no_bus, connected), lambda _r: None, Clock())
        router = RepliesKept()
        router.register(op)
        router.route(RPC_REQUEST + "1",
                     json.dumps({"method": "echo", "params": {"a": 1}}).encode())
        router.route(RPC_REQUEST + "2", json.dumps({"method": "list"}).encode())
        async with asyncio.timeout(WAIT):
            while len(router.replies) < 2:
                await asyncio.sleep(0.01)
        with contextlib.suppress(Exception):
            await op.close()
        return router.replies

    replies = dict(asyncio.run(scenario()))
    assert replies["1"] == {"message": {"a": 1, "echoed": True}}
    assert replies["2"]["message"]["echo"] == {
        "description": "answers with its params and \"echoed\": true",
        "params": {"*": "anything"}}
