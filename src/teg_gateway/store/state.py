"""Small durable state files (JSON objects, written atomically) under ``<data>/state``.

:func:`load_state` reads one (the operations' repositories in ``operations/engine.py``
and :class:`StateFile` use it). A file that cannot be parsed is never read as empty in
silence: it is renamed to ``<name>.corrupt-<time>`` (kept for a post-mortem), logged as
an ERROR, and the caller gets a :class:`Loaded` whose ``damage`` says what happened, so it
can resolve the operation the file described as failed, with a reason.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from teg_gateway.fsutil import atomic_write_json, fsync_dir

log = logging.getLogger(__name__)

#: At most this much of a damaged file is kept in memory for recovery of what it held.
RAW_KEEP_BYTES = 64 * 1024


@dataclass(frozen=True)
class Loaded:
    """The content of a state file; ``damage`` is None unless the file was damaged (then
    ``value`` is empty, ``quarantined`` is where the file went and ``raw`` holds the
    start of its bytes, for the caller to recover what it can)."""

    value: dict[str, Any]
    damage: str | None = None
    quarantined: Path | None = None
    raw: bytes = b""


def load_state(path: Path) -> Loaded:
    """Read the JSON object in ``path``: empty when the file does not exist; when it
    cannot be read or parsed, or is not an object, quarantine it and say so."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return Loaded({})
    except OSError as exc:
        return quarantine(path, b"", f"cannot be read: {exc.strerror or exc}")
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        return quarantine(path, raw, f"is not valid JSON ({str(exc)[:120]})")
    if not isinstance(value, dict):
        return quarantine(path, raw, f"holds a JSON {type(value).__name__}, not an object")
    return Loaded(value)


def store_state(path: Path, value: dict[str, Any]) -> None:
    """Replace ``path`` with ``value`` (temp file, fsync, rename, fsync directory)."""
    atomic_write_json(path, value)


def quarantine(path: Path, raw: bytes, why: str) -> Loaded:
    """Move the damaged ``path`` aside (``<name>.corrupt-<time>``), log it, and return
    the empty :class:`Loaded` that says so."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    target = path.with_name(f"{path.name}.corrupt-{stamp}-{time.monotonic_ns() % 10**6}")
    try:
        os.replace(path, target)
        fsync_dir(path.parent)
        where: Path | None = target
        text = f"state file {path} {why}: moved aside to {target.name}"
    except OSError as exc:
        where = None
        text = f"state file {path} {why}; it could not be moved aside ({exc.strerror})"
        with contextlib.suppress(OSError):
            path.unlink()
    log.error("%s", text)
    return Loaded({}, damage=text, quarantined=where, raw=raw[:RAW_KEEP_BYTES])


class StateFile:
    """A JSON object on disk that is updated by merging fields.

    ``on_damage(text)`` is called when a read finds the file damaged (it has then been
    quarantined and reads as empty)."""

    def __init__(self, path: Path, on_damage: Callable[[Loaded], None] | None = None) -> None:
        self.path = path
        self.on_damage = on_damage

    def load(self) -> Loaded:
        loaded = load_state(self.path)
        if loaded.damage is not None and self.on_damage is not None:
            try:
                self.on_damage(loaded)
            except Exception:
                log.exception("reporting the damaged state file %s failed", self.path)
        return loaded

    def read(self) -> dict[str, Any]:
        return self.load().value

    def update(self, **fields: Any) -> None:
        current = self.read()
        current.update(fields)
        store_state(self.path, current)


def state_dir(data_dir: Path) -> Path:
    return data_dir / "state"


def cloud_state(data_dir: Path) -> StateFile:
    """Last connection attempt and its result, for ``teg-gateway status``."""
    return StateFile(state_dir(data_dir) / "cloud.json")
