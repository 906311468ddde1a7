"""The gateway's wiring (gateway.py), run in-process on real files: every operation is
started under the one task group and closed in reverse order of registration, and a part
that fails stops the whole gateway in order with EXIT_TASK_FAILED (so that the service
manager starts it again)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from teg_gateway.cloud.credentials import ACCESS_TOKEN, Credentials, save
from teg_gateway.config import Settings, load_settings
from teg_gateway.gateway import EXIT_TASK_FAILED, Gateway
from teg_gateway.operations.engine import Operation
from teg_gateway.sandbox.broker import free_tcp_ports


def offline_settings(tmp_path: Path) -> Settings:
    """A provisioned gateway whose ThingsBoard is unreachable (the port is closed), without
    local broker or controller."""
    data = tmp_path / "data"
    settings = load_settings(env={"TEG_DATA_PATH": str(data)})
    settings.thingsboard.host = "127.0.0.1"
    settings.thingsboard.port = free_tcp_ports(1)[0]
    settings.thingsboard.tls = False
    settings.local_mqtt.enabled = False
    # The forced-exit timers must not fire inside the test process.
    settings.shutdown.timeout_s = 1e6
    data.mkdir(parents=True)
    save(settings.access_token_path, Credentials(ACCESS_TOKEN, token="token"))
    return settings


class Step(Operation):
    """Records when it runs and when it is closed; fails when told to."""

    def __init__(self, name: str, events: list[str], fail: bool = False) -> None:
        self.name = name
        self.events = events
        self.fail = fail

    async def run(self) -> None:
        self.events.append(f"run {self.name}")
        if self.fail:
            await asyncio.sleep(0.05)
            raise RuntimeError("this part failed")
        await asyncio.Event().wait()

    async def close(self) -> None:
        self.events.append(f"close {self.name}")


def test_a_failing_part_stops_the_gateway_in_order_with_its_exit_code(
        tmp_path: Path) -> None:
    events: list[str] = []
    gateway = Gateway(offline_settings(tmp_path))
    gateway.operations += [Step("first", events), Step("failing", events, fail=True),
                           Step("last", events)]
    code = asyncio.run(gateway.run())
    assert code == EXIT_TASK_FAILED
    assert sorted(e for e in events if e.startswith("run")) == [
        "run failing", "run first", "run last"]
    assert [e for e in events if e.startswith("close")] == [
        "close last", "close failing", "close first"]
    # Every task of the group ended; the databases are closed.
    assert all(task.done() for task in gateway._tasks)
    assert gateway.stores._conn is None


def test_a_stop_request_ends_every_part(tmp_path: Path) -> None:
    events: list[str] = []
    gateway = Gateway(offline_settings(tmp_path))
    gateway.operations.append(Step("waiting", events))

    async def scenario() -> int:
        run = asyncio.ensure_future(gateway.run())
        while "run waiting" not in events:
            await asyncio.sleep(0.01)
        gateway.request_stop()
        return await asyncio.wait_for(run, 60)

    assert asyncio.run(scenario()) == 0
    assert events == ["run waiting", "close waiting"]
    assert all(task.done() for task in gateway._tasks)
