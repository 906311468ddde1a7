"""Controller software update (OTA), driven by the shared attributes ``sw_title`` and
``sw_version`` (SPEC.md section 6).

Two kinds of release:

- a *package* stored in ThingsBoard (``sw_checksum`` is announced with the version): it
  is downloaded in chunks over MQTT, streamed to ``<data>/ota/<version>.part`` (resumed
  after a reconnect or a restart), verified with the named checksum algorithm and
  unpacked (.tar.gz or .zip) into ``<data>/controller/versions/<version>/``; a package
  stored elsewhere (``sw_url``) is fetched over https instead (``download.py``), and
  verified when a checksum comes with it;
- a *git release* (no checksum, ``TEG_CONTROLLER_GIT_PATH`` set): ``sw_version`` is a tag
  or commit, exported into the same directory by ``runtime.export_version``.

Then the supervisor switches to the new version. It must give a health signal within
``[ota] health_timeout_s`` and must not crash-loop, else the previous version is switched
back and ``sw_state`` FAILED says why; that version is not tried again until
``sw_version`` changes.

Every step is a state of a small machine persisted in ``<data>/state/ota.json`` *before*
the step is taken, so a restart or a power cut at any point resumes or resolves it:

``downloading`` → ``downloaded`` → ``verified`` → ``switching`` → ``updated``
and on any failure ``failed`` (after ``rolling_back`` once the switch was made).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import shutil
import ssl
import tarfile
import time
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from teg_gateway.bounds import clip
from teg_gateway.cloud.topics import OTA_ERRORS as ERROR_TOPICS
from teg_gateway.cloud.topics import SW_CHUNK_REQUEST as CHUNK_REQUEST
from teg_gateway.cloud.topics import SW_CHUNK_RESPONSE as CHUNK_RESPONSE
from teg_gateway.cloud.topics import SW_CHUNK_RESPONSE_RE as _CHUNK_TOPIC
from teg_gateway.config import Settings
from teg_gateway.controller.runtime import ControllerError, describe_exit
from teg_gateway.controller.supervisor import RUNNING, Supervisor
from teg_gateway.controller.versions import (
    check_version,
    export_version,
    version_dir,
    versions_dir,
)
from teg_gateway.fsutil import fsync_dir
from teg_gateway.murmur3 import Murmur3x64_128, Murmur3x86_32
from teg_gateway.operations.download import DownloadError, UrlDownload, check_url, tls_context
from teg_gateway.store.state import Loaded, StateFile, store_state

log = logging.getLogger(__name__)

# sw_state values
DOWNLOADING = "DOWNLOADING"
DOWNLOADED = "DOWNLOADED"
VERIFIED = "VERIFIED"
UPDATING = "UPDATING"
UPDATED = "UPDATED"
FAILED = "FAILED"

# phases of the persisted state machine
IDLE = "idle"
P_DOWNLOADING = "downloading"
P_DOWNLOADED = "downloaded"
P_VERIFIED = "verified"
P_SWITCHING = "switching"
P_ROLLING_BACK = "rolling_back"
P_UPDATED = "updated"
P_FAILED = "failed"

PACKAGE = "package"
URL = "url"
GIT = "git"

#: The shared attributes OTA needs, asked for on every connect.
SHARED_KEYS = ("sw_title", "sw_version", "sw_size", "sw_checksum", "sw_checksum_algorithm",
               "sw_url")
ALGORITHMS = ("MD5", "SHA256", "SHA384", "SHA512", "CRC32", "MURMUR3_32", "MURMUR3_128")
#: A new version that fails this many times after the switch is crash-looping.
CRASH_LIMIT = 3
FSYNC_EVERY_BYTES = 1024 * 1024
HASH_BLOCK = 1024 * 1024
#: Unpacked content may be at most this many times the package limit (zip bombs).
UNPACK_FACTOR = 8
MAX_URL_CHARS = 4096

Publish = Callable[[str, bytes | str], "asyncio.Future[None]"]
Report = Callable[[dict[str, Any]], None]


class OtaError(Exception):
    """An update step failed; the message is the ``sw_error`` shown to the operator."""


class _Refetch(Exception):
    """A resumed download did not verify: fetch it once more from the start."""


# -- checksums ----------------------------------------------------------------------------


def _new_hasher(algorithm: str) -> Any:
    name = algorithm.upper()
    if name in ("MD5", "SHA256", "SHA384", "SHA512"):
        return hashlib.new(name.lower())
    if name == "CRC32":
        return _Crc32()
    if name == "MURMUR3_32":
        return Murmur3x86_32()
    if name == "MURMUR3_128":
        return Murmur3x64_128()
    raise OtaError(f"checksum algorithm {clip(repr(algorithm))} is not supported (use one of "
                   f"{', '.join(ALGORITHMS)})")


class _Crc32:
    def __init__(self) -> None:
        self.value = 0

    def update(self, data: bytes) -> None:
        self.value = zlib.crc32(data, self.value)


def checksum_forms(algorithm: str, hasher: Any) -> set[str]:
    """The lower-case texts that count as a match for a finished ``hasher``.

    The hashlib digests have one form. CRC32 and MurmurHash3 are written differently by
    different tools (ThingsBoard's Guava prints the bytes little-endian, the Python
    client big-endian, some a decimal number), so every usual form is accepted."""
    name = algorithm.upper()
    if name in ("MD5", "SHA256", "SHA384", "SHA512"):
        return {hasher.hexdigest().lower()}
    if name == "CRC32":
        value = hasher.value & 0xFFFFFFFF
        raw = value.to_bytes(4, "big")
    elif name == "MURMUR3_32":
        raw = hasher.digest()  # little-endian bytes of the unsigned value
        value = int.from_bytes(raw, "little")
        raw = value.to_bytes(4, "big")
    else:
        le = hasher.digest()  # h1 then h2, each little-endian (Guava's HashCode bytes)
        value = int.from_bytes(le, "little")
        return {le.hex(), f"{value:032x}", f"{value:x}", str(value)}
    return {raw.hex(), raw[::-1].hex(), f"{value:x}", str(value)}


def file_checksum_matches(path: Path, algorithm: str, expected: str) -> tuple[bool, str]:
    """Hash ``path`` block by block; (matches, the digest in its main form)."""
    hasher = _new_hasher(algorithm)
    with path.open("rb") as fh:
        while block := fh.read(HASH_BLOCK):
            hasher.update(block)
    forms = checksum_forms(algorithm, hasher)
    main = sorted(forms, key=len)[-1]
    return expected.strip().lower() in forms, main


# -- unpacking ----------------------------------------------------------------------------


def unpack_package(package: Path, dest: Path, max_bytes: int) -> None:
    """Unpack a .tar.gz (or any tar) or .zip ``package`` into the new directory ``dest``.

    A member that would land outside ``dest`` (absolute, ``..``, a link pointing out)
    refuses the whole package. When everything sits in one top-level directory, its
    content becomes the version directory. Any failure (a damaged archive, a full disk,
    a file where the package has a directory, ...) raises OtaError saying why."""
    try:
        _unpack_any(package, dest, max_bytes)
    except OtaError:
        raise
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise OtaError("no space left on the device while unpacking the package "
                           f"({clip(exc.filename or dest)})") from None
        raise OtaError(f"the package cannot be unpacked: {clip(exc, 500)}") from None
    except Exception as exc:  # damaged archives raise many kinds (EOFError, zlib.error, ...)
        raise OtaError(f"the package is not a readable archive: {type(exc).__name__}: "
                       f"{clip(exc, 500)}") from None


def _unpack_any(package: Path, dest: Path, max_bytes: int) -> None:
    dest.mkdir(parents=True)
    if zipfile.is_zipfile(package):
        _unpack_zip(package, dest, max_bytes)
    else:
        try:
            is_tar = tarfile.is_tarfile(package)
        except OSError:  # not gzip at all; a damaged gzip raises on, as unreadable
            is_tar = False
        if not is_tar:
            raise OtaError("the package is neither a .tar.gz nor a .zip archive")
        _unpack_tar(package, dest, max_bytes)
    entries = list(dest.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink():
        inner = entries[0]
        moved = dest / f".unwrap-{os.getpid()}"
        inner.rename(moved)
        for child in moved.iterdir():
            child.rename(dest / child.name)
        moved.rmdir()


def _safe_name(name: str) -> bool:
    path = PurePosixPath(name.replace("\\", "/"))
    return not path.is_absolute() and ".." not in path.parts and name.strip() != ""


def _check_members(names: list[str], unpacked_bytes: int, max_bytes: int) -> None:
    """OtaError for a member that would land outside the target, or too much content."""
    for name in names:
        if not _safe_name(name):
            raise OtaError(f"package refused: member {clip(repr(name))} would land outside "
                           "the version directory")
    if unpacked_bytes > max_bytes:
        raise OtaError(f"package refused: it unpacks to more than {max_bytes} bytes")


def _unpack_zip(package: Path, dest: Path, max_bytes: int) -> None:
    with zipfile.ZipFile(package) as archive:
        infos = archive.infolist()
        _check_members([i.filename for i in infos], sum(i.file_size for i in infos),
                       max_bytes)
        archive.extractall(dest)


#: Whether this Python's tarfile has the extraction filters (3.11.4 and later; Debian
#: bookworm's 3.11.2, the system Python of Raspberry Pi OS, has not).
HAS_TAR_FILTER = hasattr(tarfile, "data_filter")


def _unpack_tar(package: Path, dest: Path, max_bytes: int,
                use_filter: bool = HAS_TAR_FILTER) -> None:
    """Extract a tar after checking every member ourselves (the same rules on every
    Python): regular files, directories and links only; no set-id bits, no ownership
    taken from the archive. With tarfile's ``data`` filter (when this Python has it)
    links are also checked where they really point; without it, a link must point
    downwards (no ``..``, not absolute) and no member may be reached through a link."""
    try:
        with tarfile.open(package) as archive:
            members = archive.getmembers()
            _check_members([m.name for m in members],
                           sum(m.size for m in members if m.isfile()), max_bytes)
            _check_tar_members(members, strict_links=not use_filter)
            if use_filter:
                archive.extractall(dest, members=members, numeric_owner=True,
                                   filter="data")
            else:
                archive.extractall(dest, members=members, numeric_owner=True)
    except OtaError:
        raise
    except tarfile.TarError as exc:
        if isinstance(exc, getattr(tarfile, "FilterError", ())):
            raise OtaError(f"package refused: {clip(exc, 500)}") from None
        raise OtaError(f"the package is not a readable archive: {clip(exc, 500)}") from None


def _check_tar_members(members: list[tarfile.TarInfo], strict_links: bool) -> None:
    uid, gid = os.getuid(), os.getgid()
    links = {PurePosixPath(m.name) for m in members if m.issym() or m.islnk()}
    for member in members:
        shown = clip(repr(member.name))
        if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
            raise OtaError(f"package refused: member {shown} is a device, a FIFO or another "
                           "special file")
        path = PurePosixPath(member.name)
        if strict_links and any(parent in links for parent in path.parents):
            raise OtaError(f"package refused: member {shown} lies below a link")
        if member.issym() or member.islnk():
            target = member.linkname.replace("\\", "/")
            if member.islnk() and not _safe_name(target):
                raise OtaError(f"package refused: hard link {shown} points outside")
            if member.issym() and (target.startswith("/") or (
                    strict_links and ".." in PurePosixPath(target).parts)):
                raise OtaError(f"package refused: symbolic link {shown} -> "
                               f"{clip(repr(target))} may point outside the version "
                               "directory" + ("" if not strict_links else
                                              " (links with '..' need Python 3.11.4+)"))
        member.mode = (member.mode or 0o644) & 0o755 | (0o700 if member.isdir() else 0o600)
        member.uid, member.gid, member.uname, member.gname = uid, gid, "", ""


def _remove_tree(path: Path) -> None:
    """Remove a directory by renaming it away first, so a half-removed tree never keeps
    the name of a version."""
    if not path.exists():
        return
    trash = path.parent / f".{path.name}.trash-{os.getpid()}-{time.monotonic_ns()}"
    os.replace(path, trash)
    fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


# -- the manager --------------------------------------------------------------------------


class OtaManager:
    """Runs controller updates; see the module docstring.

    ``publish(topic, payload)`` publishes to ThingsBoard and returns the PUBACK future;
    ``report(values)`` sends telemetry; ``state_path`` is ``<data>/state/ota.json``.
    Wire ``subscriptions()`` and ``shared_keys()`` into the session before it starts,
    ``on_shared`` as an attribute listener, ``on_message`` into the message router,
    ``on_connect`` as an on-connect callback, and run ``run()``.
    """

    def __init__(self, settings: Settings, supervisor: Supervisor | None, publish: Publish,
                 report: Report, state_path: Path, *, poll_s: float = 0.1) -> None:
        self.settings = settings
        self.supervisor = supervisor
        self._publish = publish
        self._report_cb = report
        self.state = StateFile(state_path, on_damage=self._state_damaged)
        self.poll_s = poll_s
        self.download_dir = settings.data_dir / "ota"
        self._wake = asyncio.Event()
        self._connected = asyncio.Event()
        self._reconnected = asyncio.Event()
        self._pending: tuple[str, int, asyncio.Future[bytes]] | None = None

    def _state_damaged(self, loaded: Loaded) -> None:
        """``ota.json`` was damaged (and moved aside): whatever update it described is
        resolved as failed, with the reason; ThingsBoard's next announcement starts over."""
        error = (f"the OTA state was damaged and the update in progress (if any) is "
                 f"abandoned: {loaded.damage}")
        store_state(self.state.path, {"phase": P_FAILED, "error": clip(error)})
        self._discard_partials()
        self._report(FAILED, sw_error=clip(error))

    # -- wiring ---------------------------------------------------------------------------

    def subscriptions(self) -> list[str]:
        return [CHUNK_RESPONSE + "+/chunk/+", *ERROR_TOPICS]

    def shared_keys(self) -> list[str]:
        return list(SHARED_KEYS)

    def on_connect(self) -> None:
        """A (re)connection: a download in progress asks for its chunk again at once."""
        self._connected.set()
        self._reconnected.set()
        self._wake.set()

    def on_shared(self, changes: dict[str, Any]) -> None:
        """Shared attribute changes (an update or a response, deleted keys as None)."""
        if "sw_version" not in changes:
            return
        version = changes.get("sw_version")
        if version is None or version == "":
            log.info("sw_version removed: no controller update wanted")
            self.state.update(desired=None)
            return
        try:
            version = check_version(clip(version, 200))
        except ValueError as exc:
            self._report(FAILED, sw_error=clip(exc, 1000))
            return
        url = changes.get("sw_url")
        if url and len(str(url)) > MAX_URL_CHARS:
            self._report(FAILED, sw_error=f"sw_url is longer than {MAX_URL_CHARS} characters")
            return
        saved = self.state.read()
        title = clip(changes.get("sw_title") or version, 200)
        desired: dict[str, Any] = {"title": title, "version": version}
        if url:
            desired.update(kind=URL, url=str(url),
                           checksum=clip(changes.get("sw_checksum") or "", 200),
                           algorithm=clip(changes.get("sw_checksum_algorithm") or "SHA256", 40),
                           size=changes.get("sw_size"))
            self.state.update(package_info=desired)
        elif changes.get("sw_checksum"):
            desired.update(kind=PACKAGE, checksum=clip(changes["sw_checksum"], 200),
                           algorithm=clip(changes.get("sw_checksum_algorithm") or "SHA256", 40),
                           size=changes.get("sw_size"))
            self.state.update(package_info=desired)
        else:
            # A partial answer (only title and version) for a package seen before keeps
            # its checksum; otherwise a version without a checksum is a git release.
            info = saved.get("package_info")
            if isinstance(info, dict) and info.get("version") == version:
                desired = dict(info)
            else:
                desired["kind"] = GIT
        old = saved.get("desired")
        if isinstance(old, dict) and old.get("version") == version and \
                old.get("kind") == desired.get("kind") and \
                old.get("checksum") == desired.get("checksum") and \
                old.get("url") == desired.get("url"):
            return
        log.info("controller update wanted: %s %s (%s)", title, version, desired["kind"])
        fields: dict[str, Any] = {"desired": desired}
        if saved.get("failed_version") not in (None, version):
            fields["failed_version"] = None  # sw_version changed: a failed one may be retried
        self.state.update(**fields)
        self._wake.set()

    def on_message(self, topic: str, payload: bytes) -> bool:
        """A message from ThingsBoard; True when it was an OTA message."""
        if topic in ERROR_TOPICS:
            text = payload.decode("utf-8", errors="replace")[:500]
            log.error("ThingsBoard reports an OTA error: %s", text)
            if self._pending is not None and not self._pending[2].done():
                self._pending[2].set_exception(OtaError(f"ThingsBoard: {text}"))
            return True
        match = _CHUNK_TOPIC.match(topic)
        if match is None:
            return topic.startswith(CHUNK_RESPONSE)
        pending = self._pending
        if pending is not None and pending[0] == match[1] and pending[1] == int(match[2]) \
                and not pending[2].done():
            pending[2].set_result(payload)
        else:
            log.debug("OTA chunk %s ignored (not the one awaited)", topic)
        return True

    # -- the loop -------------------------------------------------------------------------

    async def run(self) -> None:
        """Resume what the state file says, then handle each wanted version; never
        raises (a step that fails reports FAILED)."""
        self._report_current()
        while True:
            self._wake.clear()
            try:
                await self._step()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("OTA step failed unexpectedly")
                await asyncio.sleep(5.0)
                continue
            await self._wake.wait()

    async def _step(self) -> None:
        saved = self.state.read()
        phase = saved.get("phase", IDLE)
        job = saved.get("job")
        if phase in (P_SWITCHING, P_ROLLING_BACK) and isinstance(job, dict):
            await self._resume_switch(phase, job)
            return
        desired = saved.get("desired")
        if not isinstance(desired, dict):
            return
        version = desired["version"]
        if version == saved.get("failed_version"):
            return
        current = saved.get("current") or {}
        if phase == P_UPDATED and current.get("version") == version:
            return
        if isinstance(job, dict) and job.get("version") == version and \
                job.get("kind") == desired.get("kind") and \
                job.get("checksum") == desired.get("checksum") and \
                job.get("url") == desired.get("url") and \
                phase in (P_DOWNLOADING, P_DOWNLOADED, P_VERIFIED):
            await self._work(job, phase)
            return
        await self._begin(desired, saved)

    async def _begin(self, desired: dict[str, Any], saved: dict[str, Any]) -> None:
        version = desired["version"]
        if self.supervisor is None:
            self._fail_job(dict(desired), "no controller is supervised "
                           "([controller] runtime is none): nothing to update", None)
            return
        if self.supervisor.version == version:
            log.info("controller already runs version %s", version)
            self.state.update(phase=P_UPDATED, job=None,
                              current={"title": desired["title"], "version": version})
            self._report(UPDATED, current_sw_title=desired["title"],
                         current_sw_version=version)
            return
        request_id = int(saved.get("request_counter") or 0) + 1
        job = {**desired, "request_id": str(request_id), "resumes": 0, "restarted": False}
        self._discard_partials()
        self.state.update(phase=P_DOWNLOADING, job=job, request_counter=request_id)
        await self._work(job, P_DOWNLOADING)

    async def _work(self, job: dict[str, Any], phase: str) -> None:
        """Take the job from ``phase`` to the switch."""
        version = job["version"]
        try:
            if job["kind"] == GIT:
                if phase == P_DOWNLOADING:
                    self._report(DOWNLOADING)
                    await self._export(version)
                    self.state.update(phase=P_DOWNLOADED)
                    self._report(DOWNLOADED)
                self.state.update(phase=P_VERIFIED)
                self._report(VERIFIED)
            else:
                part = self._part_path(job)
                if phase == P_DOWNLOADING:
                    self._report(DOWNLOADING)
                    fetch = self._download_url if job["kind"] == URL else self._download
                    if not await fetch(job, part):
                        return  # superseded by another sw_version
                    self.state.update(phase=P_DOWNLOADED)
                    self._report(DOWNLOADED)
                    phase = P_DOWNLOADED
                if phase == P_DOWNLOADED:
                    try:
                        await self._verify(job, part)
                    except _Refetch:
                        job = {**job, "restarted": False, "refetched": True}
                        self.state.update(phase=P_DOWNLOADING, job=job)
                        await self._work(job, P_DOWNLOADING)
                        return
                    self.state.update(phase=P_VERIFIED)
                    self._report(VERIFIED)
                await self._unpack(job, part)
        except (OtaError, ControllerError) as exc:
            self._fail_job(job, clip(exc, 1000), None)
            return
        except Exception as exc:
            # Whatever else goes wrong before the switch ends this job, with the reason:
            # retrying the same step for ever would leave the device stuck.
            log.exception("controller update to %s: unexpected failure", version)
            self._fail_job(job, f"unexpected failure: {type(exc).__name__}: {clip(exc, 500)}",
                           None)
            return
        await self._switch(job)

    # -- steps ----------------------------------------------------------------------------

    def _part_path(self, job: dict[str, Any]) -> Path:
        return self.download_dir / f"{job['version']}.part"

    def _discard_partials(self) -> None:
        if self.download_dir.is_dir():
            for path in self.download_dir.glob("*.part"):
                path.unlink(missing_ok=True)

    async def _export(self, version: str) -> None:
        if not self.settings.paths.controller_git:
            raise OtaError(f"version {version} comes without a package (no sw_checksum) and "
                           "no controller git repository is configured "
                           "(TEG_CONTROLLER_GIT_PATH)")
        await export_version(self.settings, version)

    async def _download(self, job: dict[str, Any], part: Path) -> bool:
        """Fetch the package chunk by chunk into ``part``; False when another version
        became wanted meanwhile (the download is abandoned)."""
        ota = self.settings.ota
        size = job.get("size")
        size = size if isinstance(size, int) and size >= 0 else None
        if size is not None and size > ota.max_package_bytes:
            raise OtaError(f"package of {size} bytes is larger than [ota] max_package_bytes "
                           f"({ota.max_package_bytes})")
        chunk_size = ota.chunk_size
        part.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            have = os.fstat(fd).st_size
            number = have // chunk_size
            offset = number * chunk_size
            if offset != have:
                os.ftruncate(fd, offset)
            if offset:
                log.info("resuming the download of %s at byte %d (chunk %d)",
                         job["version"], offset, number)
                self.state.update(job={**job, "restarted": True})
                job["restarted"] = True
            unsynced = 0
            request_id = job["request_id"]
            while size is None or offset < size:
                if self._superseded(job):
                    log.info("download of %s abandoned: another version is wanted",
                             job["version"])
                    return False
                data = await self._fetch_chunk(request_id, number, chunk_size)
                if not data:
                    if size is not None and offset < size:
                        raise OtaError(f"the package ended after {offset} of {size} bytes")
                    break
                if offset + len(data) > (size if size is not None else ota.max_package_bytes):
                    raise OtaError("the package is larger than announced" if size is not None
                                   else f"package larger than [ota] max_package_bytes "
                                        f"({ota.max_package_bytes})")
                os.pwrite(fd, data, offset)
                offset += len(data)
                number += 1
                unsynced += len(data)
                if unsynced >= FSYNC_EVERY_BYTES:
                    await asyncio.to_thread(os.fsync, fd)
                    unsynced = 0
                if len(data) < chunk_size:
                    break
            if size is not None and offset != size:
                raise OtaError(f"received {offset} bytes, {size} were announced")
            await asyncio.to_thread(os.fsync, fd)
        finally:
            os.close(fd)
        log.info("package %s downloaded: %d bytes", job["version"], offset)
        return True

    def _superseded(self, job: dict[str, Any]) -> bool:
        desired = self.state.read().get("desired")
        return not isinstance(desired, dict) or desired.get("version") != job["version"]

    async def _fetch_chunk(self, request_id: str, number: int, chunk_size: int) -> bytes:
        """One chunk: ask, wait (ask again after chunk_timeout_s, or at once after a
        reconnect), for as long as it takes."""
        topic = f"{CHUNK_REQUEST}{request_id}/chunk/{number}"
        loop = asyncio.get_running_loop()
        while True:
            future: asyncio.Future[bytes] = loop.create_future()
            self._pending = (request_id, number, future)
            self._reconnected.clear()
            sent = self._publish(topic, str(chunk_size))
            sent.add_done_callback(self._publish_done)
            reconnect: asyncio.Future[Any] = asyncio.ensure_future(self._reconnected.wait())
            waiting: set[asyncio.Future[Any]] = {future, reconnect}
            try:
                await asyncio.wait(waiting,
                                   timeout=self.settings.ota.chunk_timeout_s,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                reconnect.cancel()
                self._pending = None
            if future.done():
                return future.result()  # raises OtaError for an error from ThingsBoard
            future.cancel()
            if not self._reconnected.is_set():
                if sent.done() and sent.exception() is not None:
                    # Not connected: wait for the connection instead of asking in vain.
                    self._connected.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._connected.wait(),
                                               self.settings.ota.chunk_timeout_s)
                else:
                    log.warning("OTA chunk %d not answered in %.0f s: asking again", number,
                                self.settings.ota.chunk_timeout_s)

    @staticmethod
    def _publish_done(fut: asyncio.Future[None]) -> None:
        if not fut.cancelled():
            fut.exception()

    async def _download_url(self, job: dict[str, Any], part: Path) -> bool:
        """Fetch the package from ``sw_url`` into ``part``; False when superseded."""
        ota = self.settings.ota
        size = job.get("size")
        try:
            check_url(job["url"], ota.allow_http)
            download = UrlDownload(
                job["url"], part, size=size if isinstance(size, int) and size >= 0 else None,
                max_bytes=ota.max_package_bytes, context=tls_context(ota.url_ca_cert),
                timeout_s=ota.chunk_timeout_s, superseded=lambda: self._superseded(job),
                allow_http=ota.allow_http)
            if part.exists() and part.stat().st_size:
                self.state.update(job={**job, "restarted": True})
                job["restarted"] = True
            done = await download.run()
        except (DownloadError, ssl.SSLError, OSError) as exc:
            part.unlink(missing_ok=True)
            raise OtaError(str(exc)) from None
        if done:
            log.info("package %s downloaded from %s: %d bytes", job["version"], job["url"],
                     part.stat().st_size)
        return done

    async def _verify(self, job: dict[str, Any], part: Path) -> None:
        algorithm = str(job.get("algorithm") or "SHA256").upper()
        expected = str(job.get("checksum") or "")
        if not expected and job.get("kind") == URL:
            log.warning("package %s from %s comes without a checksum: its integrity rests "
                        "on TLS alone", job["version"], job["url"])
            return
        _new_hasher(algorithm)  # an unknown algorithm fails before hashing
        ok, actual = await asyncio.to_thread(file_checksum_matches, part, algorithm, expected)
        if ok:
            log.info("package %s verified (%s)", job["version"], algorithm)
            return
        part.unlink(missing_ok=True)
        if job.get("restarted") and not job.get("refetched"):
            log.warning("resumed download of %s does not verify: fetching it again from "
                        "the start", job["version"])
            raise _Refetch
        raise OtaError(f"checksum mismatch: {algorithm} of the downloaded package is "
                       f"{actual}, ThingsBoard announced {clip(expected)}")

    async def _unpack(self, job: dict[str, Any], part: Path) -> None:
        dest = version_dir(self.settings, job["version"])
        if not part.exists():
            if dest.is_dir():
                return  # unpacked before a restart; the package was already removed
            raise OtaError("the downloaded package is missing")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{job['version']}.unpack-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        limit = self.settings.ota.max_package_bytes * UNPACK_FACTOR
        try:
            await asyncio.to_thread(unpack_package, part, tmp, limit)
            await asyncio.to_thread(_remove_tree, dest)
            os.replace(tmp, dest)
            fsync_dir(dest.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        part.unlink(missing_ok=True)
        log.info("package %s unpacked into %s", job["version"], dest)

    async def _switch(self, job: dict[str, Any]) -> None:
        assert self.supervisor is not None
        previous = self.supervisor.version
        job = {**job, "previous": previous}
        self.state.update(phase=P_SWITCHING, job=job)
        self._report(UPDATING)
        with contextlib.suppress(OSError):
            os.utime(version_dir(self.settings, job["version"]))
        baseline = self.supervisor.consecutive_failures
        try:
            await self.supervisor.switch_version(job["version"])
        except ControllerError as exc:
            await self._roll_back(job, f"version {job['version']} could not be started: {exc}")
            return
        await self._confirm(job, baseline)

    async def _resume_switch(self, phase: str, job: dict[str, Any]) -> None:
        """The gateway stopped (or lost power) during a switch or a rollback."""
        assert self.supervisor is not None or phase == P_ROLLING_BACK
        if phase == P_ROLLING_BACK or self.supervisor is None:
            await self._roll_back(job, str(job.get("error") or "the update was interrupted"))
            return
        resumes = int(job.get("resumes") or 0) + 1
        job = {**job, "resumes": resumes}
        self.state.update(job=job)
        if resumes > 1:
            await self._roll_back(job, "the gateway restarted twice before version "
                                       f"{job['version']} proved healthy")
            return
        log.warning("the gateway restarted during the switch to %s: waiting for its health "
                    "signal again", job["version"])
        self._report(UPDATING)
        baseline = self.supervisor.consecutive_failures
        if self.supervisor.version != job["version"]:
            try:
                await self.supervisor.switch_version(job["version"])
            except ControllerError as exc:
                await self._roll_back(job, f"version {job['version']} could not be started: "
                                           f"{exc}")
                return
        await self._confirm(job, baseline)

    async def _confirm(self, job: dict[str, Any], baseline: int) -> None:
        problem = await self._watch_health(baseline)
        if problem is not None:
            await self._roll_back(job, problem)
            return
        current = {"title": job["title"], "version": job["version"]}
        self.state.update(phase=P_UPDATED, job=None, current=current)
        log.info("controller updated to %s %s", job["title"], job["version"])
        # Old versions go first, so UPDATED means the device is in its final state.
        try:
            await self._prune(keep={job["version"], str(job.get("previous") or "")})
        except Exception:
            log.exception("removing old controller versions failed")
        self._report(UPDATED, current_sw_title=job["title"], current_sw_version=job["version"])

    async def _watch_health(self, baseline: int) -> str | None:
        """None when the new version gave a health signal within health_timeout_s and
        still runs ``settle`` seconds later; else why not."""
        sup = self.supervisor
        assert sup is not None
        timeout = self.settings.ota.health_timeout_s
        settle = min(self.settings.controller.healthy_after_s, timeout)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        healthy_since: float | None = None
        failures_at_health = 0
        while True:
            baseline = min(baseline, sup.consecutive_failures)
            failures = sup.consecutive_failures - baseline
            now = loop.time()
            if failures >= CRASH_LIMIT:
                return (f"the new version crashed {failures} times "
                        f"(last: {describe_exit(sup.runtime.last_exit())})")
            if healthy_since is None:
                if now >= deadline:
                    if failures:
                        return (f"the new version crashed {failures} time(s) and gave no "
                                f"health signal within {timeout:g} s")
                    return f"the new version gave no health signal within {timeout:g} s"
                if await sup.wait_healthy(min(self.poll_s, deadline - now)) and \
                        sup.state == RUNNING:
                    healthy_since = loop.time()
                    failures_at_health = failures
            elif failures > failures_at_health:
                healthy_since = None  # crashed after its health signal: needs a new one
            elif now - healthy_since >= settle and sup.state == RUNNING:
                return None
            else:
                await asyncio.sleep(self.poll_s)

    async def _roll_back(self, job: dict[str, Any], reason: str) -> None:
        previous = job.get("previous")
        job = {**job, "error": reason}
        self.state.update(phase=P_ROLLING_BACK, job=job)
        log.error("controller version %s failed: %s", job["version"], reason)
        if not previous:
            self._fail_job(job, f"{reason}; no previous version to roll back to", None)
            return
        assert self.supervisor is not None
        if self.supervisor.version != previous or self.supervisor.state != RUNNING:
            try:
                await self.supervisor.switch_version(previous)
            except ControllerError as exc:
                log.error("rollback to %s: start failed (%s); the supervisor keeps trying",
                          previous, exc)
        self._fail_job(job, f"{reason}; rolled back to version {previous}", previous)

    def _fail_job(self, job: dict[str, Any], error: str, rolled_back_to: str | None) -> None:
        fields: dict[str, Any] = {"phase": P_FAILED, "job": None,
                                  "failed_version": job.get("version"), "error": error}
        if rolled_back_to is not None:
            saved = self.state.read().get("current") or {}
            if saved.get("version") != rolled_back_to:
                fields["current"] = {"title": saved.get("title") or rolled_back_to,
                                     "version": rolled_back_to}
        self.state.update(**fields)
        self._discard_partials()
        log.error("controller update to %s failed: %s", job.get("version"), error)
        self._report(FAILED, sw_error=error)

    async def _prune(self, keep: set[str]) -> None:
        """Keep ``keep_versions`` version directories (the newest by last switch), never
        the running one or the rollback target; the runtime frees what it kept for the
        others (docker: their images)."""
        base = versions_dir(self.settings)
        try:
            dirs = [p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")]
        except OSError:
            return
        dirs.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        kept = [p for p in dirs if p.name in keep]
        others = [p for p in dirs if p.name not in keep]
        room = max(0, self.settings.ota.keep_versions - len(kept))
        for old in others[room:]:
            log.info("removing old controller version %s", old.name)
            _remove_tree(old)
            if self.supervisor is not None:
                await self.supervisor.runtime.remove_version(old.name)

    # -- reporting ------------------------------------------------------------------------

    def _report_current(self) -> None:
        current = self.state.read().get("current")
        if isinstance(current, dict) and current.get("version"):
            self._send({"current_sw_title": current.get("title") or "",
                        "current_sw_version": current["version"]})
        elif self.supervisor is not None and self.supervisor.version:
            self._send({"current_sw_version": self.supervisor.version})

    def _report(self, state: str, **extra: Any) -> None:
        self._send({"sw_state": state, **extra})

    def _send(self, values: dict[str, Any]) -> None:
        try:
            self._report_cb(values)
        except Exception:
            log.exception("OTA state could not be reported")
