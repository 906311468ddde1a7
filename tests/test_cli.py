"""The ``teg-gateway`` command line: --version, ``status`` and ``provision``."""

from __future__ import annotations

import json
import re
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import GatewayFactory
from teg_gateway import __version__
from teg_gateway.sandbox.controller import QueueWriter, make_records, now_ms
from teg_gateway.sandbox.thingsboard import FakeThingsBoard
from teg_gateway.store.stores import Stores
from test_config import run_cli

WAIT = 30.0


def file_mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def status_of(workdir: Path, env: dict[str, str]) -> dict[str, str]:
    """``teg-gateway status`` as {label: rest of the line}; it must exit 0 and say nothing
    on stderr."""
    result = run_cli(workdir, env, "status")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""
    lines: dict[str, str] = {}
    for line in result.stdout.splitlines():
        label, _, rest = line.partition(": ")
        lines[label] = rest
    return lines


def seconds(age: str) -> float:
    """Seconds in an age as status prints it ("12.5 s", "3.0 min", "2.0 h", "4.0 days")."""
    match = re.fullmatch(r"([\d.]+) (s|min|h|days)", age)
    assert match, age
    factor = {"s": 1, "min": 60, "h": 3600, "days": 86400}[match[2]]
    return float(match[1]) * factor


# -- --version and help -------------------------------------------------------------------------

def test_version_of_the_installed_command() -> None:
    command = Path(sys.executable).parent / "teg-gateway"
    if not command.exists():
        pytest.skip("the teg-gateway console script is not installed next to this Python")
    result = subprocess.run([str(command), "--version"], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0
    assert result.stdout.strip() == f"teg-gateway {__version__}"


def test_version_through_python_m(tmp_path: Path) -> None:
    result = run_cli(tmp_path, {}, "--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"teg-gateway {__version__}"


def test_help_lists_the_commands(tmp_path: Path) -> None:
    result = run_cli(tmp_path, {}, "--help")
    assert result.returncode == 0
    for command in ("run", "provision", "status"):
        assert command in result.stdout


def test_unknown_command_is_a_usage_error(tmp_path: Path) -> None:
    result = run_cli(tmp_path, {}, "frobnicate")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr
    assert "Traceback" not in result.stderr


# -- status ---------------------------------------------------------------------------------

def test_status_of_an_empty_data_directory(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    status = status_of(tmp_path / "work", {"TEG_DATA_PATH": str(data)})
    assert status["data directory"] == str(data)
    assert status["provisioned"] == f"no (no {data / 'tb_access_token'})"
    assert status["outbox"] == "not created yet"
    assert status["archive"] == "not created yet"
    assert status["last connection"] == "never tried"
    assert status["controller health check"] == "no queue database yet"
    assert list(data.iterdir()) == [], "status must not write into the data directory"


def test_status_of_a_missing_data_directory_says_so(tmp_path: Path) -> None:
    data = tmp_path / "absent"
    result = run_cli(tmp_path / "work", {"TEG_DATA_PATH": str(data)}, "status")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"teg-gateway: data directory {data} does not exist (setting paths.data, "
        "TEG_DATA_PATH): nothing has run with this path; check it for a typo"]
    assert not data.exists()


def test_status_reads_a_data_directory_with_uri_characters_in_its_name(tmp_path: Path) -> None:
    parent = tmp_path / "parent"
    data = parent / "da#ta %41?x"
    data.mkdir(parents=True)
    stores = Stores(data, 49152)
    stores.open()
    stores.close()
    status = status_of(tmp_path / "work", {"TEG_DATA_PATH": str(data)})
    assert status["outbox"] == "0 records pending"
    assert status["archive"].startswith("0 records")
    assert [p.name for p in parent.iterdir()] == [data.name], "no stray file was created"


def test_status_needs_the_data_directory(tmp_path: Path) -> None:
    result = run_cli(tmp_path, {}, "status")
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1
    assert "TEG_DATA_PATH" in result.stderr


def test_status_reports_unusable_credentials(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "tb_access_token").write_text("{not json")
    status = status_of(tmp_path / "work", {"TEG_DATA_PATH": str(data)})
    assert status["provisioned"].startswith("unusable credentials")


def test_status_after_the_gateway_forwarded_records_and_while_it_cannot_connect(
        *, tmp_path: Path, make_gateway: GatewayFactory, thingsboard: FakeThingsBoard,
        queue_writer: QueueWriter, gateway_env: dict[str, str],
        data_dir: Path) -> None:
    queue_writer.write(make_records(100))
    queue_writer.health_check(now_ms() - 90_000)
    gateway = make_gateway()
    gateway.start()
    thingsboard.wait_for(lambda: len(thingsboard.telemetry_values("seq")) >= 100, timeout=WAIT)
    assert gateway.stop() == 0

    status = status_of(tmp_path / "work", gateway_env)
    token_path = data_dir / "tb_access_token"
    assert status["provisioned"] == f"yes (access token in {token_path})"
    assert re.fullmatch(r"\d+ records pending(, oldest pending .+ old)?", status["outbox"])
    assert re.fullmatch(r"100 accepted, \d+ sent, 0 dropped \(quota\), 0 dead letters",
                        status["records"]), status["records"]
    assert re.fullmatch(r"100 records, \d+\.\d MiB", status["archive"]), status["archive"]
    assert re.fullmatch(r"disconnected: the gateway stopped \(.+ ago\)",
                        status["last connection"]), status["last connection"]
    health = re.fullmatch(r"(.+) ago", status["controller health check"])
    assert health, status["controller health check"]
    assert seconds(health[1]) >= 89

    # ThingsBoard unreachable: records wait in the outbox, and status says why.
    thingsboard.stop()
    queue_writer.write(make_records(50, start_seq=100))
    gateway.start()
    state_file = data_dir / "state" / "cloud.json"
    thingsboard.wait_for(
        lambda: "cannot connect" in str(read_json(state_file).get("last_result")),
        timeout=WAIT, message="the gateway did not record the failed connection")
    thingsboard.wait_for(lambda: queue_writer.pending() == 0, timeout=WAIT)
    status = status_of(tmp_path / "work", gateway_env)  # while the gateway runs
    pending = re.fullmatch(r"(\d+) records pending, oldest pending (.+) old", status["outbox"])
    assert pending, status["outbox"]
    assert int(pending[1]) >= 50
    seconds(pending[2])
    assert status["records"].startswith("150 accepted")
    assert status["archive"].startswith("150 records")
    assert re.fullmatch(r"cannot connect to localhost:\d+: connection refused \(.+ ago\)",
                        status["last connection"]), status["last connection"]
    assert gateway.stop() == 0

    status = status_of(tmp_path / "work", gateway_env)  # and after it stopped
    pending = re.fullmatch(r"(\d+) records pending, oldest pending .+ old", status["outbox"])
    assert pending
    assert int(pending[1]) >= 50


# -- provision ------------------------------------------------------------------------------

def test_provision_saves_the_token_once(tmp_path: Path, thingsboard: FakeThingsBoard,
                                        gateway_env: dict[str, str], data_dir: Path) -> None:
    result = run_cli(tmp_path, gateway_env, "provision")
    assert result.returncode == 0, result.stdout + result.stderr
    token_path = data_dir / "tb_access_token"
    assert f"provisioned: access token saved to {token_path}" in result.stdout.splitlines()
    assert token_path.read_text().strip() == thingsboard.access_token
    assert file_mode(token_path) == 0o600
    assert thingsboard.provision_requests == [{
        "deviceName": "test-device", "provisionDeviceKey": "test-key",
        "provisionDeviceSecret": "test-secret"}]

    again = run_cli(tmp_path, gateway_env, "provision")
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"already provisioned: access token in {token_path}" in again.stdout.splitlines()
    assert len(thingsboard.provision_requests) == 1, "the server must not be asked again"
    assert token_path.read_text().strip() == thingsboard.access_token


def test_provision_with_mqtt_basic_credentials(tmp_path: Path, thingsboard: FakeThingsBoard,
                                               gateway_env: dict[str, str],
                                               data_dir: Path) -> None:
    thingsboard.basic_credentials = {"clientId": "cid", "userName": "user", "password": "pw"}
    result = run_cli(tmp_path, gateway_env, "provision")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "MQTT basic credentials (client id 'cid', user 'user')" in result.stdout
    assert "pw" not in result.stdout, "the password must not be printed"
    token_path = data_dir / "tb_access_token"
    assert json.loads(token_path.read_text()) == {
        "credentialsType": "MQTT_BASIC", "clientId": "cid", "userName": "user", "password": "pw"}
    assert file_mode(token_path) == 0o600


@pytest.mark.parametrize(("mode", "message"), [
    ("not_found", "Provision data was not found!"),
    ("failure", "Failed to provision device!"),
])
def test_provision_refused_exits_non_zero_with_the_server_message(
        *, tmp_path: Path, thingsboard: FakeThingsBoard, gateway_env: dict[str, str],
        data_dir: Path, mode: str, message: str) -> None:
    thingsboard.provision_mode = mode
    result = run_cli(tmp_path, gateway_env, "provision")
    assert result.returncode != 0
    assert result.returncode != 2, "a refusal is not a configuration error"
    assert message in result.stderr
    assert mode.upper() in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (data_dir / "tb_access_token").exists()
    assert len(thingsboard.provision_requests) == 1


def test_provision_with_a_wrong_secret_is_not_found(
        tmp_path: Path, thingsboard: FakeThingsBoard, gateway_env: dict[str, str],
        data_dir: Path) -> None:
    thingsboard.expected_provision_key = "test-key"
    thingsboard.expected_provision_secret = "the-real-secret"
    result = run_cli(tmp_path, gateway_env, "provision")
    assert result.returncode == 1
    assert "NOT_FOUND" in result.stderr
    assert "Provision data was not found!" in result.stderr
    assert not (data_dir / "tb_access_token").exists()


def test_provision_without_key_says_what_to_set(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    result = run_cli(tmp_path, {"TEG_DATA_PATH": str(data), "TB_HOST": "localhost"},
                     "provision")
    assert result.returncode == 2, "missing settings exit with 2, like every setting error"
    assert len(result.stderr.splitlines()) == 1
    assert "THINGSBOARD_PROVISION_DEVICE_KEY" in result.stderr
    assert "Traceback" not in result.stderr


def test_already_provisioned_needs_no_server(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "tb_access_token").write_text("existing-token\n")
    (data / "tb_access_token").chmod(0o600)
    # Nothing listens on TB_HOST: the command must not try.
    result = run_cli(tmp_path, {"TEG_DATA_PATH": str(data), "TB_HOST": "host.invalid"},
                     "provision")
    assert result.returncode == 0, result.stderr
    assert "already provisioned: access token in" in result.stdout
    assert (data / "tb_access_token").read_text() == "existing-token\n"


# -- sandbox ----------------------------------------------------------------------------------

def test_sandbox_help_shows_the_stand_in_limits(tmp_path: Path) -> None:
    result = run_cli(tmp_path, {}, "sandbox", "--help")
    assert result.returncode == 0, result.stderr
    for option in ("--rate-limit-messages", "--rate-limit-telemetry-messages",
                   "--rate-limit-data-points", "--max-payload-bytes"):
        assert option in result.stdout


@pytest.mark.parametrize(("args", "message"), [
    (("--rate-limit-messages", "10/1"),
     "rate limit '10/1': '10/1' is not TOKENS:SECONDS (e.g. 60:1,1800:60)"),
    (("--rate-limit-data-points", "0:1"),
     "rate limit '0:1': tokens and seconds must be positive"),
    (("--max-payload-bytes", "0"), "max_payload_size must be positive, not 0"),
])
def test_sandbox_refuses_bad_limits_in_one_line(tmp_path: Path, args: tuple[str, ...],
                                                message: str) -> None:
    result = run_cli(tmp_path, {}, "sandbox", *args)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"teg-gateway sandbox: {message}"]
