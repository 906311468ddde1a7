"""The controller as a Docker container (optional extra: ``pip install 'teg-gateway[docker]'``).

Container ``teg_controller`` runs image ``teg-controller-<version>:latest``, built when
missing from ``<data>/controller/versions/<version>`` (exported from the controller git
repository at that tag or commit, SPEC.md sections 1 and 6). The controller data and
logs directories are mounted at the same paths, the network is the host's, the restart
policy is ``no`` (the supervisor restarts it) and Docker rotates its output.

The Docker SDK is imported only when this runtime is used, and every blocking SDK call
runs in ``asyncio.to_thread`` with a timeout. Without the SDK or an engine, every call
raises :class:`DockerUnavailable` with a message that says what is missing; the
supervisor reports it and the rest of the gateway goes on.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import math
import os
import re
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from teg_gateway.clock import Clock, ms
from teg_gateway.config import ControllerSettings
from teg_gateway.controller.runtime import ControllerStartError, ControllerUnavailable
from teg_gateway.controller.versions import ControllerPlaces, check_version, export_from_git

log = logging.getLogger(__name__)

CONTAINER_NAME = "teg_controller"
VERSION_LABEL = "teg.controller.version"
DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"
INSTALL_HINT = "pip install 'teg-gateway[docker]'"


class DockerUnavailable(ControllerUnavailable):
    """The Docker SDK is not installed or the Docker engine cannot be reached."""


def image_name(version: str) -> str:
    """``teg-controller-<version>:latest``; Docker wants lower case and ``[a-z0-9._-]``."""
    safe = re.sub(r"[^a-z0-9._-]", "-", check_version(version).lower())
    return f"teg-controller-{safe}:latest"


def parse_docker_time(text: str | None) -> int | None:
    """ms since the epoch of Docker's RFC 3339 times (nanoseconds); None for the zero time."""
    if not text or text.startswith("0001-01-01"):
        return None
    match = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", text)
    if match is None:
        return None
    base, fraction, zone = match.groups()
    zone = "+00:00" if zone == "Z" else zone
    stamp = datetime.fromisoformat(f"{base}.{(fraction or '0')[:6].ljust(6, '0')}{zone}")
    return ms(stamp.timestamp())


def build_output(items: Any) -> list[str]:
    """The text lines of a Docker build's JSON output (``stream`` and ``error`` items)."""
    lines: list[str] = []
    for item in items or []:
        if isinstance(item, dict):
            text = str(item.get("stream") or item.get("error") or "")
            lines.extend(line.rstrip() for line in text.splitlines() if line.strip())
    return lines


def _is_connection_error(exc: BaseException) -> bool:
    """Errors that mean the engine is not there (requests/urllib3 connection errors)."""
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    module = type(exc).__module__
    return module.startswith(("requests", "urllib3")) or "ConnectionError" in type(exc).__name__


class DockerRuntime:
    """Runs the controller as container ``teg_controller`` through the Docker SDK."""

    name = "docker"
    requires_version = True
    stop_on_shutdown_default = False

    def __init__(self, settings: ControllerSettings, places: ControllerPlaces, *,
                 base_url: str | None = None, call_timeout_s: float = 30.0,
                 build_timeout_s: float = 1800.0, git_timeout_s: float = 300.0,
                 clock: Clock | None = None) -> None:
        self.settings = settings
        self.places = places
        self.clock = clock or Clock()
        self.base_url = base_url
        self.call_timeout_s = call_timeout_s
        self.build_timeout_s = build_timeout_s
        self.git_timeout_s = git_timeout_s
        self._client: Any = None
        self._sdk: Any = None
        self._started_ms: int | None = None
        self._version: str | None = None
        self._last_exit: int | None = None

    @property
    def engine_url(self) -> str:
        return self.base_url or os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_HOST

    # -- connection -----------------------------------------------------------------------

    def _import_sdk(self) -> Any:
        if self._sdk is None:
            try:
                self._sdk = importlib.import_module("docker")
            except ImportError:
                raise DockerUnavailable(
                    "the Docker runtime needs the Docker SDK for Python, which is not "
                    f"installed: {INSTALL_HINT}") from None
        return self._sdk

    def _connect(self) -> Any:
        """Build a client and ping the engine (blocking: runs in a thread)."""
        sdk = self._import_sdk()
        timeout = max(1, math.ceil(self.call_timeout_s))
        try:
            if self.base_url:
                client = sdk.DockerClient(base_url=self.base_url, timeout=timeout)
            else:
                client = sdk.from_env(timeout=timeout)
            client.ping()
        except Exception as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            raise DockerUnavailable(
                f"cannot reach the Docker engine at {self.engine_url}: {first_line}. Is "
                "Docker installed and running, and may this user use it?") from None
        return client

    async def ping(self) -> None:
        """Raise DockerUnavailable unless the SDK is installed and the engine answers."""
        await self._get_client()

    async def _get_client(self) -> Any:
        if self._client is None:
            self._import_sdk()
            self._client = await self._call(self._connect)
        return self._client

    async def _call(self, fn: Callable[..., Any], *args: Any,
                    call_timeout_s: float | None = None, **kwargs: Any) -> Any:
        """Run one blocking SDK call in a thread, with a timeout; a connection failure
        becomes DockerUnavailable (and the client is built again next time)."""
        limit = call_timeout_s or self.call_timeout_s
        try:
            return await asyncio.wait_for(asyncio.to_thread(fn, *args, **kwargs), limit)
        except TimeoutError:
            self._client = None
            raise DockerUnavailable(f"the Docker engine at {self.engine_url} did not answer "
                                    f"within {limit:.0f} s") from None
        except DockerUnavailable:
            raise
        except Exception as exc:
            if _is_connection_error(exc):
                self._client = None
                raise DockerUnavailable(f"lost the Docker engine at {self.engine_url}: "
                                        f"{exc}") from None
            raise

    async def _find(self) -> Any:
        """The ``teg_controller`` container, None when there is none."""
        client = await self._get_client()
        try:
            return await self._call(client.containers.get, CONTAINER_NAME)
        except self._sdk.errors.NotFound:
            return None

    def _note(self, container: Any) -> bool:
        """Remember what the container's state says; whether it runs."""
        attrs = container.attrs or {}
        state = attrs.get("State") or {}
        labels = (attrs.get("Config") or {}).get("Labels") or {}
        self._version = labels.get(VERSION_LABEL) or self._version
        if state.get("Running"):
            self._started_ms = parse_docker_time(state.get("StartedAt"))
            return True
        self._started_ms = None
        code = state.get("ExitCode")
        self._last_exit = code if isinstance(code, int) else self._last_exit
        return False

    # -- the interface --------------------------------------------------------------------

    async def start(self, version: str | None) -> None:
        if not version:
            raise ControllerStartError("the docker runtime needs a controller version (the "
                                       "image is built from it) and none is known")
        check_version(version)
        client = await self._get_client()
        image = image_name(version)
        await self._ensure_image(client, version, image)
        old = await self._find()
        if old is not None:
            await self._call(old.remove, force=True)
        ctl = self.settings
        data = self.places.data_dir
        logs = self.places.logs_dir
        data.mkdir(parents=True, exist_ok=True)
        logs.mkdir(parents=True, exist_ok=True)
        volumes = {str(data): {"bind": str(data), "mode": "rw"}}
        volumes.setdefault(str(logs), {"bind": str(logs), "mode": "rw"})
        environment = {**ctl.env, "TEG_DATA_PATH": str(data),
                       "TEG_CONTROLLER_LOGS_PATH": str(logs),
                       "TEG_CONTROLLER_VERSION": version}
        try:
            container = await self._call(
                client.containers.run, image, name=CONTAINER_NAME, detach=True,
                network_mode="host", restart_policy={"Name": "no"}, volumes=volumes,
                environment=environment, labels={VERSION_LABEL: version},
                log_config={"type": "json-file",
                            "config": {"max-size": str(ctl.log_max_bytes),
                                       "max-file": str(ctl.log_backups + 1)}})
        except self._sdk.errors.DockerException as exc:
            raise ControllerStartError(f"docker run {image} failed: {exc}") from None
        await self._call(container.reload)
        self._version = version
        self._last_exit = None
        self._note(container)
        log.info("controller container %s started from %s", CONTAINER_NAME, image)

    async def _ensure_image(self, client: Any, version: str, image: str) -> None:
        try:
            await self._call(client.images.get, image)
            return
        except self._sdk.errors.ImageNotFound:
            pass
        source = await export_from_git(self.places, version, self.git_timeout_s)
        context, dockerfile = self.build_context(source)
        log.info("building controller image %s from %s (%s)", image, context, dockerfile)
        try:
            _image, output = await self._call(
                client.images.build, path=str(context), dockerfile=dockerfile, tag=image,
                rm=True, forcerm=True, labels={VERSION_LABEL: version},
                timeout=self.build_timeout_s, call_timeout_s=self.build_timeout_s)
        except self._sdk.errors.BuildError as exc:
            lines = build_output(exc.build_log)
            for line in lines:
                log.warning("docker build %s: %s", image, line)
            tail = " | ".join(lines)[-800:]
            raise ControllerStartError(f"docker build of {image} failed: {exc.msg}; "
                                       f"{tail}") from None
        except self._sdk.errors.DockerException as exc:
            raise ControllerStartError(f"docker build of {image} failed: {exc}") from None
        for line in build_output(output):
            log.info("docker build %s: %s", image, line)
        log.info("controller image %s built", image)

    async def remove_version(self, version: str) -> None:
        """Remove the image of a version OTA removed from disk (unless the controller
        container runs it); a failure is logged, never raised."""
        image = image_name(version)
        try:
            client = await self._get_client()
            running = await self._find()
            if running is not None and self._note(running) and self._version == version:
                return
            await self._call(client.images.remove, image)
        except Exception as exc:
            if self._sdk is not None and isinstance(exc, self._sdk.errors.ImageNotFound):
                return
            log.warning("could not remove image %s of old controller version %s: %s",
                        image, version, exc)
            return
        log.info("removed image %s of old controller version %s", image, version)

    def build_context(self, source: Path) -> tuple[Path, str]:
        """(build context, Dockerfile inside it) for a version exported to ``source``.

        ``paths.controller_dockercontext`` inside the git repository is taken at the same
        place inside the export; the default ``<git>/docker`` falls back to the export's
        root when the version has no ``docker`` directory.
        """
        places = self.places
        dockerfile = places.dockerfile or "Dockerfile"
        if places.docker_context:
            wanted = Path(os.path.normpath(places.docker_context))
            git = Path(os.path.normpath(places.git_repo)) if places.git_repo else None
            if git is not None and wanted.is_relative_to(git):
                return source / wanted.relative_to(git), dockerfile
            if not wanted.is_absolute():
                return source / wanted, dockerfile
            return wanted, dockerfile
        if (source / "docker").is_dir():
            return source / "docker", dockerfile
        return source, dockerfile

    async def stop(self, grace_s: float) -> None:
        container = await self._find()
        if container is None or not self._note(container):
            return
        grace = max(1, math.ceil(grace_s))
        log.info("stopping controller container %s (grace %d s)", CONTAINER_NAME, grace)
        await self._call(container.stop, timeout=grace,
                         call_timeout_s=grace + self.call_timeout_s)
        await self._call(container.reload)
        self._note(container)

    async def is_running(self) -> bool:
        container = await self._find()
        if container is None:
            self._started_ms = None
            return False
        return self._note(container)

    async def wait(self, timeout_s: float) -> None:
        # Polled: a container's exit is noticed at the supervisor's next check.
        await self.clock.sleep(timeout_s)

    def started_at_ms(self) -> int | None:
        return self._started_ms

    def version(self) -> str | None:
        return self._version

    def last_exit(self) -> int | None:
        return self._last_exit

    def describe(self) -> str:
        return f"container {CONTAINER_NAME}"
