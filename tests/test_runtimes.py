"""Controller runtimes: real child processes, a real git repository, the Docker SDK for real.

The report of a missing Docker SDK or engine is tested for real here; the Docker runtime
against a real engine is in ``test_docker_runtime.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import alive
from teg_gateway.config import Settings
from teg_gateway.controller.docker_runtime import (
    DockerRuntime,
    DockerUnavailable,
    image_name,
    parse_docker_time,
)
from teg_gateway.controller.factory import make_runtime
from teg_gateway.controller.process_runtime import ProcessRuntime, RotatingLog
from teg_gateway.controller.runtime import ControllerStartError, describe_exit, stop_on_shutdown
from teg_gateway.controller.versions import (
    ControllerPlaces,
    check_version,
    export_version,
    version_dir,
)
from teg_gateway.store.state import StateFile


def make_settings(tmp_path: Path, command: list[str], **controller: Any) -> Settings:
    settings = Settings()
    settings.paths.data = str(tmp_path / "data")
    settings.controller.runtime = "process"
    settings.controller.command = command
    settings.controller.stop_grace_s = 2.0
    for key, value in controller.items():
        setattr(settings.controller, key, value)
    return settings


def docker_runtime(settings: Settings, **options: Any) -> DockerRuntime:
    """A Docker runtime for ``settings``, as the gateway builds it."""
    return DockerRuntime(settings.controller, ControllerPlaces.of(settings), **options)


def script(tmp_path: Path, name: str, body: str) -> list[str]:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return [sys.executable, str(path)]


async def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


# -- process runtime ----------------------------------------------------------------------

ENV_DUMP = """
import json, os, sys
from pathlib import Path
out = Path(os.environ["TEG_DATA_PATH"]) / "env.json"
out.write_text(json.dumps({"cwd": os.getcwd(), "env": dict(os.environ)}))
print("hello from the controller")
print("to stderr", file=sys.stderr)
"""


def test_process_environment_working_dir_and_log(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THINGSBOARD_PROVISION_DEVICE_SECRET", "secret")
    monkeypatch.setenv("TB_HOST", "tb.example")
    settings = make_settings(tmp_path, script(tmp_path, "env.py", ENV_DUMP),
                             env={"EXTRA": "1"})
    settings.paths.controller_data = str(tmp_path / "cdata")
    runtime = ProcessRuntime(settings.controller, ControllerPlaces.of(settings))
    env_file = tmp_path / "cdata" / "env.json"

    async def run_once(version: str | None) -> dict[str, Any]:
        env_file.unlink(missing_ok=True)
        await runtime.start(version)
        assert runtime.started_at_ms() is not None
        assert runtime.version() == version
        await runtime.wait(5.0)
        assert not await runtime.is_running()
        assert runtime.last_exit() == 0
        result: dict[str, Any] = json.loads(env_file.read_text())
        return result

    async def main() -> None:
        # No version directory, no workdir: the controller data directory.
        seen = await run_once(None)
        assert seen["cwd"] == str(tmp_path / "cdata")
        env = seen["env"]
        assert env["TEG_DATA_PATH"] == str(tmp_path / "cdata")
        assert env["TEG_CONTROLLER_LOGS_PATH"] == str(tmp_path / "cdata" / "logs")
        assert env["TEG_CONTROLLER_VERSION"] == ""
        assert env["TEG_CONTROLLER_DIR"] == str(tmp_path / "cdata")
        assert env["EXTRA"] == "1"
        assert "THINGSBOARD_PROVISION_DEVICE_SECRET" not in env
        assert "TB_HOST" not in env
        assert "PATH" in env
        # A workdir, and a version whose directory does not exist: the workdir.
        workdir = tmp_path / "work"
        workdir.mkdir()
        settings.controller.workdir = str(workdir)
        seen = await run_once("1.0")
        assert seen["cwd"] == str(workdir)
        assert seen["env"]["TEG_CONTROLLER_VERSION"] == "1.0"
        # The version's directory exists: it wins.
        vdir = version_dir(settings, "1.0")
        vdir.mkdir(parents=True)
        seen = await run_once("1.0")
        assert seen["cwd"] == str(vdir)
        assert seen["env"]["TEG_CONTROLLER_DIR"] == str(vdir)

    asyncio.run(main())
    text = (tmp_path / "cdata" / "logs" / "controller.log").read_text()
    assert text.count("hello from the controller") == 3
    assert "to stderr" in text
    assert "ended: exit code 0" in text


def test_exit_code_is_remembered(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, script(tmp_path, "c.py", "import sys; sys.exit(7)\n"))
    runtime = ProcessRuntime(settings.controller, ControllerPlaces.of(settings))

    async def main() -> None:
        await runtime.start(None)
        await runtime.wait(5.0)
        assert not await runtime.is_running()
        assert runtime.started_at_ms() is None

    asyncio.run(main())
    assert runtime.last_exit() == 7
    assert describe_exit(runtime.last_exit()) == "exit code 7"


STUBBORN = """
import os, signal, subprocess, sys, time
from pathlib import Path
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"])
Path(os.environ["TEG_DATA_PATH"], "grandchild").write_text(str(child.pid))
print("ready", flush=True)
time.sleep(60)
"""


def test_stop_sends_sigterm_then_sigkill_to_the_whole_tree(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, script(tmp_path, "stubborn.py", STUBBORN),
                             stop_grace_s=0.3)
    runtime = ProcessRuntime(settings.controller, ControllerPlaces.of(settings))
    marker = tmp_path / "data" / "grandchild"

    async def main() -> int:
        await runtime.start(None)
        pid = runtime.pid
        assert pid is not None
        await wait_for(marker.exists)
        await asyncio.sleep(0.1)  # the signal handlers are installed before the marker
        await runtime.stop(settings.controller.stop_grace_s)
        assert not await runtime.is_running()
        assert not alive(pid)
        return int(marker.read_text())

    grandchild = asyncio.run(main())
    assert runtime.last_exit() == -9
    deadline = time.monotonic() + 3.0
    while alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not alive(grandchild), "the controller's child survived the stop"
    log_text = (tmp_path / "data" / "logs" / "controller.log").read_text()
    assert "killed by SIGKILL" in log_text


def test_stop_of_a_well_behaved_controller_is_sigterm(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, [sys.executable, "-c", "import time; time.sleep(60)"])
    runtime = ProcessRuntime(settings.controller, ControllerPlaces.of(settings))

    async def main() -> None:
        await runtime.start(None)
        await asyncio.sleep(0.1)
        await runtime.stop(5.0)
        await runtime.stop(5.0)  # stopping twice is harmless

    asyncio.run(main())
    assert describe_exit(runtime.last_exit()) == "killed by SIGTERM"


def test_missing_program_is_a_clear_start_error(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, [str(tmp_path / "no-such-controller")])
    runtime = ProcessRuntime(settings.controller, ControllerPlaces.of(settings))
    with pytest.raises(ControllerStartError, match=r"cannot start .*no-such-controller"):
        asyncio.run(runtime.start(None))


def test_orphan_of_an_earlier_gateway_is_stopped(tmp_path: Path) -> None:
    command = [sys.executable, "-c", "import time; time.sleep(60)"]
    settings = make_settings(tmp_path, command, stop_grace_s=1.0)
    state = StateFile(tmp_path / "data" / "state" / "controller.json")

    async def main() -> None:
        first = ProcessRuntime(settings.controller, ControllerPlaces.of(settings), state)
        await first.start(None)
        old = first.pid
        assert old is not None
        assert state.read()["process"]["pid"] == old
        # The gateway goes away without stopping it; the next one finds it.
        second = ProcessRuntime(settings.controller, ControllerPlaces.of(settings), state)
        await second.start(None)
        await wait_for(lambda: not alive(old))
        assert second.pid != old
        assert await second.is_running()
        await second.stop(1.0)
        assert state.read()["process"] is None

    asyncio.run(main())


def test_process_output_rotates(tmp_path: Path) -> None:
    body = "for i in range(400):\n    print(f'line {i:04d} ' + 'x' * 90)\n"
    settings = make_settings(tmp_path, script(tmp_path, "chatty.py", body),
                             log_max_bytes=4000, log_backups=2)
    runtime = ProcessRuntime(settings.controller, ControllerPlaces.of(settings))

    async def main() -> None:
        await runtime.start(None)
        await runtime.wait(5.0)
        assert not await runtime.is_running()

    asyncio.run(main())
    logs = tmp_path / "data" / "logs"
    names = sorted(p.name for p in logs.iterdir())
    assert names == ["controller.log", "controller.log.1", "controller.log.2"]
    for path in logs.iterdir():
        assert path.stat().st_size <= 4000
    assert "ended: exit code 0" in (logs / "controller.log").read_text()
    # Whole lines: rotation cuts at line ends.
    for path in logs.iterdir():
        assert path.read_text().endswith("\n")


def test_rotating_log_keeps_n_backups(tmp_path: Path) -> None:
    log = RotatingLog(tmp_path / "x.log", 100, 0)
    for _ in range(10):
        log.write(b"a" * 30 + b"\n")
    log.close()
    assert [p.name for p in tmp_path.iterdir()] == ["x.log"]
    assert (tmp_path / "x.log").stat().st_size <= 100
    log = RotatingLog(tmp_path / "y.log", 50, 3)
    log.write(b"b" * 500)  # no line end: cut at the size
    log.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "x.log", "y.log", "y.log.1", "y.log.2", "y.log.3"]


def test_version_names_are_checked() -> None:
    for good in ("1.0", "v2.3.4", "release_7", "1.0+build-2", "a" * 128):
        assert check_version(good) == good
    for bad in ("", "../x", "a/b", "..", "-rm", ".hidden", "a b", "x" * 129, "1..2", "v1\n"):
        with pytest.raises(ValueError, match="not allowed"):
            check_version(bad)
    assert image_name("V1.0+build") == "teg-controller-v1.0-build:latest"


def test_runtime_choice_and_stop_on_shutdown(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, ["true"])
    settings.controller.runtime = "none"
    assert make_runtime(settings) is None
    settings.controller.runtime = "process"
    process = make_runtime(settings)
    assert isinstance(process, ProcessRuntime)
    settings.controller.runtime = "docker"
    docker = make_runtime(settings)
    assert isinstance(docker, DockerRuntime)
    assert stop_on_shutdown(settings.controller, process)
    assert not stop_on_shutdown(settings.controller, docker)
    settings.controller.stop_on_shutdown = "always"
    assert stop_on_shutdown(settings.controller, docker)
    settings.controller.stop_on_shutdown = "never"
    assert not stop_on_shutdown(settings.controller, process)


def test_docker_times() -> None:
    assert parse_docker_time("0001-01-01T00:00:00Z") is None
    assert parse_docker_time("2024-05-06T07:08:09.123456789Z") == 1714979289123
    assert parse_docker_time("2024-05-06T09:08:09+02:00") == 1714979289000
    assert parse_docker_time("garbage") is None


# -- versions from git --------------------------------------------------------------------

def git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                          text=True, env=env).stdout


def make_repo(path: Path) -> Path:
    (path / "docker").mkdir(parents=True)
    git(path, "init", "-q")
    (path / "docker" / "Dockerfile").write_text("FROM scratch\n")
    (path / "docker" / "main.py").write_text("VERSION = 1\n")
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "one")
    git(path, "tag", "v1")
    (path / "docker" / "main.py").write_text("VERSION = 2\n")
    git(path, "commit", "-q", "-am", "two")
    git(path, "tag", "v2")
    return path


def test_export_version_from_git_leaves_the_working_tree_alone(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    (repo / "docker" / "main.py").write_text("VERSION = 'uncommitted'\n")
    settings = make_settings(tmp_path, ["true"])
    settings.paths.controller_git = str(repo)

    async def main() -> None:
        first = await export_version(settings, "v1")
        assert first == version_dir(settings, "v1")
        assert (first / "docker" / "main.py").read_text() == "VERSION = 1\n"
        second = await export_version(settings, "v2")
        assert (second / "docker" / "main.py").read_text() == "VERSION = 2\n"
        # A second call keeps what is there.
        assert await export_version(settings, "v1") == first
        with pytest.raises(ControllerStartError, match="neither a tag nor a commit"):
            await export_version(settings, "v9")

    asyncio.run(main())
    assert (repo / "docker" / "main.py").read_text() == "VERSION = 'uncommitted'\n"
    assert git(repo, "status", "--porcelain").strip() == "M docker/main.py"
    leftovers = [p.name for p in version_dir(settings, "v1").parent.iterdir()]
    assert sorted(leftovers) == ["v1", "v2"]


def test_export_without_a_source_says_so(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, ["true"])
    with pytest.raises(ControllerStartError, match="TEG_CONTROLLER_GIT_PATH"):
        asyncio.run(export_version(settings, "v1"))


def test_docker_build_context_follows_the_export(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, ["true"])
    settings.paths.controller_git = str(tmp_path / "repo")
    source = tmp_path / "export"
    (source / "docker").mkdir(parents=True)
    assert docker_runtime(settings).build_context(source) == (source / "docker", "./Dockerfile")
    (source / "docker").rmdir()
    assert docker_runtime(settings).build_context(source) == (source, "./Dockerfile")
    settings.paths.controller_dockercontext = str(tmp_path / "repo" / "images" / "ctl")
    settings.paths.controller_dockerfile = "Containerfile"
    assert docker_runtime(settings).build_context(source) == (source / "images" / "ctl",
                                                              "Containerfile")
    settings.paths.controller_dockercontext = "/opt/shared-context"
    assert docker_runtime(settings).build_context(source) == (Path("/opt/shared-context"),
                                                              "Containerfile")


# -- Docker: the missing SDK and engine, for real (a real engine: test_docker_runtime.py) --

def sdk_installed() -> bool:
    try:
        import docker  # noqa: F401
    except ImportError:
        return False
    return True


def test_missing_sdk_is_reported_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "docker", None)  # makes `import docker` fail
    runtime = docker_runtime(make_settings(tmp_path, ["true"]))
    hint = re.escape("not installed: pip install 'teg-gateway[docker]'")
    with pytest.raises(DockerUnavailable, match=hint):
        asyncio.run(runtime.ping())
    with pytest.raises(DockerUnavailable, match="not installed"):
        asyncio.run(runtime.is_running())


@pytest.mark.skipif(not sdk_installed(), reason="the Docker SDK is not installed "
                    "(pip install 'teg-gateway[docker]'); the missing-SDK report is tested")
def test_unreachable_engine_is_reported_clearly(tmp_path: Path) -> None:
    socket = tmp_path / "no-engine.sock"
    runtime = docker_runtime(make_settings(tmp_path, ["true"]),
                            base_url=f"unix://{socket}", call_timeout_s=5.0)

    async def main() -> None:
        for call in (runtime.ping(), runtime.is_running(), runtime.start("v1"),
                     runtime.stop(1.0)):
            with pytest.raises(DockerUnavailable,
                               match=f"cannot reach the Docker engine at unix://{socket}"):
                await call

    asyncio.run(main())


def test_the_example_controller_runs_under_the_process_runtime(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parent.parent / "examples" / "controller" / "controller.py"
    settings = make_settings(tmp_path, [sys.executable, str(example)],
                             env={"EXAMPLE_PERIOD_S": "0.05"})
    runtime = ProcessRuntime(settings.controller, ControllerPlaces.of(settings))
    queue = tmp_path / "data" / "communication_queue.db"

    def health_and_rows() -> tuple[int, int]:
        if not queue.exists():
            return 0, 0
        db = sqlite3.connect(queue)
        try:
            check = db.execute("SELECT max(timestamp_ms) FROM health_check").fetchone()[0]
            rows = db.execute("SELECT count(*) FROM messages").fetchone()[0]
        except sqlite3.OperationalError:
            return 0, 0
        finally:
            db.close()
        return int(check or 0), int(rows)

    async def main() -> None:
        await runtime.start("1.0")
        await wait_for(lambda: health_and_rows()[1] >= 3)
        first = health_and_rows()[0]
        await wait_for(lambda: health_and_rows()[0] > first)
        await runtime.stop(5.0)

    asyncio.run(main())
    assert runtime.last_exit() == 0  # it handled SIGTERM
    text = (tmp_path / "data" / "logs" / "controller.log").read_text()
    assert "example controller 1.0 writing to" in text
    assert "example controller stopped after" in text
