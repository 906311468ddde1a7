"""The controller as a plain child process, in its own session.

Its output goes to a size-rotated log file; its pid is kept in the controller state file
so a gateway that was killed stops the orphan it left before it starts a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from pathlib import Path
from typing import IO, Any

from teg_gateway.clock import Clock
from teg_gateway.config import ControllerSettings
from teg_gateway.controller.runtime import LOG_FILE_NAME, ControllerStartError, describe_exit
from teg_gateway.controller.versions import ControllerPlaces
from teg_gateway.store.state import StateFile

log = logging.getLogger(__name__)

READ_CHUNK = 65536
# Variables of the gateway itself (credentials, its own paths) that a child process
# controller does not inherit.
PRIVATE_ENV_PREFIXES = ("THINGSBOARD_", "TB_", "TEG_")


class RotatingLog:
    """An append-only log file rotated by size: ``controller.log``, ``.1`` … ``.<backups>``."""

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._file: IO[bytes] | None = None
        self._size = 0

    def _open(self) -> IO[bytes]:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("ab")
            self._size = self._file.tell()
        return self._file

    def write(self, data: bytes) -> None:
        """Append ``data``; rotate first when it would pass ``max_bytes``."""
        while data:
            fh = self._open()
            room = self.max_bytes - self._size
            if room <= 0:
                self._rotate()
                continue
            # A chunk bigger than the room left is split at the last line break that fits,
            # so files stay near max_bytes and lines are rarely cut.
            if len(data) > room:
                cut = data.rfind(b"\n", 0, room) + 1
                if cut == 0:
                    cut = room if self._size == 0 else 0
                if cut == 0:
                    self._rotate()
                    continue
                part, data = data[:cut], data[cut:]
            else:
                part, data = data, b""
            fh.write(part)
            fh.flush()
            self._size += len(part)

    def _rotate(self) -> None:
        self.close()
        if self.backups <= 0:
            self.path.unlink(missing_ok=True)
            return
        for i in range(self.backups, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            newer = self.path.with_name(f"{self.path.name}.{i - 1}") if i > 1 else self.path
            with contextlib.suppress(FileNotFoundError):
                os.replace(newer, older)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _proc_start_ticks(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks since boot (Linux), None when unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    if len(fields) <= 19 or fields[0] in ("Z", "X"):
        return None  # gone, or a zombie waiting to be reaped
    return fields[19]


class ProcessRuntime:
    """The controller as a child process in its own session (so the whole tree is stopped).

    Output (stdout and stderr) goes to ``<controller logs>/controller.log``, rotated by
    size. The pid is kept in the state file (key ``process``), so a gateway that was
    killed finds and stops its orphaned controller before it starts a new one.
    """

    name = "process"
    requires_version = False
    stop_on_shutdown_default = True

    def __init__(self, settings: ControllerSettings, places: ControllerPlaces,
                 state: StateFile | None = None, *, clock: Clock | None = None) -> None:
        self.settings = settings
        self.places = places
        self.state = state
        self.clock = clock or Clock()
        self.log = RotatingLog(places.logs_dir / LOG_FILE_NAME,
                               settings.log_max_bytes, settings.log_backups)
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._exited: asyncio.Future[int] | None = None
        self._started_ms: int | None = None
        self._version: str | None = None
        self._last_exit: int | None = None
        self._orphan_checked = False
        self.workdir: Path | None = None

    # -- the interface --------------------------------------------------------------------

    async def start(self, version: str | None) -> None:
        if self._proc is not None and self._proc.returncode is None:
            raise ControllerStartError(f"the controller already runs ({self.describe()})")
        await self._reap()
        if not self._orphan_checked:
            self._orphan_checked = True
            await self._stop_orphan()
        command = list(self.settings.command)
        if not command:
            raise ControllerStartError("controller.command is empty: nothing to run")
        cwd = self.working_dir(version)
        env = self.environment(version, cwd)
        self.places.data_dir.mkdir(parents=True, exist_ok=True)
        self.places.logs_dir.mkdir(parents=True, exist_ok=True)
        try:
            proc = await asyncio.create_subprocess_exec(
                *command, cwd=cwd, env=env, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                start_new_session=True)
        except OSError as exc:
            raise ControllerStartError(
                f"cannot start {command[0]!r} in {cwd}: {exc.strerror or exc}") from None
        self._proc = proc
        # One waiter per process: wait() polls it without piling up tasks.
        self._exited = asyncio.ensure_future(proc.wait())
        self._started_ms = self.clock.now_ms()
        self._version = version
        self._last_exit = None
        self.workdir = cwd
        self._mark(f"started pid {proc.pid}, version {version or '(none)'}, in {cwd}: "
                   f"{command}")
        assert proc.stdout is not None
        self._reader = asyncio.ensure_future(self._copy_output(proc.stdout))
        if self.state is not None:
            self.state.update(process={"pid": proc.pid, "start": _proc_start_ticks(proc.pid)})
        log.info("controller started: pid %d, version %s, in %s", proc.pid,
                 version or "(none)", cwd)

    async def stop(self, grace_s: float) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.returncode is None:
            self._signal_group(proc.pid, signal.SIGTERM)
            try:
                await self.clock.wait_for(proc.wait(), grace_s)
            except TimeoutError:
                log.warning("controller pid %d did not stop %.1f s after SIGTERM: SIGKILL",
                            proc.pid, grace_s)
                self._signal_group(proc.pid, signal.SIGKILL)
                await proc.wait()
        await self._reap()

    async def is_running(self) -> bool:
        proc = self._proc
        if proc is None:
            return False
        if proc.returncode is None:
            return True
        await self._reap()
        return False

    async def wait(self, timeout_s: float) -> None:
        proc, exited = self._proc, self._exited
        if proc is None or exited is None or proc.returncode is not None:
            return
        with contextlib.suppress(TimeoutError):
            await self.clock.wait_for(asyncio.shield(exited), timeout_s)

    def started_at_ms(self) -> int | None:
        running = self._proc is not None and self._proc.returncode is None
        return self._started_ms if running else None

    def version(self) -> str | None:
        return self._version

    def last_exit(self) -> int | None:
        if self._proc is not None and self._proc.returncode is not None:
            return self._proc.returncode
        return self._last_exit

    def describe(self) -> str:
        return f"pid {self._proc.pid}" if self._proc is not None else "no process"

    async def remove_version(self, version: str) -> None:
        """Nothing: a process version is its directory alone."""

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # -- how it is started ----------------------------------------------------------------

    def working_dir(self, version: str | None) -> Path:
        """The active version's directory when it exists, else ``[controller] workdir``,
        else the controller data directory."""
        if version:
            vdir = self.places.version_dir(version)
            if vdir.is_dir():
                return vdir
        if self.settings.workdir:
            return Path(self.settings.workdir)
        return self.places.data_dir

    def environment(self, version: str | None, cwd: Path) -> dict[str, str]:
        """The gateway's environment without its own variables, ``[controller] env``, and
        the contract: TEG_DATA_PATH (the controller data directory, as in the original),
        TEG_CONTROLLER_LOGS_PATH, TEG_CONTROLLER_VERSION and TEG_CONTROLLER_DIR."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(PRIVATE_ENV_PREFIXES)}
        env.update(self.settings.env)
        env["TEG_DATA_PATH"] = str(self.places.data_dir)
        env["TEG_CONTROLLER_LOGS_PATH"] = str(self.places.logs_dir)
        env["TEG_CONTROLLER_VERSION"] = version or ""
        env["TEG_CONTROLLER_DIR"] = str(cwd)
        return env

    # -- internals ------------------------------------------------------------------------

    async def _copy_output(self, stream: asyncio.StreamReader) -> None:
        try:
            while True:
                chunk = await stream.read(READ_CHUNK)
                if not chunk:
                    return
                self._write_log(chunk)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("controller output could not be copied to %s", self.log.path)

    def _write_log(self, data: bytes) -> None:
        try:
            self.log.write(data)
        except OSError as exc:
            log.error("controller log %s: cannot write: %s", self.log.path, exc)

    def _mark(self, text: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self._write_log(f"=== teg-gateway {stamp}: controller {text} ===\n".encode())

    async def _reap(self) -> None:
        """After the process ended: finish copying its output, kill what is left of its
        process group, remember the exit status."""
        proc = self._proc
        if proc is None or proc.returncode is None:
            return
        self._signal_group(proc.pid, signal.SIGKILL)
        if self._reader is not None:
            try:
                await asyncio.wait_for(self._reader, 2.0)
            except TimeoutError:
                log.warning("controller output still open after its exit; not copied further")
            self._reader = None
        self._last_exit = proc.returncode
        self._mark(f"pid {proc.pid} ended: {describe_exit(proc.returncode)}")
        self.log.close()
        self._proc = None
        if self._exited is not None and not self._exited.done():
            self._exited.cancel()
        self._exited = None
        self._started_ms = None
        if self.state is not None:
            self.state.update(process=None)

    @staticmethod
    def _signal_group(pgid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)

    async def _stop_orphan(self) -> None:
        """Stop a controller left running by an earlier gateway (killed, or configured to
        leave it): its output pipe is gone, so it cannot be adopted."""
        if self.state is None:
            return
        record: Any = self.state.read().get("process")
        if not isinstance(record, dict) or not isinstance(record.get("pid"), int):
            return
        pid: int = record["pid"]
        start = record.get("start")
        if start is None or _proc_start_ticks(pid) != start:
            self.state.update(process=None)
            return
        log.warning("controller pid %d from an earlier gateway run still runs: stopping it",
                    pid)
        self._signal_group(pid, signal.SIGTERM)
        clock = self.clock
        deadline = clock.monotonic() + self.settings.stop_grace_s
        while _proc_start_ticks(pid) == start and clock.monotonic() < deadline:
            await clock.sleep(0.05)
        self._signal_group(pid, signal.SIGKILL)
        while _proc_start_ticks(pid) == start and clock.monotonic() < deadline + 2.0:
            await clock.sleep(0.05)
        self.state.update(process=None)
