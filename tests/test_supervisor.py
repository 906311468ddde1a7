"""The supervisor with real child processes as controllers.

Delays are small (restart_min_s 0.1, restart_max_s 0.8) and the tests assert on what
the supervisor decided (the delays it recorded, its reports), never on wall-clock time.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import alive
from teg_gateway.clock import Clock
from teg_gateway.config import Settings
from teg_gateway.controller.docker_runtime import DockerRuntime
from teg_gateway.controller.process_runtime import ProcessRuntime
from teg_gateway.controller.queue import QUEUE_FILE, last_health_check_ms, open_queue
from teg_gateway.controller.runtime import ControllerError, ControllerRuntime
from teg_gateway.controller.supervisor import Supervisor, controller_state_file
from teg_gateway.controller.versions import ControllerPlaces, version_dir
from teg_gateway.operations.controller_rpc import register_controller_rpc
from teg_gateway.operations.rpc import RpcDispatcher

CONTROLLER = """
import json, os, sys, time
from pathlib import Path
from teg_gateway.sandbox.controller import QueueWriter

mode = sys.argv[1]
data = Path(os.environ["TEG_DATA_PATH"])
with open(data / "starts.log", "a") as fh:
    fh.write(json.dumps({"pid": os.getpid(), "cwd": os.getcwd(),
                         "version": os.environ["TEG_CONTROLLER_VERSION"]}) + "\\n")
starts = len((data / "starts.log").read_text().splitlines())


def healthy(seconds):
    writer = QueueWriter(data)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        writer.health_check()
        time.sleep(0.05)


if mode == "crash":
    print("crashing", flush=True)
    sys.exit(3)
if mode == "healthy":
    healthy(60)
if mode == "hang":
    QueueWriter(data).health_check()  # one sign of life, then silence
    time.sleep(60)
if mode == "silent":
    time.sleep(60)
if mode == "flaky":
    if starts <= 3:
        sys.exit(1)          # crash three times
    if starts == 4:
        healthy(1.0)         # then run healthily for a while and crash
        sys.exit(1)
    healthy(60)
"""


def make_settings(tmp_path: Path, mode: str, **controller: Any) -> Settings:
    path = tmp_path / "controller.py"
    path.write_text(textwrap.dedent(CONTROLLER))
    settings = Settings()
    settings.paths.data = str(tmp_path / "data")
    ctl = settings.controller
    ctl.runtime = "process"
    ctl.command = [sys.executable, str(path), mode]
    ctl.restart_min_s = 0.1
    ctl.restart_max_s = 0.8
    ctl.healthy_after_s = 0.4
    ctl.health_timeout_s = 30.0
    ctl.stop_grace_s = 2.0
    for key, value in controller.items():
        setattr(ctl, key, value)
    return settings


class Harness:
    """A supervisor over a real runtime, with its reports and sw_version requests kept."""

    def __init__(self, settings: Settings, runtime: ControllerRuntime | None = None,
                 clock: Clock | None = None) -> None:
        self.settings = settings
        self.state = controller_state_file(settings)
        self.runtime = runtime or ProcessRuntime(settings.controller,
                                                 ControllerPlaces.of(settings), self.state)
        self.reports: list[dict[str, Any]] = []
        self.sw_requests = 0
        queue_path = settings.controller_data_dir / QUEUE_FILE

        def last_health_check() -> int:
            conn = open_queue(queue_path)
            try:
                return last_health_check_ms(conn)
            finally:
                conn.close()

        self.supervisor = Supervisor(
            self.runtime, settings.controller, self.state,
            last_health_check_ms=last_health_check,
            report=self.reports.append, request_sw_version=self._request,
            clock=clock, check_interval_s=0.05)

    def _request(self) -> None:
        self.sw_requests += 1

    def states(self) -> list[str]:
        return [r["controller_state"] for r in self.reports]

    def starts(self) -> list[dict[str, Any]]:
        path = self.settings.controller_data_dir / "starts.log"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    def pid(self) -> int | None:
        return self.runtime.pid if isinstance(self.runtime, ProcessRuntime) else None

    def run(self, scenario: Callable[[Harness], Awaitable[None]]) -> None:
        asyncio.run(self.run_async(scenario))

    async def run_async(self, scenario: Callable[[Harness], Awaitable[None]]) -> None:
        """Supervise while ``scenario`` runs, then shut down as the gateway does."""
        task = asyncio.ensure_future(self.supervisor.run())
        try:
            await scenario(self)
            assert not task.done(), "run() ended by itself"
        finally:
            await self.supervisor.shutdown()
            await asyncio.wait_for(task, 5.0)


async def until(predicate: Callable[[], bool], timeout: float = 6.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def test_crashing_controller_is_restarted_with_growing_delays(tmp_path: Path) -> None:
    h = Harness(make_settings(tmp_path, "crash"))

    async def scenario(h: Harness) -> None:
        await until(lambda: len(h.supervisor.delays) >= 5)

    h.run(scenario)
    delays = h.supervisor.delays
    for i, delay in enumerate(delays[:5]):
        step = min(0.1 * 2 ** i, 0.8)
        assert step / 2 <= delay <= step, (i, delays)
    assert delays[3] > delays[0]
    crashed = [r for r in h.reports if r["controller_state"] == "crashed"]
    assert len(crashed) >= 5
    assert all(r["controller_last_exit"] == "exit code 3" for r in crashed)
    assert [r["controller_consecutive_failures"] for r in crashed[:5]] == [1, 2, 3, 4, 5]
    assert crashed[0]["controller_restart_delay_s"] == round(delays[0], 3)
    restarts = [r["controller_restarts"] for r in h.reports if r["controller_state"] == "running"]
    assert restarts[:4] == [0, 1, 2, 3]
    assert len(h.starts()) >= 5
    assert "crashing" in (h.settings.controller_logs_dir / "controller.log").read_text()
    # A gateway restart keeps counting.
    assert h.state.read()["restarts"] == h.supervisor.restarts >= 4


def test_hung_controller_is_stopped_and_restarted(tmp_path: Path) -> None:
    h = Harness(make_settings(tmp_path, "hang", health_timeout_s=0.6))
    first_pid: list[int] = []

    async def scenario(h: Harness) -> None:
        await until(lambda: h.pid() is not None)
        pid = h.pid()
        assert pid is not None
        first_pid.append(pid)
        await until(lambda: "hung" in h.states() and len(h.starts()) >= 2)
        await until(lambda: not alive(pid))

    h.run(scenario)
    hung = next(r for r in h.reports if r["controller_state"] == "hung")
    assert hung["controller_last_exit"].startswith("hung: no health signal for")
    assert "killed by SIGTERM" in hung["controller_last_exit"]
    assert h.starts()[0]["pid"] == first_pid[0]
    assert h.starts()[1]["pid"] != first_pid[0]
    assert h.supervisor.restarts >= 1


def test_healthy_controller_is_left_alone(tmp_path: Path) -> None:
    h = Harness(make_settings(tmp_path, "healthy", health_timeout_s=0.5))

    async def scenario(h: Harness) -> None:
        await until(lambda: any(r.get("controller_healthy") for r in h.reports))
        await asyncio.sleep(1.2)  # over twice the health timeout
        assert await h.supervisor.wait_healthy(1.0)
        values = h.supervisor.health_values()
        assert values["ms_since_controller_startup"] >= 0
        assert 0 <= values["ms_since_last_controller_health_check"] < 5000
        assert h.supervisor.last_health_ms() is not None

    h.run(scenario)
    assert len(h.starts()) == 1
    assert "hung" not in h.states()
    assert h.supervisor.delays == []


def test_healthy_run_resets_the_backoff(tmp_path: Path) -> None:
    h = Harness(make_settings(tmp_path, "flaky"))

    async def scenario(h: Harness) -> None:
        await until(lambda: len(h.supervisor.delays) >= 4 and len(h.starts()) >= 5)

    h.run(scenario)
    delays = h.supervisor.delays
    # Three crashes in a row: 0.1, 0.2, 0.4 steps; the healthy fourth run resets it.
    assert 0.2 <= delays[2] <= 0.4, delays
    assert delays[3] <= 0.1, delays
    healthy = [i for i, r in enumerate(h.reports) if r.get("controller_healthy")]
    assert healthy, h.reports
    crashed = [r for r in h.reports if r["controller_state"] == "crashed"]
    assert crashed[3]["controller_consecutive_failures"] == 1


def test_bus_health_counts_as_a_health_signal(tmp_path: Path) -> None:
    h = Harness(make_settings(tmp_path, "silent", health_timeout_s=0.6))

    async def scenario(h: Harness) -> None:
        await until(lambda: h.pid() is not None)
        end = time.monotonic() + 1.5  # over twice the health timeout
        while time.monotonic() < end:
            h.supervisor.note_health("up", int(time.time() * 1000))
            await asyncio.sleep(0.1)
        assert "hung" not in h.states()
        assert len(h.starts()) == 1
        h.supervisor.note_health("down")
        await until(lambda: "hung" in h.states())

    h.run(scenario)


def test_restart_now_and_the_rpc(tmp_path: Path) -> None:
    h = Harness(make_settings(tmp_path, "healthy"))
    replies: dict[str, dict[str, Any]] = {}
    dispatcher = RpcDispatcher(replies.__setitem__)
    register_controller_rpc(dispatcher, h.supervisor)
    unsupervised = RpcDispatcher(lambda rid, reply: replies.__setitem__("none-" + rid, reply))
    register_controller_rpc(unsupervised, None)

    async def scenario(h: Harness) -> None:
        await until(lambda: len(h.starts()) == 1)
        first = h.pid()
        answer = await h.supervisor.restart_now("test")
        assert answer.startswith("controller restarted (pid ")
        second = h.pid()
        assert second not in (None, first)
        assert first is not None and not alive(first)
        await until(lambda: len(h.starts()) == 2)
        dispatcher.handle("7", b'{"method": "restart_controller", "params": {"reason": "x"}}')
        await until(lambda: "7" in replies)
        assert "error" not in replies["7"], replies
        assert replies["7"]["message"].startswith("controller restarted")
        assert h.pid() not in (None, first, second)
        await until(lambda: len(h.starts()) == 3)
        unsupervised.handle("8", b'{"method": "restart_controller"}')
        await until(lambda: "none-8" in replies)

    h.run(scenario)
    assert h.supervisor.restarts == 2
    assert len(h.starts()) == 3
    assert h.supervisor.delays == []  # a restart on request is not a failure
    reasons = [r.get("controller_restart_reason") for r in h.reports
               if r["controller_state"] == "restarting"]
    assert reasons == ["test", "RPC restart_controller: x"]
    assert replies["none-8"] == {"message": "no controller is supervised "
                                            "(controller.runtime is \"none\")", "error": True}


def test_gateway_shutdown_stops_a_process_controller(tmp_path: Path) -> None:
    h = Harness(make_settings(tmp_path, "healthy"))
    pids: list[int] = []

    async def scenario(h: Harness) -> None:
        await until(lambda: h.pid() is not None)
        pid = h.pid()
        assert pid is not None
        pids.append(pid)

    h.run(scenario)  # ends with supervisor.shutdown()
    assert not alive(pids[0])
    assert h.states()[-1] == "stopped"
    assert h.reports[-1]["controller_last_exit"] == "killed by SIGTERM"
    assert h.state.read()["state"] == "stopped"


def test_shutdown_never_leaves_it_running_and_the_next_gateway_replaces_it(
        tmp_path: Path) -> None:
    settings = make_settings(tmp_path, "healthy", stop_on_shutdown="never")
    pids: list[int] = []

    async def first_run(h: Harness) -> None:
        await until(lambda: h.pid() is not None)
        pid = h.pid()
        assert pid is not None
        pids.append(pid)

    async def next_run(h: Harness) -> None:
        await until(lambda: h.pid() is not None and h.pid() != pids[0])
        await until(lambda: not alive(pids[0]))

    async def main() -> tuple[Harness, Harness]:
        first = Harness(settings)
        await first.run_async(first_run)
        assert alive(pids[0])
        assert first.states()[-1] == "running"
        # The next gateway cannot take over its output: it stops it and starts afresh.
        settings.controller.stop_on_shutdown = "auto"
        again = Harness(settings)
        await again.run_async(next_run)
        return first, again

    _first, again = asyncio.run(main())
    assert again.supervisor.restarts == 0 and again.state.read()["restarts"] == 0


def test_versions_default_switch_and_memory(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, "healthy", default_version="1.0")
    for version in ("1.0", "2.0"):
        version_dir(settings, version).mkdir(parents=True)
    h = Harness(settings)

    async def scenario(h: Harness) -> None:
        await until(lambda: len(h.starts()) == 1)
        assert h.supervisor.version == "1.0"
        await h.supervisor.switch_version("2.0")
        assert h.state.read()["version"] == "2.0"
        assert await h.supervisor.wait_healthy(5.0)
        with pytest.raises(ValueError, match="not allowed"):
            await h.supervisor.switch_version("../../etc")
        await until(lambda: len(h.starts()) == 2)

    h.run(scenario)
    starts = h.starts()
    assert [s["version"] for s in starts] == ["1.0", "2.0"]
    assert starts[0]["cwd"] == str(version_dir(settings, "1.0"))
    assert starts[1]["cwd"] == str(version_dir(settings, "2.0"))
    assert h.reports[-2]["controller_version"] == "2.0"
    # The next gateway launches the remembered version, not the default.
    again = Harness(settings)

    async def next_run(h: Harness) -> None:
        await until(lambda: len(h.starts()) == 3)

    again.run(next_run)
    assert again.starts()[2]["version"] == "2.0"
    assert again.sw_requests == 0


def test_no_version_asks_thingsboard(tmp_path: Path) -> None:
    # A process controller can run without a version; it still asks for one.
    h = Harness(make_settings(tmp_path, "healthy"))

    async def scenario(h: Harness) -> None:
        await until(lambda: len(h.starts()) == 1)

    h.run(scenario)
    assert h.states()[0] == "no_version"
    assert "sw_version" in h.reports[0]["controller_error"]
    assert h.sw_requests == 1
    assert h.starts()[0]["version"] == ""
    assert h.starts()[0]["cwd"] == str(h.settings.controller_data_dir)


def docker_harness(tmp_path: Path, **controller: Any) -> Harness:
    settings = make_settings(tmp_path, "unused", **controller)
    settings.controller.runtime = "docker"
    runtime = DockerRuntime(settings.controller, ControllerPlaces.of(settings),
                            base_url=f"unix://{tmp_path}/no-engine.sock", call_timeout_s=5.0)
    return Harness(settings, runtime)


def test_docker_without_a_version_waits_for_one(tmp_path: Path) -> None:
    h = docker_harness(tmp_path)

    async def scenario(h: Harness) -> None:
        await until(lambda: h.sw_requests == 1)
        await asyncio.sleep(0.3)
        with pytest.raises(ControllerError, match="no controller version"):
            await h.supervisor.restart_now("test")

    h.run(scenario)
    assert h.states() == ["no_version"]
    assert h.supervisor.delays == []


def test_missing_docker_engine_is_reported_and_retried(tmp_path: Path) -> None:
    h = docker_harness(tmp_path, default_version="1.0")

    async def scenario(h: Harness) -> None:
        await until(lambda: len(h.supervisor.delays) >= 3)

    h.run(scenario)  # run() kept going: the rest of the gateway is unaffected
    unavailable = [r for r in h.reports if r["controller_state"] == "unavailable"]
    assert len(unavailable) >= 3
    error = unavailable[0]["controller_error"]
    assert "Docker" in error
    assert ("cannot reach the Docker engine" in error or "pip install" in error), error
    assert unavailable[1]["controller_restart_delay_s"] >= unavailable[0][
        "controller_restart_delay_s"] / 2
    assert h.supervisor.restarts == 0
    # Shutting down leaves a container alone by default: no stop, no "stopped" report.
    assert h.states()[-1] == "unavailable"


def test_a_command_that_cannot_start_is_retried_with_backoff(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, "crash")
    settings.controller.command = [str(tmp_path / "missing-controller")]
    h = Harness(settings)

    async def scenario(h: Harness) -> None:
        await until(lambda: len(h.supervisor.delays) >= 3)

    h.run(scenario)
    crashed = [r for r in h.reports if r["controller_state"] == "crashed"]
    assert crashed[0]["controller_last_exit"].startswith("start failed: cannot start")
    assert os.fspath(tmp_path / "missing-controller") in crashed[0]["controller_last_exit"]
    assert h.supervisor.delays[2] > h.supervisor.delays[0] / 2


class JumpingClock(Clock):
    """The real clock, with a wall clock that a test sets ahead or back."""

    def __init__(self) -> None:
        self.jump_ms = 0

    def now_ms(self) -> int:
        return super().now_ms() + self.jump_ms


def test_health_durations_ignore_a_wall_clock_jump(tmp_path: Path) -> None:
    """A device without a real-time clock boots with a wrong time and NTP moves it by
    years: the reported durations follow the monotonic clock only."""
    clock = JumpingClock()
    h = Harness(make_settings(tmp_path, "healthy", health_timeout_s=30.0), clock=clock)

    async def scenario(h: Harness) -> None:
        await until(lambda: "ms_since_last_controller_health_check" in
                    h.supervisor.health_values())
        before = h.supervisor.health_values()
        ten_years_ms = 10 * 365 * 86_400_000
        clock.jump_ms = ten_years_ms
        after = h.supervisor.health_values()
        assert after["ms_since_controller_startup"] - before["ms_since_controller_startup"] \
            < 60_000
        assert after["ms_since_last_controller_health_check"] < 60_000
        clock.jump_ms = -ten_years_ms
        assert 0 <= h.supervisor.health_values()["ms_since_controller_startup"] < 60_000

    h.run(scenario)
