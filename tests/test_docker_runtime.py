"""The Docker runtime against a real container engine, and OTA through it.

The engine is podman's Docker-compatible API service on a private socket (or the engine
named by ``TEG_TEST_DOCKER_HOST``), driven through the Docker SDK exactly as a Docker
daemon would be; see ``container_engine.py``. The images are really built from a git
tag or an OTA package, the containers really run, write the queue database through the
bind-mounted data directory, crash, get killed and are replaced.

Every wait is bounded; nothing asserts on wall-clock time.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import GatewayFactory, needs_mosquitto
from container_engine import BASE_IMAGE, ContainerEngine, EngineUnavailable
from teg_gateway.config import Settings
from teg_gateway.controller.docker_runtime import (
    CONTAINER_NAME,
    VERSION_LABEL,
    DockerRuntime,
    image_name,
)
from teg_gateway.controller.runtime import ControllerStartError
from teg_gateway.controller.versions import ControllerPlaces
from teg_gateway.sandbox.process import GatewayProcess
from teg_gateway.sandbox.thingsboard import FakeThingsBoard
from test_forwarding import health_records, wait_connected, wait_until
from test_gateway_controller import with_state
from test_ota import ota_state, states, tar_gz

ROOT = Path(__file__).resolve().parent.parent

# The test controller: standard library only (the image has nothing else). Its mode is
# a file of its version, so each version behaves as built.
CONTROLLER = """
import json, os, signal, sqlite3, sys, time
from pathlib import Path

here = Path(__file__).resolve().parent
data = Path(os.environ["TEG_DATA_PATH"])
version = os.environ.get("TEG_CONTROLLER_VERSION", "")
mode = (here / "mode.txt").read_text().strip()
starts = data / "starts.log"
with starts.open("a") as fh:
    fh.write(json.dumps({"version": version, "mode": mode, "hostname": os.uname().nodename,
                         "env": {k: v for k, v in os.environ.items()
                                 if k.startswith(("TEG_", "TB_", "EXTRA_"))}}) + "\\n")
run = len(starts.read_text().splitlines())
print(f"test controller {version} run {run} ({mode})", flush=True)
if mode == "crash":
    sys.exit(3)
stopping = False


def on_sigterm(signum, frame):
    global stopping
    stopping = True


signal.signal(signal.SIGTERM, on_sigterm)
if mode == "silent":
    while not stopping:
        time.sleep(0.05)
    sys.exit(0)
db = sqlite3.connect(data / "communication_queue.db", timeout=10)
db.execute("PRAGMA journal_mode = WAL")
db.executescript(
    "CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY AUTOINCREMENT, "
    "type TEXT, message TEXT);"
    "CREATE TABLE IF NOT EXISTS health_check (id INTEGER PRIMARY KEY, timestamp_ms INTEGER);")
seq = 0
while not stopping:
    ts = time.time_ns() // 1_000_000
    body = {"ts": ts, "values": {"ctl_version": version, "ctl_run": run, "ctl_seq": seq}}
    with db:
        db.execute("INSERT INTO messages (type, message) VALUES ('telemetry', ?)",
                   (json.dumps(body),))
        db.execute("INSERT INTO health_check (id, timestamp_ms) VALUES (1, ?) ON CONFLICT "
                   "(id) DO UPDATE SET timestamp_ms = excluded.timestamp_ms", (ts,))
    seq += 1
    time.sleep(0.1)
db.close()
with (data / "stops.log").open("a") as fh:
    fh.write(json.dumps({"version": version, "run": run, "written": seq}) + "\\n")
"""

DOCKERFILE = f"""\
FROM {BASE_IMAGE}
COPY controller.py mode.txt /app/
CMD ["/usr/bin/python3", "-u", "/app/controller.py"]
"""


def controller_files(mode: str) -> dict[str, bytes]:
    return {"Dockerfile": DOCKERFILE.encode(), "controller.py": textwrap.dedent(CONTROLLER)
            .encode(), "mode.txt": mode.encode()}


# -- the engine ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine_or_reason(tmp_path_factory: pytest.TempPathFactory
                     ) -> Iterator[ContainerEngine | str]:
    try:
        engine = ContainerEngine(tmp_path_factory.mktemp("engine")).__enter__()
    except EngineUnavailable as exc:
        yield str(exc)
        return
    except Exception as exc:  # an engine that is there but broken: say how
        yield f"the container engine could not be prepared: {type(exc).__name__}: {exc}"
        return
    try:
        yield engine
    finally:
        engine.close()


@pytest.fixture
def engine(engine_or_reason: ContainerEngine | str) -> Iterator[ContainerEngine]:
    """The engine, with no controller container and no controller image before and after."""
    if isinstance(engine_or_reason, str):
        pytest.skip(engine_or_reason)
    engine_or_reason.remove_controller()
    yield engine_or_reason
    engine_or_reason.remove_controller()


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t",
                    *args], check=True, capture_output=True)


def controller_repo(path: Path, versions: dict[str, str], subdir: str = "docker") -> Path:
    """A git repository with one tag per version, each a controller in ``mode``."""
    (path / subdir).mkdir(parents=True)
    git(path, "init", "-q")
    for version, mode in versions.items():
        for name, data in controller_files(mode).items():
            (path / subdir / name).write_bytes(data)
        git(path, "add", "-A")
        git(path, "commit", "-q", "-m", version)
        git(path, "tag", version)
    return path


def lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    # Only complete lines: the controller may be writing the last one.
    return [json.loads(line) for line in path.read_text().split("\n")[:-1]]


def container(engine: ContainerEngine) -> Any:
    return engine.client.containers.get(CONTAINER_NAME)


def wait_for_output(found: Any, text: bytes, timeout: float = 30.0) -> bool:
    """Whether the container's output shows ``text`` within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while text not in found.logs():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


# -- the runtime on its own ----------------------------------------------------------------

def runtime_settings(tmp_path: Path, repo: Path) -> Settings:
    settings = Settings()
    settings.paths.data = str(tmp_path / "data")
    settings.paths.controller_git = str(repo)
    settings.controller.runtime = "docker"
    settings.controller.env = {"EXTRA_SETTING": "from the configuration"}
    return settings


def docker_runtime(settings: Settings, **options: Any) -> DockerRuntime:
    """A Docker runtime for ``settings``, as the gateway builds it."""
    return DockerRuntime(settings.controller, ControllerPlaces.of(settings), **options)


async def until(predicate: Any, what: str, timeout: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        await asyncio.sleep(0.05)


def readings(queue: Path) -> int:
    """Telemetry rows the controller wrote into its queue database so far."""
    if not queue.exists():
        return 0
    db = sqlite3.connect(queue, timeout=10)
    try:
        return int(db.execute("SELECT count(*) FROM messages WHERE type = 'telemetry'")
                   .fetchone()[0])
    except sqlite3.OperationalError:
        return 0
    finally:
        db.close()


def test_build_run_stop_and_restart_from_a_git_tag(engine: ContainerEngine,
                                                   tmp_path: Path) -> None:
    repo = controller_repo(tmp_path / "repo", {"v1": "healthy"})
    (repo / "docker" / "mode.txt").write_text("crash")  # uncommitted: not what v1 is
    settings = runtime_settings(tmp_path, repo)
    data = tmp_path / "data"
    runtime = docker_runtime(settings, base_url=engine.base_url, call_timeout_s=60.0)

    async def main() -> None:
        await runtime.start("v1")
        assert await runtime.is_running()
        assert runtime.version() == "v1"
        assert runtime.started_at_ms() is not None
        await until(lambda: readings(data / "communication_queue.db") >= 1,
                    "a first reading in the queue db")
        await until(lambda: bool(lines(data / "starts.log")), "the first start")
        await runtime.stop(5.0)
        assert not await runtime.is_running()
        assert runtime.last_exit() == 0  # SIGTERM, then a clean exit
        assert runtime.started_at_ms() is None
        await runtime.start("v1")  # the image is there: no second build
        assert await runtime.is_running()

    image_count = len(engine.client.images.list())
    asyncio.run(main())
    # One image per version, labelled, built from the tag (not the working tree).
    image = engine.client.images.get(image_name("v1"))
    assert image.labels[VERSION_LABEL] == "v1"
    assert len(engine.client.images.list()) == image_count + 1
    first = lines(data / "starts.log")[0]
    assert first["mode"] == "healthy" and first["version"] == "v1"
    assert first["env"] == {
        "TEG_DATA_PATH": str(data), "TEG_CONTROLLER_LOGS_PATH": str(data / "logs"),
        "TEG_CONTROLLER_VERSION": "v1", "EXTRA_SETTING": "from the configuration"}
    assert first["hostname"] == os.uname().nodename  # the host's network
    assert lines(data / "stops.log")[0]["written"] > 0
    running = container(engine)
    assert running.attrs["State"]["Running"]
    assert running.labels[VERSION_LABEL] == "v1"
    assert running.attrs["HostConfig"]["RestartPolicy"]["Name"] in ("no", "")
    assert wait_for_output(running, b"test controller v1 run 2 (healthy)")
    assert len(lines(data / "starts.log")) == 2


def test_a_broken_build_or_unknown_version_is_a_clear_start_error(engine: ContainerEngine,
                                                                    tmp_path: Path) -> None:
    repo = controller_repo(tmp_path / "repo", {"v1": "healthy"})
    (repo / "docker" / "Dockerfile").write_text(DOCKERFILE.replace("mode.txt", "missing.txt"))
    git(repo, "commit", "-q", "-am", "broken")
    git(repo, "tag", "v2")
    runtime = docker_runtime(runtime_settings(tmp_path, repo), base_url=engine.base_url,
                            call_timeout_s=60.0)

    async def start(version: str) -> str:
        with pytest.raises(ControllerStartError) as caught:
            await runtime.start(version)
        return str(caught.value)

    error = asyncio.run(start("v2"))
    assert error.startswith(f"docker build of {image_name('v2')} failed"), error
    assert "missing.txt" in error
    error = asyncio.run(start("v3"))
    assert "v3 is neither a tag nor a commit of the git repository" in error
    assert not asyncio.run(runtime.is_running())


def test_the_example_controller_runs_in_a_container(engine: ContainerEngine,
                                                    tmp_path: Path) -> None:
    example = ROOT / "examples" / "controller"
    repo = tmp_path / "repo"
    (repo / "docker").mkdir(parents=True)
    dockerfile = (example / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in dockerfile
    # The same Dockerfile on the local base image: no registry here.
    (repo / "docker" / "Dockerfile").write_text(
        dockerfile.replace("FROM python:3.11-slim", f"FROM {BASE_IMAGE}"))
    (repo / "docker" / "controller.py").write_bytes((example / "controller.py").read_bytes())
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "example")
    git(repo, "tag", "1.0")
    settings = runtime_settings(tmp_path, repo)
    settings.controller.env = {"EXAMPLE_PERIOD_S": "0.05"}
    runtime = docker_runtime(settings, base_url=engine.base_url, call_timeout_s=60.0)
    queue = tmp_path / "data" / "communication_queue.db"

    async def main() -> None:
        await runtime.start("1.0")
        await until(lambda: readings(queue) >= 5, "five readings from the container")
        await runtime.stop(10.0)

    asyncio.run(main())
    assert runtime.last_exit() == 0
    assert wait_for_output(container(engine), b"example controller stopped after")


# -- a gateway supervising a container -----------------------------------------------------

DOCKER_CONTROLLER: dict[str, Any] = {
    "runtime": "docker", "restart_min_s": 0.1, "restart_max_s": 1.0, "healthy_after_s": 60.0,
    "health_timeout_s": 30.0, "stop_grace_s": 5.0}


def docker_gateway(make_gateway: GatewayFactory, engine: ContainerEngine,
                   config: dict[str, dict[str, Any]], env: dict[str, str] | None = None
                   ) -> GatewayProcess:
    return make_gateway(config, env={"DOCKER_HOST": engine.base_url, **(env or {})})


def arrived(thingsboard: FakeThingsBoard, run: int) -> list[int]:
    return [r["values"]["ctl_seq"] for r in thingsboard.telemetry()
            if r["values"].get("ctl_run") == run]


@needs_mosquitto
def test_gateway_supervises_a_container_and_forwards_what_it_writes(
        engine: ContainerEngine, make_gateway: GatewayFactory, thingsboard: FakeThingsBoard,
        data_dir: Path, tmp_path: Path) -> None:
    repo = controller_repo(tmp_path / "repo", {"v1": "healthy"})
    config: dict[str, dict[str, Any]] = {
        "controller": {**DOCKER_CONTROLLER, "default_version": "v1"},
        "health": {"interval_s": 0.5}}
    gateway = docker_gateway(make_gateway, engine, config,
                             {"TEG_CONTROLLER_GIT_PATH": str(repo)})
    gateway.start()
    wait_connected(thingsboard, gateway)
    wait_until(lambda: len(arrived(thingsboard, 1)) >= 10, "records of the container",
               gateway)
    running = with_state(thingsboard, "running")[0]
    assert running["controller_version"] == "v1" and running["controller_restarts"] == 0
    wait_until(lambda: any(h.get("ms_since_controller_startup", 0) > 0
                           for h in health_records(thingsboard)),
               "health telemetry with the container's uptime", gateway)

    # Killed from outside: reported as a crash, started again.
    container(engine).kill()
    wait_until(lambda: bool(with_state(thingsboard, "crashed")) and len(
        lines(data_dir / "starts.log")) >= 2, "the killed container is replaced", gateway)
    crashed = with_state(thingsboard, "crashed")[0]
    assert crashed["controller_last_exit"] == "exit code 137", crashed  # 128 + SIGKILL
    wait_until(lambda: len(arrived(thingsboard, 2)) >= 5, "records of the new container",
               gateway)

    # A graceful gateway stop leaves the container running (docker's default) ...
    assert gateway.stop() == 0
    assert container(engine).attrs["State"]["Running"]
    kept = container(engine).id
    assert not lines(data_dir / "stops.log")
    # ... and the next gateway takes it over instead of starting another.
    gateway.start()
    wait_connected(thingsboard, gateway)
    written = len(arrived(thingsboard, 2))
    wait_until(lambda: len(arrived(thingsboard, 2)) >= written + 10,
               "records of the same container after the gateway's restart", gateway)
    assert len(lines(data_dir / "starts.log")) == 2
    assert container(engine).id == kept

    # The RPC restarts the container; then everything the run wrote has arrived.
    reply = thingsboard.rpc("restart_controller", timeout=60)
    assert reply.get("message", "").startswith((
        "controller restarted (container teg_controller, version v1)",
        "restart of the controller in progress")), reply
    wait_until(lambda: len(lines(data_dir / "stops.log")) == 1 and len(arrived(
        thingsboard, 3)) >= 3, "the container restarted by the RPC", gateway)
    stop = lines(data_dir / "stops.log")[0]
    assert stop["run"] == 2
    seqs = arrived(thingsboard, 2)
    assert set(seqs) == set(range(stop["written"])), "records of run 2 lost"
    assert gateway.stop() == 0


# -- OTA with the docker runtime -----------------------------------------------------------

def running_versions(data_dir: Path) -> list[str]:
    return [start["version"] for start in lines(data_dir / "starts.log")]


@needs_mosquitto
def test_ota_package_is_built_and_run_and_a_crashing_one_rolled_back(
        engine: ContainerEngine, make_gateway: GatewayFactory, thingsboard: FakeThingsBoard,
        data_dir: Path) -> None:
    first = data_dir / "controller" / "versions" / "1.0"
    first.mkdir(parents=True)
    for name, data in controller_files("healthy").items():
        (first / name).write_bytes(data)
    config: dict[str, dict[str, Any]] = {
        "controller": {**DOCKER_CONTROLLER, "default_version": "1.0", "healthy_after_s": 0.5},
        "ota": {"health_timeout_s": 20.0, "chunk_size": 4096, "chunk_timeout_s": 5.0,
                "keep_versions": 2}}
    gateway = docker_gateway(make_gateway, engine, config)
    gateway.start()
    wait_connected(thingsboard, gateway)
    wait_until(lambda: running_versions(data_dir)[-1:] == ["1.0"], "version 1.0 runs",
               gateway)

    thingsboard.assign_package("sw", "ctl", "2.0", tar_gz(controller_files("healthy")))
    wait_until(lambda: "UPDATED" in states(thingsboard) or "FAILED" in states(thingsboard),
               "the update to 2.0", gateway, timeout=120)
    assert states(thingsboard) == ["DOWNLOADING", "DOWNLOADED", "VERIFIED", "UPDATING",
                                   "UPDATED"], thingsboard.telemetry_values("sw_error")
    assert container(engine).labels[VERSION_LABEL] == "2.0"
    assert engine.client.images.get(image_name("2.0")).labels[VERSION_LABEL] == "2.0"
    assert running_versions(data_dir)[-1] == "2.0"

    thingsboard.clear()
    thingsboard.assign_package("sw", "ctl", "3.0", tar_gz(controller_files("crash")))
    wait_until(lambda: "FAILED" in states(thingsboard) or "UPDATED" in states(thingsboard),
               "the update to 3.0", gateway, timeout=120)
    assert states(thingsboard)[-1] == "FAILED"
    error = thingsboard.telemetry_values("sw_error")[-1]
    assert "rolled back to version 2.0" in error, error
    wait_until(lambda: running_versions(data_dir)[-1] == "2.0" and container(
        engine).labels[VERSION_LABEL] == "2.0", "2.0 runs again", gateway)
    assert "3.0" in running_versions(data_dir)
    assert ota_state(data_dir)["failed_version"] == "3.0"

    # A third version: the oldest versions go, their images with them.
    thingsboard.clear()
    thingsboard.assign_package("sw", "ctl", "4.0", tar_gz(controller_files("healthy")))
    wait_until(lambda: "UPDATED" in states(thingsboard) or "FAILED" in states(thingsboard),
               "the update to 4.0", gateway, timeout=120)
    assert states(thingsboard)[-1] == "UPDATED", thingsboard.telemetry_values("sw_error")
    versions = data_dir / "controller" / "versions"
    assert sorted(p.name for p in versions.iterdir()) == ["2.0", "4.0"]
    images = {tag.rsplit("/", 1)[-1] for image in engine.client.images.list()
              for tag in image.tags if "teg-controller-" in tag}
    assert images == {image_name("2.0"), image_name("4.0")}
    # The build output is in the gateway's log: there, the log line is the product.
    assert f"docker build {image_name('4.0')}: " in gateway.log_text()
    assert gateway.stop() == 0
