"""How the controller runs: the one small interface every runtime implements.

The supervisor and OTA only use :class:`ControllerRuntime` (start, stop, is running,
started at, version), so they do not care whether the controller is a child process
(``process_runtime.ProcessRuntime``) or a Docker container
(``docker_runtime.DockerRuntime``); ``factory.make_runtime`` picks one. Versions on disk
are in ``versions``.
"""

from __future__ import annotations

import signal
from typing import Protocol

from teg_gateway.config import ControllerSettings

LOG_FILE_NAME = "controller.log"


class ControllerError(Exception):
    """Base of the errors a runtime reports; the message is meant for the operator."""


class ControllerStartError(ControllerError):
    """The controller could not be started (bad command, missing source, failed build)."""


class ControllerUnavailable(ControllerError):
    """The runtime itself cannot work (e.g. no Docker engine); retried with backoff."""


class ControllerRuntime(Protocol):
    """What the supervisor and OTA need from a way of running the controller."""

    #: ``process`` or ``docker``.
    name: str
    #: A version must be known before the controller can start (docker: the image).
    requires_version: bool
    #: Stop the controller when the gateway stops, for ``stop_on_shutdown = "auto"``.
    stop_on_shutdown_default: bool

    async def start(self, version: str | None) -> None:
        """Start the controller at ``version``; raises ControllerError when it cannot."""

    async def stop(self, grace_s: float) -> None:
        """Ask the controller to stop, force it after ``grace_s``; no error if not running."""

    async def is_running(self) -> bool:
        """Whether the controller runs now (may ask the engine)."""

    async def wait(self, timeout_s: float) -> None:
        """Return when the controller stops, or after ``timeout_s`` at the latest."""

    def started_at_ms(self) -> int | None:
        """When the running controller started (ms since the epoch), None when unknown."""

    def version(self) -> str | None:
        """The version the controller was started with (or found running with)."""

    def last_exit(self) -> int | None:
        """Exit status of the last run: the code, or minus the signal number."""

    def describe(self) -> str:
        """A short description for logs: ``pid 1234``, ``container teg_controller``."""

    async def remove_version(self, version: str) -> None:
        """Free what the runtime keeps for ``version`` beyond its directory (docker: the
        image), once OTA removed that version; never the running one."""


def describe_exit(code: int | None) -> str:
    """``exit code 3``, ``killed by SIGKILL``, or ``unknown``."""
    if code is None:
        return "unknown"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def stop_on_shutdown(settings: ControllerSettings, runtime: ControllerRuntime) -> bool:
    """Whether a graceful gateway shutdown stops the controller."""
    mode = settings.stop_on_shutdown
    if mode == "always":
        return True
    if mode == "never":
        return False
    return runtime.stop_on_shutdown_default


