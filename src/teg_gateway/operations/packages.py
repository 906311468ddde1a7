"""Controller packages: checksums, safe unpacking, and removal of version directories.

Used by the update pipeline (``update.py``) for packages from ThingsBoard, from a URL and
from the local bus alike.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tarfile
import time
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Any

from teg_gateway.bounds import clip
from teg_gateway.fsutil import fsync_dir
from teg_gateway.murmur3 import Murmur3x64_128, Murmur3x86_32

ALGORITHMS = ("MD5", "SHA256", "SHA384", "SHA512", "CRC32", "MURMUR3_32", "MURMUR3_128")
HASH_BLOCK = 1024 * 1024
#: Unpacked content may be at most this many times the package limit (zip bombs).
UNPACK_FACTOR = 8


class OtaError(Exception):
    """An update step failed; the message is the ``sw_error`` shown to the operator."""


# -- checksums ----------------------------------------------------------------------------


def new_hasher(algorithm: str) -> Any:
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
    hasher = new_hasher(algorithm)
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


def remove_tree(path: Path) -> None:
    """Remove a directory by renaming it away first, so a half-removed tree never keeps
    the name of a version."""
    if not path.exists():
        return
    trash = path.parent / f".{path.name}.trash-{os.getpid()}-{time.monotonic_ns()}"
    os.replace(path, trash)
    fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)
