"""Remote file management through shared attributes (SPEC.md section 5).

ThingsBoard holds the desired state: ``FILES`` says which files are managed and how
their content is encoded, ``FILE_CONTENT_<key>`` holds each file's content. The
gateway writes the files (atomically), mirrors what is on disk to ``FILE_READ_<key>``
and reports ``FILE_HASHES``. The server's content wins: a file changed on the device
is put back.

Reconciliation runs on every connect (after asking for the keys it needs), on every
attribute change (coalesced: a burst of changes gives one pass) and when a managed
file changes on disk (found by a poll). Passes never overlap. The hashes reported as
``FILE_HASHES`` are kept in ``<data>/state/files.json``: the facts (:class:`FileFacts`)
of a :class:`CommandRepository` without commands.

Security: a path is resolved (``..`` and symlinks included) and must lie inside one of
the allowed directories; the gateway's own files (databases, state, credentials) are
never managed. Reads and writes then walk down from the allowed directory without
following links (``Located``), so swapping a directory for a link after the check leads
nowhere. A refused file never stops the other files.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import errno
import hashlib
import json
import logging
import os
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from teg_gateway.bounds import clip
from teg_gateway.clock import Clock
from teg_gateway.config import FilesSettings, Settings
from teg_gateway.controller.queue import QUEUE_FILE
from teg_gateway.fsutil import atomic_write_at
from teg_gateway.operations.engine import CommandRepository, Nothing, Operation, encode
from teg_gateway.operations.rpc import Method
from teg_gateway.store.state import state_dir
from teg_gateway.store.stores import ARCHIVE_FILE, OUTBOX_FILE

log = logging.getLogger(__name__)

FILES = "FILES"
CONTENT_PREFIX = "FILE_CONTENT_"
READ_PREFIX = "FILE_READ_"
HASHES = "FILE_HASHES"
NO_FILE = "E_NOFILE"
TOO_LARGE = "E_TOO_LARGE"
NOT_A_FILE = "E_NOTAFILE"
LINKED = "E_LINKED"
ENCODINGS = ("text", "json", "base64")
# Bounds on FILES, so FILE_HASHES and the attribute names stay small.
MAX_ENTRIES = 200
MAX_KEY_CHARS = 100
MAX_PATH_CHARS = 4096
DATA_PATH_VARS = ("${DATA_PATH}", "$DATA_PATH")

# A burst of attribute changes arriving within this long gives one pass.
COALESCE_S = 0.25
# Files above this size are read and hashed in a worker thread.
THREAD_ABOVE_BYTES = 64 * 1024
# The RPC init_files waits this long for its pass before answering "still running".
INIT_REPLY_WITHIN_S = 5.0
# Room for the attribute name and JSON punctuation around a FILE_READ value.
ATTRIBUTE_OVERHEAD = 256

PublishAttributes = Callable[[dict[str, Any]], None]
Report = Callable[[dict[str, Any]], None]
RequestShared = Callable[[list[str]], None]
RestartController = Callable[[str], Awaitable[Any]]


class FileRefused(Exception):
    """A managed file that must not be written: the message says why."""


@dataclass(frozen=True)
class FileSpec:
    """One entry of ``FILES``, validated."""

    key: str
    path: str
    encoding: str
    write_version: Any = None
    restart_controller_on_change: bool = False
    create_if_not_exist: bool = True


@dataclass
class PassResult:
    """What one reconciliation pass did."""

    written: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    no_content: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    restarted: bool = False

    def summary(self) -> dict[str, Any]:
        return {"written": self.written, "unchanged": self.unchanged,
                "no_content": self.no_content, "errors": self.errors,
                "controller_restarted": self.restarted}


# -- pure helpers (no I/O beyond resolving paths) ------------------------------------------


def parse_files(value: Any) -> tuple[dict[str, FileSpec], dict[str, str]]:
    """The valid entries of a ``FILES`` value, and an error per invalid entry.

    ``FILES`` may arrive as an object or as a string holding JSON."""
    if value is None:
        return {}, {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise FileRefused(f"FILES is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise FileRefused(f"FILES must be a JSON object, got {type(value).__name__}")
    if len(value) > MAX_ENTRIES:
        raise FileRefused(f"FILES has {len(value)} entries; at most {MAX_ENTRIES} files are "
                          "managed")
    specs: dict[str, FileSpec] = {}
    errors: dict[str, str] = {}
    for key, entry in value.items():
        if len(key) > MAX_KEY_CHARS:
            errors[clip(key, MAX_KEY_CHARS)] = (f"a FILES key must be at most {MAX_KEY_CHARS} "
                                                "characters")
            continue
        try:
            specs[key] = parse_entry(key, entry)
        except FileRefused as exc:
            errors[key] = str(exc)
    return specs, errors


def parse_entry(key: str, entry: Any) -> FileSpec:
    if not key:
        raise FileRefused("a FILES key must not be empty")
    if not isinstance(entry, dict):
        raise FileRefused("the entry must be an object with path and encoding")
    path = entry.get("path")
    if not isinstance(path, str) or not path.strip():
        raise FileRefused("path is missing or not a string")
    encoding = entry.get("encoding", "text")
    if encoding not in ENCODINGS:
        raise FileRefused(f"unknown encoding {clip(repr(encoding))} (text, json or base64)")
    flags = {}
    for name, default in (("restart_controller_on_change", False),
                          ("create_if_not_exist", True)):
        flag = entry.get(name, default)
        if flag is None:
            flag = default
        if not isinstance(flag, bool):
            raise FileRefused(f"{name} must be true or false, got {clip(repr(flag))}")
        flags[name] = flag
    if len(path) > MAX_PATH_CHARS:
        raise FileRefused(f"path is longer than {MAX_PATH_CHARS} characters")
    write_version = entry.get("write_version")
    if len(json.dumps(write_version, default=str)) > MAX_KEY_CHARS:
        raise FileRefused(f"write_version must be at most {MAX_KEY_CHARS} characters")
    return FileSpec(key=key, path=path, encoding=encoding,
                    write_version=write_version,
                    restart_controller_on_change=flags["restart_controller_on_change"],
                    create_if_not_exist=flags["create_if_not_exist"])


def expand_data_path(path: str, controller_data_dir: Path) -> str:
    for var in DATA_PATH_VARS:
        path = path.replace(var, str(controller_data_dir))
    return path


@dataclass(frozen=True)
class FileArea:
    """Where managed files may lie, and the gateway's own files, which never may.

    ``controller_data_dir`` is ``$DATA_PATH`` (and where relative paths start);
    ``allowed_dirs`` is the setting ``files.allowed_dirs`` (empty: the controller data
    directory only); ``data_dir`` and ``access_token_path`` are the gateway's own."""

    controller_data_dir: Path
    data_dir: Path
    access_token_path: Path
    allowed_dirs: tuple[str, ...] = ()

    @classmethod
    def of(cls, settings: Settings) -> FileArea:
        return cls(settings.controller_data_dir, settings.data_dir,
                   settings.access_token_path, tuple(settings.files.allowed_dirs))


def allowed_dirs(area: FileArea) -> list[Path]:
    """The directories managed files may be in, resolved (a relative one is taken from
    the controller data directory)."""
    data = area.controller_data_dir
    configured = area.allowed_dirs or (str(data),)
    return [(data / expand_data_path(item, data)).resolve() for item in configured]


def protected_paths(area: FileArea) -> tuple[list[Path], list[Path]]:
    """(files, directories) of the gateway itself that are never managed, resolved,
    whatever the allowed directories say: its databases, its credentials, its state,
    the OTA downloads and the installed controller versions (code that OTA verified)."""
    files = [area.access_token_path]
    for directory, name in ((area.data_dir, OUTBOX_FILE), (area.data_dir, ARCHIVE_FILE),
                            (area.controller_data_dir, QUEUE_FILE)):
        files += [directory / (name + suffix) for suffix in ("", "-wal", "-shm", "-journal")]
    dirs = [state_dir(area.data_dir), area.data_dir / "ota",
            area.data_dir / "controller" / "versions"]
    return [p.resolve() for p in files], [d.resolve() for d in dirs]


def resolve_path(raw: str, area: FileArea, allowed: list[Path] | None = None) -> Path:
    """The real path of a managed file; FileRefused unless it lies inside an allowed
    directory and is not one of the gateway's own files.

    ``$DATA_PATH`` expands to the controller data directory; a relative path is taken
    from there. Symlinks and ``..`` are resolved before the check, so a link pointing
    out of the allowed directories is refused."""
    if "\x00" in raw:
        raise FileRefused("path contains a NUL character")
    data = area.controller_data_dir
    expanded = Path(expand_data_path(raw, data))
    if not expanded.is_absolute():
        expanded = data / expanded
    try:
        real = expanded.resolve()
    except (OSError, RuntimeError) as exc:
        raise FileRefused(f"path {clip(repr(raw))} cannot be resolved: {exc}") from None
    allowed = allowed_dirs(area) if allowed is None else allowed
    if not any(real != d and real.is_relative_to(d) for d in allowed):
        shown = ", ".join(str(d) for d in allowed) or "(none)"
        raise FileRefused(f"path {clip(repr(raw))} resolves to {clip(real)}, which is "
                          f"outside the allowed directories ({shown}; setting files.allowed_dirs)")
    files, dirs = protected_paths(area)
    if real in files or any(real.is_relative_to(d) for d in dirs):
        raise FileRefused(f"path {clip(repr(raw))} resolves to {clip(real)}, a file of the "
                          "gateway itself (its databases, credentials, state, OTA downloads "
                          "and installed versions are never managed)")
    return real


@dataclass(frozen=True)
class Located:
    """A managed file: the allowed directory it lies in and the names below it.

    Every access walks down from ``root`` one name at a time without following symbolic
    links, so a directory swapped for a link after the path was checked cannot lead the
    gateway outside the allowed directories, for reading or for writing.
    """

    root: Path
    parts: tuple[str, ...]

    @property
    def path(self) -> Path:
        return self.root.joinpath(*self.parts)

    @property
    def name(self) -> str:
        return self.parts[-1]


def locate(raw: str, area: FileArea, allowed: list[Path] | None = None) -> Located:
    """:func:`resolve_path`, split at the (innermost) allowed directory it lies in."""
    allowed = allowed_dirs(area) if allowed is None else allowed
    real = resolve_path(raw, area, allowed)
    root = max((d for d in allowed if real != d and real.is_relative_to(d)),
               key=lambda d: len(d.parts))
    return Located(root, real.relative_to(root).parts)


def encode_content(spec: FileSpec, content: Any, max_bytes: int) -> bytes:
    """The bytes to write for ``content`` in the entry's encoding; FileRefused when the
    content does not fit the encoding or is larger than ``max_bytes``."""
    if spec.encoding == "text":
        if not isinstance(content, str):
            raise FileRefused(f"text content must be a string, got {type(content).__name__}")
        data = content.encode("utf-8", errors="surrogatepass")
    elif spec.encoding == "base64":
        if not isinstance(content, str):
            raise FileRefused(f"base64 content must be a string, got {type(content).__name__}")
        try:
            data = base64.b64decode("".join(content.split()), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise FileRefused(f"content is not valid base64: {exc}") from None
    else:
        value = content
        if isinstance(content, str):
            try:
                value = json.loads(content)
            except ValueError as exc:
                raise FileRefused(f"content is not valid JSON: {exc}") from None
        data = (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode()
    if len(data) > max_bytes:
        raise FileRefused(f"content is {len(data)} bytes, over the limit of {max_bytes} "
                          "(setting files.max_bytes)")
    return data


def mirror_value(spec: FileSpec, data: bytes | None) -> Any:
    """The ``FILE_READ_<key>`` value for the bytes on disk (None: no file)."""
    if data is None:
        return NO_FILE
    if spec.encoding == "base64":
        return base64.b64encode(data).decode("ascii")
    text = data.decode("utf-8", errors="replace")
    if spec.encoding == "json":
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


Signature = tuple[int, int, int, int]


def _signature(st: os.stat_result) -> Signature:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass
class _Read:
    """A managed file as read from disk: content None when missing (problem None),
    too large or not a regular file (problem says which)."""

    data: bytes | None
    signature: Signature | None
    problem: str | None = None


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_parent(loc: Located, create: bool) -> int | None:
    """A descriptor of the file's directory, reached from the root without following
    links (created when ``create``); None when a directory is missing. FileRefused when
    a name on the way is a symbolic link or not a directory."""
    fd = os.open(loc.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for depth, part in enumerate(loc.parts[:-1]):
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    return None
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=fd)
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                where = loc.root.joinpath(*loc.parts[:depth + 1])
                raise FileRefused(f"{where} is not a directory (a symbolic link or a "
                                  "file): refused, links are not followed here") from None
            os.close(fd)
            fd = child
        opened, fd = fd, -1
        return opened
    finally:
        if fd >= 0:
            os.close(fd)


def _open_regular(loc: Located) -> tuple[BinaryIO | None, Signature | None, str | None]:
    """(open file, its signature, None) for a regular file; (None, None, None) when it is
    missing; (None, signature, NOT_A_FILE) for anything else (a link is not followed,
    a FIFO never blocks)."""
    parent = _open_parent(loc, create=False)
    if parent is None:
        return None, None, None
    try:
        try:
            fd = os.open(loc.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=parent)
        except FileNotFoundError:
            return None, None, None
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            st = os.stat(loc.name, dir_fd=parent, follow_symlinks=False)
            return None, _signature(st), NOT_A_FILE
    finally:
        os.close(parent)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        return None, _signature(st), NOT_A_FILE
    if st.st_nlink > 1:
        # Another name of the same file may lie anywhere on this file system: its
        # content is not the managed file's to show or to change.
        os.close(fd)
        return None, _signature(st), LINKED
    return os.fdopen(fd, "rb"), _signature(st), None


def _signature_of(loc: Located) -> Signature | None:
    """The file's signature without following a link; None when it is missing."""
    parent = _open_parent(loc, create=False)
    if parent is None:
        return None
    try:
        return _signature(os.stat(loc.name, dir_fd=parent, follow_symlinks=False))
    except FileNotFoundError:
        return None
    finally:
        os.close(parent)


def _read_file(loc: Located, limit: int) -> _Read:
    fh, signature, problem = _open_regular(loc)
    if fh is None:
        return _Read(None, signature, problem)
    with fh:
        if os.fstat(fh.fileno()).st_size > limit:
            return _Read(None, signature, TOO_LARGE)
        return _Read(fh.read(limit + 1), signature)


def _hash_file(loc: Located) -> tuple[str | None, Signature | None]:
    """(md5, signature) of a file, streamed; (None, None) when missing."""
    fh, signature, _problem = _open_regular(loc)
    if fh is None:
        return None, signature
    with fh:
        digest = hashlib.md5(usedforsecurity=False)
        while chunk := fh.read(1024 * 1024):
            digest.update(chunk)
        return digest.hexdigest(), signature


def _write_file(loc: Located, data: bytes, create_dirs: bool) -> None:
    parent = _open_parent(loc, create=create_dirs)
    if parent is None:
        raise FileRefused(f"directory {loc.path.parent} does not exist and "
                          "create_if_not_exist is false")
    try:
        try:
            st = os.stat(loc.name, dir_fd=parent, follow_symlinks=False)
            mode = stat.S_IMODE(st.st_mode) if stat.S_ISREG(st.st_mode) else 0o644
        except FileNotFoundError:
            mode = 0o644
        atomic_write_at(parent, loc.name, data, mode)
    finally:
        os.close(parent)


# -- the manager ----------------------------------------------------------------------------


@dataclass
class _OnDisk:
    """What a pass left on disk, for the poll: signature and md5 (None: no file)."""

    signature: Signature | None
    md5: str | None


@dataclass(frozen=True)
class FileHash:
    """A ``FILE_HASHES`` entry: the md5 of the content last written or found as desired,
    and the entry's ``write_version`` then."""

    hash: str
    write_version: Any = None


@dataclass
class FileFacts:
    """What ``files.json`` keeps: the hashes reported as ``FILE_HASHES``."""

    hashes: dict[str, FileHash] = field(default_factory=dict)


def legacy_state(value: dict[str, Any]) -> dict[str, Any]:
    """``files.json`` as earlier releases wrote it (``{"hashes": {key: {"hash",
    "write_version"}}}``) in the repository's layout. An entry without a readable hash is
    left out: the next pass finds the file's hash again."""
    hashes = value.get("hashes")
    kept = {key: {"hash": entry["hash"], "write_version": entry.get("write_version")}
            for key, entry in (hashes.items() if isinstance(hashes, dict) else ())
            if isinstance(entry, dict) and isinstance(entry.get("hash"), str)}
    return {"facts": {"hashes": kept}, "commands": []}


async def _done_within(fut: asyncio.Future[Any], clock: Clock, seconds: float) -> bool:
    """Wait for ``fut`` at most ``seconds`` on ``clock``; whether it is done (it is left
    running otherwise)."""
    if fut.done():
        return True
    timer = asyncio.ensure_future(clock.sleep(seconds))
    try:
        await asyncio.wait({fut, timer}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        timer.cancel()
    return fut.done()


class FileManager(Operation):
    """Keeps the managed files as ThingsBoard wants them; see the module docstring.

    ``files`` is the settings section, ``area`` where files may be; ``publish_attributes``
    sends client attributes and ``report`` telemetry (both through the outbox);
    ``request_shared`` asks ThingsBoard for shared attributes; ``restart_controller``
    (None: no controller is supervised) restarts the controller with a reason. The
    coalescing of changes and the poll run on ``clock``.
    """

    name = "files"

    def __init__(self, files: FilesSettings, area: FileArea, *,
                 publish_attributes: PublishAttributes, report: Report,
                 request_shared: RequestShared, restart_controller: RestartController | None,
                 max_payload_bytes: int, clock: Clock) -> None:
        self.area = area
        self.max_bytes = files.max_bytes
        self.poll_interval_s = files.poll_interval_s
        self.max_payload_bytes = max_payload_bytes
        self.clock = clock
        self.repo: CommandRepository[Nothing, FileFacts] = CommandRepository(
            state_dir(area.data_dir) / "files.json", Nothing, FileFacts, clock=clock,
            legacy=legacy_state)
        self._publish = publish_attributes
        self._report = report
        self._request = request_shared
        self._restart = restart_controller
        self.files: dict[str, FileSpec] | None = None  # None until FILES is known
        self.spec_errors: dict[str, str] = {}
        self.contents: dict[str, Any] = {}
        self.hashes: dict[str, FileHash] = {}
        self._fresh: set[str] = set()        # contents received since the last connect
        self._requested: set[str] = set()    # content keys asked for since the last connect
        self._published_reads: dict[str, str] = {}
        self._published_hashes: dict[str, FileHash] | None = None
        self._reported_errors: dict[str, str] = {}
        self._on_disk: dict[str, _OnDisk] = {}
        self._retry: set[str] = set()        # failed writes, tried again at every poll
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._state_damage: str | None = None
        self._conflicts: dict[str, str] = {}  # key -> why, found by the last pass
        self._load_state()

    @property
    def state_path(self) -> Path:
        return self.repo.path

    # -- inputs -------------------------------------------------------------------------

    def rpc_methods(self) -> list[Method]:
        async def init_files(_params: dict[str, Any]) -> str:
            return await self.init_files()

        return [Method("init_files", "reset the file-management client attributes "
                       "(FILE_HASHES, FILE_READ_*) and reconcile the managed files again",
                       init_files)]

    def shared_keys(self) -> list[str]:
        """Shared keys to ask for on every connect (the contents follow once FILES is known)."""
        return [FILES]

    def on_connect(self) -> None:
        """A new connection: ask again for every content (FILES is in ``shared_keys``)."""
        self._fresh.clear()
        self._requested.clear()
        if self.files is not None:
            self._request_contents(list(self.files))

    def on_shared(self, changes: dict[str, Any]) -> None:
        """Shared attribute updates and responses; None means deleted."""
        relevant = False
        for key, value in changes.items():
            if key == FILES:
                relevant = True
                self._set_files(value)
            elif key.startswith(CONTENT_PREFIX):
                relevant = True
                name = key[len(CONTENT_PREFIX):]
                self._fresh.add(name)
                if value is None:
                    self.contents.pop(name, None)
                else:
                    self.contents[name] = value
        if relevant:
            self.schedule()

    def schedule(self) -> None:
        """Ask for a reconciliation pass soon (many requests give one pass)."""
        self._wake.set()

    def _set_files(self, value: Any) -> None:
        try:
            self.files, self.spec_errors = parse_files(value)
        except FileRefused as exc:
            self.files, self.spec_errors = {}, {FILES: str(exc)}
        missing = [k for k in self.files if k not in self._fresh and k not in self._requested]
        if missing:
            self._request_contents(missing)

    def _request_contents(self, keys: list[str]) -> None:
        if not keys:
            return
        self._requested.update(keys)
        self._ask([CONTENT_PREFIX + k for k in keys])

    def _ask(self, keys: list[str]) -> None:
        try:
            self._request(keys)
        except Exception:
            log.exception("files: could not ask ThingsBoard for %s", ", ".join(keys))

    # -- the loop -----------------------------------------------------------------------

    async def run(self) -> None:
        """Reconcile when asked to, and poll the managed files for local changes."""
        if self._state_damage is not None:
            self._report({"files_error": self._state_damage})
            self._state_damage = None
        clock = self.clock
        next_poll = clock.monotonic() + self.poll_interval_s
        while True:
            wake = asyncio.ensure_future(self._wake.wait())
            try:
                woken = await _done_within(wake, clock,
                                           max(0.0, next_poll - clock.monotonic()))
            finally:
                wake.cancel()
            try:
                if woken:
                    await clock.sleep(COALESCE_S)
                    self._wake.clear()
                    await self.reconcile()
                    continue
                next_poll = clock.monotonic() + self.poll_interval_s
                if await self.changed_on_disk():
                    await self.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("files: reconciliation failed; trying again at the next poll")

    async def changed_on_disk(self) -> bool:
        """Whether a managed file differs from what the last pass left (or must be retried)."""
        if self.files is None:
            return False
        if self._retry:
            return True
        for key, spec in self.files.items():
            if key in self._conflicts:
                continue
            try:
                loc = locate(spec.path, self.area)
            except FileRefused:
                continue
            known = self._on_disk.get(key)
            if known is None:
                return True
            try:
                signature = _signature_of(loc)
            except (OSError, FileRefused):
                return True  # unreadable or refused: let the pass report it
            if signature == known.signature:
                continue
            try:
                if signature is not None and signature[1] > THREAD_ABOVE_BYTES:
                    md5, signature = await asyncio.to_thread(_hash_file, loc)
                else:
                    md5, signature = _hash_file(loc)
            except (OSError, FileRefused):
                return True
            if md5 != known.md5:
                log.info("files: %s (%s) changed on the device", key, loc.path)
                return True
            known.signature = signature
        return False

    async def reconcile(self) -> PassResult:
        """One pass over every managed file; passes never overlap."""
        async with self._lock:
            return await self._pass()

    async def init_files(self) -> str:
        """The RPC init_files: forget the reported attributes and reconcile again."""
        async with self._lock:
            self.hashes = {}
            self._published_reads.clear()
            self._published_hashes = None
            self._reported_errors.clear()
            self._on_disk.clear()
            self._save_state()
            self._publish({HASHES: {}})
        self._fresh.clear()
        self._requested = set(self.files or {})
        self._ask([FILES, *(CONTENT_PREFIX + k for k in self._requested)])
        task = asyncio.ensure_future(self.reconcile())
        if not await _done_within(task, self.clock, INIT_REPLY_WITHIN_S):
            return ("file-management attributes reset; the reconciliation is still running "
                    "(see FILE_HASHES)")
        result = task.result()
        if self.files is None:
            return ("file-management attributes reset; FILES is not known yet: asked "
                    "ThingsBoard for it")
        return (f"file-management attributes reset and {len(self.files)} file(s) reconciled: "
                + json.dumps(result.summary(), sort_keys=True))

    # -- one pass -----------------------------------------------------------------------

    async def _pass(self) -> PassResult:
        result = PassResult()
        if self.files is None:
            return result
        hashes_before = dict(self.hashes)
        for key, error in self.spec_errors.items():
            self._error(key, error, result)
        allowed = allowed_dirs(self.area)
        self._conflicts = self._find_conflicts(allowed)
        for key, text in self._conflicts.items():
            self._error(key, text, result)
        restart_for: list[str] = []
        for key, spec in self.files.items():
            if key in self._conflicts:
                continue
            try:
                wrote = await self._reconcile_one(key, spec, allowed, result)
            except FileRefused as exc:
                self._error(key, str(exc), result)
                continue
            except OSError as exc:
                self._retry.add(key)
                self._error(key, f"{spec.path}: cannot be read: {exc}", result)
                continue
            if wrote and spec.restart_controller_on_change:
                restart_for.append(key)
            self._clear_error(key)
        for gone in set(self.hashes) - set(self.files):
            del self.hashes[gone]
        for gone in set(self._on_disk) - set(self.files):
            del self._on_disk[gone]
        self._retry &= set(self.files)
        for gone in set(self._reported_errors) - set(self.files) - set(self.spec_errors):
            del self._reported_errors[gone]
        if self.hashes != hashes_before:
            self._save_state()
        self._publish_hashes()
        if restart_for:
            result.restarted = await self._restart_controller(restart_for)
        return result

    def _find_conflicts(self, allowed: list[Path]) -> dict[str, str]:
        """An error per key whose file (after resolving) is also another key's file:
        neither is written, or they would overwrite each other at every pass."""
        by_path: dict[Path, list[str]] = {}
        for key, spec in (self.files or {}).items():
            try:
                by_path.setdefault(locate(spec.path, self.area, allowed).path,
                                   []).append(key)
            except FileRefused:
                continue  # reported by the pass
        conflicts: dict[str, str] = {}
        for path, keys in by_path.items():
            if len(keys) > 1:
                for key in keys:
                    others = ", ".join(clip(k, 60) for k in keys if k != key)
                    conflicts[key] = (f"{clip(path)} is also managed by {clip(others)}: "
                                      "neither is written until one path is changed")
        return conflicts

    async def _reconcile_one(self, key: str, spec: FileSpec, allowed: list[Path],
                             result: PassResult) -> bool:
        """Bring one file to its desired content; True when it was written."""
        loc = locate(spec.path, self.area, allowed)
        path = loc.path
        desired: bytes | None = None
        refused: FileRefused | None = None
        if key in self.contents:
            try:
                desired = encode_content(spec, self.contents[key], self.max_bytes)
            except FileRefused as exc:
                refused = exc
        current = await self._read(loc)
        if current.problem == LINKED:
            self._mirror(spec, current)
            self._retry.discard(key)
            raise FileRefused(f"{clip(path)} has more than one hard link: refused (its "
                              "content could be another file's); give it a name of its own")
        wrote = False
        if desired is not None and current.data != desired:
            try:
                await self._write(loc, desired, spec.create_if_not_exist)
            except (OSError, FileRefused) as exc:
                self._retry.add(key)
                why = exc if isinstance(exc, FileRefused) else f"write failed: {exc}"
                self._mirror(spec, current)
                raise FileRefused(f"{path}: {why}") from None
            log.info("files: wrote %s (%s, %d bytes)", key, path, len(desired))
            wrote = True
            result.written.append(key)
            current = await self._read(loc)
        elif desired is not None:
            result.unchanged.append(key)
        self._mirror(spec, current)
        if desired is not None and current.data != desired:
            # Changed again between the write and the read back: the next poll retries,
            # however the disk looks now.
            self._retry.add(key)
        else:
            self._retry.discard(key)
        if desired is not None and current.data == desired:
            self.hashes[key] = FileHash(md5_hex(desired), spec.write_version)
        if refused is not None:
            raise refused
        if desired is None:
            result.no_content.append(key)
            log.debug("files: no %s%s yet; %s left as it is", CONTENT_PREFIX, key, path)
        return wrote

    async def _read(self, loc: Located) -> _Read:
        try:
            size = loc.path.stat().st_size  # only to choose a thread: not trusted
        except OSError:
            size = 0
        if size > THREAD_ABOVE_BYTES:
            return await asyncio.to_thread(_read_file, loc, self.max_bytes)
        return _read_file(loc, self.max_bytes)

    async def _write(self, loc: Located, data: bytes, create_dirs: bool) -> None:
        # fsync can take long on an SD card: keep it off the event loop.
        await asyncio.to_thread(_write_file, loc, data, create_dirs)

    def _mirror(self, spec: FileSpec, current: _Read) -> None:
        value: Any = current.problem or mirror_value(spec, current.data)
        md5 = None if current.data is None else md5_hex(current.data)
        self._on_disk[spec.key] = _OnDisk(current.signature, md5)
        attribute = READ_PREFIX + spec.key
        text = json.dumps({attribute: value}, separators=(",", ":"), ensure_ascii=False)
        limit = self.max_payload_bytes - ATTRIBUTE_OVERHEAD
        if len(text.encode()) > limit:
            value = TOO_LARGE
            text = json.dumps({attribute: value})
        if self._published_reads.get(spec.key) == text:
            return
        self._published_reads[spec.key] = text
        self._publish({attribute: value})

    def _publish_hashes(self) -> None:
        if self._published_hashes == self.hashes:
            return
        self._published_hashes = dict(self.hashes)
        self._publish({HASHES: encode(self._published_hashes)})

    async def _restart_controller(self, keys: list[str]) -> bool:
        reason = "managed file(s) changed: " + ", ".join(sorted(keys))
        if self._restart is None:
            log.warning("files: %s, but no controller is supervised: nothing restarted",
                        reason)
            return False
        try:
            await self._restart(reason)
        except Exception as exc:
            log.error("files: could not restart the controller after %s: %s", reason, exc)
            self._report({"files_error": f"controller restart after {reason} failed: {exc}"})
            return False
        return True

    def _error(self, key: str, text: str, result: PassResult) -> None:
        result.errors[key] = text
        if self._reported_errors.get(key) == text:
            return
        self._reported_errors[key] = text
        log.error("files: %s refused: %s", key, text)
        self._report({"files_error": clip(f"{clip(key, 100)}: {text}", 1200)})

    def _clear_error(self, key: str) -> None:
        if self._reported_errors.pop(key, None) is not None:
            log.info("files: %s is fine again", key)

    # -- durable state ------------------------------------------------------------------

    def _load_state(self) -> None:
        try:
            self.repo.load()
        except OSError as exc:
            log.error("files: could not save %s: %s", self.state_path, exc)
        damage = self.repo.damage
        if damage is not None:
            # Reported when the loop starts (telemetry is not open yet). What could still
            # be read is kept; the next pass finds every other hash again.
            self._state_damage = clip(f"the file-management state was damaged: "
                                      f"{damage.text}", 1000)
        self.hashes = dict(self.repo.facts.hashes)

    def _save_state(self) -> None:
        try:
            self.repo.set_facts(FileFacts(dict(self.hashes)))
        except OSError as exc:
            log.error("files: could not save %s: %s", self.state_path, exc)
