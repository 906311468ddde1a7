"""Small durable state files (JSON, written atomically) under ``<data>/state``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from teg_gateway.fsutil import atomic_write_json, read_json


class StateFile:
    """A JSON object on disk that is updated by merging fields."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> dict[str, Any]:
        value = read_json(self.path)
        return value if isinstance(value, dict) else {}

    def update(self, **fields: Any) -> None:
        current = self.read()
        current.update(fields)
        atomic_write_json(self.path, current)


def state_dir(data_dir: Path) -> Path:
    return data_dir / "state"


def cloud_state(data_dir: Path) -> StateFile:
    """Last connection attempt and its result, for ``teg-gateway status``."""
    return StateFile(state_dir(data_dir) / "cloud.json")
