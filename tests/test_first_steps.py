"""What a newcomer meets first: help text, messages, exit codes, the data directory."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import GatewayFactory, needs_mosquitto, render_toml
from teg_gateway.config import ConfigError, load_settings
from teg_gateway.sandbox.broker import free_tcp_ports
from teg_gateway.sandbox.thingsboard import FakeThingsBoard
from test_config import run_cli
from test_forwarding import wait_connected


def test_help_names_the_required_settings_and_the_readme(tmp_path: Path) -> None:
    for args in (("--help",), ("run", "--help"), ("provision", "--help")):
        result = run_cli(tmp_path, {}, *args)
        assert result.returncode == 0
        for name in ("TB_HOST", "TEG_DATA_PATH", "THINGSBOARD_PROVISION_DEVICE_KEY",
                     "THINGSBOARD_PROVISION_DEVICE_SECRET", "tb_access_token", "README",
                     "teg-gateway check"):
            assert name in result.stdout, (args, name)


def test_an_unknown_setting_names_the_file_and_suggests(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text("[outbox]\nquota_m = 10\n")
    with pytest.raises(ConfigError) as err:
        load_settings(config, {"TEG_DATA_PATH": "/x"})
    assert str(err.value) == (f"config file {config}: unknown setting outbox.quota_m; "
                              "did you mean `quota_mb`?")
    config.write_text("[outbx]\n")
    with pytest.raises(ConfigError, match="did you mean `outbox`"):
        load_settings(config, {"TEG_DATA_PATH": "/x"})


def test_a_string_where_a_boolean_belongs_is_called_a_string(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('[thingsboard]\ntls = "false"\n')
    with pytest.raises(ConfigError) as err:
        load_settings(config, {"TEG_DATA_PATH": "/x"})
    assert "got the string 'false'" in str(err.value)
    assert str(config) in str(err.value)


def test_the_log_level_error_names_warning(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(None, {"TEG_DATA_PATH": "/x", "LOG_LEVEL": "LOUD"})
    assert "DEBUG, INFO, WARNING (or WARN), ERROR or CRITICAL" in str(err.value)
    for name in ("WARNING", "WARN", "warning"):
        load_settings(None, {"TEG_DATA_PATH": "/x", "LOG_LEVEL": name})


def test_run_says_loudly_that_it_created_the_data_directory(tmp_path: Path) -> None:
    data = tmp_path / "typo" / "deeper" / "data"
    # Nothing listens on this port: the gateway stops at the provision timeout below.
    port = free_tcp_ports(1)[0]
    result = run_cli(tmp_path / "work", {
        "TEG_DATA_PATH": str(data), "TB_HOST": "127.0.0.1", "TB_PORT": str(port),
        "THINGSBOARD_PROVISION_DEVICE_KEY": "k", "THINGSBOARD_PROVISION_DEVICE_SECRET": "s",
        "THINGSBOARD_DEVICE_NAME": "first-steps"}, "provision", "--timeout", "1")
    assert result.returncode == 5, result.stdout + result.stderr
    assert "WARNING" in result.stdout
    assert f"data directory (TEG_DATA_PATH) {data} did not exist: created it" in result.stdout
    assert "typo" in result.stdout
    assert f"no answer from 127.0.0.1:{port} within 1 s" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_provisioning_warns_about_a_name_many_devices_share(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    result = run_cli(tmp_path / "work", {
        "TEG_DATA_PATH": str(data), "TB_HOST": "127.0.0.1",
        "TB_PORT": str(free_tcp_ports(1)[0]),
        "THINGSBOARD_PROVISION_DEVICE_KEY": "k", "THINGSBOARD_PROVISION_DEVICE_SECRET": "s",
        "THINGSBOARD_DEVICE_NAME": "raspberrypi"}, "provision", "--timeout", "1")
    assert result.returncode == 5
    assert "device name 'raspberrypi' is a host name many devices share" in result.stdout
    assert "THINGSBOARD_DEVICE_NAME" in result.stdout


@contextlib.contextmanager
def read_only(where: Path) -> Iterator[Path]:
    """``where`` as a read-only tmpfs (read-only even for root); skipped without root."""
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        (where / "data").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)
        yield where / "data"
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@contextlib.contextmanager
def full(where: Path) -> Iterator[Path]:
    """A data directory on a tiny tmpfs filled to the last byte."""
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(where)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        (where / "data").mkdir()
        with contextlib.suppress(OSError), (where / "filler").open("wb") as filler:
            while True:
                filler.write(b"\0" * 4096)
        yield where / "data"
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.parametrize(("make", "reason"), [
    (read_only, "read-only file system"), (full, "no space left on the device")])
def test_an_unusable_data_directory_is_one_line_and_exit_2(
        tmp_path: Path, make: object, reason: str) -> None:
    with make(tmp_path / "mnt") as data:  # type: ignore[operator]
        for command in ("run", "provision"):
            result = run_cli(tmp_path / "work", {
                "TEG_DATA_PATH": str(data), "TB_HOST": "127.0.0.1",
                "THINGSBOARD_PROVISION_DEVICE_KEY": "k",
                "THINGSBOARD_PROVISION_DEVICE_SECRET": "s"}, command,
                config=render_toml({"local_mqtt": {"enabled": False}}))
            output = result.stdout + result.stderr
            assert result.returncode == 2, output
            assert "Traceback" not in output
            assert result.stderr.splitlines() == [
                f"teg-gateway: data directory (TEG_DATA_PATH) {data} is not usable: {reason}"]


def test_a_data_path_under_a_regular_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    data = tmp_path / "file" / "data"
    result = run_cli(tmp_path / "work", {
        "TEG_DATA_PATH": str(data), "TB_HOST": "127.0.0.1",
        "THINGSBOARD_PROVISION_DEVICE_KEY": "k", "THINGSBOARD_PROVISION_DEVICE_SECRET": "s"},
        "run")
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert str(data) in result.stderr and "cannot be created" in result.stderr


def test_status_shows_the_local_broker(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    port = free_tcp_ports(1)[0]
    result = run_cli(tmp_path / "work", {"TEG_DATA_PATH": str(data)}, "status",
                     config=render_toml({"local_mqtt": {"port": port}}))
    assert result.returncode == 0, result.stderr
    assert f"local broker: 127.0.0.1:{port} not reachable" in result.stdout
    result = run_cli(tmp_path / "work", {"TEG_DATA_PATH": str(data)}, "status",
                     config=render_toml({"local_mqtt": {"enabled": False}}))
    assert "local broker: disabled" in result.stdout


@needs_mosquitto
def test_an_absent_local_broker_is_said_once_at_info(
        make_gateway: GatewayFactory, thingsboard: FakeThingsBoard) -> None:
    port = free_tcp_ports(1)[0]
    gateway = make_gateway(config={"local_mqtt": {"enabled": True, "port": port,
                                                  "reconnect_max_s": 0.2}},
                           env={"LOG_LEVEL": "INFO"})
    gateway.start()
    wait_connected(thingsboard, gateway)
    time.sleep(1.5)  # several retries at 0.2 s
    # How often and at which level it is said is the product here.
    lines = [line for line in gateway.log_text().splitlines()
             if f"local broker 127.0.0.1:{port} not reachable" in line]
    assert len(lines) == 1, lines
    assert " INFO " in lines[0]


def test_a_database_path_that_cannot_be_opened_is_one_line_and_exit_2(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "outbox.db").mkdir(parents=True)  # a directory where the database belongs
    result = run_cli(tmp_path / "work", {
        "TEG_DATA_PATH": str(data), "TB_HOST": "127.0.0.1",
        "THINGSBOARD_PROVISION_DEVICE_KEY": "k", "THINGSBOARD_PROVISION_DEVICE_SECRET": "s"},
        "run", config=render_toml({"local_mqtt": {"enabled": False}}))
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if " ERROR " in line]
    assert len(errors) == 1, output
    assert f"databases (outbox.db, archive.db) in the data directory {data}" in errors[0]
