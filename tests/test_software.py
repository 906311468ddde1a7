"""thin-edge.io software management of the controller over the local bus, end to end: a
real gateway process, a real mosquitto as the device's broker, the ThingsBoard stand-in,
packages served over plain http on 127.0.0.1 (as thin-edge.io's file-transfer service
does), and real child processes as controller versions.

Every wait is bounded; nothing asserts on wall-clock time.
"""

from __future__ import annotations

import asyncio
import json
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import GatewayFactory, merge_config, needs_mosquitto
from teg_gateway.config import load_settings
from teg_gateway.operations.engine import (
    CommandChannel,
    CommandRepository,
    Nothing,
    PayloadError,
    Status,
)
from teg_gateway.operations.software import SoftwareOperation, parse_update_list
from teg_gateway.operations.update import Kind, UpdateFacts, UpdateJob, Updates
from teg_gateway.sandbox.broker import Mosquitto
from teg_gateway.sandbox.certs import Pki
from teg_gateway.sandbox.process import GatewayProcess
from teg_gateway.sandbox.thingsboard import FakeThingsBoard
from test_local_bus import BusClient, local_config, retained
from test_ota import (
    PackageServer,
    install_first_version,
    ota_config,
    running_version,
    starts,
    states,
    tar_gz,
)

LIST = "te/device/main///cmd/software_list"
UPDATE = "te/device/main///cmd/software_update"
RECORDS = 5

APP = """
import json, os, sys, time
from pathlib import Path
from teg_gateway.sandbox.controller import QueueWriter

here = Path(os.environ["TEG_CONTROLLER_DIR"])
data = Path(os.environ["TEG_DATA_PATH"])
version = os.environ["TEG_CONTROLLER_VERSION"]
mode = (here / "mode.txt").read_text().strip()
with open(data / "starts.log", "a") as fh:
    fh.write(json.dumps({"version": version, "dir": str(here), "mode": mode,
                         "pid": os.getpid()}) + "\\n")
if mode == "crash":
    sys.exit(3)
writer = QueueWriter(data)
if not (data / f"records-{version}").exists():
    for seq in range(RECORDS):
        writer.write_record({"ctl_version": version, "ctl_seq": seq})
    (data / f"records-{version}").write_text("written")
while True:
    writer.health_check()
    time.sleep(0.1)
""".replace("RECORDS", str(RECORDS))


def package(mode: str) -> bytes:
    return tar_gz({"app.py": textwrap.dedent(APP).encode(), "mode.txt": mode.encode()})


@pytest.fixture
def local(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(tmp_path / "local") as running:
        yield running


@pytest.fixture
def files(pki: Pki) -> Iterator[PackageServer]:
    """Plain http on 127.0.0.1, as thin-edge.io's file-transfer service."""
    server = PackageServer(pki, tls=False)
    yield server
    server.close()


def loopback_url(server: PackageServer, name: str) -> str:
    return f"http://127.0.0.1:{server.httpd.server_address[1]}/pkg/{name}"


def module(version: str, url: str | None = None, action: str = "install",
           name: str = "ctl") -> dict[str, Any]:
    found: dict[str, Any] = {"name": name, "version": version, "action": action}
    if url is not None:
        found["url"] = url
    return found


def update_request(*modules: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"status": "init", **extra,
            "updateList": [{"type": "teg-controller", "modules": list(modules)}]}


def final(bus: BusClient, topic: str, gateway: GatewayProcess,
          timeout: float = 40.0) -> dict[str, Any]:
    found = bus.wait_for_document(
        topic, lambda d: isinstance(d, dict) and d.get("status") in ("successful", "failed"),
        f"an outcome on {topic}", gateway, timeout)
    assert isinstance(found, dict)
    return found


def ask(bus: BusClient, topic: str, request: dict[str, Any],
        gateway: GatewayProcess) -> dict[str, Any]:
    """Publish ``request`` (retained, as a requester does) and return its outcome."""
    bus.publish(topic, request, retain=True)
    return final(bus, topic, gateway)


def statuses(bus: BusClient, topic: str) -> list[str]:
    return [d["status"] for d in bus.documents(topic) if isinstance(d, dict)]


def start(make_gateway: GatewayFactory, tb: FakeThingsBoard, data_dir: Path,
          local: Mosquitto) -> GatewayProcess:
    """A gateway on the local broker, running controller version 1.0."""
    install_first_version(data_dir)
    for name, data in {"app.py": textwrap.dedent(APP).encode(), "mode.txt": b"healthy"}.items():
        (data_dir / "controller" / "versions" / "1.0" / name).write_bytes(data)
    gateway = make_gateway(merge_config(ota_config(), local_config(local)))
    gateway.start()
    tb.wait_for(lambda: running_version(data_dir) == "1.0", timeout=20,
                message="controller 1.0 did not start")
    tb.wait_for(lambda: "current_sw_version" in str(tb.telemetry()), timeout=20,
                message="the gateway did not report its current version")
    return gateway


def records_of(tb: FakeThingsBoard, version: str) -> list[int]:
    return sorted(r["values"]["ctl_seq"] for r in tb.telemetry()
                  if r["values"].get("ctl_version") == version)


@needs_mosquitto
def test_install_list_and_remove_over_the_local_bus(
        make_gateway: GatewayFactory, thingsboard: FakeThingsBoard, data_dir: Path,
        local: Mosquitto, files: PackageServer) -> None:
    with BusClient(local, [LIST + "/+", UPDATE + "/+"]) as bus:
        gateway = start(make_gateway, thingsboard, data_dir, local)
        caps = retained(local, "te/device/main///cmd/+")
        assert json.loads(caps[LIST]) == {"types": ["teg-controller"]}
        assert json.loads(caps[UPDATE]) == {"types": ["teg-controller"]}

        # Install 2.0 from the file-transfer service: unknown fields come back unchanged.
        files.files["ctl-2.0.tar.gz"] = package("healthy")
        request = update_request(module("2.0", loopback_url(files, "ctl-2.0.tar.gz")),
                                 requester="test", tedgeUrl="x", note={"keep": [1, 2]})
        outcome = ask(bus, f"{UPDATE}/install-1", request, gateway)
        assert outcome == {**request, "status": "successful"}, outcome
        assert statuses(bus, f"{UPDATE}/install-1") == ["init", "executing", "successful"]
        assert running_version(data_dir) == "2.0"
        # ThingsBoard saw the update, and every record of the new version.
        thingsboard.wait_for(lambda: "UPDATED" in states(thingsboard), timeout=20,
                             message=f"ThingsBoard hears of the update: {states(thingsboard)}")
        assert states(thingsboard)[-5:] == ["DOWNLOADING", "DOWNLOADED", "VERIFIED",
                                            "UPDATING", "UPDATED"], states(thingsboard)
        assert thingsboard.telemetry_values("current_sw_version")[-1] == "2.0"
        assert thingsboard.telemetry_values("current_sw_title")[-1] == "ctl"
        thingsboard.wait_for(lambda: records_of(thingsboard, "2.0") == list(range(RECORDS)),
                             timeout=20, message="the records of version 2.0")
        assert files.requests == [("/pkg/ctl-2.0.tar.gz", None)]
        bus.publish(f"{UPDATE}/install-1", b"", retain=True)  # the requester clears it

        # The list: the running version first, then the versions on disk.
        listed = ask(bus, f"{LIST}/list-1", {"status": "init"}, gateway)
        assert listed["status"] == "successful"
        assert listed["currentSoftwareList"] == [{"type": "teg-controller", "modules": [
            {"name": "ctl", "version": "2.0"}, {"name": "teg-controller", "version": "1.0"}]}]

        # Remove the version kept on disk; the running one cannot be removed.
        removed = ask(bus, f"{UPDATE}/remove-1",
                      update_request(module("1.0", action="remove")), gateway)
        assert removed["status"] == "successful", removed
        assert not (data_dir / "controller" / "versions" / "1.0").exists()
        refused = ask(bus, f"{UPDATE}/remove-2",
                      update_request(module("2.0", action="remove")), gateway)
        assert refused["status"] == "failed" and "running" in refused["reason"], refused
        assert running_version(data_dir) == "2.0"
        listed = ask(bus, f"{LIST}/list-2", {"status": "init"}, gateway)
        assert listed["currentSoftwareList"][0]["modules"] == [{"name": "ctl", "version": "2.0"}]

        # Plain http anywhere but on loopback is refused, before any connection.
        far = ask(bus, f"{UPDATE}/far", update_request(
            module("3.0", "http://192.0.2.10/pkg/ctl-3.0.tar.gz")), gateway)
        assert far["status"] == "failed" and "loopback" in far["reason"], far
        # A version neither on disk nor with a url, and a request of another type.
        nourl = ask(bus, f"{UPDATE}/nourl", update_request(module("4.0")), gateway)
        assert "not on disk" in nourl["reason"], nourl
        apt = ask(bus, f"{UPDATE}/apt", {"status": "init", "updateList": [
            {"type": "apt", "modules": [{"name": "vim", "action": "install"}]}]}, gateway)
        assert "not managed here" in apt["reason"], apt
        assert running_version(data_dir) == "2.0"
        assert gateway.stop() == 0


@needs_mosquitto
def test_a_crashing_version_is_rolled_back_and_a_second_update_waits_or_is_refused(
        make_gateway: GatewayFactory, thingsboard: FakeThingsBoard, data_dir: Path,
        local: Mosquitto, files: PackageServer) -> None:
    with BusClient(local, [UPDATE + "/+"]) as bus:
        gateway = start(make_gateway, thingsboard, data_dir, local)
        files.files["ctl-3.0.tar.gz"] = package("crash")
        files.files["ctl-4.0.tar.gz"] = package("healthy")
        bus.publish(f"{UPDATE}/crash", update_request(
            module("3.0", loopback_url(files, "ctl-3.0.tar.gz"))), retain=True)
        bus.wait_for_document(f"{UPDATE}/crash", lambda d: d.get("status") == "executing",
                              "the first update executes", gateway)
        # A second local update while the first runs: refused, naming the first.
        second = ask(bus, f"{UPDATE}/second", update_request(
            module("4.0", loopback_url(files, "ctl-4.0.tar.gz"))), gateway)
        assert second["status"] == "failed", second
        assert "in progress" in second["reason"] and "crash" in second["reason"], second
        # A ThingsBoard announcement meanwhile is desired state: it waits.
        thingsboard.chunk_delay_s = 0.3
        thingsboard.assign_package("sw", "ctl", "5.0", package("healthy"))
        outcome = final(bus, f"{UPDATE}/crash", gateway)
        assert outcome["status"] == "failed", outcome
        assert "crashed" in outcome["reason"], outcome
        assert "rolled back to version 1.0" in outcome["reason"], outcome
        assert [s["version"] for s in starts(data_dir)].count("3.0") >= 3
        thingsboard.wait_for(lambda: any("rolled back to version 1.0" in str(e)
                                         for e in thingsboard.telemetry_values("sw_error")),
                             timeout=20, message="ThingsBoard hears of the rollback")
        # ... and is applied after the local update ended; a local update meanwhile is
        # refused, naming it.
        thingsboard.wait_for(lambda: thingsboard.chunk_requests > 0, timeout=20,
                             message=f"5.0 applied after: {states(thingsboard)}")
        third = ask(bus, f"{UPDATE}/third",
                    update_request(module("1.0", action="remove")), gateway)
        assert third["status"] == "failed", third
        assert "version 5.0 (from ThingsBoard)" in third["reason"], third
        assert (data_dir / "controller" / "versions" / "1.0").is_dir()
        thingsboard.wait_for(lambda: running_version(data_dir) == "5.0", timeout=40,
                             message=f"5.0 applied after: {states(thingsboard)}")
        thingsboard.wait_for(lambda: states(thingsboard)[-1] == "UPDATED", timeout=20,
                             message=f"5.0 updated: {states(thingsboard)}")
        assert files.requests == [("/pkg/ctl-3.0.tar.gz", None)]
        assert gateway.stop() == 0


@needs_mosquitto
def test_an_update_under_way_resumes_after_a_gateway_kill(
        make_gateway: GatewayFactory, thingsboard: FakeThingsBoard, data_dir: Path,
        local: Mosquitto, files: PackageServer) -> None:
    with BusClient(local, [UPDATE + "/+"]) as bus:
        gateway = start(make_gateway, thingsboard, data_dir, local)
        files.files["ctl-2.0.tar.gz"] = package("healthy")
        # The first answer stops early: the download waits a second before it retries,
        # and the gateway is killed meanwhile.
        files.cut_after = 100
        request = update_request(module("2.0", loopback_url(files, "ctl-2.0.tar.gz")),
                                 requester="resume-test")
        bus.publish(f"{UPDATE}/resume", request, retain=True)
        bus.wait_for_document(f"{UPDATE}/resume", lambda d: d.get("status") == "executing",
                              "the update executes", gateway)
        gateway.kill()
        saved = json.loads((data_dir / "state" / "software.json").read_text())
        assert [c["status"] for c in saved["commands"]] == ["executing"]
        gateway.start()
        outcome = final(bus, f"{UPDATE}/resume", gateway)
        assert outcome == {**request, "status": "successful"}, outcome
        assert running_version(data_dir) == "2.0"
        thingsboard.wait_for(lambda: records_of(thingsboard, "2.0") == list(range(RECORDS)),
                             timeout=20, message="the records of version 2.0")
        assert gateway.stop() == 0


# -- in-process: requests refused, damaged state files ---------------------------------------


def test_update_lists_that_are_refused_say_why() -> None:
    ok = parse_update_list(update_request(module("2.0", "https://h/p"),
                                          module("1.0", action="remove")))
    assert [(m.version, m.action) for m in ok] == [("2.0", "install"), ("1.0", "remove")]
    refused: list[tuple[dict[str, Any], str]] = [
            ({"status": "init"}, "updateList must be a non-empty list"),
            ({"updateList": [{"type": "apt", "modules": []}]}, "not managed here"),
            (update_request({"name": "x", "action": "install"}), "version"),
            (update_request(module("../1")), "version"),
            (update_request(module("2.0", action="purge")), "is not install or remove"),
            (update_request(module("2.0"), module("3.0")), "one teg-controller version"),
            (update_request(module("2.0", "https://h/" + "p" * 5000)), "too long"),
            (update_request(*[module(f"{n}.0", action="remove") for n in range(30)]),
             "more than 20")]
    for request, says in refused:
        with pytest.raises(PayloadError, match=says):
            parse_update_list(request)


class Recorder:
    """A local bus that acknowledges every publish and keeps what was published."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Any]] = []
        self.connected = asyncio.Event()
        self.connected.set()

    def publish(self, topic: str, payload: bytes) -> asyncio.Future[None]:
        self.sent.append((topic, json.loads(payload) if payload else None))
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut


def _operation(data: Path, reported: list[dict[str, Any]],
               bus: Recorder) -> SoftwareOperation:
    settings = load_settings(env={"TEG_DATA_PATH": str(data)})
    updates = Updates.of(settings, None, reported.append, data / "state" / "ota.json")
    return SoftwareOperation(updates, data / "state" / "software.json",
                             CommandChannel(bus.publish, bus.connected))


@pytest.mark.parametrize("damaged", ["software.json", "ota.json", "software.json-lost"])
def test_a_damaged_state_file_ends_the_update_it_held_failed(tmp_path: Path,
                                                             damaged: str) -> None:
    asyncio.run(_damaged_state(tmp_path, damaged))


async def _damaged_state(data: Path, damaged: str) -> None:
    lost = damaged.endswith("-lost")
    damaged = damaged.removesuffix("-lost")
    state = data / "state"
    state.mkdir()
    # A software_update under way (its update job too) when the gateway stopped.
    request = update_request(module("2.0", "http://127.0.0.1:1/p"), requester="me")
    software = CommandRepository(state / "software.json", Nothing, Nothing)
    software.load()
    software.create("software_update/u1",
                    Nothing(), extra={k: v for k, v in request.items() if k != "status"})
    jobs = CommandRepository(state / "ota.json", UpdateJob, UpdateFacts)
    jobs.load()
    jobs.create("te-u1", UpdateJob("2.0", "ctl", Kind.URL, url="http://127.0.0.1:1/p"),
                origin="local")
    target = state / damaged
    raw = target.read_bytes()
    # Garbage in the middle: the file does not parse, but each command line still reads
    # (or, "lost", nothing of it is left).
    target.write_bytes(b"\x00garbage" if lost else
                       raw.replace(b'"commands": [', b'"commands": \x00['))
    reported: list[dict[str, Any]] = []
    bus = Recorder()
    operation = _operation(data, reported, bus)
    await operation.run()
    if lost:
        # Its last state comes back from the broker (retained) at connect: ended.
        operation.on_update("u1", json.dumps({**request, "status": "executing"}).encode())
    for _ in range(50):
        if any(d and d.get("status") == "failed" for _t, d in bus.sent):
            break
        await asyncio.sleep(0.02)
    await operation.close()
    assert len(list(state.glob(f"{damaged}.corrupt-*"))) == 1
    topic, outcome = bus.sent[-1]
    assert topic == f"{UPDATE}/u1" and outcome["status"] == "failed", bus.sent
    assert "damaged" in outcome["reason"] and damaged in outcome["reason"], outcome
    assert outcome["requester"] == "me"
    if damaged == "ota.json":
        # ThingsBoard hears of it too.
        assert reported[0]["sw_state"] == "FAILED"
        assert "OTA state was damaged" in reported[0]["sw_error"]
    # Both files are whole again and the command is resolved for good.
    again = CommandRepository(state / "software.json", Nothing, Nothing)
    assert again.load() is None
    assert [c.status for c in again.commands.values()] == [Status.FAILED]
