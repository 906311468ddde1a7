"""Durable file writes: temp file in the same directory, fsync, rename, fsync directory."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` so that a power cut leaves the old or the new file.

    The temporary file is created with ``mode`` from the start, so a secret is never
    readable by others, not even for an instant.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        atomic_write_at(dir_fd, path.name, data, mode)
    finally:
        os.close(dir_fd)


def atomic_write_at(dir_fd: int, name: str, data: bytes, mode: int = 0o644) -> None:
    """:func:`atomic_write` of file ``name`` in the directory open as ``dir_fd``.

    Neither the temporary file nor ``name`` is reached through a symbolic link: the
    rename replaces whatever has that name in this very directory.
    """
    tmp = f".{name}.tmp-{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=dir_fd)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 mode, dir_fd=dir_fd)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    os.close(fd)
    os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    with contextlib.suppress(OSError):
        os.fsync(dir_fd)


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new file in ``directory`` durable."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_json(path: Path, value: Any, mode: int = 0o644) -> None:
    """Write ``value`` as JSON with :func:`atomic_write`."""
    atomic_write(path, json.dumps(value, indent=1, sort_keys=True).encode() + b"\n", mode)


def read_json(path: Path) -> Any:
    """Read a JSON file; None when it does not exist or does not parse."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
