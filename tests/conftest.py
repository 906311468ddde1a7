"""Shared fixtures: the ThingsBoard stand-in (an MQTT server with TLS), a real mosquitto for
the local bus, gateway processes."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from teg_gateway.sandbox.broker import Mosquitto, mosquitto_available
from teg_gateway.sandbox.certs import Pki, make_pki
from teg_gateway.sandbox.controller import QueueWriter
from teg_gateway.sandbox.process import GatewayProcess
from teg_gateway.sandbox.thingsboard import FakeThingsBoard
from teg_gateway.store.outbox import TELEMETRY, stored_records
from teg_gateway.store.stores import Stores

needs_mosquitto = pytest.mark.skipif(
    not mosquitto_available(),
    reason="mosquitto is not installed; install it with `apt-get install -y mosquitto`")

# Settings that make a test gateway quick to react; everything else stays at its default.
FAST_CONFIG: dict[str, dict[str, Any]] = {
    "thingsboard": {"reconnect_min_s": 0.2, "reconnect_max_s": 1.0,
                    "provision_timeout_s": 2.0},
    "health": {"interval_s": 1.0},
    # No local broker unless a test gives one (a system mosquitto on 1883 must not leak in).
    "local_mqtt": {"enabled": False},
}


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (a zombie waiting to be reaped is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2:].split()[0] not in ("Z", "X")


def render_toml(config: dict[str, dict[str, Any]]) -> str:
    """TOML text of ``{section: {key: value}}`` (strings, numbers, booleans, lists)."""
    lines = []
    for section, values in config.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in values.items())
        lines.append("")
    return "\n".join(lines)


def merge_config(*configs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    merged: dict[str, dict[str, Any]] = {}
    for config in configs:
        for section, values in config.items():
            merged.setdefault(section, {}).update(values)
    return merged


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def broker(tmp_path: Path, pki: Pki) -> Iterator[Mosquitto]:
    if not mosquitto_available():
        pytest.skip("mosquitto is not installed; install it with `apt-get install -y mosquitto`")
    with Mosquitto(tmp_path / "broker", pki) as running:
        yield running


@pytest.fixture
def thingsboard(pki: Pki) -> Iterator[FakeThingsBoard]:
    """ThingsBoard's device transport: TLS and plain listeners, no rate limits."""
    with FakeThingsBoard(pki) as tb:
        yield tb


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture
def gateway_env(thingsboard: FakeThingsBoard, pki: Pki, data_dir: Path) -> dict[str, str]:
    """The environment of a gateway that provisions against the stand-in over TLS."""
    return {
        "TB_HOST": thingsboard.tls_hostname,
        "TB_PORT": str(thingsboard.tls_port),
        "THINGSBOARD_CA_CERT": str(pki.ca_cert),
        "THINGSBOARD_PROVISION_DEVICE_KEY": "test-key",
        "THINGSBOARD_PROVISION_DEVICE_SECRET": "test-secret",
        "THINGSBOARD_DEVICE_NAME": "test-device",
        "TEG_DATA_PATH": str(data_dir),
        "LOG_LEVEL": "DEBUG",
    }


@pytest.fixture
def queue_writer(data_dir: Path) -> Iterator[QueueWriter]:
    writer = QueueWriter(data_dir)
    yield writer
    writer.close()


# The gateway's own databases and a controller queue, opened in-process (store and intake
# tests).
STORE_MAX_PAYLOAD = 49152


@pytest.fixture
def controller_dir(tmp_path: Path) -> Path:
    path = tmp_path / "controller"
    path.mkdir()
    return path


@pytest.fixture
def gateway_dir(tmp_path: Path) -> Path:
    path = tmp_path / "gateway"
    path.mkdir()
    return path


@pytest.fixture
def stores(gateway_dir: Path) -> Iterator[Stores]:
    opened = Stores(gateway_dir, STORE_MAX_PAYLOAD)
    opened.open()
    yield opened
    opened.close()


@pytest.fixture
def writer(controller_dir: Path) -> Iterator[QueueWriter]:
    queue_writer = QueueWriter(controller_dir)
    yield queue_writer
    queue_writer.close()


GatewayFactory = Callable[..., GatewayProcess]


@pytest.fixture
def make_gateway(tmp_path: Path, gateway_env: dict[str, str]) -> Iterator[GatewayFactory]:
    """Build (not start) gateway processes; all are stopped at the end of the test."""
    made: list[GatewayProcess] = []

    def factory(config: dict[str, dict[str, Any]] | None = None,
                env: dict[str, str] | None = None,
                args: tuple[str, ...] = ("run",)) -> GatewayProcess:
        """A gateway with FAST_CONFIG merged with ``config`` and ``env`` over gateway_env."""
        process = GatewayProcess(tmp_path / "gateway", {**gateway_env, **(env or {})},
                                 render_toml(merge_config(FAST_CONFIG, config or {})), args)
        made.append(process)
        return process

    yield factory
    for process in made:
        if process.running:
            process.kill()


@pytest.fixture
def report(capsys: pytest.CaptureFixture[str]) -> Callable[[str], None]:
    """Print a line into the test run's output even when output is captured (figures such
    as records lost and duplicated, so every run shows them)."""

    def emit(text: str) -> None:
        with capsys.disabled():
            print(f"\n    {text}", end="")

    return emit


def outbox_seqs(conn: sqlite3.Connection) -> list[int]:
    """The ``seq`` of every telemetry record in the outbox that has one, in order (rows
    may hold several records)."""
    seqs = []
    for text in stored_records(conn, TELEMETRY):
        values = json.loads(text).get("values", {})
        if "seq" in values:
            seqs.append(values["seq"])
    return seqs
