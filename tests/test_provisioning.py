"""Self-provisioning (SPEC.md section 3): the device name, the credentials file, and
``teg-gateway run`` asking the ThingsBoard stand-in for credentials over verified TLS."""

from __future__ import annotations

import json
import random
import re
import socket
import stat
from pathlib import Path

import pytest

from conftest import GatewayFactory
from teg_gateway.cloud import credentials
from teg_gateway.cloud.credentials import Credentials, CredentialsError
from teg_gateway.cloud.provision import device_name
from teg_gateway.sandbox.certs import make_pki, make_untrusted_ca
from teg_gateway.sandbox.controller import QueueWriter, now_ms
from teg_gateway.sandbox.thingsboard import FakeThingsBoard
from test_config import run_cli

WAIT = 30.0
TOKEN_FILE = "tb_access_token"
# Answer-less provisioning attempts give up quickly in these tests.
QUICK_RETRY = {"thingsboard": {"provision_timeout_s": 1.0, "reconnect_min_s": 0.2,
                               "reconnect_max_s": 1.0}}


def file_mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def provision_logins(thingsboard: FakeThingsBoard) -> list[tuple[str, str]]:
    return [login for login in thingsboard.connected_usernames() if login[1] == "provision"]


# -- device name ------------------------------------------------------------------------------

def test_device_name_prefers_the_configured_name() -> None:
    # The flag and THINGSBOARD_DEVICE_NAME are merged into the setting (flag first, see
    # test_config); the setting then wins over the host name.
    assert device_name("from-setting", hostname="the-host") == "from-setting"
    assert device_name("  padded  ", hostname="the-host") == "padded"


def test_device_name_falls_back_to_the_host_name() -> None:
    assert device_name("", hostname="the-host") == "the-host"
    assert device_name("   ", hostname="the-host") == "the-host"
    assert device_name("") == socket.gethostname().strip()


def test_device_name_without_host_name_is_teg_and_seven_digits() -> None:
    names = {device_name("", hostname="", rng=random.Random(seed)) for seed in range(20)}
    assert all(re.fullmatch(r"teg-\d{7}", name) for name in names), names
    assert len(names) > 1, "the digits are random"
    assert device_name("", hostname=" ", rng=random.Random(7)) == \
        device_name("", hostname="", rng=random.Random(7))


# -- credentials file -------------------------------------------------------------------------

def test_access_token_is_saved_with_mode_0600_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "sub" / TOKEN_FILE
    credentials.save(path, Credentials(credentials.ACCESS_TOKEN, token="abc"))
    assert path.read_text() == "abc\n"
    assert file_mode(path) == 0o600
    loaded = credentials.load(path)
    assert loaded == Credentials(credentials.ACCESS_TOKEN, token="abc")
    assert loaded.login("dev") == ("dev", "abc", None)
    assert [p.name for p in path.parent.iterdir()] == [TOKEN_FILE], "no temporary file left"


def test_mqtt_basic_credentials_are_saved_as_json_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / TOKEN_FILE
    creds = Credentials(credentials.MQTT_BASIC, client_id="cid", username="user",
                        password="pw")
    credentials.save(path, creds)
    assert json.loads(path.read_text()) == {"credentialsType": "MQTT_BASIC", "clientId": "cid",
                                            "userName": "user", "password": "pw"}
    assert file_mode(path) == 0o600
    assert credentials.load(path) == creds
    assert creds.login("dev") == ("cid", "user", "pw")
    assert Credentials(credentials.MQTT_BASIC, username="u").login("dev") == ("dev", "u", None)


def test_token_file_of_the_original_gateway_is_read(tmp_path: Path) -> None:
    path = tmp_path / TOKEN_FILE
    path.write_text("  original-token \n")
    path.chmod(0o600)
    assert credentials.load(path) == Credentials(credentials.ACCESS_TOKEN,
                                                 token="original-token")


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o666, 0o604])
def test_loose_credentials_file_is_tightened_on_load(tmp_path: Path, mode: int) -> None:
    path = tmp_path / TOKEN_FILE
    path.write_text("token\n")
    path.chmod(mode)
    assert credentials.load(path) is not None
    assert file_mode(path) == 0o600


def test_missing_credentials_file_is_none(tmp_path: Path) -> None:
    assert credentials.load(tmp_path / TOKEN_FILE) is None


@pytest.mark.parametrize(("text", "why"), [
    ("", "empty"),
    ("{broken", "not valid JSON"),
    ('{"credentialsType": "X509"}', "unknown JSON object"),
])
def test_unusable_credentials_file_is_an_error(tmp_path: Path, text: str, why: str) -> None:
    path = tmp_path / TOKEN_FILE
    path.write_text(text)
    with pytest.raises(CredentialsError, match=why):
        credentials.load(path)


def test_provision_answers_become_credentials() -> None:
    token = credentials.from_provision_answer(
        {"status": "SUCCESS", "credentialsType": "ACCESS_TOKEN", "credentialsValue": "t1"})
    assert token == Credentials(credentials.ACCESS_TOKEN, token="t1")
    basic = credentials.from_provision_answer(
        {"status": "SUCCESS", "credentialsType": "MQTT_BASIC",
         "credentialsValue": {"clientId": "c", "userName": "u", "password": "p"}})
    assert basic == Credentials(credentials.MQTT_BASIC, client_id="c", username="u",
                                password="p")
    for bad in ({"credentialsType": "ACCESS_TOKEN", "credentialsValue": ""},
                {"credentialsType": "MQTT_BASIC", "credentialsValue": "x"},
                {"credentialsType": "X509_CERTIFICATE", "credentialsValue": "pem"}):
        with pytest.raises(CredentialsError):
            credentials.from_provision_answer(bad)


# -- provisioning in `run` --------------------------------------------------------------------

def test_run_provisions_then_connects_with_the_token(
        make_gateway: GatewayFactory, thingsboard: FakeThingsBoard,
        data_dir: Path, queue_writer: QueueWriter) -> None:
    gateway = make_gateway()
    gateway.start()
    login = ("test-device", thingsboard.access_token)
    thingsboard.wait_for(lambda: login in thingsboard.connected_usernames(), timeout=WAIT,
                         message="the gateway did not connect with the provisioned token")
    token_path = data_dir / TOKEN_FILE
    assert token_path.read_text().strip() == thingsboard.access_token
    assert file_mode(token_path) == 0o600
    requests = thingsboard.provision_requests
    assert requests, "the gateway asked for credentials"
    for request in requests:  # more than one only if a noisy machine made one time out
        assert request == {"deviceName": "test-device", "provisionDeviceKey": "test-key",
                           "provisionDeviceSecret": "test-secret"}
    logins = thingsboard.connected_usernames()
    assert logins.index(provision_logins(thingsboard)[0]) < logins.index(login)
    queue_writer.write_record({"after_provisioning": 1})
    thingsboard.wait_for(lambda: thingsboard.telemetry_values("after_provisioning") == [1],
                         timeout=WAIT)
    assert gateway.stop() == 0


def test_run_uses_the_host_name_without_a_configured_name(
        make_gateway: GatewayFactory, thingsboard: FakeThingsBoard) -> None:
    gateway = make_gateway(env={"THINGSBOARD_DEVICE_NAME": ""})
    gateway.start()
    host = socket.gethostname()
    login = (host, thingsboard.access_token)
    thingsboard.wait_for(lambda: login in thingsboard.connected_usernames(), timeout=WAIT)
    assert {r["deviceName"] for r in thingsboard.provision_requests} == {host}
    assert gateway.stop() == 0


def test_run_saves_to_the_configured_token_path(
        make_gateway: GatewayFactory, thingsboard: FakeThingsBoard,
        tmp_path: Path, data_dir: Path) -> None:
    token_path = tmp_path / "secrets" / "token"
    gateway = make_gateway(env={"THINGSBOARD_ACCESS_TOKEN": str(token_path)})
    gateway.start()
    thingsboard.wait_for(lambda: ("test-device", thingsboard.access_token)
                         in thingsboard.connected_usernames(), timeout=WAIT)
    assert token_path.read_text().strip() == thingsboard.access_token
    assert file_mode(token_path) == 0o600
    assert not (data_dir / TOKEN_FILE).exists()
    assert gateway.stop() == 0


@pytest.mark.parametrize(("mode", "message"), [
    ("not_found", "Provision data was not found!"),
    ("failure", "Failed to provision device!"),
])
def test_run_stops_when_provisioning_is_refused(
        make_gateway: GatewayFactory, thingsboard: FakeThingsBoard, data_dir: Path,
        mode: str, message: str) -> None:
    thingsboard.provision_mode = mode
    gateway = make_gateway()
    gateway.start()
    code = gateway.wait(timeout=WAIT)
    log = gateway.log_text()
    assert code == 1, log
    # The one error line an operator reads: it must carry ThingsBoard's own answer.
    assert message in log
    assert mode.upper() in log
    assert "Traceback" not in log
    assert not (data_dir / TOKEN_FILE).exists()
    assert len(thingsboard.provision_requests) >= 1


def test_run_retries_unanswered_provisioning_with_backoff(
        make_gateway: GatewayFactory, thingsboard: FakeThingsBoard,
        data_dir: Path) -> None:
    thingsboard.ignore_first_provision_requests = 2
    gateway = make_gateway(config=QUICK_RETRY)
    gateway.start()
    thingsboard.wait_for(lambda: ("test-device", thingsboard.access_token)
                         in thingsboard.connected_usernames(), timeout=WAIT)
    assert gateway.running
    # Two unanswered requests, then the answered one (a noisy machine may add attempts).
    assert len(thingsboard.provision_requests) >= 3
    assert (data_dir / TOKEN_FILE).read_text().strip() == thingsboard.access_token
    # Only the log tells the delays between attempts (timing them would be flaky).
    log = gateway.log_text()
    delays = [float(d) for d in re.findall(r"provisioning: next attempt in ([\d.]+) s", log)]
    assert len(delays) >= 2
    assert delays[1] >= delays[0], "the delay grows"
    assert all(0 < d <= 1.0 for d in delays), "and stays below reconnect_max_s"
    assert gateway.stop() == 0


def test_run_with_mqtt_basic_credentials(
        make_gateway: GatewayFactory, thingsboard: FakeThingsBoard,
        data_dir: Path, queue_writer: QueueWriter) -> None:
    thingsboard.basic_credentials = {"clientId": "basic-client", "userName": "basic-user",
                                     "password": "basic-password"}
    gateway = make_gateway()
    gateway.start()
    login = ("basic-client", "basic-user")
    thingsboard.wait_for(lambda: login in thingsboard.connected_usernames(), timeout=WAIT,
                         message="no connection with the MQTT_BASIC login")
    token_path = data_dir / TOKEN_FILE
    assert json.loads(token_path.read_text()) == {
        "credentialsType": "MQTT_BASIC", "clientId": "basic-client", "userName": "basic-user",
        "password": "basic-password"}
    assert file_mode(token_path) == 0o600
    queue_writer.write_record({"basic": 1})
    thingsboard.wait_for(lambda: thingsboard.telemetry_values("basic") == [1], timeout=WAIT)
    assert "basic-password" not in gateway.log_text()
    assert gateway.stop() == 0


def test_existing_token_skips_provisioning(
        make_gateway: GatewayFactory, thingsboard: FakeThingsBoard,
        data_dir: Path) -> None:
    token_path = data_dir / TOKEN_FILE
    thingsboard.accept_token("preexisting-token")
    token_path.write_text("preexisting-token\n")
    token_path.chmod(0o600)
    gateway = make_gateway()
    gateway.start()
    thingsboard.wait_for(lambda: ("test-device", "preexisting-token")
                         in thingsboard.connected_usernames(), timeout=WAIT)
    assert thingsboard.provision_requests == []
    assert provision_logins(thingsboard) == []
    assert token_path.read_text() == "preexisting-token\n"
    assert gateway.stop() == 0


def test_run_tightens_a_loose_token_file(
        make_gateway: GatewayFactory, thingsboard: FakeThingsBoard,
        data_dir: Path) -> None:
    token_path = data_dir / TOKEN_FILE
    thingsboard.accept_token("loose-token")
    token_path.write_text("loose-token\n")
    token_path.chmod(0o644)
    gateway = make_gateway()
    gateway.start()
    login = ("test-device", "loose-token")
    thingsboard.wait_for(lambda: login in thingsboard.connected_usernames(), timeout=WAIT)
    assert file_mode(token_path) == 0o600
    assert gateway.stop() == 0


def test_run_with_an_unusable_token_file_stops_with_a_clear_message(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / TOKEN_FILE).write_text("")
    result = run_cli(tmp_path, {"TEG_DATA_PATH": str(data), "TB_HOST": "localhost"}, "run")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert f"credentials file {data / TOKEN_FILE} is empty" in output
    assert "Traceback" not in output


def test_run_without_provisioning_key_stops_with_a_clear_message(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    result = run_cli(tmp_path, {"TEG_DATA_PATH": str(data), "TB_HOST": "localhost"}, "run")
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "THINGSBOARD_PROVISION_DEVICE_KEY" in output
    assert "Traceback" not in output


# -- TLS --------------------------------------------------------------------------------------

def test_untrusted_server_is_not_provisioned_against(
        make_gateway: GatewayFactory, thingsboard: FakeThingsBoard,
        tmp_path: Path, data_dir: Path) -> None:
    untrusted = make_untrusted_ca(tmp_path / "untrusted")
    gateway = make_gateway(config=QUICK_RETRY, env={"THINGSBOARD_CA_CERT": str(untrusted)})
    gateway.start()
    thingsboard.wait_for(lambda: gateway.log_text().count("TLS verification failed") >= 3,
                         timeout=WAIT, message="the gateway did not keep retrying:\n"
                         + gateway.log_tail())
    assert gateway.running, "a TLS failure must not stop the gateway"
    # Nothing reaches the server, so the ERROR line is the operator's only report.
    assert re.search(r"ERROR .*TLS verification failed", gateway.log_text())
    assert thingsboard.provision_requests == []
    assert provision_logins(thingsboard) == []
    assert not (data_dir / TOKEN_FILE).exists()
    assert gateway.stop() == 0


def test_failed_tls_attempts_log_no_stray_asyncio_errors(
        make_gateway: GatewayFactory, thingsboard: FakeThingsBoard, tmp_path: Path) -> None:
    untrusted = make_untrusted_ca(tmp_path / "untrusted")
    gateway = make_gateway(config=QUICK_RETRY, env={"THINGSBOARD_CA_CERT": str(untrusted)})
    gateway.start()
    thingsboard.wait_for(lambda: gateway.log_text().count("TLS verification failed") >= 3,
                         timeout=WAIT, message=gateway.log_tail())
    assert gateway.stop() == 0
    assert "exception was never retrieved" not in gateway.log_text()


def test_server_with_a_certificate_for_another_name_is_refused(
        make_gateway: GatewayFactory, tmp_path: Path, data_dir: Path) -> None:
    other_pki = make_pki(tmp_path / "other-pki", hostnames=("other.example",), ips=())
    with FakeThingsBoard(other_pki) as other_tb:
        gateway = make_gateway(config=QUICK_RETRY, env={
            "TB_PORT": str(other_tb.tls_port), "THINGSBOARD_CA_CERT": str(other_pki.ca_cert)})
        gateway.start()
        other_tb.wait_for(lambda: gateway.log_text().count("TLS verification failed") >= 2,
                          timeout=WAIT, message=gateway.log_tail())
        assert "Hostname mismatch" in gateway.log_text()
        assert gateway.running
        assert other_tb.provision_requests == []
        assert not (data_dir / TOKEN_FILE).exists()
        assert gateway.stop() == 0


# -- nothing is lost while provisioning waits -------------------------------------------------

def test_records_written_before_provisioning_answers_are_forwarded(
        make_gateway: GatewayFactory, thingsboard: FakeThingsBoard,
        queue_writer: QueueWriter, data_dir: Path) -> None:
    thingsboard.provision_mode = "silent"
    gateway = make_gateway(config=QUICK_RETRY)
    gateway.start()
    thingsboard.wait_for(lambda: len(thingsboard.provision_requests) >= 1, timeout=WAIT)
    written: list[tuple[int, int]] = []
    base_ts = now_ms() - 10_000
    for seq in range(300):
        queue_writer.write_record({"seq": seq}, ts_ms=base_ts + seq)
        written.append((base_ts + seq, seq))
        if seq % 100 == 99:
            # The intake takes them from the controller while provisioning still waits.
            thingsboard.wait_for(lambda: queue_writer.pending() == 0, timeout=WAIT)
    assert gateway.running
    assert not (data_dir / TOKEN_FILE).exists()
    assert thingsboard.telemetry() == []
    assert len(thingsboard.provision_requests) >= 1

    thingsboard.provision_mode = "success"
    thingsboard.wait_for(lambda: len(thingsboard.telemetry_values("seq")) >= 300, timeout=WAIT,
                         message="not every record was forwarded after provisioning")
    received = [(r["ts"], r["values"]["seq"]) for r in thingsboard.telemetry()
                if "seq" in r["values"]]
    assert sorted(received) == written, "every record exactly once, with its timestamp"
    assert gateway.stop() == 0
