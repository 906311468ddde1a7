"""How the controller runs: one small interface, and the process runtime.

The supervisor and OTA only use :class:`ControllerRuntime` (start, stop, is running,
started at, version), so they do not care whether the controller is a child process
(:class:`ProcessRuntime`, here) or a Docker container (``docker_runtime.DockerRuntime``).

Versions live in ``<data>/controller/versions/<version>/``: the process runtime runs the
command there when that directory exists, and the Docker runtime builds its image from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import re
import shutil
import signal
import tarfile
import time
from pathlib import Path
from typing import IO, Any, Protocol

from teg_gateway.config import Settings
from teg_gateway.fsutil import fsync_dir
from teg_gateway.store.state import StateFile

log = logging.getLogger(__name__)

LOG_FILE_NAME = "controller.log"
READ_CHUNK = 65536
# Variables of the gateway itself (credentials, its own paths) that a child process
# controller does not inherit.
PRIVATE_ENV_PREFIXES = ("THINGSBOARD_", "TB_", "TEG_")
_VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")


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


def check_version(version: str) -> str:
    """``version`` when it is a safe name for a directory, a git ref and an image tag.

    Letters, digits and ``. _ + -``, starting with a letter or digit, at most 128
    characters, no ``..``. Raises ValueError otherwise.
    """
    if not isinstance(version, str) or not _VERSION_RE.fullmatch(version) or ".." in version:
        raise ValueError(f"controller version {version!r} is not allowed: use letters, digits "
                         "and . _ + - (starting with a letter or digit, at most 128, no '..')")
    return version


def versions_dir(settings: Settings) -> Path:
    """``<data>/controller/versions``: one directory per controller version."""
    return settings.data_dir / "controller" / "versions"


def version_dir(settings: Settings, version: str) -> Path:
    """The directory of one controller version (it may not exist)."""
    return versions_dir(settings) / check_version(version)


async def run_git(repo: str, *args: str, timeout_s: float = 300.0) -> tuple[int, str, str]:
    """``git -C repo args…`` as an asyncio subprocess: (exit code, stdout, stderr)."""
    try:
        proc = await asyncio.create_subprocess_exec(
            "git", "-C", repo, *args, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    except OSError as exc:
        raise ControllerStartError(f"cannot run git: {exc.strerror or exc}") from None
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise ControllerStartError(f"git {args[0]} in {repo} took longer than "
                                   f"{timeout_s:.0f} s") from None
    code = proc.returncode if proc.returncode is not None else -1
    return code, out.decode(errors="replace"), err.decode(errors="replace")


async def export_version(settings: Settings, version: str, timeout_s: float = 300.0) -> Path:
    """``<data>/controller/versions/<version>``, exported from the controller git
    repository (``git archive`` of the tag or commit) when it does not exist yet.

    The repository's own working tree is never touched; a version missing from it is
    fetched (``git fetch --tags``) once. The export appears atomically (temp directory,
    rename), so a half-written version directory never exists.
    """
    dest = version_dir(settings, version)
    if dest.is_dir():
        return dest
    repo = settings.paths.controller_git
    if not repo:
        raise ControllerStartError(
            f"no source for controller version {version}: {dest} does not exist and "
            "paths.controller_git (TEG_CONTROLLER_GIT_PATH) is not set")
    if not Path(repo).is_dir():
        raise ControllerStartError(f"controller git repository {repo} does not exist")
    ref = f"{version}^{{commit}}"
    code, out, _err = await run_git(repo, "rev-parse", "--verify", "--quiet", ref,
                                    timeout_s=timeout_s)
    if code != 0:
        log.info("controller version %s is not in %s: fetching", version, repo)
        _code, _out, err = await run_git(repo, "fetch", "--quiet", "--tags",
                                         timeout_s=timeout_s)
        if _code != 0:
            log.warning("git fetch in %s failed: %s", repo, err.strip()[:500])
        code, out, _err = await run_git(repo, "rev-parse", "--verify", "--quiet", ref,
                                        timeout_s=timeout_s)
    if code != 0:
        raise ControllerStartError(f"controller version {version} is neither a tag nor a "
                                   f"commit of the git repository {repo}")
    commit = out.strip()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{version}.tmp-{os.getpid()}"
    tar = dest.parent / f".{version}.tar-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        code, _out, err = await run_git(repo, "archive", "--format=tar", f"--output={tar}",
                                        commit, timeout_s=timeout_s)
        if code != 0:
            raise ControllerStartError(f"git archive of {version} failed: {err.strip()[:500]}")
        await asyncio.to_thread(_extract_tar, tar, tmp)
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    finally:
        tar.unlink(missing_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("controller version %s (%s) exported to %s", version, commit[:12], dest)
    return dest


def _extract_tar(tar: Path, dest: Path) -> None:
    dest.mkdir(parents=True)
    with tarfile.open(tar) as archive:
        archive.extractall(dest, filter="data")


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


def stop_on_shutdown(settings: Settings, runtime: ControllerRuntime) -> bool:
    """Whether a graceful gateway shutdown stops the controller."""
    mode = settings.controller.stop_on_shutdown
    if mode == "always":
        return True
    if mode == "never":
        return False
    return runtime.stop_on_shutdown_default


def make_runtime(settings: Settings, state: StateFile | None = None) -> ControllerRuntime | None:
    """The runtime chosen by ``[controller] runtime``; None for ``none``.

    The Docker runtime is imported only when chosen: its SDK is an optional extra.
    """
    kind = settings.controller.runtime
    if kind == "process":
        return ProcessRuntime(settings, state)
    if kind == "docker":
        module = importlib.import_module("teg_gateway.controller.docker_runtime")
        runtime: ControllerRuntime = module.DockerRuntime(settings)
        return runtime
    return None


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

    def __init__(self, settings: Settings, state: StateFile | None = None) -> None:
        self.settings = settings
        self.state = state
        ctl = settings.controller
        self.log = RotatingLog(settings.controller_logs_dir / LOG_FILE_NAME,
                               ctl.log_max_bytes, ctl.log_backups)
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
        command = list(self.settings.controller.command)
        if not command:
            raise ControllerStartError("controller.command is empty: nothing to run")
        cwd = self.working_dir(version)
        env = self.environment(version, cwd)
        self.settings.controller_data_dir.mkdir(parents=True, exist_ok=True)
        self.settings.controller_logs_dir.mkdir(parents=True, exist_ok=True)
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
        self._started_ms = time.time_ns() // 1_000_000
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
                await asyncio.wait_for(proc.wait(), grace_s)
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
        await asyncio.wait({exited}, timeout=timeout_s)

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
            vdir = version_dir(self.settings, version)
            if vdir.is_dir():
                return vdir
        if self.settings.controller.workdir:
            return Path(self.settings.controller.workdir)
        return self.settings.controller_data_dir

    def environment(self, version: str | None, cwd: Path) -> dict[str, str]:
        """The gateway's environment without its own variables, ``[controller] env``, and
        the contract: TEG_DATA_PATH (the controller data directory, as in the original),
        TEG_CONTROLLER_LOGS_PATH, TEG_CONTROLLER_VERSION and TEG_CONTROLLER_DIR."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(PRIVATE_ENV_PREFIXES)}
        env.update(self.settings.controller.env)
        env["TEG_DATA_PATH"] = str(self.settings.controller_data_dir)
        env["TEG_CONTROLLER_LOGS_PATH"] = str(self.settings.controller_logs_dir)
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
        deadline = time.monotonic() + self.settings.controller.stop_grace_s
        while _proc_start_ticks(pid) == start and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._signal_group(pid, signal.SIGKILL)
        while _proc_start_ticks(pid) == start and time.monotonic() < deadline + 2.0:
            await asyncio.sleep(0.05)
        self.state.update(process=None)
