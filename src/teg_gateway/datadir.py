"""The data directory at start: created loudly when missing, refused clearly when unusable."""

from __future__ import annotations

import errno
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


class DataDirError(Exception):
    """The data directory cannot be used; the message names the path and says why."""


def prepare_data_dir(path: Path, what: str = "data directory (TEG_DATA_PATH)") -> bool:
    """Make sure ``path`` is a writable directory; True when it had to be created.

    Creating it is logged as a WARNING: a typo in the path would otherwise silently start
    a new, empty gateway (and provision a new device). A directory that cannot be created
    or written (read-only, full, wrong owner) raises DataDirError with the path and reason.
    """
    created = False
    if not path.is_dir():
        if path.exists():
            raise DataDirError(f"{what} {path} exists but is not a directory")
        try:
            path.mkdir(parents=True)
        except FileExistsError:
            pass
        except OSError as exc:
            raise DataDirError(f"{what} {path} does not exist and cannot be created: "
                               f"{_reason(exc)}") from None
        created = True
        log.warning("%s %s did not exist: created it. If this is not a new installation, "
                    "check the path for a typo: a new data directory means a new outbox, "
                    "and provisioning a new device", what, path)
    try:
        # A real write, not os.access(): root passes access() on a read-only bind mount's
        # files only through the mount flag, and a full disk shows only when writing.
        with tempfile.TemporaryFile(dir=path, prefix=".teg-write-test-") as probe:
            probe.write(b"x" * 4096)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        raise DataDirError(f"{what} {path} is not usable: {_reason(exc)}") from None
    return created


def _reason(exc: OSError) -> str:
    if exc.errno == errno.EROFS:
        return "read-only file system"
    if exc.errno == errno.ENOSPC:
        return "no space left on the device"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied for user id {os.geteuid()}"
    return exc.strerror or str(exc)
