"""Waking the intake when the controller commits, instead of on a timer.

A commit to the controller's queue writes its WAL file (``communication_queue.db-wal``),
or the database file itself for a controller not in WAL mode. Linux reports such writes
through inotify, so the intake worker sleeps until one of those two files changes, or until
another thread wakes it (``Wakeup.set``), or until its fallback timer runs out.

The directory holding the queue is watched, not the files: the WAL file comes and goes
(SQLite deletes it when the last connection closes) and the queue may be replaced by a
new file; a directory watch sees all of that. Events for other files in it (the gateway's
own databases may live there) are read and dropped without waking the intake.

inotify is reached through the C library with ``ctypes`` (``inotify_init1``,
``inotify_add_watch``; the events are read with ``os.read``): three calls of the standard
library, no dependency. Where inotify is missing (another OS, no instance left, a watch
refused) ``Wakeup.watching`` is false and the caller polls at its own interval. A network
file system shows only the writes made on this machine; the fallback timer covers the rest.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import select
import struct
import threading
import time
from collections.abc import Collection
from pathlib import Path

log = logging.getLogger(__name__)

# <sys/inotify.h>
IN_MODIFY = 0x00000002
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
WATCH_MASK = IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE | IN_ONLYDIR
EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name
READ_SIZE = 64 * 1024

# Why wait() returned.
SET = "set"
CHANGE = "change"
TIMEOUT = "timeout"


class _Inotify:
    """The three libc calls; None from ``open`` where inotify cannot be had."""

    def __init__(self, libc: ctypes.CDLL, fd: int) -> None:
        self.libc = libc
        self.fd = fd

    @classmethod
    def open(cls) -> _Inotify | None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            init = libc.inotify_init1
        except (OSError, AttributeError):
            return None
        init.argtypes = [ctypes.c_int]
        init.restype = ctypes.c_int
        libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        libc.inotify_add_watch.restype = ctypes.c_int
        fd = init(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            log.debug("inotify_init1: %s", os.strerror(ctypes.get_errno()))
            return None
        return cls(libc, fd)

    def add_watch(self, directory: Path, mask: int) -> int:
        wd = int(self.libc.inotify_add_watch(self.fd, os.fsencode(directory), mask))
        if wd < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), str(directory))
        return wd

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


class Wakeup:
    """A wake-up for one waiting thread: ``set()`` from any thread, or a write to one of
    ``names`` in ``directory`` (the names of files, e.g. the queue and its WAL file).

    ``wait(timeout)`` returns SET, CHANGE or TIMEOUT. Events that came while nobody waited
    are kept by the kernel: a commit made during a round wakes the next ``wait`` at once.
    """

    def __init__(self, directory: Path | None = None, names: Collection[str] = ()) -> None:
        self.directory = directory
        self.names = {os.fsencode(name) for name in names}
        self._lock = threading.Lock()
        self._read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._closed = False
        self._inotify: _Inotify | None = None
        self._wd: int | None = None
        self._poll = select.poll()
        self._poll.register(self._read_fd, select.POLLIN)
        if directory is not None and self.names:
            self._inotify = _Inotify.open()
            if self._inotify is not None:
                self._poll.register(self._inotify.fd, select.POLLIN)
                self.rewatch()

    @property
    def watching(self) -> bool:
        """True while writes to the watched files wake ``wait``."""
        return self._wd is not None

    def rewatch(self) -> bool:
        """Watch the directory again if the watch was lost (the directory was removed or
        replaced); True when watching."""
        if self._inotify is None or self.directory is None:
            return False
        try:
            self._wd = self._inotify.add_watch(self.directory, WATCH_MASK)
        except OSError as exc:
            if self._wd is not None or exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                log.debug("cannot watch %s for changes: %s", self.directory, exc)
            self._wd = None
        return self._wd is not None

    def set(self) -> None:
        """Wake the waiting thread (or its next wait). Safe from any thread, also after
        ``close``."""
        with self._lock:
            if self._closed:
                return
            with contextlib.suppress(BlockingIOError):  # already set: the pipe is full
                os.write(self._write_fd, b"\0")

    def wait(self, timeout: float) -> str:
        """Sleep until set, a change of a watched file, or ``timeout`` seconds."""
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            remaining = max(0.0, deadline - time.monotonic())
            ready = {fd for fd, _ in self._poll.poll(remaining * 1000)}
            if self._read_fd in ready:
                self._drain_pipe()
                return SET
            if self._inotify is not None and self._inotify.fd in ready and self._changed():
                return CHANGE
            if time.monotonic() >= deadline:
                return TIMEOUT

    def clear(self) -> None:
        """Forget a pending ``set``."""
        self._drain_pipe()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for fd in (self._read_fd, self._write_fd):
                with contextlib.suppress(OSError):
                    os.close(fd)
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None
            self._wd = None

    def _drain_pipe(self) -> None:
        with contextlib.suppress(OSError):
            while os.read(self._read_fd, 512):
                pass

    def _changed(self) -> bool:
        """Read every pending event; True when one concerns a watched file (or events were
        lost, or the watch ended: then a round must look)."""
        assert self._inotify is not None
        changed = False
        while True:
            try:
                data = os.read(self._inotify.fd, READ_SIZE)
            except BlockingIOError:
                return changed
            except OSError as exc:
                log.debug("reading inotify events: %s", exc)
                return True
            if not data:
                return changed
            offset = 0
            while offset + EVENT.size <= len(data):
                wd, mask, _cookie, length = EVENT.unpack_from(data, offset)
                name = data[offset + EVENT.size:offset + EVENT.size + length].rstrip(b"\0")
                offset += EVENT.size + length
                if mask & IN_Q_OVERFLOW:
                    changed = True
                elif mask & IN_IGNORED:
                    if wd == self._wd:
                        self._wd = None  # the directory went away: polling until rewatch
                    changed = True
                elif name in self.names:
                    changed = True
