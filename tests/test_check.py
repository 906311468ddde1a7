"""``teg-gateway check``: every step against real parts (the test PKI, the ThingsBoard
stand-in server with TLS, which refuses unknown tokens, a real mosquitto as the local
broker, a full tmpfs), one line per step, a fix on every failure, nothing written."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import needs_mosquitto, render_toml
from teg_gateway.sandbox.broker import Mosquitto, free_tcp_ports
from teg_gateway.sandbox.certs import Pki, make_pki
from teg_gateway.sandbox.thingsboard import FakeThingsBoard
from test_config import run_cli

pytestmark = needs_mosquitto

TOKEN = "check-test-token"


def check(workdir: Path, env: dict[str, str],
          config: dict[str, dict[str, object]] | None = None
          ) -> tuple[int, dict[str, tuple[bool, str, str]]]:
    """Run ``check``; (exit code, {step: (ok, detail, fix)})."""
    result = run_cli(workdir, env, "check", config=render_toml(config or {}))
    assert "Traceback" not in result.stdout + result.stderr, result.stdout + result.stderr
    steps: dict[str, tuple[bool, str, str]] = {}
    last = ""
    for line in result.stdout.splitlines():
        if line[:2] in ("✓ ", "✗ "):
            name, _, detail = line[2:].partition(": ")
            steps[name] = (line[0] == "✓", detail, "")
            last = name
        elif line.startswith("    fix: "):
            ok, detail, _ = steps[last]
            steps[last] = (ok, detail, line[len("    fix: "):])
    for name, (ok, _detail, fix) in steps.items():
        assert ok or fix, f"step {name} failed without a fix hint:\n{result.stdout}"
    return result.returncode, steps


@pytest.fixture
def env(thingsboard: FakeThingsBoard, pki: Pki, data_dir: Path) -> dict[str, str]:
    thingsboard.accept_token(TOKEN)
    (data_dir / "tb_access_token").write_text(TOKEN + "\n")
    (data_dir / "tb_access_token").chmod(0o600)
    return {
        "TB_HOST": thingsboard.tls_hostname,
        "TB_PORT": str(thingsboard.tls_port),
        "THINGSBOARD_CA_CERT": str(pki.ca_cert),
        "TEG_DATA_PATH": str(data_dir),
    }


def local_broker(broker: Mosquitto) -> dict[str, dict[str, object]]:
    return {"local_mqtt": {"enabled": True, "host": broker.host, "port": broker.plain_port}}


def test_a_good_setup_passes_every_step(tmp_path: Path, env: dict[str, str],
                                        broker: Mosquitto, data_dir: Path) -> None:
    before = sorted(p.name for p in data_dir.iterdir())
    code, steps = check(tmp_path / "work", env, local_broker(broker))
    assert code == 0, steps
    assert list(steps) == ["configuration", "data directory", "free disk", "DNS", "TCP",
                           "TLS", "credentials", "local broker", "controller runtime"]
    assert all(ok for ok, _, _ in steps.values()), steps
    assert "CN=localhost" in steps["TLS"][1]
    assert "valid until" in steps["TLS"][1]
    assert "CONNACK accepted" in steps["credentials"][1]
    assert sorted(p.name for p in data_dir.iterdir()) == before, "check wrote a file"


def test_not_provisioned_yet_needs_the_provisioning_credentials(
        tmp_path: Path, env: dict[str, str], data_dir: Path) -> None:
    (data_dir / "tb_access_token").unlink()
    code, steps = check(tmp_path / "work", env, {"local_mqtt": {"enabled": False}})
    assert code == 1
    ok, detail, fix = steps["credentials"]
    assert not ok and "no provisioning key and secret" in detail
    assert "THINGSBOARD_PROVISION_DEVICE_KEY" in fix
    code, steps = check(tmp_path / "work", {
        **env, "THINGSBOARD_PROVISION_DEVICE_KEY": "k", "THINGSBOARD_PROVISION_DEVICE_SECRET": "s",
        "THINGSBOARD_DEVICE_NAME": "raspberrypi"}, {"local_mqtt": {"enabled": False}})
    assert code == 0, steps
    assert "not provisioned yet" in steps["credentials"][1]
    assert "many devices share" in steps["credentials"][1]
    assert not (data_dir / "tb_access_token").exists(), "check must never provision"


def test_a_wrong_host_fails_at_dns(tmp_path: Path, env: dict[str, str]) -> None:
    code, steps = check(tmp_path / "work", {**env, "TB_HOST": "no-such-host.invalid"},
                        {"local_mqtt": {"enabled": False}})
    assert code == 1
    ok, detail, fix = steps["DNS"]
    assert not ok and "no-such-host.invalid" in detail
    assert "TB_HOST" in fix
    assert "TCP" not in steps


def test_a_closed_port_fails_at_tcp(tmp_path: Path, env: dict[str, str]) -> None:
    closed = free_tcp_ports(1)[0]
    code, steps = check(tmp_path / "work", {**env, "TB_PORT": str(closed)},
                        {"local_mqtt": {"enabled": False}})
    assert code == 1
    ok, detail, fix = steps["TCP"]
    assert not ok and str(closed) in detail
    assert "TB_PORT" in fix


def test_a_wrong_ca_fails_at_tls(tmp_path: Path, env: dict[str, str]) -> None:
    other = make_pki(tmp_path / "other-pki")
    code, steps = check(tmp_path / "work", {**env, "THINGSBOARD_CA_CERT": str(other.ca_cert)},
                        {"local_mqtt": {"enabled": False}})
    assert code == 1
    ok, detail, fix = steps["TLS"]
    assert not ok and "certificate" in detail and str(other.ca_cert) in detail
    assert "THINGSBOARD_CA_CERT" in fix
    assert "credentials" not in steps


def test_a_revoked_token_is_refused_at_connack(tmp_path: Path, env: dict[str, str],
                                               data_dir: Path) -> None:
    (data_dir / "tb_access_token").write_text("revoked-token\n")
    (data_dir / "tb_access_token").chmod(0o600)
    code, steps = check(tmp_path / "work", env, {"local_mqtt": {"enabled": False}})
    assert code == 1
    assert steps["TLS"][0]
    ok, detail, fix = steps["credentials"]
    assert not ok
    assert "token revoked or wrong" in detail
    assert "tb_access_token" in fix


@contextlib.contextmanager
def small_tmpfs(where: Path, size_kb: int) -> Iterator[Path]:
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs",
                              str(where)], capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_data_directory_fails_at_free_disk(tmp_path: Path, env: dict[str, str],
                                                  data_dir: Path) -> None:
    with small_tmpfs(tmp_path / "small", 320) as small:
        data = small / "data"
        data.mkdir()
        (data / "tb_access_token").write_text(TOKEN + "\n")
        with contextlib.suppress(OSError), (small / "filler").open("wb") as filler:
            while True:
                filler.write(b"\0" * 65536)
        code, steps = check(tmp_path / "work", {**env, "TEG_DATA_PATH": str(data)},
                            {"local_mqtt": {"enabled": False}})
    assert code == 1
    ok, detail, fix = steps["free disk"]
    assert not ok and "MiB free" in detail
    assert "free some space" in fix


def test_a_missing_data_directory_is_not_created(tmp_path: Path, env: dict[str, str]) -> None:
    missing = tmp_path / "typo" / "data"
    _code, steps = check(tmp_path / "work", {**env, "TEG_DATA_PATH": str(missing)},
                         {"local_mqtt": {"enabled": False}})
    assert "does not exist yet" in steps["data directory"][1]
    assert not (tmp_path / "typo").exists()


def test_a_bad_setting_fails_the_first_step(tmp_path: Path, env: dict[str, str]) -> None:
    code, steps = check(tmp_path / "work", {**env, "TB_PORT": "eighty"})
    assert code == 1
    assert list(steps) == ["configuration"]
    assert "TB_PORT" in steps["configuration"][1]


def test_an_absent_local_broker_and_controller_program(tmp_path: Path,
                                                       env: dict[str, str]) -> None:
    code, steps = check(tmp_path / "work", env, {
        "local_mqtt": {"enabled": True, "host": "127.0.0.1", "port": free_tcp_ports(1)[0]},
        "controller": {"runtime": "process", "command": ["no-such-controller-program"]}})
    assert code == 1
    assert not steps["local broker"][0]
    assert "local_mqtt.enabled" in steps["local broker"][2]
    assert not steps["controller runtime"][0]
    assert "no-such-controller-program" in steps["controller runtime"][1]


def test_a_token_file_readable_by_others_is_reported_not_changed(
        tmp_path: Path, env: dict[str, str], data_dir: Path) -> None:
    token = data_dir / "tb_access_token"
    token.chmod(0o644)
    code, steps = check(tmp_path / "work", env, {"local_mqtt": {"enabled": False}})
    assert code == 1
    ok, detail, fix = steps["credentials"]
    assert not ok and "readable by other users" in detail
    assert f"chmod 600 {token}" in fix
    assert token.stat().st_mode & 0o777 == 0o644, "check changes nothing"
