"""systemd notification: the protocol module alone, then a real gateway process talking to a
Unix datagram socket the test binds, as systemd would (path and abstract forms)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import GatewayFactory, needs_mosquitto
from teg_gateway.systemd import (
    STATUS_PERIOD_S,
    Notifier,
    socket_address,
    status_line,
    watchdog_interval_s,
)


class Listener:
    """A bound Unix datagram socket collecting what the gateway sends, like systemd."""

    def __init__(self, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        if abstract:
            name = f"teg-test-{uuid.uuid4().hex}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            # A short directory: Unix socket paths are limited to about 100 bytes.
            self._dir = tempfile.TemporaryDirectory(prefix="teg-notify-")
            self.address = str(Path(self._dir.name) / "notify.sock")
            self.sock.bind(self.address)
        self.messages: list[str] = []

    def receive(self, seconds: float) -> list[str]:
        """Collect every datagram's lines for ``seconds``; returns the lines received."""
        got: list[str] = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                break
            got.extend(data.decode().split("\n"))
        self.messages.extend(got)
        return got

    def wait_for(self, line: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while line not in self.messages and time.monotonic() < deadline:
            self.receive(min(0.2, deadline - time.monotonic()))
        assert line in self.messages, f"{line!r} not received in {timeout:g} s: {self.messages}"

    def close(self) -> None:
        self.sock.close()
        if self._dir is not None:
            self._dir.cleanup()


@pytest.fixture
def listener() -> Iterator[Listener]:
    made = Listener()
    yield made
    made.close()


@pytest.fixture
def abstract_listener() -> Iterator[Listener]:
    made = Listener(abstract=True)
    yield made
    made.close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def unreachable_thingsboard(notify_socket: str) -> dict[str, str]:
    return {"NOTIFY_SOCKET": notify_socket, "WATCHDOG_USEC": "2000000",
            "TB_HOST": "127.0.0.1", "TB_PORT": str(closed_port())}


# -- the protocol --------------------------------------------------------------------------


def test_socket_addresses() -> None:
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@teg/notify") == b"\0teg/notify"
    assert socket_address("@") is None
    assert socket_address("vsock:2:1234") is None
    assert socket_address("relative/path") is None


def test_watchdog_interval_is_half_of_watchdog_usec_for_our_pid_only() -> None:
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000"}, 42) == 15.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "42"}, 42) == 1.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "43"}, 42) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "x"}, 42) is None
    assert watchdog_interval_s({}, 42) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "0"}, 42) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "soon"}, 42) is None


def test_from_environment_reads_and_removes_the_variables(listener: Listener) -> None:
    env = {"NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": "4000000",
           "WATCHDOG_PID": str(os.getpid()), "OTHER": "kept"}
    notifier = Notifier.from_environment(env)
    assert notifier.enabled and notifier.watchdog_s == 2.0
    assert env == {"OTHER": "kept"}  # children (controller, reboot) do not inherit them
    notifier.ready("starting")
    notifier.ping()
    notifier.stopping()
    notifier.close()
    assert listener.receive(0.5) == ["READY=1", "STATUS=starting", "WATCHDOG=1",
                                     "STOPPING=1", "STATUS=shutting down"]


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = Notifier.from_environment({"WATCHDOG_USEC": "2000000"})
    assert not notifier.enabled and notifier.watchdog_s is None
    notifier.ready()
    notifier.ping()
    assert not notifier.status("x")
    assert notifier.sent == 0
    asyncio.run(asyncio.wait_for(notifier.run(lambda: "x"), 1.0))  # returns at once


def test_a_missing_socket_is_logged_once_and_never_raises(tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    notifier = Notifier(str(tmp_path / "absent.sock"), 1.0)
    for _ in range(3):
        notifier.ping()
    assert notifier.sent == 0
    # Said once, not at every ping: the log line is the product here.
    assert len([r for r in caplog.records if "cannot notify systemd" in r.message]) == 1


def test_status_is_sent_when_it_changes_at_most_once_a_second(listener: Listener) -> None:
    now = [100.0]
    notifier = Notifier(listener.address, None, clock=lambda: now[0])
    assert notifier.status("ThingsBoard: connecting")
    assert not notifier.status("ThingsBoard: connecting")  # unchanged
    now[0] += STATUS_PERIOD_S / 2
    assert not notifier.status("ThingsBoard: connected")  # changed, but too soon
    now[0] += STATUS_PERIOD_S / 2
    assert notifier.status("ThingsBoard: connected\nsecond line")
    assert listener.receive(0.5) == ["STATUS=ThingsBoard: connecting",
                                     "STATUS=ThingsBoard: connected second line"]


def test_status_line() -> None:
    line = status_line({"thingsboard": "connected", "outbox_depth": 12,
                        "controller": "running", "uptime_s": 3.0})
    assert line == "ThingsBoard: connected; outbox: 12 waiting; controller: running"


def test_run_pings_and_sends_status_changes_despite_a_failing_status(listener: Listener
                                                                     ) -> None:
    calls = iter(["connecting", "connecting"])

    def describe() -> str:
        try:
            return next(calls)
        except StopIteration:
            raise RuntimeError("database closed") from None

    async def main() -> None:
        notifier = Notifier(listener.address, 0.05)
        task = asyncio.ensure_future(notifier.run(describe, status_poll_s=0.05))
        await asyncio.sleep(0.4)
        task.cancel()

    asyncio.run(main())
    got = listener.receive(0.5)
    assert got.count("WATCHDOG=1") >= 3
    assert [m for m in got if m.startswith("STATUS=")] == ["STATUS=connecting"]


class FakeTime:
    """A clock and a sleep that advances it at once, ``early`` seconds short of the delay
    (timers may fire a little early)."""

    def __init__(self, early: float = 0.0) -> None:
        self.now = 1000.0
        self.early = early
        self.pings: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.now += delay - min(self.early, delay / 2)
        await asyncio.sleep(0)


@pytest.mark.parametrize("early", [0.0, 0.001])
def test_watchdog_pings_every_half_period_on_a_fake_clock(listener: Listener,
                                                          early: float) -> None:
    fake = FakeTime(early)
    notifier = Notifier(listener.address, 15.0, clock=fake.clock, sleep=fake.sleep)
    sent = notifier.send

    def record(*fields: str) -> bool:
        if "WATCHDOG=1" in fields:
            fake.pings.append(fake.now)
        return sent(*fields)

    notifier.send = record  # type: ignore[method-assign]

    async def main() -> None:
        task = asyncio.ensure_future(notifier.run(lambda: "ok"))
        for _ in range(10_000):
            if fake.now >= 1000.0 + 300:
                break
            await asyncio.sleep(0)
        task.cancel()

    asyncio.run(main())
    gaps = [b - a for a, b in zip(fake.pings, fake.pings[1:], strict=False)]
    assert len(fake.pings) >= 20 and gaps
    assert max(gaps) <= 15.0 + 1e-6, max(gaps)  # never a round late
    assert min(gaps) >= 15.0 - 0.02, min(gaps)  # and not more often than asked


# -- a real gateway -------------------------------------------------------------------------


@needs_mosquitto
def test_gateway_ready_watchdog_status_stopping(make_gateway: GatewayFactory,
                                                listener: Listener) -> None:
    gateway = make_gateway(env=unreachable_thingsboard(listener.address))
    gateway.start()
    try:
        # Ready without ThingsBoard: the databases are open and intake runs.
        listener.wait_for("READY=1", timeout=20)
    except AssertionError:
        raise AssertionError(gateway.log_tail()) from None
    window = 5.0
    pings = listener.receive(window).count("WATCHDOG=1")
    # A ping every second (half of WATCHDOG_USEC): about 5 in the window; 3 leaves margin
    # for a busy machine while still proving the pings repeat.
    assert pings >= 3, (pings, listener.messages)
    status = [m for m in listener.messages if m.startswith("STATUS=")]
    assert status and "ThingsBoard: " in status[0] and "outbox: " in status[0], status
    gateway.signal(signal.SIGTERM)
    listener.wait_for("STOPPING=1", timeout=10)
    assert gateway.wait(30) == 0, gateway.log_tail()


@needs_mosquitto
def test_gateway_abstract_notify_socket(make_gateway: GatewayFactory,
                                        abstract_listener: Listener) -> None:
    gateway = make_gateway(env=unreachable_thingsboard(abstract_listener.address))
    gateway.start()
    abstract_listener.wait_for("READY=1", timeout=20)
    abstract_listener.wait_for("WATCHDOG=1", timeout=10)
    gateway.signal(signal.SIGTERM)
    abstract_listener.wait_for("STOPPING=1", timeout=10)
    assert gateway.wait(30) == 0, gateway.log_tail()


# -- the unit file --------------------------------------------------------------------------

UNIT = Path(__file__).resolve().parent.parent / "packaging" / "teg-gateway.service"


def unit_values() -> dict[str, str]:
    values: dict[str, str] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values.setdefault(key.strip(), value.strip())
    return values


def test_unit_file_essentials() -> None:
    from teg_gateway.config import ShutdownSettings

    values = unit_values()
    assert values["Type"] == "notify"
    assert values["NotifyAccess"] == "main"
    assert values["WatchdogSec"] == "30"
    assert values["Restart"] == "always"
    assert values["User"] == "teg"
    assert values["StateDirectory"] == "teg-gateway"
    assert values["EnvironmentFile"] == "/etc/teg-gateway/teg-gateway.env"
    assert "--config /etc/teg-gateway/teg-gateway.toml" in values["ExecStart"]
    # sudo (reboot, power-off) needs new privileges: nothing may turn them off.
    assert values["NoNewPrivileges"] == "no"
    implying = ("PrivateDevices", "ProtectClock", "ProtectHostname", "ProtectKernelTunables",
                "ProtectKernelModules", "ProtectKernelLogs", "RestrictAddressFamilies",
                "RestrictNamespaces", "LockPersonality", "MemoryDenyWriteExecute",
                "RestrictRealtime", "RestrictSUIDSGID", "SystemCallFilter",
                "SystemCallArchitectures", "DynamicUser")
    assert not set(implying) & set(values)
    # The stop timeout is above the gateway's own forced exit and its backstop (+5 s).
    assert float(values["TimeoutStopSec"]) > ShutdownSettings().timeout_s + 5


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed (apt-get install systemd)")
def test_unit_file_verifies(tmp_path: Path) -> None:
    # The programs it starts exist only once the package is installed: stand-ins here.
    stand_in = tmp_path / "program"
    stand_in.write_text("#!/bin/sh\n")
    stand_in.chmod(0o755)
    text = UNIT.read_text().replace("/opt/teg-gateway/bin/python", str(stand_in))
    text = text.replace("/usr/bin/teg-gateway", str(stand_in))
    unit = tmp_path / "teg-gateway.service"
    unit.write_text(text)
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True, check=False, timeout=60)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_start_condition(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from teg_gateway.systemd import start_condition

    config = tmp_path / "gateway.toml"
    config.write_text('[paths]\ndata = "/var/lib/teg-gateway"\n')
    assert start_condition(["--config", str(config)], {}) == 1
    assert "set TB_HOST" in capsys.readouterr().err
    assert start_condition(["--config", str(config)], {"TB_HOST": "tb.example.com"}) == 0
    config.write_text('[thingsboard]\nhost = "tb.example.com"\n')
    assert start_condition(["--config", str(config)], {}) == 0
    # A configuration that does not load: start, so the gateway reports the error itself.
    config.write_text("[nonsense\n")
    assert start_condition(["--config", str(config)], {}) == 0
