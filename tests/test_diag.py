"""``teg-gateway diag``: the support bundle holds what support needs and no secret."""

from __future__ import annotations

import stat
import tarfile
from pathlib import Path

from conftest import GatewayFactory, needs_mosquitto, render_toml
from teg_gateway.sandbox.broker import free_tcp_ports
from teg_gateway.sandbox.controller import QueueWriter, make_records
from teg_gateway.sandbox.process import GatewayProcess
from teg_gateway.sandbox.thingsboard import FakeThingsBoard
from teg_gateway.store.stores import Stores
from test_config import run_cli
from test_forwarding import wait_connected, wait_until

MEMBERS = {"status.txt", "config.json", "environment.txt", "versions.txt", "databases.txt",
           "system.txt", "gateway.log", "controller.log", "check.txt"}
KEY = "planted-provision-key-7f3a91"
SECRET = "planted-provision-secret-c04e55"
TOKEN = "planted-access-token-9b1d27"
ENV_SECRET = "planted-controller-env-value-31aa0c"


def bundle_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as bundle:
        members = {}
        for member in bundle.getmembers():
            assert member.isfile(), member.name
            extracted = bundle.extractfile(member)
            assert extracted is not None
            members[member.name.split("/", 1)[1]] = extracted.read()
    return members


def test_the_bundle_of_a_stopped_offline_gateway_holds_no_secret(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "logs").mkdir(parents=True)
    (data / "tb_access_token").write_text(TOKEN + "\n")
    (data / "tb_access_token").chmod(0o600)
    stores = Stores(data, 49152)
    stores.open()
    stores.outbox.put_telemetry({"temp": 1})
    stores.close()
    with QueueWriter(data) as writer:
        writer.write(make_records(7))
    # A log line that (wrongly) carries secrets must come out redacted too.
    (data / "logs" / "gateway.log").write_text(
        f"2026-12-01 10:00:00,000 ERROR teg_gateway.x: connect as {TOKEN} with {KEY}\n")
    (data / "logs" / "controller.log").write_text(f"controller says {ENV_SECRET}\n")
    env = {"TEG_DATA_PATH": str(data), "TB_HOST": "127.0.0.1",
           "TB_PORT": str(free_tcp_ports(1)[0]),
           "THINGSBOARD_PROVISION_DEVICE_KEY": KEY,
           "THINGSBOARD_PROVISION_DEVICE_SECRET": SECRET}
    config = render_toml({"local_mqtt": {"enabled": False}}) + (
        f'[controller]\nenv = {{ API_PASSWORD = "{ENV_SECRET}" }}\n')
    output = tmp_path / "bundle.tar.gz"
    result = run_cli(tmp_path / "work", env, "diag", "--output", str(output), config=config)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"support bundle written to {output}" in result.stdout
    assert stat.S_IMODE(output.stat().st_mode) == 0o600
    members = bundle_members(output)
    assert set(members) == MEMBERS
    for name, content in members.items():
        for secret in (KEY, SECRET, TOKEN, ENV_SECRET):
            assert secret.encode() not in content, f"{secret} in {name}"
    assert b"<redacted>" in members["config.json"]
    assert b"THINGSBOARD_PROVISION_DEVICE_KEY=<redacted>" in members["environment.txt"]
    assert b"connect as <redacted> with <redacted>" in members["gateway.log"]
    assert b"outbox rows: 1" in members["databases.txt"]
    assert b"controller queue rows: 7" in members["databases.txt"]
    assert b"outbox: 1 records pending" in members["status.txt"]
    assert b"teg-gateway " in members["versions.txt"] and b"sqlite " in members["versions.txt"]
    assert b"MemAvailable" not in members["system.txt"] and b"memory:" in members["system.txt"]
    assert b"\xe2\x9c\x97 TCP" in members["check.txt"], members["check.txt"]


@needs_mosquitto
def test_the_bundle_of_a_running_gateway(make_gateway: GatewayFactory,
                                         thingsboard: FakeThingsBoard, tmp_path: Path,
                                         gateway_env: dict[str, str], data_dir: Path) -> None:
    gateway: GatewayProcess = make_gateway()
    gateway.start()
    wait_connected(thingsboard, gateway)
    wait_until((data_dir / "logs" / "gateway.log").exists, "the log file", gateway)
    token = (data_dir / "tb_access_token").read_text().strip()
    output = tmp_path / "running.tar.gz"
    result = run_cli(tmp_path / "work", gateway_env, "diag", "-o", str(output), "--no-check")
    assert result.returncode == 0, result.stdout + result.stderr
    members = bundle_members(output)
    assert b"provisioned: yes" in members["status.txt"]
    assert b"connected" in members["gateway.log"]
    assert members["check.txt"] == b"not run (--no-check)\n"
    for content in members.values():
        assert token.encode() not in content
        assert b"test-secret" not in content
    assert gateway.running
