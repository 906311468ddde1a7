"""A real container engine for the Docker runtime's tests.

``TEG_TEST_DOCKER_HOST`` names an engine to use (a Docker daemon, say:
``unix:///var/run/docker.sock``). Without it, podman's Docker-compatible API service is
started on a private socket, with its own storage in a temporary directory, so the tests
touch nothing of the machine's own containers. ``scripts/setup`` installs podman and runc
from Debian's packages.

Controller images are built ``FROM`` :data:`BASE_IMAGE`, made here from the machine's
own Debian ``python3.11`` (the interpreter, its standard library and the shared libraries
they load) and imported through the Docker API: no registry is needed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any

from teg_gateway.controller.docker_runtime import CONTAINER_NAME

BASE_IMAGE = "teg-test-python:1"
HOST_PYTHON = Path("/usr/bin/python3.11")
STDLIB = Path("/usr/lib/python3.11")
SKIPPED_STDLIB_PARTS = {"test", "tests", "idlelib", "tkinter", "turtledemo", "__pycache__",
                        "ensurepip", "lib2to3", "dist-packages", "site-packages"}

# This sandbox refuses raised rlimits and runs cgroups v1 in hybrid mode: runc with
# cgroupfs and modest ulimits work there and on ordinary machines alike.
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""

# Short names never go to a registry: only local images exist for these tests.
REGISTRIES_CONF = """\
unqualified-search-registries = []
short-name-mode = "permissive"
"""


class EngineUnavailable(Exception):
    """No engine can be used here; the message says why (it becomes the skip reason)."""


def _shared_libraries(paths: list[Path]) -> set[str]:
    found: set[str] = set()
    for path in paths:
        out = subprocess.run(["ldd", str(path)], check=False, capture_output=True,
                             text=True).stdout
        found.update(re.findall(r"(/\S+) \(0x", out))
    return found


def python_rootfs_tar(dest: Path) -> Path:
    """A tar of a root file system that runs ``/usr/bin/python3`` (with sqlite3)."""
    if not HOST_PYTHON.exists() or not (STDLIB / "lib-dynload").is_dir():
        raise EngineUnavailable(f"{HOST_PYTHON} (Debian's python3.11) is not installed")
    interpreter = HOST_PYTHON.resolve()
    libraries = _shared_libraries([interpreter, *sorted((STDLIB / "lib-dynload").glob("*.so"))])

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        return None if SKIPPED_STDLIB_PARTS & set(info.name.split("/")) else info

    with tarfile.open(dest, "w") as tar:
        tar.add(interpreter, arcname="usr/bin/python3")
        python = tarfile.TarInfo("usr/bin/python")
        python.type, python.linkname = tarfile.SYMTYPE, "python3"
        tar.addfile(python)
        tar.add(STDLIB, arcname=str(STDLIB).lstrip("/"), filter=keep)
        for library in sorted(libraries):
            tar.add(os.path.realpath(library), arcname=library.lstrip("/"))
        tmp = tarfile.TarInfo("tmp")
        tmp.type, tmp.mode = tarfile.DIRTYPE, 0o1777
        tar.addfile(tmp)
    return dest


class ContainerEngine:
    """An engine reachable at :attr:`base_url` with :data:`BASE_IMAGE` loaded."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.base_url = os.environ.get("TEG_TEST_DOCKER_HOST", "")
        self._service: subprocess.Popen[bytes] | None = None
        self.client: Any = None

    def __enter__(self) -> ContainerEngine:
        try:
            import docker
        except ImportError:
            raise EngineUnavailable("the Docker SDK is not installed "
                                    "(pip install 'teg-gateway[docker]')") from None
        try:
            if not self.base_url:
                self._start_podman()
            self._connect(docker)
            self._load_base_image()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- podman -------------------------------------------------------------------------

    def _start_podman(self) -> None:
        podman = shutil.which("podman")
        if podman is None or shutil.which("runc") is None:
            raise EngineUnavailable("no container engine: set TEG_TEST_DOCKER_HOST, or "
                                    "install podman and runc (apt-get install -y podman runc)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "containers.conf").write_text(CONTAINERS_CONF)
        (self.workdir / "registries.conf").write_text(REGISTRIES_CONF)
        socket = self.workdir / "engine.sock"
        # podman's API keeps uploads (an image import is ~60 MB) in TMPDIR, /var/tmp by
        # default, and does not always remove them: keep them in the workdir.
        (self.workdir / "tmp").mkdir(exist_ok=True)
        env = {**os.environ, "TMPDIR": str(self.workdir / "tmp"),
               "CONTAINERS_CONF": str(self.workdir / "containers.conf"),
               "CONTAINERS_REGISTRIES_CONF": str(self.workdir / "registries.conf")}
        log = (self.workdir / "engine.log").open("wb")
        self._service = subprocess.Popen(
            [podman, "--root", str(self.workdir / "storage"),
             "--runroot", str(self.workdir / "run"), "--tmpdir", str(self.workdir / "tmp"),
             "system", "service", "--time=0", f"unix://{socket}"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        self.base_url = f"unix://{socket}"

    def _connect(self, sdk: Any) -> None:
        deadline = time.monotonic() + 60
        while True:
            try:
                self.client = sdk.DockerClient(base_url=self.base_url, timeout=120)
                self.client.ping()
                return
            except Exception as exc:
                if self._service is not None and self._service.poll() is not None:
                    raise EngineUnavailable(f"podman's API service ended: {self.engine_log()}"
                                            ) from None
                if time.monotonic() > deadline:
                    raise EngineUnavailable(f"the engine at {self.base_url} did not answer: "
                                            f"{exc}") from None
                time.sleep(0.1)

    def engine_log(self) -> str:
        path = self.workdir / "engine.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    # -- images and containers ------------------------------------------------------------

    def _load_base_image(self) -> None:
        tar = python_rootfs_tar(self.workdir / "base.tar")
        repository, tag = BASE_IMAGE.split(":")
        answer = self.client.api.import_image_from_file(str(tar), repository=repository,
                                                        tag=tag)
        tar.unlink()
        image_id = json.loads(answer.strip().splitlines()[-1])["status"]
        # Some engines (podman) drop the tag of an import: name it explicitly.
        self.client.images.get(image_id).tag(repository, tag)
        probe = self.client.containers.run(
            BASE_IMAGE, ["/usr/bin/python3", "-c", "import sqlite3; print('ok')"],
            network_mode="host", remove=False, detach=True)
        try:
            result = probe.wait(timeout=60)
            output = probe.logs().decode(errors="replace")
        finally:
            probe.remove(force=True)
        if result.get("StatusCode") != 0 or "ok" not in output:
            raise EngineUnavailable(f"a container of {BASE_IMAGE} does not run here: "
                                    f"{result} {output[-500:]} {self.engine_log()}")

    def remove_containers(self) -> None:
        for container in self.client.containers.list(all=True):
            container.remove(force=True)

    def remove_controller(self) -> None:
        """Remove the controller container and every controller image."""
        for found in self.client.containers.list(all=True, filters={"name": CONTAINER_NAME}):
            found.remove(force=True)
        for image in self.client.images.list():
            if any("teg-controller-" in tag for tag in image.tags):
                self.client.images.remove(image.id, force=True)

    def _unmount_storage(self) -> None:
        """podman leaves its storage's mounts behind when its service ends."""
        prefix = str(self.workdir.resolve()) + "/"
        with open("/proc/self/mounts") as mounts:
            points = [line.split()[1] for line in mounts]
        for point in reversed(points):
            if point.startswith(prefix):
                subprocess.run(["umount", "-l", point], check=False, capture_output=True)

    def close(self) -> None:
        if self.client is not None and self._service is not None:
            with contextlib.suppress(Exception):
                self.remove_containers()
        if self.client is not None:
            self.client.close()
            self.client = None
        if self._service is not None:
            try:
                os.killpg(self._service.pid, signal.SIGTERM)
                self._service.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(self._service.pid, signal.SIGKILL)
                self._service.wait()
            self._service = None
            self._unmount_storage()
            shutil.rmtree(self.workdir / "storage", ignore_errors=True)
            shutil.rmtree(self.workdir / "run", ignore_errors=True)
            shutil.rmtree(self.workdir / "tmp", ignore_errors=True)
