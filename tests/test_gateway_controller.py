"""The controller supervised by a real gateway process, end to end.

Real gateway processes (``python -m teg_gateway run``), real mosquitto over TLS and the
ThingsBoard stand-in, and real controllers: a small Python script in the test's temporary
directory that writes records and health checks into the queue database through
:class:`~teg_gateway.sandbox.controller.QueueWriter`. Each start of the controller is
written to ``starts.log`` (pid and the variables it got) and each graceful stop to
``stops.log``, both in the controller data directory.

Delays are small (restart_min_s 0.1, restart_max_s 1) and the tests assert on what the
gateway reported (states, counts, delays, their order), never on wall-clock time; every
wait is bounded.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import GatewayFactory, alive, needs_mosquitto
from teg_gateway.sandbox.broker import Mosquitto
from teg_gateway.sandbox.controller import QueueWriter, make_records
from teg_gateway.sandbox.process import GatewayProcess
from teg_gateway.sandbox.thingsboard import FakeThingsBoard
from test_forwarding import health_records, log_records, query, wait_connected, wait_until

pytestmark = needs_mosquitto

CONTROLLER = """
import json, os, signal, sys, time
from pathlib import Path

mode = sys.argv[1]
data = Path(os.environ["TEG_DATA_PATH"])
starts_file = data / "starts.log"
private = ("TEG_", "TB_", "THINGSBOARD_")
with starts_file.open("a") as fh:
    fh.write(json.dumps({
        "pid": os.getpid(), "cwd": os.getcwd(),
        "env": {k: v for k, v in os.environ.items() if k.startswith(private)},
    }) + "\\n")
run = len(starts_file.read_text().splitlines())
print(f"controller run {run} ({mode}), pid {os.getpid()}", flush=True)
stopping = False


def on_sigterm(signum, frame):
    global stopping
    stopping = True


def healthy(seconds):
    # Records and a health check every 0.1 s; a clean exit on SIGTERM. Bounded, so a
    # controller left behind by a failed test ends by itself.
    from teg_gateway.sandbox.controller import QueueWriter

    signal.signal(signal.SIGTERM, on_sigterm)
    writer = QueueWriter(data)
    seq = 0
    end = time.monotonic() + seconds
    while not stopping and time.monotonic() < end:
        writer.write_record({"ctl_run": run, "ctl_seq": seq})
        writer.health_check()
        if seq == 0:
            (data / f"working-{os.getpid()}").touch()
        seq += 1
        time.sleep(0.1)
    writer.close()
    with (data / "stops.log").open("a") as fh:
        fh.write(json.dumps({"pid": os.getpid(), "sigterm": stopping}) + "\\n")


if mode == "crash":
    print("crashing", flush=True)
    sys.exit(3)
if mode == "crash_once" and run == 1:
    print("crashing", flush=True)
    sys.exit(3)
if mode in ("bus_on_demand", "bus_once"):
    # Health on the local bus, retained, once at the start; then only when asked with a
    # health check command ("bus_on_demand", the thin-edge.io way) or never ("bus_once").
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    signal.signal(signal.SIGTERM, on_sigterm)
    topic = "te/device/main/service/test-controller/status/health"

    def up(client):
        client.publish(topic, json.dumps({"status": "up", "time": time.time()}), qos=1,
                       retain=True)

    def on_check(client, userdata, msg):
        if mode == "bus_on_demand":
            up(client)
        with (data / "checks.log").open("a") as fh:
            fh.write(msg.topic + "\\n")

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"controller-{os.getpid()}")
    client.on_message = on_check
    client.connect(sys.argv[2], int(sys.argv[3]))
    client.subscribe([("te/device/main/service/test-controller/cmd/health/check", 1),
                      ("te/device/main///cmd/health/check", 1)])
    client.loop_start()
    up(client)
    end = time.monotonic() + 60
    while not stopping and time.monotonic() < end:
        time.sleep(0.05)
    client.loop_stop()
    sys.exit(0)
if mode.startswith("bus"):
    # Health on the local bus only: {"status": "up"} every 0.2 s, the same text each time
    # ("bus_same") or with the time in it ("bus_time").
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    signal.signal(signal.SIGTERM, on_sigterm)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"controller-{os.getpid()}")
    client.connect(sys.argv[2], int(sys.argv[3]))
    client.loop_start()
    topic = "te/device/main/service/test-controller/status/health"
    end = time.monotonic() + 60
    while not stopping and time.monotonic() < end:
        health = {"status": "up"} if mode == "bus_same" else {"status": "up",
                                                              "time": time.time()}
        client.publish(topic, json.dumps(health), qos=1, retain=True).wait_for_publish(2.0)
        time.sleep(0.2)
    client.loop_stop()
    sys.exit(0)
if mode == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    (data / "stubborn").touch()
    time.sleep(60)
    sys.exit(0)
if mode == "hang":
    # A few signs of life, then silence; SIGTERM ends it (default action).
    from teg_gateway.sandbox.controller import QueueWriter

    writer = QueueWriter(data)
    for _ in range(3):
        writer.health_check()
        time.sleep(0.1)
    time.sleep(60)
    sys.exit(0)
healthy(60)
"""

CONTROLLER_DEFAULTS: dict[str, Any] = {
    "runtime": "process",
    "restart_min_s": 0.1,
    "restart_max_s": 1.0,
    "healthy_after_s": 60.0,
    "health_timeout_s": 30.0,
    "stop_grace_s": 3.0,
}


def controller_reports(thingsboard: FakeThingsBoard) -> list[dict[str, Any]]:
    """The controller state telemetry received, in order."""
    return [r["values"] for r in thingsboard.telemetry() if "controller_state" in r["values"]]


def with_state(thingsboard: FakeThingsBoard, state: str) -> list[dict[str, Any]]:
    return [r for r in controller_reports(thingsboard) if r["controller_state"] == state]


class ControllerSetup:
    """Gateways supervising the test controller; kills what is left at the end."""

    def __init__(self, tmp_path: Path, make_gateway: GatewayFactory) -> None:
        self.script = tmp_path / "controller.py"
        self.script.write_text(textwrap.dedent(CONTROLLER))
        # A controller data directory of its own, so TEG_DATA_PATH of the controller (this
        # one) differs from the gateway's.
        self.data = tmp_path / "controller-data"
        self.data.mkdir()
        self.gateway_data = tmp_path / "data"
        self._make_gateway = make_gateway
        self.gateways: list[GatewayProcess] = []

    def gateway(self, mode: str, config: dict[str, dict[str, Any]] | None = None,
                args: tuple[str, ...] = (), **controller: Any) -> GatewayProcess:
        """A gateway (not started) running the test controller in ``mode``."""
        command = [sys.executable, "-u", str(self.script), mode, *args]
        settings = {**CONTROLLER_DEFAULTS, "command": command, **controller}
        gateway = self._make_gateway({**(config or {}), "controller": settings},
                                     env={"TEG_CONTROLLER_DATA_PATH": str(self.data)})
        self.gateways.append(gateway)
        return gateway

    def starts(self) -> list[dict[str, Any]]:
        return self._lines("starts.log")

    def stops(self) -> list[dict[str, Any]]:
        return self._lines("stops.log")

    def _lines(self, name: str) -> list[dict[str, Any]]:
        path = self.data / name
        if not path.exists():
            return []
        # Only complete lines: the controller may be writing the last one.
        return [json.loads(line) for line in path.read_text().split("\n")[:-1]]

    def state(self) -> dict[str, Any]:
        value = json.loads((self.gateway_data / "state" / "controller.json").read_text())
        assert isinstance(value, dict)
        return value

    def controller_log(self) -> str:
        return (self.data / "logs" / "controller.log").read_text(errors="replace")

    def cleanup(self) -> None:
        # The gateways first, or one would start the controller again.
        for gateway in self.gateways:
            if gateway.running:
                gateway.kill()
        for start in self.starts():
            pid = start["pid"]
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if str(self.script).encode() in cmdline and alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def controller(tmp_path: Path, make_gateway: GatewayFactory) -> Iterator[ControllerSetup]:
    setup = ControllerSetup(tmp_path, make_gateway)
    yield setup
    setup.cleanup()


def test_controller_gets_its_environment_and_its_records_and_health_reach_thingsboard(
        controller: ControllerSetup, thingsboard: FakeThingsBoard) -> None:
    gateway = controller.gateway("healthy", {"health": {"interval_s": 0.5}},
                                 default_version="v1")
    gateway.start()
    wait_connected(thingsboard, gateway)
    wait_until(lambda: len(controller.starts()) == 1, "the controller starts", gateway)

    env = controller.starts()[0]["env"]
    assert env["TEG_DATA_PATH"] == str(controller.data)
    assert env["TEG_CONTROLLER_LOGS_PATH"] == str(controller.data / "logs")
    assert env["TEG_CONTROLLER_VERSION"] == "v1"
    assert env["TEG_CONTROLLER_DIR"] == str(controller.data)
    assert controller.starts()[0]["cwd"] == str(controller.data)
    # The gateway's own variables (the provisioning secret among them) stay with it.
    leaked = sorted(k for k in env if k.startswith(("TB_", "THINGSBOARD_")))
    assert leaked == []
    assert set(env) == {"TEG_DATA_PATH", "TEG_CONTROLLER_LOGS_PATH",
                        "TEG_CONTROLLER_VERSION", "TEG_CONTROLLER_DIR"}

    # What the controller writes through TEG_DATA_PATH reaches ThingsBoard.
    wait_until(lambda: len(thingsboard.telemetry_values("ctl_seq")) >= 10,
               "records of the controller arrive", gateway)
    seqs = thingsboard.telemetry_values("ctl_seq")
    assert seqs[:10] == list(range(10))
    assert set(thingsboard.telemetry_values("ctl_run")) == {1}

    running = with_state(thingsboard, "running")
    assert running and running[0]["controller_restarts"] == 0
    assert running[0]["controller_version"] == "v1"

    # Health telemetry: the controller's uptime grows, its health check stays recent.
    def timed() -> list[dict[str, Any]]:
        return [h for h in health_records(thingsboard) if "ms_since_controller_startup" in h]

    wait_until(lambda: len(timed()) >= 3 and timed()[-1]["ms_since_controller_startup"] >= 1500,
               "health telemetry with the controller's uptime", gateway)
    records = timed()
    uptimes = [h["ms_since_controller_startup"] for h in records]
    assert uptimes == sorted(uptimes) and uptimes[-1] > uptimes[0], uptimes
    last = records[-1]
    assert 0 <= last["ms_since_last_controller_health_check"] < last["ms_since_controller_startup"]
    assert gateway.stop() == 0


def test_crash_loop_is_restarted_with_growing_delays_and_reported(
        controller: ControllerSetup, thingsboard: FakeThingsBoard) -> None:
    gateway = controller.gateway("crash")
    gateway.start()
    wait_connected(thingsboard, gateway)
    wait_until(lambda: len(with_state(thingsboard, "crashed")) >= 6,
               "six crashes reported", gateway)
    crashed = with_state(thingsboard, "crashed")[:6]

    assert [r["controller_consecutive_failures"] for r in crashed] == [1, 2, 3, 4, 5, 6]
    assert [r["controller_restarts"] for r in crashed] == [0, 1, 2, 3, 4, 5]
    assert all(r["controller_last_exit"] == "exit code 3" for r in crashed), crashed
    delays = [r["controller_restart_delay_s"] for r in crashed]
    for i, delay in enumerate(delays):
        step = min(0.1 * 2 ** i, 1.0)  # doubling from restart_min_s, capped at restart_max_s
        assert step / 2 - 0.001 <= delay <= step + 0.001, (i, delays)
    assert delays[3] > delays[0] and delays[4] > delays[1], delays
    assert delays[5] <= 1.0

    # Each crash follows a start: running, crashed, running, crashed, ...
    states = [r["controller_state"] for r in controller_reports(thingsboard)
              if r["controller_state"] in ("running", "crashed")]
    assert states[:12] == ["running", "crashed"] * 6, states
    assert len(controller.starts()) >= 6

    # The crash is an error line in the gateway's log that reaches ThingsBoard: that line
    # is what an operator reads, so its wording is checked.
    wait_until(lambda: any("controller stopped unexpectedly" in r["message"]
                           for r in log_records(thingsboard)),
               "the crash logged to ThingsBoard", gateway)
    error = next(r for r in log_records(thingsboard)
                 if "controller stopped unexpectedly" in r["message"])
    assert error["severity"] == "ERROR"
    # The controller's own output and the gateway's marks are in its log file.
    log = controller.controller_log()
    assert "crashing" in log and "ended: exit code 3" in log
    assert gateway.stop() == 0
    assert controller.state()["restarts"] >= 5


def test_a_controller_that_stops_writing_health_checks_is_restarted(
        controller: ControllerSetup, thingsboard: FakeThingsBoard) -> None:
    gateway = controller.gateway("hang", health_timeout_s=2.0)
    gateway.start()
    wait_connected(thingsboard, gateway)
    wait_until(lambda: len(controller.starts()) >= 1, "the controller starts", gateway)
    first = controller.starts()[0]["pid"]
    wait_until(lambda: bool(with_state(thingsboard, "hung")) and len(controller.starts()) >= 2,
               "the hung controller is reported and started again", gateway)

    hung = with_state(thingsboard, "hung")[0]
    assert hung["controller_last_exit"].startswith("hung: no health signal for "), hung
    assert "killed by SIGTERM" in hung["controller_last_exit"]
    assert hung["controller_consecutive_failures"] == 1
    assert hung["controller_restart_delay_s"] <= 0.1
    assert not alive(first)
    assert controller.starts()[1]["pid"] != first
    wait_until(lambda: any(r["controller_restarts"] >= 1
                           for r in with_state(thingsboard, "running")),
               "the restart is counted", gateway)
    assert gateway.stop() == 0


def bus_health_gateway(controller: ControllerSetup, thingsboard: FakeThingsBoard,
                       broker: Mosquitto, mode: str, **settings: Any) -> GatewayProcess:
    """A connected gateway whose controller (in ``mode``) gives its health on the local
    bus (mosquitto), with a health timeout of 2 s."""
    bus: dict[str, dict[str, Any]] = {
        "local_mqtt": {"enabled": True, "host": broker.host, "port": broker.plain_port},
        "health": {"interval_s": 0.5}}
    gateway = controller.gateway(mode, bus, (broker.host, str(broker.plain_port)),
                                 health_timeout_s=2.0, **settings)
    gateway.start()
    wait_connected(thingsboard, gateway)
    return gateway


def wait_past_twice_the_health_timeout(thingsboard: FakeThingsBoard,
                                       gateway: GatewayProcess) -> None:
    """Until the controller has run over 5 s (or was found hung)."""
    wait_until(lambda: any(h.get("ms_since_controller_startup", 0) > 5000
                           for h in health_records(thingsboard))
               or bool(with_state(thingsboard, "hung")),
               "the controller runs over twice the health timeout", gateway)


@pytest.mark.parametrize("mode", [
    "bus_time",
    "bus_same",
])
def test_health_on_the_local_bus_keeps_a_controller_from_being_hung(
        controller: ControllerSetup, thingsboard: FakeThingsBoard, broker: Mosquitto,
        mode: str) -> None:
    gateway = bus_health_gateway(controller, thingsboard, broker, mode)
    wait_past_twice_the_health_timeout(thingsboard, gateway)
    assert with_state(thingsboard, "hung") == []
    assert len(controller.starts()) == 1
    late = next(h for h in health_records(thingsboard)
                if h.get("ms_since_controller_startup", 0) > 5000)
    assert late["ms_since_last_controller_health_check"] < late["ms_since_controller_startup"]
    assert gateway.stop() == 0


@pytest.mark.parametrize("mode", ["bus_on_demand", "bus_once"])
def test_a_bus_service_that_reports_only_when_asked_is_asked_before_it_counts_as_hung(
        controller: ControllerSetup, thingsboard: FakeThingsBoard, broker: Mosquitto,
        mode: str) -> None:
    gateway = bus_health_gateway(controller, thingsboard, broker, mode,
                                 health_service="test-controller")
    checks = controller.data / "checks.log"

    def asked() -> list[str]:
        return checks.read_text().splitlines() if checks.exists() else []

    if mode == "bus_once":
        # Asked, silent all the same: hung, restarted.
        wait_until(lambda: bool(with_state(thingsboard, "hung")) and len(
            controller.starts()) >= 2, "the silent controller restarted", gateway)
        assert asked(), "it was asked before it counted as hung"
        hung = with_state(thingsboard, "hung")[0]
        assert hung["controller_last_exit"].startswith("hung: no health signal for ")
        assert gateway.stop() == 0
        return
    wait_past_twice_the_health_timeout(thingsboard, gateway)
    assert with_state(thingsboard, "hung") == []
    assert len(controller.starts()) == 1
    assert len(asked()) >= 2
    assert set(asked()) == {"te/device/main/service/test-controller/cmd/health/check"}
    assert gateway.stop() == 0


def test_rpc_restart_controller_restarts_it_now(controller: ControllerSetup,
                                                thingsboard: FakeThingsBoard) -> None:
    # Slow backoff: only the RPC can bring a new run this soon.
    gateway = controller.gateway("healthy", {"health": {"interval_s": 0.5}},
                                 default_version="v1", restart_min_s=60.0,
                                 restart_max_s=60.0)
    gateway.start()
    wait_connected(thingsboard, gateway)
    wait_until(lambda: len(controller.starts()) == 1, "the controller starts", gateway)
    first = controller.starts()[0]["pid"]
    wait_until(lambda: any(h.get("ms_since_controller_startup", 0) >= 1000
                           for h in health_records(thingsboard)),
               "health telemetry of the first run", gateway)

    reply = thingsboard.rpc("restart_controller", {"reason": "test"})
    assert "error" not in reply, reply
    match = re.fullmatch(r"controller restarted \(pid (\d+), version v1\)", reply["message"])
    assert match is not None, reply
    wait_until(lambda: len(controller.starts()) == 2, "the new run writes its start", gateway)
    second = controller.starts()[1]["pid"]
    assert int(match.group(1)) == second != first
    assert not alive(first)
    assert controller.stops() == [{"pid": first, "sigterm": True}]

    wait_until(lambda: any(r["controller_restarts"] == 1
                           for r in with_state(thingsboard, "running")),
               "the restart reported", gateway)
    reports = controller_reports(thingsboard)
    restarting = next(i for i, r in enumerate(reports) if r["controller_state"] == "restarting")
    assert reports[restarting]["controller_restart_reason"] == "RPC restart_controller: test"
    after = reports[restarting + 1]
    assert after["controller_state"] == "running" and after["controller_restarts"] == 1
    assert after["controller_consecutive_failures"] == 0  # asked for, not a failure

    # The uptime reported starts again with the new run.
    def uptimes() -> list[int]:
        return [h["ms_since_controller_startup"] for h in health_records(thingsboard)
                if "ms_since_controller_startup" in h]

    before = max(uptimes())
    count = len(uptimes())
    wait_until(lambda: len(uptimes()) > count + 1, "health telemetry after the restart",
               gateway)
    assert min(uptimes()[count + 1:]) < before
    assert gateway.stop() == 0


def test_rpc_restart_controller_without_a_supervised_controller_is_an_error(
        make_gateway: GatewayFactory, thingsboard: FakeThingsBoard) -> None:
    gateway = make_gateway()  # controller.runtime defaults to "none"
    gateway.start()
    wait_connected(thingsboard, gateway)
    reply = thingsboard.rpc("restart_controller")
    assert reply == {"message": "no controller is supervised (controller.runtime is \"none\")",
                     "error": True}
    assert not any("controller_state" in r["values"] for r in thingsboard.telemetry())
    assert gateway.stop() == 0


@pytest.mark.parametrize("connected", [True, False], ids=["connected", "unprovisioned"])
def test_sigterm_to_the_gateway_stops_a_process_controller(
        controller: ControllerSetup, thingsboard: FakeThingsBoard, connected: bool) -> None:
    if not connected:
        thingsboard.stop()  # the gateway stops while it still waits to be provisioned
    gateway = controller.gateway("healthy")
    gateway.start()
    if connected:
        wait_connected(thingsboard, gateway)
    wait_until(lambda: len(controller.starts()) == 1, "the controller starts", gateway)
    pid = controller.starts()[0]["pid"]
    wait_until((controller.data / f"working-{pid}").exists,
               "the controller writes its first record", gateway)
    assert alive(pid)

    assert gateway.stop() == 0
    assert not alive(pid)
    assert controller.stops() == [{"pid": pid, "sigterm": True}]  # a clean stop, on SIGTERM
    state = controller.state()
    assert state["state"] == "stopped"
    assert state["process"] is None
    assert state["last_exit"] == "exit code 0"


def test_a_controller_that_ignores_sigterm_is_killed_when_the_gateway_stops(
        controller: ControllerSetup, thingsboard: FakeThingsBoard) -> None:
    gateway = controller.gateway("stubborn", stop_grace_s=1.0)
    gateway.start()
    wait_connected(thingsboard, gateway)
    wait_until((controller.data / "stubborn").exists, "the controller starts",
               gateway)
    pid = controller.starts()[0]["pid"]
    assert gateway.stop() == 0
    assert not alive(pid)
    assert controller.state()["last_exit"] == "killed by SIGKILL"


def test_a_controller_left_by_a_killed_gateway_is_replaced_by_the_next(
        controller: ControllerSetup, thingsboard: FakeThingsBoard) -> None:
    gateway = controller.gateway("healthy")
    gateway.start()
    wait_connected(thingsboard, gateway)
    wait_until(lambda: len(controller.starts()) == 1, "the controller starts", gateway)
    orphan = controller.starts()[0]["pid"]
    gateway.kill()
    assert alive(orphan)  # its own session: kill -9 of the gateway does not reach it

    gateway.start()
    wait_until(lambda: len(controller.starts()) == 2, "the next gateway starts one", gateway)
    assert not alive(orphan)
    assert controller.stops()[0] == {"pid": orphan, "sigterm": True}
    assert controller.starts()[1]["pid"] != orphan
    assert gateway.stop() == 0
    assert not alive(controller.starts()[1]["pid"])


def test_controller_is_supervised_while_thingsboard_is_unreachable_and_unprovisioned(
        controller: ControllerSetup, thingsboard: FakeThingsBoard, data_dir: Path) -> None:
    thingsboard.stop()
    gateway = controller.gateway("crash_once")
    gateway.start()
    # Crashed once, restarted, and its records go into the outbox meanwhile.
    wait_until(lambda: len(controller.starts()) == 2, "the crashed controller is restarted",
               gateway)

    def outbox() -> list[dict[str, Any]]:
        return [json.loads(body)["values"] for (body,) in query(
            data_dir / "outbox.db", "SELECT body FROM outbox WHERE kind = 0 ORDER BY id")]

    wait_until(lambda: any(v.get("ctl_run") == 2 for v in outbox()),
               "records of the second run reach the outbox", gateway)
    assert not (data_dir / "tb_access_token").exists()  # not provisioned yet
    queued = [v["controller_state"] for v in outbox() if "controller_state" in v]
    assert "crashed" in queued and queued.index("crashed") < len(queued) - 1
    assert queued[queued.index("crashed") + 1] == "running"

    thingsboard.start()
    wait_connected(thingsboard, gateway)
    wait_until(lambda: any(r["controller_restarts"] == 1
                           for r in with_state(thingsboard, "running")),
               "the state reported offline arrives", gateway)
    states = [r["controller_state"] for r in controller_reports(thingsboard)]
    assert states.index("crashed") < len(states) - 1
    assert with_state(thingsboard, "crashed")[0]["controller_last_exit"] == "exit code 3"
    wait_until(lambda: 2 in thingsboard.telemetry_values("ctl_run"),
               "records written offline arrive", gateway)
    assert len(controller.starts()) == 2  # the second run kept going throughout
    assert gateway.stop() == 0


def test_docker_runtime_without_docker_is_reported_and_forwarding_goes_on(
        make_gateway: GatewayFactory, thingsboard: FakeThingsBoard,
        queue_writer: QueueWriter, tmp_path: Path) -> None:
    queue_writer.write(make_records(100))
    gateway = make_gateway(
        {"controller": {"runtime": "docker", "default_version": "1.0",
                        "restart_min_s": 0.1, "restart_max_s": 1.0}},
        env={"DOCKER_HOST": f"unix://{tmp_path}/no-docker-engine.sock"})
    gateway.start()
    wait_connected(thingsboard, gateway)
    wait_until(lambda: set(range(100)) <= set(thingsboard.telemetry_values("seq")),
               "the records queued before the start arrive", gateway)
    wait_until(lambda: len(with_state(thingsboard, "unavailable")) >= 3,
               "three reports of the missing Docker", gateway)

    unavailable = with_state(thingsboard, "unavailable")
    error = unavailable[0]["controller_error"]
    # No SDK in the test environment, or an SDK without an engine at DOCKER_HOST.
    assert ("Docker SDK for Python, which is not installed: pip install "
            "'teg-gateway[docker]'" in error
            or "cannot reach the Docker engine at unix://" in error), error
    delays = [r["controller_restart_delay_s"] for r in unavailable[:3]]
    assert delays[2] > delays[0], delays
    assert all(r["controller_restarts"] == 0 for r in unavailable)
    # The error line is what an operator reads in ThingsBoard's log: its wording counts.
    wait_until(lambda: any(f"controller runtime docker unavailable: {error}" in r["message"]
                           for r in log_records(thingsboard)),
               "the log line reaches ThingsBoard", gateway)

    # Records keep flowing.
    queue_writer.write(make_records(100, start_seq=100))
    wait_until(lambda: set(range(200)) <= set(thingsboard.telemetry_values("seq")),
               "the records queued later arrive", gateway)
    assert gateway.stop() == 0


def test_a_failed_restart_on_request_reports_the_problem_at_once(
        make_gateway: GatewayFactory, thingsboard: FakeThingsBoard, tmp_path: Path) -> None:
    # Long delays: the state after the failed request must not wait for the backoff.
    gateway = make_gateway(
        {"controller": {"runtime": "docker", "default_version": "1.0",
                        "restart_min_s": 120.0, "restart_max_s": 120.0}},
        env={"DOCKER_HOST": f"unix://{tmp_path}/no-docker-engine.sock"})
    gateway.start()
    wait_connected(thingsboard, gateway)
    wait_until(lambda: bool(with_state(thingsboard, "unavailable")),
               "the missing Docker reported", gateway)
    error = with_state(thingsboard, "unavailable")[0]["controller_error"]

    reply = thingsboard.rpc("restart_controller", {"reason": "try again"})
    assert reply == {"message": f"controller restart failed: {error}", "error": True}
    wait_until(lambda: controller_reports(thingsboard)[-1]["controller_state"] == "unavailable"
               and len(with_state(thingsboard, "unavailable")) >= 2,
               "unavailable reported again after the failed restart", gateway, timeout=15.0)
    states = [r["controller_state"] for r in controller_reports(thingsboard)]
    assert states.index("restarting") < len(states) - 1
    restarting = with_state(thingsboard, "restarting")[0]
    assert restarting["controller_restart_reason"] == "RPC restart_controller: try again"
    assert gateway.stop() == 0
