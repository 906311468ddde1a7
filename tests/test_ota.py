"""Controller OTA end to end: a real gateway process, real mosquitto, the ThingsBoard
stand-in serving package chunks, and real child processes as controller versions.

Every wait is bounded (``thingsboard.wait_for``); nothing asserts on wall-clock time.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import ssl
import subprocess
import sys
import tarfile
import textwrap
import threading
import zipfile
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import mmh3
import pytest

from conftest import GatewayFactory, needs_mosquitto
from teg_gateway.operations.packages import (
    OtaError,
    checksum_forms,
    file_checksum_matches,
    unpack_package,
)
from teg_gateway.sandbox.certs import Pki
from teg_gateway.sandbox.process import GatewayProcess
from teg_gateway.sandbox.thingsboard import FakeThingsBoard

APP = """
import json, os, sys, time
from pathlib import Path
from teg_gateway.sandbox.controller import QueueWriter

here = Path(os.environ["TEG_CONTROLLER_DIR"])
data = Path(os.environ["TEG_DATA_PATH"])
mode = (here / "mode.txt").read_text().strip()
with open(data / "starts.log", "a") as fh:
    fh.write(json.dumps({"version": os.environ["TEG_CONTROLLER_VERSION"], "dir": str(here),
                         "mode": mode, "pid": os.getpid()}) + "\\n")
if mode == "crash":
    sys.exit(3)
if mode == "silent":
    time.sleep(600)
writer = QueueWriter(data)
while True:
    writer.health_check()
    time.sleep(0.1)
"""

HEALTH_TIMEOUT_S = 4.0


def controller_files(mode: str, extra: bytes = b"") -> dict[str, bytes]:
    files = {"app.py": textwrap.dedent(APP).encode(), "mode.txt": mode.encode()}
    if extra:
        files["payload.bin"] = extra
    return files


def tar_gz(files: dict[str, bytes], top: str = "controller") -> bytes:
    """A .tar.gz with everything inside one top-level directory (as `tar czf` makes it)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{top}/{name}" if top else name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buf.getvalue()


def ota_config(**ota: Any) -> dict[str, dict[str, Any]]:
    return {
        "controller": {"runtime": "process", "command": [sys.executable, "app.py"],
                       "default_version": "1.0", "restart_min_s": 0.1, "restart_max_s": 0.4,
                       "healthy_after_s": 0.5, "stop_grace_s": 2.0},
        "ota": {"health_timeout_s": HEALTH_TIMEOUT_S, "chunk_size": 1024,
                "chunk_timeout_s": 2.0, **ota},
    }


def install_first_version(data_dir: Path) -> None:
    vdir = data_dir / "controller" / "versions" / "1.0"
    vdir.mkdir(parents=True)
    for name, data in controller_files("healthy").items():
        (vdir / name).write_bytes(data)


def starts(data_dir: Path) -> list[dict[str, Any]]:
    path = data_dir / "starts.log"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def states(tb: FakeThingsBoard) -> list[str]:
    return [str(v) for v in tb.telemetry_values("sw_state")]


def ota_state(data_dir: Path) -> dict[str, Any]:
    """``ota.json`` seen as a whole: its facts, and ``phase``: the step of the update under
    way, else the outcome of the last one ("updated" or "failed")."""
    value = json.loads((data_dir / "state" / "ota.json").read_text())
    assert isinstance(value, dict) and value["format"] == 1
    commands = value["commands"]
    phase = "idle"
    if commands:
        last = commands[-1]
        phase = {"successful": "updated", "failed": "failed"}.get(
            last["status"], last["payload"]["step"])
    return {**value["facts"], "phase": phase}


def running_version(data_dir: Path) -> str | None:
    found = starts(data_dir)
    return found[-1]["version"] if found else None


def start_gateway(make_gateway: GatewayFactory, tb: FakeThingsBoard, data_dir: Path,
                  env: dict[str, str] | None = None, **ota: Any) -> GatewayProcess:
    """A gateway running controller version 1.0, healthy and connected."""
    if not (data_dir / "controller" / "versions" / "1.0").exists():
        install_first_version(data_dir)
    gateway = make_gateway(ota_config(**ota), env=env)
    gateway.start()
    tb.wait_for(lambda: running_version(data_dir) == "1.0", timeout=20,
                message="controller 1.0 did not start")
    tb.wait_for(lambda: "current_sw_version" in str(tb.telemetry()), timeout=20,
                message=f"the gateway did not report its current version: {tb.telemetry()[-3:]}")
    return gateway


# -- end to end ----------------------------------------------------------------------------


@needs_mosquitto
def test_package_update_end_to_end(make_gateway: GatewayFactory, thingsboard: FakeThingsBoard,
                                   data_dir: Path) -> None:
    gateway = start_gateway(make_gateway, thingsboard, data_dir)
    package = tar_gz(controller_files("healthy", os.urandom(5000)))
    thingsboard.assign_package("sw", "ctl", "2.0", package)
    thingsboard.wait_for(lambda: "UPDATED" in states(thingsboard) or "FAILED" in states(
        thingsboard), timeout=30, message=f"no result: {states(thingsboard)}")
    assert states(thingsboard) == ["DOWNLOADING", "DOWNLOADED", "VERIFIED", "UPDATING",
                                   "UPDATED"], thingsboard.telemetry_values("sw_error")
    assert thingsboard.telemetry_values("current_sw_version")[-1] == "2.0"
    assert thingsboard.telemetry_values("current_sw_title")[-1] == "ctl"
    last = starts(data_dir)[-1]
    vdir = data_dir / "controller" / "versions" / "2.0"
    assert last["version"] == "2.0" and last["dir"] == str(vdir)
    assert (vdir / "payload.bin").stat().st_size == 5000  # unpacked, top directory removed
    # Chunked: one fresh request id, chunks 0..n asked in order with the configured size.
    history = thingsboard.chunk_history()
    assert {h[1] for h in history} == {history[0][1]}
    assert [h[2] for h in history][:3] == [0, 1, 2] and {h[3] for h in history} == {1024}
    assert not list((data_dir / "ota").glob("*.part"))
    assert ota_state(data_dir)["phase"] == "updated"
    # The same version announced again does nothing.
    thingsboard.clear()
    thingsboard.set_shared({"sw_title": "ctl", "sw_version": "2.0"})
    thingsboard.rpc("ping")
    assert thingsboard.chunk_requests == 0
    assert gateway.stop() == 0


@needs_mosquitto
def test_checksum_mismatch_fails_and_keeps_the_running_version(
        make_gateway: GatewayFactory, thingsboard: FakeThingsBoard, data_dir: Path) -> None:
    gateway = start_gateway(make_gateway, thingsboard, data_dir)
    package = tar_gz(controller_files("healthy"))
    thingsboard.assign_package("sw", "ctl", "2.0", package, checksum_algorithm="SHA256",
                               checksum="0" * 64)
    thingsboard.wait_for(lambda: "FAILED" in states(thingsboard), timeout=30)
    assert states(thingsboard) == ["DOWNLOADING", "DOWNLOADED", "FAILED"]
    error = thingsboard.telemetry_values("sw_error")[-1]
    assert "checksum mismatch" in error and "0" * 64 in error
    assert not (data_dir / "controller" / "versions" / "2.0").exists()
    assert running_version(data_dir) == "1.0"
    assert not list((data_dir / "ota").glob("*.part"))
    assert gateway.stop() == 0


@needs_mosquitto
def test_download_resumes_after_a_gateway_kill(make_gateway: GatewayFactory,
                                               thingsboard: FakeThingsBoard,
                                               data_dir: Path) -> None:
    gateway = start_gateway(make_gateway, thingsboard, data_dir)
    thingsboard.chunk_delay_s = 0.03
    package = tar_gz(controller_files("healthy", os.urandom(80_000)))
    chunks = -(-len(package) // 1024)
    thingsboard.assign_package("sw", "ctl", "2.0", package, checksum_algorithm="MD5")
    thingsboard.wait_for(lambda: thingsboard.chunk_requests >= 20, timeout=30)
    gateway.kill()
    part = data_dir / "ota" / "2.0.part"
    have = part.stat().st_size
    assert have >= 10 * 1024
    before = len(thingsboard.chunk_history())
    thingsboard.chunk_delay_s = 0.0
    gateway.start()
    thingsboard.wait_for(lambda: "UPDATED" in states(thingsboard) or "FAILED" in states(
        thingsboard), timeout=40, message=f"no result: {states(thingsboard)}")
    assert states(thingsboard)[-1] == "UPDATED", thingsboard.telemetry_values("sw_error")
    after = thingsboard.chunk_history()[before:]
    # It went on from where the file ended, not from chunk 0.
    assert after[0][2] >= have // 1024 - 1 and after[0][2] > 0
    assert len(after) <= chunks - have // 1024 + 3
    assert running_version(data_dir) == "2.0"
    assert (data_dir / "controller" / "versions" / "2.0" / "payload.bin").stat().st_size \
        == 80_000
    assert gateway.stop() == 0


@needs_mosquitto
def test_version_that_crashes_on_start_is_rolled_back(make_gateway: GatewayFactory,
                                                      thingsboard: FakeThingsBoard,
                                                      data_dir: Path) -> None:
    gateway = start_gateway(make_gateway, thingsboard, data_dir)
    thingsboard.assign_package("sw", "ctl", "2.0", zip_bytes(controller_files("crash")),
                               checksum_algorithm="SHA512")
    thingsboard.wait_for(lambda: "FAILED" in states(thingsboard), timeout=30)
    assert states(thingsboard) == ["DOWNLOADING", "DOWNLOADED", "VERIFIED", "UPDATING",
                                   "FAILED"]
    error = thingsboard.telemetry_values("sw_error")[-1]
    assert "crashed" in error and "rolled back to version 1.0" in error
    thingsboard.wait_for(lambda: running_version(data_dir) == "1.0", timeout=10)
    assert [s["version"] for s in starts(data_dir)].count("2.0") >= 3
    assert ota_state(data_dir)["failed_version"] == "2.0"
    # Not retried until sw_version changes.
    thingsboard.clear()
    thingsboard.set_shared({"sw_title": "ctl", "sw_version": "2.0"})
    thingsboard.rpc("ping")
    assert thingsboard.chunk_requests == 0 and states(thingsboard) == []
    assert gateway.stop() == 0


@needs_mosquitto
def test_version_without_a_health_signal_is_rolled_back(make_gateway: GatewayFactory,
                                                        thingsboard: FakeThingsBoard,
                                                        data_dir: Path) -> None:
    gateway = start_gateway(make_gateway, thingsboard, data_dir)
    data = tar_gz(controller_files("silent"))
    thingsboard.assign_package("sw", "ctl", "2.0", data, checksum_algorithm="CRC32",
                               checksum=f"{zlib.crc32(data):08x}")
    thingsboard.wait_for(lambda: "FAILED" in states(thingsboard), timeout=30)
    error = thingsboard.telemetry_values("sw_error")[-1]
    assert "no health signal" in error and "rolled back to version 1.0" in error
    thingsboard.wait_for(lambda: running_version(data_dir) == "1.0", timeout=10)
    assert gateway.stop() == 0


@needs_mosquitto
def test_kill_between_switch_and_health_is_resolved_on_the_next_start(
        make_gateway: GatewayFactory, thingsboard: FakeThingsBoard, data_dir: Path) -> None:
    gateway = start_gateway(make_gateway, thingsboard, data_dir)
    thingsboard.assign_package("sw", "ctl", "2.0", tar_gz(controller_files("silent")))
    thingsboard.wait_for(lambda: running_version(data_dir) == "2.0", timeout=30)
    assert ota_state(data_dir)["phase"] == "switching"
    gateway.kill()
    thingsboard.clear()
    gateway.start()
    thingsboard.wait_for(lambda: "FAILED" in states(thingsboard), timeout=30)
    error = thingsboard.telemetry_values("sw_error")[-1]
    assert "rolled back to version 1.0" in error
    thingsboard.wait_for(lambda: running_version(data_dir) == "1.0", timeout=10)
    state = ota_state(data_dir)
    assert state["phase"] == "failed" and state["failed_version"] == "2.0"
    assert gateway.stop() == 0


@needs_mosquitto
def test_old_versions_are_removed_keeping_the_running_one_and_its_predecessor(
        make_gateway: GatewayFactory, thingsboard: FakeThingsBoard, data_dir: Path) -> None:
    gateway = start_gateway(make_gateway, thingsboard, data_dir, keep_versions=2)
    versions = data_dir / "controller" / "versions"
    for version in ("2.0", "3.0", "4.0"):
        thingsboard.clear()
        thingsboard.assign_package("sw", "ctl", version, tar_gz(controller_files("healthy")))
        thingsboard.wait_for(lambda: "UPDATED" in states(thingsboard) or "FAILED" in states(
            thingsboard), timeout=30, message=f"no result for {version}")
        assert states(thingsboard)[-1] == "UPDATED", thingsboard.telemetry_values("sw_error")
        assert running_version(data_dir) == version
    # 4.0 runs, 3.0 is the rollback target: 1.0 and 2.0 are gone, nothing else touched.
    assert sorted(p.name for p in versions.iterdir()) == ["3.0", "4.0"]
    log = gateway.log_text()
    assert "removing old controller version 1.0" in log
    assert "removing old controller version 2.0" in log
    assert gateway.stop() == 0


class PackageServer:
    """A real HTTPS server (the test PKI) for packages stored outside ThingsBoard: serves
    ``files`` at ``/pkg/<name>`` with range requests, and records each request's path
    and Range header. ``cut_after`` makes the next answer stop after that many bytes."""

    def __init__(self, pki: Pki, tls: bool = True) -> None:
        self.files: dict[str, bytes] = {}
        self.redirects: dict[str, str] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.cut_after: int | None = None
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append((self.path, self.headers.get("Range")))
                location = server.redirects.get(self.path.removeprefix("/pkg/"))
                if location is not None:
                    self.send_response(302)
                    self.send_header("Location", location)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = server.files.get(self.path.removeprefix("/pkg/"))
                if data is None:
                    self.send_error(404, "no such package")
                    return
                start = 0
                wanted = self.headers.get("Range") or ""
                if wanted.startswith("bytes=") and wanted.endswith("-"):
                    start = int(wanted[6:-1])
                    self.send_response(206)
                    self.send_header("Content-Range",
                                     f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if server.cut_after is not None:
                    body, server.cut_after = body[:server.cut_after], None
                    self.close_connection = True
                self.wfile.write(body)

            def log_message(self, *_args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(pki.server_cert, pki.server_key)
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str, scheme: str = "https") -> str:
        return f"{scheme}://localhost:{self.httpd.server_address[1]}/pkg/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def package_server(pki: Pki) -> Iterator[PackageServer]:
    server = PackageServer(pki)
    yield server
    server.close()


@needs_mosquitto
def test_package_from_a_url_resumes_after_a_cut_connection(
        make_gateway: GatewayFactory, thingsboard: FakeThingsBoard, data_dir: Path,
        package_server: PackageServer, pki: Pki) -> None:
    gateway = start_gateway(make_gateway, thingsboard, data_dir, url_ca_cert=str(pki.ca_cert))
    package = tar_gz(controller_files("healthy", os.urandom(300_000)))
    package_server.files["ctl-2.0.tar.gz"] = package
    package_server.cut_after = 100_000
    thingsboard.set_shared({"sw_title": "ctl", "sw_version": "2.0",
                            "sw_url": package_server.url("ctl-2.0.tar.gz"),
                            "sw_checksum": hashlib.sha256(package).hexdigest(),
                            "sw_checksum_algorithm": "SHA256", "sw_size": len(package)})
    thingsboard.wait_for(lambda: "UPDATED" in states(thingsboard) or "FAILED" in states(
        thingsboard), timeout=30, message=f"no result: {states(thingsboard)}")
    assert states(thingsboard) == ["DOWNLOADING", "DOWNLOADED", "VERIFIED", "UPDATING",
                                   "UPDATED"], thingsboard.telemetry_values("sw_error")
    # Cut after 100,000 bytes, then resumed from there, not from byte 0.
    assert package_server.requests == [("/pkg/ctl-2.0.tar.gz", None),
                                       ("/pkg/ctl-2.0.tar.gz", "bytes=100000-")]
    assert thingsboard.chunk_requests == 0
    assert running_version(data_dir) == "2.0"
    assert (data_dir / "controller" / "versions" / "2.0" / "payload.bin").stat().st_size \
        == 300_000
    assert "the connection ended after 100000 of" in gateway.log_text() or \
        "the connection broke at byte 100000" in gateway.log_text()
    assert gateway.stop() == 0


@needs_mosquitto
def test_package_urls_refused_and_one_without_a_checksum(
        make_gateway: GatewayFactory, thingsboard: FakeThingsBoard, data_dir: Path,
        package_server: PackageServer, pki: Pki) -> None:
    gateway = start_gateway(make_gateway, thingsboard, data_dir, url_ca_cert=str(pki.ca_cert))
    package_server.files["ctl.tar.gz"] = tar_gz(controller_files("healthy"))
    for version, url, error in (
            ("2.0", package_server.url("ctl.tar.gz", "http"),
             "(plain http needs [ota] allow_http = true)"),
            ("3.0", package_server.url("missing.tar.gz"), "HTTP 404"),
            ("4.0", "ftp://localhost/ctl.tar.gz", "is not an https URL")):
        thingsboard.clear()
        thingsboard.set_shared({"sw_title": "ctl", "sw_version": version, "sw_url": url})
        thingsboard.wait_for(lambda: "FAILED" in states(thingsboard), timeout=30,
                             message=f"{version} did not fail: {states(thingsboard)}")
        assert error in thingsboard.telemetry_values("sw_error")[-1]
        assert running_version(data_dir) == "1.0"
    thingsboard.clear()
    thingsboard.set_shared({"sw_title": "ctl", "sw_version": "5.0",
                            "sw_url": package_server.url("ctl.tar.gz")})
    thingsboard.wait_for(lambda: "UPDATED" in states(thingsboard) or "FAILED" in states(
        thingsboard), timeout=30, message=f"no result: {states(thingsboard)}")
    assert states(thingsboard)[-1] == "UPDATED", thingsboard.telemetry_values("sw_error")
    assert "comes without a checksum: its integrity rests on TLS alone" in gateway.log_text()
    assert gateway.stop() == 0


@needs_mosquitto
def test_git_release_update(make_gateway: GatewayFactory, thingsboard: FakeThingsBoard,
                            data_dir: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)

    git("init", "-q")
    for name, data in controller_files("healthy").items():
        (repo / name).write_bytes(data)
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "v2")
    git("tag", "v2.0")
    (repo / "mode.txt").write_text("work in progress")  # the working tree stays as it is
    gateway = start_gateway(make_gateway, thingsboard, data_dir,
                            env={"TEG_CONTROLLER_GIT_PATH": str(repo)})
    thingsboard.set_shared({"sw_title": "ctl", "sw_version": "v2.0"})
    thingsboard.wait_for(lambda: "UPDATED" in states(thingsboard) or "FAILED" in states(
        thingsboard), timeout=30)
    assert states(thingsboard)[-1] == "UPDATED", thingsboard.telemetry_values("sw_error")
    assert thingsboard.chunk_requests == 0
    assert running_version(data_dir) == "v2.0"
    assert (data_dir / "controller" / "versions" / "v2.0" / "mode.txt").read_text() == "healthy"
    assert (repo / "mode.txt").read_text() == "work in progress"
    assert gateway.stop() == 0


@needs_mosquitto
def test_git_version_without_a_repository_fails_clearly(make_gateway: GatewayFactory,
                                                        thingsboard: FakeThingsBoard,
                                                        data_dir: Path) -> None:
    gateway = start_gateway(make_gateway, thingsboard, data_dir)
    thingsboard.set_shared({"sw_title": "ctl", "sw_version": "v9"})
    thingsboard.wait_for(lambda: "FAILED" in states(thingsboard), timeout=30)
    assert "TEG_CONTROLLER_GIT_PATH" in thingsboard.telemetry_values("sw_error")[-1]
    assert running_version(data_dir) == "1.0"
    assert gateway.stop() == 0


# -- the parts -----------------------------------------------------------------------------


def test_checksum_algorithms_match_independent_implementations(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)  # more than one hashing block
    path = tmp_path / "pkg"
    path.write_bytes(data)
    expected = {
        "MD5": hashlib.md5(data).hexdigest(),
        "SHA256": hashlib.sha256(data).hexdigest(),
        "SHA384": hashlib.sha384(data).hexdigest().upper(),
        "SHA512": hashlib.sha512(data).hexdigest(),
        "CRC32": f"{zlib.crc32(data):08x}",
        "MURMUR3_32": f"{mmh3.hash(data, signed=False):x}",
        "MURMUR3_128": f"{mmh3.hash128(data, signed=False):x}",
    }
    for algorithm, checksum in expected.items():
        assert file_checksum_matches(path, algorithm, checksum)[0], algorithm
        assert not file_checksum_matches(path, algorithm, "1234abcd")[0], algorithm
    # Guava (ThingsBoard's server side) prints CRC32 / Murmur bytes little-endian.
    crc = zlib.crc32(data).to_bytes(4, "little").hex()
    assert file_checksum_matches(path, "CRC32", crc)[0]
    assert mmh3.hash_bytes(data).hex() in checksum_forms("MURMUR3_128", _mmh128(data))
    with pytest.raises(OtaError, match="not supported"):
        file_checksum_matches(path, "SHA1", "x")


def _mmh128(data: bytes) -> Any:
    hasher = mmh3.mmh3_x64_128()
    hasher.update(data)
    return hasher


def test_unpacking_refuses_members_outside_the_target(tmp_path: Path) -> None:
    bad_tar = tmp_path / "bad.tar.gz"
    bad_tar.write_bytes(tar_gz({"../../evil.txt": b"x", "ok.txt": b"y"}, top=""))
    with pytest.raises(OtaError, match="outside"):
        unpack_package(bad_tar, tmp_path / "t1", 10**6)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as archive:
        link = tarfile.TarInfo("link")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        archive.addfile(link)
    (tmp_path / "link.tar.gz").write_bytes(buf.getvalue())
    with pytest.raises(OtaError, match="refused"):
        unpack_package(tmp_path / "link.tar.gz", tmp_path / "t2", 10**6)
    bad_zip = tmp_path / "bad.zip"
    bad_zip.write_bytes(zip_bytes({"/abs.txt": b"x"}))
    with pytest.raises(OtaError, match="outside"):
        unpack_package(bad_zip, tmp_path / "t3", 10**6)
    assert not (tmp_path / "evil.txt").exists() and not Path("/abs.txt").exists()
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"just bytes")
    with pytest.raises(OtaError, match=r"neither a \.tar\.gz nor a \.zip"):
        unpack_package(plain, tmp_path / "t4", 10**6)
    big = tmp_path / "big.zip"
    big.write_bytes(zip_bytes({"a": b"0" * 5000}))
    with pytest.raises(OtaError, match="more than"):
        unpack_package(big, tmp_path / "t5", 1000)


def test_unpacking_keeps_flat_archives_and_unwraps_one_top_directory(tmp_path: Path) -> None:
    flat = tmp_path / "flat.zip"
    flat.write_bytes(zip_bytes({"app.py": b"a", "lib/x.py": b"b"}))
    unpack_package(flat, tmp_path / "flat", 10**6)
    assert (tmp_path / "flat" / "app.py").read_bytes() == b"a"
    assert (tmp_path / "flat" / "lib" / "x.py").read_bytes() == b"b"
    wrapped = tmp_path / "wrapped.tar.gz"
    wrapped.write_bytes(tar_gz({"app.py": b"a"}, top="release-2.0"))
    unpack_package(wrapped, tmp_path / "wrapped", 10**6)
    assert [p.name for p in (tmp_path / "wrapped").iterdir()] == ["app.py"]


def _damaged_packages() -> dict[str, bytes]:
    """Archives that break while being read, each in its own way."""
    good_tar = tar_gz(controller_files("healthy", os.urandom(20_000)))
    good_zip = zip_bytes({"app.py": b"print('hi')\n" * 200, "data.bin": os.urandom(5000)})
    bad_crc = bytearray(good_zip)
    bad_crc[good_zip.index(b"data.bin") + 8 + 100] ^= 0xFF  # a byte of the stored data
    false_size = bytearray(zip_bytes({"app.py": b"x" * 3000}))
    # The central directory's uncompressed size of app.py, false (smaller than the data).
    cd = false_size.rindex(b"PK\x01\x02")
    false_size[cd + 24:cd + 28] = (1000).to_bytes(4, "little")
    deflated = io.BytesIO()
    with zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("app.py", b"y" * 50_000)
    broken_stream = bytearray(deflated.getvalue())
    start = broken_stream.index(b"app.py") + 6
    broken_stream[start + 10:start + 30] = b"\xff" * 20  # a damaged deflate stream
    file_then_dir = zip_bytes({"lib": b"a file", "lib/x.py": b"b"})
    return {"truncated.tar.gz": good_tar[: len(good_tar) // 2],
            "truncated-in-first-block.tar.gz": good_tar[:100],
            "bad-crc.zip": bytes(bad_crc), "false-size.zip": bytes(false_size),
            "broken-deflate.zip": bytes(broken_stream), "file-then-dir.zip": file_then_dir}


@pytest.mark.parametrize("name", sorted(_damaged_packages()))
def test_a_damaged_package_is_refused_with_a_reason(tmp_path: Path, name: str) -> None:
    package = tmp_path / name
    package.write_bytes(_damaged_packages()[name])
    with pytest.raises(OtaError) as caught:
        unpack_package(package, tmp_path / "out", 10**7)
    assert str(caught.value) and len(str(caught.value)) < 1200


def _tar_with(*members: tuple[str, bytes | str | int]) -> bytes:
    """A .tar.gz of (name, content): bytes = file, str = symlink target, int = tar type."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as archive:
        for name, what in members:
            info = tarfile.TarInfo(name)
            if isinstance(what, bytes):
                info.size = len(what)
                info.mode = 0o4755
                archive.addfile(info, io.BytesIO(what))
            elif isinstance(what, str):
                info.type, info.linkname = tarfile.SYMTYPE, what
                archive.addfile(info)
            else:
                info.type = bytes([what])
                archive.addfile(info)
    return buf.getvalue()


@pytest.mark.parametrize("use_filter", [True, False])
def test_tar_checks_hold_with_and_without_the_tarfile_filter(tmp_path: Path,
                                                             use_filter: bool) -> None:
    from teg_gateway.operations.packages import HAS_TAR_FILTER, _unpack_tar
    if use_filter and not HAS_TAR_FILTER:
        pytest.skip("this Python's tarfile has no extraction filter")
    refused = {
        "escape-through-dot-link": _tar_with(("s", "."), ("t", "s/.."), ("t/evil", b"x")),
        "absolute-link": _tar_with(("l", "/etc")),
        "write-through-link": _tar_with(("l", ".."), ("l/evil", b"x")),
        "fifo": _tar_with(("f", ord(tarfile.FIFOTYPE))),
        "device": _tar_with(("d", ord(tarfile.CHRTYPE))),
    }
    for name, data in refused.items():
        package = tmp_path / f"{name}.tar.gz"
        package.write_bytes(data)
        dest = tmp_path / name
        dest.mkdir()
        with pytest.raises(OtaError, match="refused"):
            _unpack_tar(package, dest, 10**6, use_filter=use_filter)
        assert not (tmp_path / "evil").exists(), name
    package = tmp_path / "fine.tar.gz"
    package.write_bytes(_tar_with(("bin/tool", b"#!/bin/sh\n"), ("tool", "bin/tool")))
    dest = tmp_path / "fine"
    dest.mkdir()
    _unpack_tar(package, dest, 10**6, use_filter=use_filter)
    assert (dest / "tool").read_bytes() == b"#!/bin/sh\n"
    assert (dest / "bin" / "tool").stat().st_mode & 0o7000 == 0  # no set-uid from a package


def test_an_ota_state_of_an_earlier_release_is_read_and_the_update_resumes(
        tmp_path: Path) -> None:
    from teg_gateway.config import load_settings
    from teg_gateway.operations.engine import Status
    from teg_gateway.operations.update import Kind, Step, Updates

    settings = load_settings(env={"TEG_DATA_PATH": str(tmp_path)})
    path = tmp_path / "state" / "ota.json"
    path.parent.mkdir()
    desired = {"title": "ctl", "version": "2.0", "kind": "package", "checksum": "ab",
               "algorithm": "SHA256", "size": 10}
    path.write_text(json.dumps({
        "phase": "switching", "desired": desired, "package_info": desired,
        "current": {"title": "ctl", "version": "1.0"}, "failed_version": None,
        "request_counter": 4,
        "job": {**desired, "request_id": "4", "resumes": 0, "restarted": True,
                "previous": "1.0"}}))
    reported: list[dict[str, Any]] = []
    updates = Updates.of(settings, None, reported.append, path)
    assert updates.load() is None and reported == []
    facts = updates.facts
    assert facts.desired is not None and facts.desired.version == "2.0"
    assert facts.desired.kind is Kind.PACKAGE and not facts.desired_done
    assert (facts.current_version, facts.request_counter) == ("1.0", 4)
    active = updates.active()
    assert active is not None and active.status is Status.EXECUTING
    assert active.payload.step is Step.SWITCHING and active.payload.previous == "1.0"
    assert active.payload.restarted and active.payload.request_id == "4"
    # Written back in the new layout at the next change.
    updates.save_facts()
    assert json.loads(path.read_text())["format"] == 1
    # A finished update of an earlier release: nothing under way, the version done.
    path.write_text(json.dumps({"phase": "failed", "desired": desired, "job": None,
                                "failed_version": "2.0",
                                "current": {"title": "ctl", "version": "1.0"}}))
    again = Updates.of(settings, None, reported.append, path)
    again.load()
    assert again.active() is None and again.facts.desired_done
    assert again.facts.failed_version == "2.0"
