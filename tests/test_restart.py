"""The restart operation by thin-edge.io's contract, with real gateway processes on a real
local mosquitto.

A reboot is simulated by a reboot command that writes a new boot id into the file the
gateway reads (``[restart] boot_id_file``) and then stops the gateway (its parent) with
SIGTERM, as the init system does on the way down; the test then starts the gateway again,
as the boot would. Before it does so, the command records what the world looked like at
that moment: the persisted command and the retained state on the local broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from conftest import GatewayFactory, merge_config, needs_mosquitto
from teg_gateway.clock import Clock, FakeClock
from teg_gateway.config import LocalMqttSettings, RestartSettings, Settings
from teg_gateway.local.bus import LocalBus
from teg_gateway.local.topics import RESTART_CAPABILITY
from teg_gateway.operations.engine import (
    CommandChannel,
    CommandRepository,
    LocalCommand,
    Nothing,
    Status,
)
from teg_gateway.operations.restart import RestartJob, RestartOperation, legacy_state
from teg_gateway.sandbox.broker import Mosquitto
from teg_gateway.sandbox.process import GatewayProcess
from teg_gateway.sandbox.thingsboard import FakeThingsBoard
from test_forwarding import WAIT, wait_until
from test_local_bus import BusClient, local_config, retained

pytestmark = needs_mosquitto

# The reboot command of the tests. argv: mode ("reboot": the device restarts, "gateway":
# only the gateway is stopped, "fail": exit 1), the gateway's restart.json, the local
# broker's port, the boot-id file and a directory for what it saw.
REBOOT_SCRIPT = """
import json, os, signal, sys, time, uuid
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

mode, state_path, port, boot_file, seen = sys.argv[1:6]
state = json.loads(Path(state_path).read_text())
Path(seen, "state.json").write_text(json.dumps(state))
retained = []
client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="reboot-command")
client.on_message = lambda c, u, m: retained.append(m.payload.decode())
client.connect("127.0.0.1", int(port))
client.loop_start()
executing = [c for c in state["commands"] if c["status"] == "executing"]
client.subscribe("te/device/main///cmd/restart/" + executing[0]["id"], 1)
deadline = time.monotonic() + 10
while not retained and time.monotonic() < deadline:
    time.sleep(0.01)
client.disconnect()
client.loop_stop()
Path(seen, "retained.json").write_text(retained[0] if retained else "")
if mode == "fail":
    sys.exit(1)
if mode == "reboot":
    Path(boot_file).write_text(str(uuid.uuid4()) + "\\n")
os.kill(os.getppid(), signal.SIGTERM)
"""


@dataclass
class Rig:
    """The device side of a restart: boot-id file, reboot commands, and an observer that
    records every state of every restart command on the local broker, in order."""

    local: Mosquitto
    data_dir: Path
    workdir: Path
    boot_id: Path
    # restart.json as it was on disk the instant each ``executing`` message arrived.
    state_at_executing: list[Any] = field(default_factory=list)
    on_executing: Callable[[], None] | None = None
    observer: BusClient | None = None

    @property
    def state_path(self) -> Path:
        return self.data_dir / "state" / "restart.json"

    @property
    def seen(self) -> Path:
        return self.workdir / "seen"

    def hook(self, topic: str, payload: bytes) -> None:
        try:
            command = json.loads(payload)
        except ValueError:
            return
        if topic.startswith(RESTART_CAPABILITY + "/") and isinstance(command, dict) and \
                command.get("status") == "executing":
            self.state_at_executing.append(read_state(self.state_path))
            if self.on_executing is not None:
                self.on_executing()

    @property
    def bus(self) -> BusClient:
        assert self.observer is not None
        return self.observer

    def reboot_command(self, mode: str = "reboot", state_path: Path | None = None) -> list[str]:
        script = self.workdir / "reboot.py"
        script.write_text(textwrap.dedent(REBOOT_SCRIPT))
        self.seen.mkdir(exist_ok=True)
        return [sys.executable, str(script), mode, str(state_path or self.state_path),
                str(self.local.plain_port), str(self.boot_id), str(self.seen)]

    def config(self, command: list[str], timeout_s: float = 30.0,
               boot_id_file: Path | None = None) -> dict[str, dict[str, Any]]:
        return merge_config(local_config(self.local), {"restart": {
            "command": command, "timeout_s": timeout_s,
            "boot_id_file": str(boot_id_file or self.boot_id)}})

    def topic(self, command_id: str) -> str:
        return f"{RESTART_CAPABILITY}/{command_id}"

    def states(self, command_id: str) -> list[Any]:
        """Every payload of the command, in order (None: cleared)."""
        return self.bus.documents(self.topic(command_id))

    def statuses(self, command_id: str) -> list[str | None]:
        return [s.get("status") if s else None for s in self.states(command_id)]

    def wait_status(self, command_id: str, status: str | None,
                    gateway: GatewayProcess | None, timeout: float = WAIT) -> Any:
        """Wait for ``status`` of the command (None: the command cleared); its payload."""
        self.bus.wait_for(lambda: status in self.statuses(command_id),
                          f"restart {command_id} becomes {status}", gateway, timeout)
        return self.states(command_id)[self.statuses(command_id).index(status)]

    def wait_statuses(self, command_id: str, statuses: list[str | None],
                      gateway: GatewayProcess | None) -> None:
        """Wait until the command has gone through exactly ``statuses`` so far."""
        self.bus.wait_for(lambda: self.statuses(command_id) == statuses,
                          f"restart {command_id} goes through {statuses}", gateway)

    def wait_registered(self, gateway: GatewayProcess) -> None:
        """The gateway is on the local bus: it registered the restart capability."""
        self.bus.wait_for(lambda: self.bus.payloads(RESTART_CAPABILITY) != [],
                          "the restart capability is registered", gateway)
        assert self.bus.payloads(RESTART_CAPABILITY)[-1] == b"{}"

    def request(self, command_id: str, **fields: Any) -> None:
        """Publish a restart request as a requester does: retained ``init``."""
        self.bus.publish(self.topic(command_id), {"status": "init", **fields}, retain=True)

    def new_boot(self) -> None:
        self.boot_id.write_text(f"{uuid.uuid4()}\n")


def read_state(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def rows(state: Any) -> dict[str, dict[str, Any]]:
    """The commands of a restart.json, by id."""
    return {row["id"]: row for row in state["commands"]}


def executing_row(state: Any) -> dict[str, Any]:
    """The one command of a restart.json that is executing."""
    found: list[dict[str, Any]] = [row for row in state["commands"]
                                   if row["status"] == "executing"]
    assert len(found) == 1, state
    return found[0]


def all_delivered(path: Path) -> bool:
    """Every command in restart.json ended and its outcome reached the requester."""
    state = read_state(path)
    return all(row["delivered"] and row["status"] in ("successful", "failed")
               for row in state["commands"])


@contextlib.asynccontextmanager
async def restart_on_bus(settings: Settings, state_path: Path,
                         reports: list[dict[str, Any]],
                         clock: Clock) -> AsyncIterator[RestartOperation]:
    """A restart operation in-process on a real local bus (``settings.local_mqtt``), its
    reports into ``reports``. The bus task starts on entry, but runs only at the caller's
    first wait: a command given before that arrives before the bus connects. On exit the
    operation is closed and the bus stopped."""
    def deliver(command_id: str, payload: bytes) -> None:
        restart.on_command(command_id, payload)

    bus = LocalBus(settings.local_mqtt, on_mapped=lambda _m: None,
                   commands=[LocalCommand("restart", {}, deliver)],
                   on_service_health=lambda _n, _s: None)
    restart = RestartOperation(
        settings.restart, state_path,
        CommandChannel(lambda topic, payload: bus.publish(topic, payload, retain=True),
                       bus.connected, Clock()), reports.append, clock)
    running = asyncio.ensure_future(bus.run())
    try:
        yield restart
    finally:
        await restart.close()
        await bus.stop()
        await running


async def until_delivered(state_path: Path) -> None:
    while not all_delivered(state_path):
        await asyncio.sleep(0.02)


def outcome_after_start(device_restarted: bool) -> tuple[str, dict[str, Any]]:
    """The final status of a restart under way at the gateway's start, and the command's
    whole state (with the test's extra fields), as the boot id decides."""
    status = "successful" if device_restarted else "failed"
    expected: dict[str, Any] = {"status": status, **EXTRA}
    if not device_restarted:
        expected["reason"] = "The gateway restarted but the device did not (same boot id)"
    return status, expected


@pytest.fixture
def rig(data_dir: Path, tmp_path: Path) -> Iterator[Rig]:
    """A local broker (plain, as on the device), a boot id and the observer."""
    boot_id = tmp_path / "boot_id"
    boot_id.write_text(f"{uuid.uuid4()}\n")
    with Mosquitto(tmp_path / "local") as local:
        made = Rig(local, data_dir, tmp_path, boot_id)
        with BusClient(local, [RESTART_CAPABILITY, RESTART_CAPABILITY + "/+"],
                       hook=made.hook) as observer:
            made.observer = observer
            yield made


def wait_exit(gateway: GatewayProcess, timeout: float = WAIT) -> int:
    try:
        return gateway.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the gateway did not exit within {timeout:g} s\n"
                             f"--- gateway log ---\n{gateway.log_tail(60)}") from None


def restart_reports(thingsboard: FakeThingsBoard) -> list[dict[str, Any]]:
    return [r["values"] for r in thingsboard.telemetry() if "restart_status" in r["values"]]


def wait_report(thingsboard: FakeThingsBoard, gateway: GatewayProcess,
                status: str) -> dict[str, Any]:
    """The first restart report to ThingsBoard with ``status``."""
    wait_until(lambda: any(r["restart_status"] == status for r in restart_reports(thingsboard)),
               f"restart_status {status} reaches ThingsBoard", gateway)
    return next(r for r in restart_reports(thingsboard) if r["restart_status"] == status)


EXTRA = {"requester": "test", "extra": {"keep": [1, 2]}}


# -- reboot, and a gateway restart that is not one ----------------------------------------


@pytest.mark.parametrize(("mode", "outcome"), [
    ("reboot", {"status": "successful", **EXTRA}),
    ("gateway", {"status": "failed", **EXTRA,
                 "reason": "The gateway restarted but the device did not (same boot id)"}),
])
def test_the_outcome_is_decided_by_the_boot_id_at_the_next_start(
        make_gateway: GatewayFactory, thingsboard: FakeThingsBoard, rig: Rig, mode: str,
        outcome: dict[str, Any]) -> None:
    first_boot = rig.boot_id.read_text().strip()
    gateway = make_gateway(config=rig.config(rig.reboot_command(mode)))
    gateway.start()
    rig.wait_registered(gateway)
    rig.request("c8y-1", **EXTRA)
    assert wait_exit(gateway) == 0, gateway.log_tail()  # stopped by the reboot command

    # Persisted before executing was published; executing retained before the command ran.
    rig.wait_statuses("c8y-1", ["init", "executing"], gateway)
    assert rig.states("c8y-1")[1] == {"status": "executing", **EXTRA}
    for state in (rig.state_at_executing[0], json.loads((rig.seen / "state.json").read_text())):
        row = executing_row(state)
        assert (row["id"], row["payload"]["boot_id"]) == ("c8y-1", first_boot)
        assert row["extra"] == EXTRA
    assert json.loads((rig.seen / "retained.json").read_text()) == {
        "status": "executing", **EXTRA}
    assert (rig.boot_id.read_text().strip() != first_boot) == (mode == "reboot")

    gateway.start()
    assert rig.wait_status("c8y-1", outcome["status"], gateway) == outcome
    report = wait_report(thingsboard, gateway, outcome["status"])
    assert report == {"restart_status": outcome["status"], "restart_id": "c8y-1",
                      "restart_reason": outcome.get("reason", "")}
    assert [r["restart_status"] for r in restart_reports(thingsboard)] == [
        "executing", outcome["status"]]
    wait_until(lambda: all_delivered(rig.state_path),
               "the command is settled once its outcome is published", gateway)

    # Only the requester clears a command: the outcome stays retained.
    assert gateway.stop() == 0
    assert rig.statuses("c8y-1") == ["init", "executing", outcome["status"]]
    assert json.loads(retained(rig.local, rig.topic("c8y-1"))[rig.topic("c8y-1")]) == outcome


def test_an_init_published_while_the_gateway_is_down_is_served_at_start(
        make_gateway: GatewayFactory, rig: Rig) -> None:
    """The retained init arrives with the subscription, before anything else: executing is
    still published (and acknowledged) before the reboot command runs."""
    gateway = make_gateway(config=rig.config(rig.reboot_command("reboot")))
    rig.request("early")
    gateway.start()
    assert wait_exit(gateway) == 0, gateway.log_tail()
    assert json.loads((rig.seen / "retained.json").read_text()) == {"status": "executing"}
    rig.wait_statuses("early", ["init", "executing"], gateway)
    assert executing_row(rig.state_at_executing[0])["id"] == "early"
    gateway.start()
    assert rig.wait_status("early", "successful", gateway) == {"status": "successful"}
    assert rig.statuses("early") == ["init", "executing", "successful"]


@pytest.mark.parametrize("device_restarted", [True, False])
def test_a_power_cut_right_after_executing_is_resolved_at_the_next_start(
        make_gateway: GatewayFactory, rig: Rig, device_restarted: bool) -> None:
    """kill -9 the instant executing is seen; the next start still decides correctly."""
    pid_file = rig.workdir / "reboot.pid"
    # A reboot command that does nothing harmful if it got to start at all.
    command = [sys.executable, "-c", "import os, sys, time; "
               "open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(30)", str(pid_file)]
    gateway = make_gateway(config=rig.config(command))
    try:
        gateway.start()
        rig.wait_registered(gateway)
        pid = gateway.pid
        assert pid is not None
        rig.on_executing = lambda: os.kill(pid, signal.SIGKILL)
        rig.request("cut", **EXTRA)
        assert wait_exit(gateway) == -signal.SIGKILL
        rig.on_executing = None
    finally:
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
    assert executing_row(read_state(rig.state_path))["id"] == "cut"

    if device_restarted:
        rig.new_boot()
    gateway.start()
    status, expected = outcome_after_start(device_restarted)
    assert rig.wait_status("cut", status, gateway) == expected
    assert rig.statuses("cut") == ["init", "executing", status]


def test_a_command_delivered_before_the_bus_says_connected_still_goes_executing_first(
        rig: Rig, tmp_path: Path) -> None:
    """A retained init can be handed over while the session is still being set up; its
    executing state must still be published, and acknowledged, before the reboot command
    runs. In-process, to make that ordering certain: the command arrives first, then the
    bus connects."""
    settings = Settings()
    settings.local_mqtt = LocalMqttSettings(host=rig.local.host, port=rig.local.plain_port,
                                            reconnect_max_s=1.0)
    state_path = tmp_path / "inproc" / "restart.json"
    settings.restart = RestartSettings(command=rig.reboot_command("fail", state_path),
                                       timeout_s=30.0, boot_id_file=str(rig.boot_id))
    reports: list[dict[str, Any]] = []

    async def scenario() -> None:
        async with restart_on_bus(settings, state_path, reports, Clock()) as restart:
            restart.on_command("early", b'{"status": "init", "n": 1}')
            async with asyncio.timeout(WAIT):
                while not any(r["restart_status"] == "failed" for r in reports):
                    await asyncio.sleep(0.02)
                await until_delivered(state_path)

    asyncio.run(scenario())
    assert json.loads((rig.seen / "retained.json").read_text()) == {
        "status": "executing", "n": 1}
    rig.wait_status("early", "failed", None)
    assert rig.states("early") == [
        {"status": "executing", "n": 1},
        {"status": "failed", "n": 1, "reason": "The reboot command exited with code 1"}]


# -- failures while the gateway runs ------------------------------------------------------


def test_a_reboot_command_that_cannot_start_fails_the_restart(
        make_gateway: GatewayFactory, thingsboard: FakeThingsBoard, rig: Rig) -> None:
    missing = rig.workdir / "no-such-reboot"
    gateway = make_gateway(config=rig.config([str(missing), "now"]))
    gateway.start()
    rig.wait_registered(gateway)
    rig.request("c1", **EXTRA)
    reason = f"The reboot command '{missing}' cannot be started: No such file or directory"
    assert rig.wait_status("c1", "failed", gateway) == {"status": "failed", **EXTRA,
                                                         "reason": reason}
    assert rig.statuses("c1") == ["init", "executing", "failed"]
    assert wait_report(thingsboard, gateway, "failed")["restart_reason"] == reason
    assert gateway.running


def test_a_reboot_command_that_exits_non_zero_fails_the_restart_and_only_init_is_acted_on(
        make_gateway: GatewayFactory, thingsboard: FakeThingsBoard, rig: Rig) -> None:
    command = [sys.executable, "-c",
               "import sys; print('reboot: permission denied', file=sys.stderr); sys.exit(1)"]
    gateway = make_gateway(config=rig.config(command))
    gateway.start()
    rig.wait_registered(gateway)
    # Other states, unknown statuses and junk are not acted on...
    others = {"s-executing": {"status": "executing"}, "s-successful": {"status": "successful"},
              "s-failed": {"status": "failed", "reason": "x"}, "s-odd": {"status": "scheduled"},
              "s-none": {"reason": "no status"}}
    for command_id, payload in others.items():
        rig.bus.publish(rig.topic(command_id), payload, retain=True)
    rig.bus.publish(rig.topic("s-junk"), b"not json", retain=True)
    rig.bus.publish(rig.topic("s-list"), b"[1]", retain=True)
    # ...an init is, after them.
    rig.request("c1", **EXTRA)
    reason = "The reboot command exited with code 1: reboot: permission denied"
    assert rig.wait_status("c1", "failed", gateway) == {"status": "failed", **EXTRA,
                                                         "reason": reason}
    assert rig.statuses("c1") == ["init", "executing", "failed"]
    for command_id, payload in others.items():
        assert rig.states(command_id) == [payload], command_id
    assert rig.bus.payloads(rig.topic("s-junk")) == [b"not json"]
    assert rig.bus.payloads(rig.topic("s-list")) == [b"[1]"]
    assert wait_report(thingsboard, gateway, "failed")["restart_reason"] == reason
    assert "restart s-" not in gateway.log_text()


def test_an_outcome_decided_while_the_broker_is_down_is_published_after_a_kill_9(
        make_gateway: GatewayFactory, rig: Rig) -> None:
    """The reboot command fails and takes the local broker down with it: the outcome cannot
    be published. It is on disk, and the next start publishes it."""
    broker_pid = rig.local.pid
    assert broker_pid is not None
    command = [sys.executable, "-c", "import os, signal, sys; "
               "os.kill(int(sys.argv[1]), signal.SIGKILL); sys.exit(1)", str(broker_pid)]
    gateway = make_gateway(config=rig.config(command))
    gateway.start()
    rig.wait_registered(gateway)
    rig.request("c1", **EXTRA)
    gateway.wait_for_log("restart c1 failed: The reboot command exited with code 1")
    gateway.wait_for_log("local broker: connection lost")
    record = rows(read_state(rig.state_path))["c1"]
    assert (record["status"], record["reason"], record["extra"], record["delivered"]) == (
        "failed", "The reboot command exited with code 1", EXTRA, False)
    gateway.kill()

    rig.local.start()  # same port, but empty: the broker keeps nothing (no persistence)
    with BusClient(rig.local, [rig.topic("c1")]) as bus:
        gateway.start()
        bus.wait_for(lambda: bus.payloads(rig.topic("c1")) != [], "the outcome", gateway)
        assert bus.documents(rig.topic("c1")) == [
            {"status": "failed", **EXTRA, "reason": "The reboot command exited with code 1"}]
    wait_until(lambda: all_delivered(rig.state_path),
               "the outcome is settled once acknowledged", gateway)


def test_a_device_that_does_not_restart_in_time_fails_and_a_second_init_is_refused(
        make_gateway: GatewayFactory, thingsboard: FakeThingsBoard, rig: Rig) -> None:
    gateway = make_gateway(config=rig.config([sys.executable, "-c", "pass"], timeout_s=2))
    gateway.start()
    rig.wait_registered(gateway)
    rig.request("c1", **EXTRA)
    rig.wait_status("c1", "executing", gateway)
    rig.request("c2", note="second")
    assert rig.wait_status("c2", "failed", gateway) == {
        "status": "failed", "note": "second", "reason": "Another restart (c1) is in progress"}
    assert rig.statuses("c2") == ["init", "failed"]
    assert rig.wait_status("c1", "failed", gateway) == {
        "status": "failed", **EXTRA, "reason": "The device has not restarted within 2 seconds"}
    assert rig.statuses("c1") == ["init", "executing", "failed"]
    assert wait_report(thingsboard, gateway, "failed") == {
        "restart_status": "failed", "restart_id": "c1",
        "restart_reason": "The device has not restarted within 2 seconds"}
    # Once it ended, a new request is served.
    rig.request("c3")
    rig.wait_status("c3", "executing", gateway)


def test_an_unreadable_boot_id_fails_the_restart(make_gateway: GatewayFactory,
                                                 rig: Rig) -> None:
    missing = rig.workdir / "no-boot-id"
    gateway = make_gateway(config=rig.config(rig.reboot_command(), boot_id_file=missing))
    gateway.start()
    rig.wait_registered(gateway)
    rig.request("c1")
    failed = rig.wait_status("c1", "failed", gateway)
    assert failed["reason"].startswith(f"Cannot read the boot id from {missing}: ")
    assert rig.statuses("c1") == ["init", "failed"]
    assert not (rig.seen / "state.json").exists()  # the reboot command never ran
    assert gateway.running


# -- the RPC reboot -----------------------------------------------------------------------


def rpc_gateway(make_gateway: GatewayFactory, thingsboard: FakeThingsBoard, rig: Rig,
                config: dict[str, dict[str, Any]]) -> GatewayProcess:
    """A gateway on the rig's local broker, registered there and connected to ThingsBoard."""
    gateway = make_gateway(config=config)
    gateway.start()
    rig.wait_registered(gateway)
    wait_until(lambda: "sys_info" in thingsboard.client_attributes,
               "the gateway is connected to ThingsBoard", gateway)
    return gateway


def test_rpc_reboot_goes_through_the_restart_operation_and_clears_its_command(
        make_gateway: GatewayFactory, thingsboard: FakeThingsBoard, rig: Rig) -> None:
    gateway = rpc_gateway(make_gateway, thingsboard, rig,
                          rig.config(rig.reboot_command("reboot")))
    request_id = thingsboard.rpc_async("reboot")
    command_id = f"tb-rpc-{request_id}"
    assert thingsboard.wait_rpc_response(request_id) == {
        "message": f"restart {command_id} started; its outcome is reported as telemetry "
                   "restart_status and restart_reason"}
    assert wait_exit(gateway) == 0, gateway.log_tail()
    rig.wait_statuses(command_id, ["init", "executing"], gateway)
    assert executing_row(rig.state_at_executing[0])["id"] == command_id

    gateway.start()
    rig.wait_status(command_id, None, gateway)  # the gateway was the requester: cleared
    assert rig.statuses(command_id) == ["init", "executing", "successful", None]
    assert wait_report(thingsboard, gateway, "successful") == {
        "restart_status": "successful", "restart_id": command_id, "restart_reason": ""}
    assert retained(rig.local, rig.topic(command_id)) == {}


def test_rpc_reboot_is_refused_while_a_restart_is_pending(
        make_gateway: GatewayFactory, thingsboard: FakeThingsBoard, rig: Rig) -> None:
    gateway = rpc_gateway(make_gateway, thingsboard, rig,
                          rig.config([sys.executable, "-c", "pass"], timeout_s=2))
    first = thingsboard.rpc_async("reboot")
    assert "error" not in thingsboard.wait_rpc_response(first)
    rig.wait_status(f"tb-rpc-{first}", "executing", gateway)
    assert thingsboard.rpc("reboot") == {
        "message": f"another restart (tb-rpc-{first}) is in progress", "error": True}
    # The first one times out, is reported, and its command is cleared.
    rig.wait_status(f"tb-rpc-{first}", None, gateway)
    assert rig.statuses(f"tb-rpc-{first}") == ["init", "executing", "failed", None]
    assert wait_report(thingsboard, gateway, "failed") == {
        "restart_status": "failed", "restart_id": f"tb-rpc-{first}",
        "restart_reason": "The device has not restarted within 2 seconds"}


def test_two_rpc_reboots_at_once_start_one_restart(
        make_gateway: GatewayFactory, thingsboard: FakeThingsBoard, rig: Rig) -> None:
    gateway = rpc_gateway(make_gateway, thingsboard, rig,
                          rig.config([sys.executable, "-c", "pass"], timeout_s=2))
    # The second arrives before the first came back through the local broker.
    first, second = thingsboard.rpc_async("reboot"), thingsboard.rpc_async("reboot")
    assert "error" not in thingsboard.wait_rpc_response(first)
    assert thingsboard.wait_rpc_response(second) == {
        "message": f"another restart (tb-rpc-{first}) is in progress", "error": True}
    rig.wait_status(f"tb-rpc-{first}", None, gateway)
    assert rig.statuses(f"tb-rpc-{first}") == ["init", "executing", "failed", None]
    assert rig.statuses(f"tb-rpc-{second}") == []  # never asked for on the bus
    # Once it ended, a reboot is served again.
    third = thingsboard.rpc_async("reboot")
    assert "error" not in thingsboard.wait_rpc_response(third)
    rig.wait_status(f"tb-rpc-{third}", "executing", gateway)


def test_rpc_reboot_without_a_local_broker_still_reports_the_outcome(
        make_gateway: GatewayFactory, thingsboard: FakeThingsBoard, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-reboot"
    boot_id = tmp_path / "boot_id"
    boot_id.write_text(f"{uuid.uuid4()}\n")
    gateway = make_gateway(config={"restart": {"command": [str(missing)],
                                               "boot_id_file": str(boot_id)}})
    gateway.start()
    wait_until(lambda: "sys_info" in thingsboard.client_attributes,
               "the gateway is connected to ThingsBoard", gateway)
    request_id = thingsboard.rpc_async("reboot")
    assert "error" not in thingsboard.wait_rpc_response(request_id)
    assert wait_report(thingsboard, gateway, "failed") == {
        "restart_status": "failed", "restart_id": f"tb-rpc-{request_id}",
        "restart_reason": f"The reboot command '{missing}' cannot be started: "
                          "No such file or directory"}
    state_path = tmp_path / "data" / "state" / "restart.json"
    wait_until(lambda: all_delivered(state_path), "the ended restart is settled", gateway)
    assert thingsboard.rpc("status")["message"]["restart_pending"] is None


@pytest.mark.parametrize("recoverable", [True, False])
def test_a_damaged_state_file_fails_the_executing_restart_with_a_reason(
        make_gateway: GatewayFactory, thingsboard: FakeThingsBoard, rig: Rig,
        recoverable: bool) -> None:
    rig.state_path.parent.mkdir(parents=True, exist_ok=True)
    text = "\x00\x01garbage"
    if recoverable:
        # Written by the gateway, then cut: the end of the file is lost, every command
        # line is still whole.
        repo = CommandRepository(rig.state_path, RestartJob, Nothing)
        repo.load()
        done = repo.create("old", RestartJob(boot_id="b0"))
        repo.resolve(done, Status.SUCCESSFUL)
        repo.delivered(done)
        repo.create("dmg-1", RestartJob(boot_id="b"), extra=EXTRA)
        whole = rig.state_path.read_text()
        text = whole[:whole.rindex("]}")]
    rig.state_path.write_text(text)
    gateway = make_gateway(config=rig.config(rig.reboot_command("reboot")))
    gateway.start()
    report = wait_report(thingsboard, gateway, "failed")
    assert report["restart_reason"].startswith("The gateway's restart state was damaged: ")
    assert "restart.json" in report["restart_reason"]
    assert report["restart_id"] == ("dmg-1" if recoverable else "")
    if recoverable:
        outcome = rig.wait_status("dmg-1", "failed", gateway)
        assert outcome == {"status": "failed", **EXTRA, "reason": report["restart_reason"]}
        wait_until(lambda: all_delivered(rig.state_path), "the outcome is settled", gateway)
        assert set(rows(read_state(rig.state_path))) == {"old", "dmg-1"}
    quarantined = list(rig.state_path.parent.glob("restart.json.corrupt-*"))
    assert [p.read_text() for p in quarantined] == [text]
    # Still manageable: a repeated request is recognised, the next restart runs as usual.
    rig.wait_registered(gateway)
    if recoverable:
        rig.request("old")
    rig.request("after")
    assert wait_exit(gateway) == 0, gateway.log_tail()
    assert executing_row(json.loads((rig.seen / "state.json").read_text()))["id"] == "after"
    if recoverable:
        assert rig.statuses("old") == ["init"]


# -- the layout of earlier releases -------------------------------------------------------


def earlier_layout(boot_id: str) -> dict[str, Any]:
    """restart.json as an earlier release left it in the middle of a restart: one command
    executing, one outcome not yet acknowledged, and the ids already handled."""
    return {
        "pending": {"id": "old-1", "topic": f"{RESTART_CAPABILITY}/old-1",
                    "command": {"status": "executing", **EXTRA}, "boot_id": boot_id,
                    "phase": "executing", "started_ms": 1_700_000_000_000, "via_bus": True},
        "finished": {"old-0": {"id": "old-0", "topic": f"{RESTART_CAPABILITY}/old-0",
                               "command": {"status": "failed", "reason": "it broke", "n": 1},
                               "phase": "final", "via_bus": True}},
        "recent": ["done-1", "old-0", "old-1"]}


def test_the_layout_of_an_earlier_release_is_read_as_commands(tmp_path: Path) -> None:
    path = tmp_path / "restart.json"
    path.write_text(json.dumps(earlier_layout("boot-a")))
    repo = CommandRepository(path, RestartJob, Nothing, legacy=legacy_state)
    assert repo.load() is None
    assert list(repo.commands) == ["done-1", "old-0", "old-1"]
    executing = repo.commands["old-1"]
    assert (executing.status, executing.extra, executing.payload) == (
        Status.EXECUTING, EXTRA, RestartJob("boot-a", True, 1_700_000_000_000))
    finished = repo.commands["old-0"]
    assert (finished.status, finished.reason, finished.extra, finished.delivered) == (
        Status.FAILED, "it broke", {"n": 1}, False)
    assert repo.commands["done-1"].final and repo.commands["done-1"].delivered
    # Written back in today's layout at the next change, and read again as it was.
    repo.save()
    assert json.loads(path.read_text())["format"] == 1
    again = CommandRepository(path, RestartJob, Nothing, legacy=legacy_state)
    assert again.load() is None and again.commands == repo.commands
    assert not list(tmp_path.glob("*.corrupt-*"))


@pytest.mark.parametrize("device_restarted", [True, False])
def test_a_device_upgraded_in_the_middle_of_a_restart_resolves_it(
        make_gateway: GatewayFactory, thingsboard: FakeThingsBoard, rig: Rig,
        device_restarted: bool) -> None:
    rig.state_path.parent.mkdir(parents=True, exist_ok=True)
    rig.state_path.write_text(json.dumps(earlier_layout(rig.boot_id.read_text().strip())))
    if device_restarted:
        rig.new_boot()
    gateway = make_gateway(config=rig.config(rig.reboot_command("reboot")))
    gateway.start()
    status, expected = outcome_after_start(device_restarted)
    assert rig.wait_status("old-1", status, gateway) == expected
    assert rig.wait_status("old-0", "failed", gateway) == {
        "status": "failed", "reason": "it broke", "n": 1}
    wait_until(lambda: {r["restart_id"] for r in restart_reports(thingsboard)} >= {
        "old-0", "old-1"}, "both outcomes reach ThingsBoard", gateway)
    assert not list(rig.state_path.parent.glob("restart.json.corrupt-*"))
    # The ids handled before the upgrade are still recognised; a new one is served.
    rig.wait_registered(gateway)
    rig.request("done-1")
    rig.request("new-1")
    assert wait_exit(gateway) == 0, gateway.log_tail()
    assert executing_row(json.loads((rig.seen / "state.json").read_text()))["id"] == "new-1"
    assert rig.statuses("done-1") == ["init"]


# -- the timeout, on a fake clock ---------------------------------------------------------


class CountingClock(FakeClock):
    """A fake clock that counts the sleeps begun on it."""

    def __init__(self) -> None:
        super().__init__()
        self.sleeps: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        await super().sleep(seconds)


@pytest.mark.parametrize(("command", "reason"), [
    (["true"], "The device has not restarted within 5 minutes"),
    (["sleep", "60"], "The reboot command did not finish within 5 minutes"),
])
def test_the_restart_timeout_runs_on_the_operations_clock(
        rig: Rig, tmp_path: Path, command: list[str], reason: str) -> None:
    """The reboot command returns and the device stays up (or the command hangs): failed
    exactly when the clock passes the timeout, not a moment before."""
    settings = Settings()
    settings.local_mqtt = LocalMqttSettings(host=rig.local.host, port=rig.local.plain_port,
                                            reconnect_max_s=1.0)
    settings.restart = RestartSettings(command=command, timeout_s=300.0,
                                       boot_id_file=str(rig.boot_id))
    state_path = tmp_path / "inproc" / "restart.json"
    reports: list[dict[str, Any]] = []
    clock = CountingClock()
    sleeps_before_timeout = 2 if command == ["true"] else 1

    async def scenario() -> None:
        async with restart_on_bus(settings, state_path, reports, clock) as restart:
            async with asyncio.timeout(WAIT):
                await restart.run()
                await restart.channel.connected.wait()
                restart.on_command("slow", b'{"status": "init", "n": 2}')
                while len(clock.sleeps) < sleeps_before_timeout:
                    await asyncio.sleep(0.01)
                await clock.advance(299.9)
                await asyncio.sleep(0.1)
                assert [r["restart_status"] for r in reports] == ["executing"]
                assert restart.in_progress() == "slow"
                await clock.advance(0.1)
                await until_delivered(state_path)

    asyncio.run(scenario())
    assert rig.wait_status("slow", "failed", None) == {"status": "failed", "n": 2,
                                                        "reason": reason}
    assert rig.statuses("slow") == ["executing", "failed"]
    assert reports[-1] == {"restart_status": "failed", "restart_reason": reason,
                           "restart_id": "slow"}
