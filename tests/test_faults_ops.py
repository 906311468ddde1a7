"""Hostile conditions in the operations, against a real gateway process: damaged OTA
packages, a full disk while unpacking, an https download redirected to http, damaged
state files. Each ends in a clear, reported failure and the device stays manageable.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import GatewayFactory, needs_mosquitto
from teg_gateway.operations.engine import CommandRepository, Nothing
from teg_gateway.operations.files import FileFacts, FileHash
from teg_gateway.operations.restart import RestartJob
from teg_gateway.sandbox.certs import Pki
from teg_gateway.sandbox.thingsboard import FakeThingsBoard
from test_ota import (
    PackageServer,
    controller_files,
    ota_state,
    running_version,
    start_gateway,
    states,
    tar_gz,
)


def _failed(tb: FakeThingsBoard) -> bool:
    return "FAILED" in states(tb)


@needs_mosquitto
def test_a_truncated_package_fails_once_and_the_running_version_stays(
        make_gateway: GatewayFactory, thingsboard: FakeThingsBoard, data_dir: Path) -> None:
    gateway = start_gateway(make_gateway, thingsboard, data_dir)
    package = tar_gz(controller_files("healthy", os.urandom(30_000)))
    # Cut inside the first tar block: reading its header already fails (EOFError).
    thingsboard.assign_package("sw", "ctl", "2.0", package[:100])
    thingsboard.wait_for(lambda: _failed(thingsboard), timeout=30,
                         message=f"no FAILED: {states(thingsboard)}")
    assert states(thingsboard) == ["DOWNLOADING", "DOWNLOADED", "VERIFIED", "FAILED"]
    error = thingsboard.telemetry_values("sw_error")[-1]
    assert "not a readable archive" in error, error
    assert running_version(data_dir) == "1.0"
    # Resolved for good: no step retried in the background.
    thingsboard.rpc("ping")
    # No step crashed (that would be a traceback in the log, which a user never sees).
    assert "OTA step failed unexpectedly" not in gateway.log_text()
    assert states(thingsboard) == ["DOWNLOADING", "DOWNLOADED", "VERIFIED", "FAILED"]
    assert ota_state(data_dir)["phase"] == "failed"
    assert not (data_dir / "controller" / "versions" / "2.0").exists()
    assert gateway.stop() == 0


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[None]:
    """Mount a tmpfs of ``size`` on ``path`` (root only), or skip saying why."""
    if os.geteuid() != 0:
        pytest.skip("a full disk is simulated with a small tmpfs, which needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@needs_mosquitto
def test_a_full_disk_while_unpacking_fails_the_update_and_frees_the_space(
        make_gateway: GatewayFactory, thingsboard: FakeThingsBoard, data_dir: Path) -> None:
    with small_tmpfs(data_dir, "6m"):
        gateway = start_gateway(make_gateway, thingsboard, data_dir)
        # Compresses to a few kilobytes, unpacks to 12 MB: more than the disk holds.
        package = tar_gz({**controller_files("healthy"), "zeros.bin": bytes(12 * 1024 * 1024)})
        thingsboard.assign_package("sw", "ctl", "2.0", package)
        thingsboard.wait_for(lambda: _failed(thingsboard), timeout=30,
                             message=f"no FAILED: {states(thingsboard)}")
        error = thingsboard.telemetry_values("sw_error")[-1]
        assert "no space left on the device while unpacking" in error, error
        assert running_version(data_dir) == "1.0"
        versions = data_dir / "controller" / "versions"
        assert sorted(p.name for p in versions.iterdir()) == ["1.0"]  # the half-unpacked tree
        free = os.statvfs(data_dir)
        assert free.f_bavail * free.f_frsize > 4 * 1024 * 1024  # ... is gone again
        thingsboard.rpc("ping")
        assert "OTA step failed unexpectedly" not in gateway.log_text()
        # Still manageable: a good version after the failed one is installed.
        thingsboard.clear()
        thingsboard.assign_package("sw", "ctl", "3.0", tar_gz(controller_files("healthy")))
        thingsboard.wait_for(lambda: "UPDATED" in states(thingsboard) or _failed(thingsboard),
                             timeout=30, message=f"no result: {states(thingsboard)}")
        assert states(thingsboard)[-1] == "UPDATED", thingsboard.telemetry_values("sw_error")
        assert gateway.stop() == 0


@needs_mosquitto
def test_a_damaged_ota_state_file_is_quarantined_and_reported(
        make_gateway: GatewayFactory, thingsboard: FakeThingsBoard, data_dir: Path) -> None:
    state = data_dir / "state"
    state.mkdir()
    (state / "ota.json").write_text('{"phase": "downloading", "job": {"version": "2.')
    gateway = start_gateway(make_gateway, thingsboard, data_dir)
    thingsboard.wait_for(lambda: _failed(thingsboard), timeout=20,
                         message=f"no FAILED: {states(thingsboard)}")
    error = thingsboard.telemetry_values("sw_error")[-1]
    assert "OTA state was damaged" in error and "ota.json" in error, error
    quarantined = list(state.glob("ota.json.corrupt-*"))
    assert len(quarantined) == 1
    assert quarantined[0].read_text().startswith('{"phase": "downloading"')
    assert gateway.stop() == 0



@needs_mosquitto
def test_an_https_package_url_redirected_to_http_is_refused(
        make_gateway: GatewayFactory, thingsboard: FakeThingsBoard, data_dir: Path,
        pki: Pki) -> None:
    secure, plain = PackageServer(pki), PackageServer(pki, tls=False)
    try:
        package = tar_gz(controller_files("healthy"))
        plain.files["ctl.tar.gz"] = package
        secure.redirects["ctl.tar.gz"] = plain.url("ctl.tar.gz", "http")
        secure.files["good.tar.gz"] = package
        # A loop of redirects on https only: bounded.
        secure.redirects["loop.tar.gz"] = secure.url("loop.tar.gz")
        gateway = start_gateway(make_gateway, thingsboard, data_dir,
                                url_ca_cert=str(pki.ca_cert))
        for version, name, error in (("2.0", "ctl.tar.gz", "is not an https URL"),
                                     ("3.0", "loop.tar.gz", "redirected more than 5 times")):
            thingsboard.clear()
            thingsboard.set_shared({"sw_title": "ctl", "sw_version": version,
                                    "sw_url": secure.url(name)})
            thingsboard.wait_for(lambda: _failed(thingsboard), timeout=30,
                                 message=f"{version}: no FAILED: {states(thingsboard)}")
            assert error in thingsboard.telemetry_values("sw_error")[-1]
            assert running_version(data_dir) == "1.0"
        assert plain.requests == []  # the http hop was never taken
        # A redirect to another https URL verified by the same CA is followed.
        secure.redirects["moved.tar.gz"] = secure.url("good.tar.gz")
        thingsboard.clear()
        thingsboard.set_shared({"sw_title": "ctl", "sw_version": "4.0",
                                "sw_url": secure.url("moved.tar.gz"),
                                "sw_checksum": hashlib.sha256(package).hexdigest()})
        thingsboard.wait_for(lambda: "UPDATED" in states(thingsboard) or _failed(thingsboard),
                             timeout=30, message=f"no result: {states(thingsboard)}")
        assert states(thingsboard)[-1] == "UPDATED", thingsboard.telemetry_values("sw_error")
        assert gateway.stop() == 0
    finally:
        secure.close()
        plain.close()


@needs_mosquitto
def test_remote_files_conflicts_ota_areas_and_hard_links_are_refused(
        make_gateway: GatewayFactory, thingsboard: FakeThingsBoard, data_dir: Path,
        tmp_path: Path) -> None:
    installed = data_dir / "controller" / "versions" / "1.0" / "app.py"
    installed.parent.mkdir(parents=True)
    installed.write_text("verified code\n")
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    os.link(secret, data_dir / "leak.txt")
    thingsboard.set_shared({
        "FILES": {
            "one": {"path": "$DATA_PATH/app.conf", "restart_controller_on_change": True},
            "two": {"path": "$DATA_PATH/./sub/../app.conf"},
            "code": {"path": "$DATA_PATH/controller/versions/1.0/app.py"},
            "part": {"path": "$DATA_PATH/ota/2.0.part"},
            "leak": {"path": "$DATA_PATH/leak.txt"},
            "good": {"path": "$DATA_PATH/good.txt"}},
        "FILE_CONTENT_one": "1", "FILE_CONTENT_two": "2", "FILE_CONTENT_code": "evil",
        "FILE_CONTENT_part": "evil", "FILE_CONTENT_good": "fine"})
    gateway = make_gateway({"files": {"poll_interval_s": 0.3}})
    gateway.start()
    thingsboard.wait_for(lambda: "good" in thingsboard.client_attributes.get(
        "FILE_HASHES", {}), timeout=20, message="the good file is written")

    def errors() -> dict[str, str]:
        found = [str(v) for v in thingsboard.telemetry_values("files_error")]
        return {e.split(":", 1)[0]: e for e in found}

    thingsboard.wait_for(lambda: len(errors()) >= 5, timeout=15,
                         message=f"five refusals, got {errors()}")
    by_key = errors()
    assert "also managed by two" in by_key["one"] and "also managed by one" in by_key["two"]
    assert "a file of the gateway itself" in by_key["code"]
    assert "a file of the gateway itself" in by_key["part"]
    assert "more than one hard link" in by_key["leak"]
    assert not (data_dir / "app.conf").exists()
    assert installed.read_text() == "verified code\n"
    assert not (data_dir / "ota" / "2.0.part").exists()
    assert thingsboard.client_attributes["FILE_READ_leak"] == "E_LINKED"
    assert "top secret" not in json.dumps(thingsboard.client_attributes)
    # A full pass again (init_files): still refused, nothing written, no restart.
    reply = thingsboard.rpc("init_files")["message"]
    assert '"controller_restarted": false' in reply and '"written": []' in reply, reply
    assert not (data_dir / "app.conf").exists()
    assert installed.read_text() == "verified code\n"
    assert gateway.stop() == 0


# -- damaged state of restart and remote files ----------------------------------------------


def _cut_at_the_end(path: Path) -> str:
    """Cut what the repository wrote before its closing bracket (every line before it
    stays whole), as a power cut in the middle of a write without fsync could."""
    whole = path.read_text()
    text = whole[:whole.rindex("]")]
    path.write_text(text)
    return text


@needs_mosquitto
def test_a_damaged_restart_state_ends_the_executing_restart_failed(
        make_gateway: GatewayFactory, thingsboard: FakeThingsBoard, data_dir: Path,
        tmp_path: Path) -> None:
    """An RPC reboot was executing (no local broker) when restart.json was damaged: the
    next start ends it failed with the reason, reports it, and takes new reboots."""
    boot_id = tmp_path / "boot_id"
    boot_id.write_text("boot-1\n")
    path = data_dir / "state" / "restart.json"
    path.parent.mkdir()
    repo = CommandRepository(path, RestartJob, Nothing)
    repo.load()
    repo.create("tb-rpc-7", RestartJob(boot_id="boot-0", via_bus=False), origin="gateway")
    text = _cut_at_the_end(path)
    gateway = make_gateway({"restart": {"command": ["false"], "boot_id_file": str(boot_id)}})
    gateway.start()
    thingsboard.wait_for(lambda: "failed" in thingsboard.telemetry_values("restart_status"),
                         timeout=20, message="no restart outcome")
    assert thingsboard.telemetry_values("restart_id") == ["tb-rpc-7"]
    reason = thingsboard.telemetry_values("restart_reason")[-1]
    assert reason.startswith("The gateway's restart state was damaged: ") and \
        "restart.json" in reason, reason
    assert [p.read_text() for p in path.parent.glob("restart.json.corrupt-*")] == [text]
    saved = json.loads(path.read_text())["commands"]
    assert [(c["id"], c["status"], c["reason"], c["delivered"]) for c in saved] == [
        ("tb-rpc-7", "failed", reason, True)]
    assert thingsboard.rpc("status")["message"]["restart_pending"] is None
    # A new reboot is taken (and fails here: the reboot command is `false`).
    assert "error" not in thingsboard.rpc("reboot")
    thingsboard.wait_for(lambda: len(thingsboard.telemetry_values("restart_status")) >= 3,
                         timeout=20, message="the new reboot is not reported")
    assert thingsboard.telemetry_values("restart_status")[-2:] == ["executing", "failed"]
    assert gateway.stop() == 0


@needs_mosquitto
def test_a_damaged_files_state_is_reported_and_the_files_still_kept(
        make_gateway: GatewayFactory, thingsboard: FakeThingsBoard, data_dir: Path) -> None:
    path = data_dir / "state" / "files.json"
    path.parent.mkdir()
    repo = CommandRepository(path, Nothing, FileFacts)
    repo.load()
    repo.set_facts(FileFacts({"a": FileHash("0" * 32, 1)}))
    path.write_text(path.read_text().replace('"commands": [', '"commands": \x00['))
    thingsboard.set_shared({"FILES": {"a": {"path": "$DATA_PATH/a.txt", "write_version": 2}},
                            "FILE_CONTENT_a": "A"})
    gateway = make_gateway()
    gateway.start()
    thingsboard.wait_for(lambda: thingsboard.client_attributes.get("FILE_HASHES", {}).get(
        "a", {}).get("write_version") == 2, timeout=20, message="a is not reconciled")
    assert (data_dir / "a.txt").read_text() == "A"
    errors = [str(e) for e in thingsboard.telemetry_values("files_error")]
    assert len(errors) == 1 and errors[0].startswith(
        "the file-management state was damaged: ") and "files.json" in errors[0], errors
    assert len(list(path.parent.glob("files.json.corrupt-*"))) == 1
    assert json.loads(path.read_text())["facts"]["hashes"]["a"]["write_version"] == 2
    assert gateway.stop() == 0
