"""RPC ``logs``: the tail of the gateway's or the controller's log, filtered, bounded.

Files are read backwards in blocks from their end, newest file first (``gateway.log``,
then ``gateway.log.1``, ...), so a 100 MB log costs a few blocks, not 100 MB of memory.
The reply stays under ``MAX_REPLY_BYTES`` (ThingsBoard drops payloads above 64 KiB): the
oldest lines are left out first and ``"truncated": true`` says so.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from teg_gateway.config import LOG_LEVELS_TEXT, level_number
from teg_gateway.operations.rpc import RpcDispatcher, RpcError

MAX_REPLY_BYTES = 48 * 1024
MAX_LINES = 2000
DEFAULT_LINES = 100
MAX_LINE_CHARS = 2000
BLOCK = 64 * 1024
# A search through a huge log stops after this much has been read, and says so: about
# 0.3 s on a 2-core x86 VM, a few seconds on a Raspberry Pi, within the RPC's time.
MAX_SCAN_BYTES = 16 * 1024 * 1024
LEVELS = ("DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL")
_LEVEL_WORD = re.compile(r"\b(DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL)\b")


@dataclass(frozen=True)
class LogQuery:
    source: str
    lines: int
    min_level: int | None
    grep: str


def parse_query(params: dict[str, Any]) -> LogQuery:
    """Validate the params; RpcError naming the bad one."""
    source = params.get("source", "gateway")
    if source not in ("gateway", "controller"):
        raise RpcError(f"param 'source' must be \"gateway\" or \"controller\", got {source!r}")
    lines = params.get("lines", DEFAULT_LINES)
    if isinstance(lines, bool) or not isinstance(lines, int) or not 1 <= lines <= MAX_LINES:
        raise RpcError(f"param 'lines' must be an integer from 1 to {MAX_LINES}, got {lines!r}")
    level = params.get("level")
    min_level = None
    if level not in (None, ""):
        if not isinstance(level, str) or level.upper() not in LEVELS:
            raise RpcError(f"param 'level' must be {LOG_LEVELS_TEXT}, got {level!r}")
        min_level = level_number(level)
    grep = params.get("grep", "")
    if grep is None:
        grep = ""
    if not isinstance(grep, str) or len(grep) > 200:
        raise RpcError("param 'grep' must be a text of at most 200 characters")
    return LogQuery(source, lines, min_level, grep)


def rotated_files(path: Path) -> list[Path]:
    """``path`` and its rotated copies ``path.1``, ``path.2``, ..., newest first."""
    files = [path] if path.is_file() else []
    n = 1
    while True:
        older = path.with_name(f"{path.name}.{n}")
        if not older.is_file():
            return files
        files.append(older)
        n += 1


def lines_backwards(path: Path, budget: list[int]) -> Iterator[bytes]:
    """The lines of ``path`` from the last to the first, read in blocks from the end.

    ``budget[0]`` counts down the bytes still allowed to be read (shared across files).
    """
    with path.open("rb") as fh:
        position = fh.seek(0, os.SEEK_END)
        rest = b""
        while position > 0 and budget[0] > 0:
            size = min(BLOCK, position)
            position -= size
            fh.seek(position)
            block = fh.read(size)
            budget[0] -= size
            parts = (block + rest).split(b"\n")
            rest = parts[0]
            for line in reversed(parts[1:]):
                if line:
                    yield line
            if len(rest) > 16 * MAX_LINE_CHARS:
                # A "line" without newlines for a megabyte: show its end, move on.
                yield rest[-MAX_LINE_CHARS:]
                rest = b""
        if rest and position == 0:
            yield rest


def _line_level(text: str) -> int | None:
    match = _LEVEL_WORD.search(text[:200])
    return level_number(match.group(1)) if match else None


def tail(files: list[Path], query: LogQuery) -> tuple[list[str], bool]:
    """The last ``query.lines`` matching lines (oldest first) and whether the scan stopped
    early at ``MAX_SCAN_BYTES``."""
    found: list[str] = []
    budget = [MAX_SCAN_BYTES]
    needle = query.grep.lower()
    # Reading backwards, a line without a level (a traceback line) belongs to the record
    # above it, which is read later: keep such lines pending until their record is seen.
    pending: list[str] = []
    for path in files:
        for raw in lines_backwards(path, budget):
            text = raw.decode("utf-8", errors="replace").rstrip("\r")
            if len(text) > MAX_LINE_CHARS:
                text = text[:MAX_LINE_CHARS] + "…"
            if query.min_level is not None:
                level = _line_level(text)
                if level is None:
                    pending.append(text)
                    continue
                group = [text, *reversed(pending)] if level >= query.min_level else []
                pending = []
            else:
                group = [text]
            for item in group:
                if needle and needle not in item.lower():
                    continue
                found.append(item)
                if len(found) >= query.lines:
                    found.reverse()
                    return found, False
    found.reverse()
    return found, budget[0] <= 0


def bounded_reply(reply: dict[str, Any], lines: list[str]) -> dict[str, Any]:
    """``reply`` with as many of the newest ``lines`` as fit in MAX_REPLY_BYTES."""
    base = len(json.dumps({"message": {**reply, "lines": [], "truncated": True}}).encode())
    room = MAX_REPLY_BYTES - base
    kept: list[str] = []
    for line in reversed(lines):
        cost = len(json.dumps(line).encode()) + 2
        if cost > room:
            break
        room -= cost
        kept.append(line)
    kept.reverse()
    truncated = len(kept) < len(lines) or bool(reply.get("truncated"))
    return {**reply, "lines": kept, "count": len(kept), "truncated": truncated}


def read_logs(gateway_log: Path | None, controller_log: Path, query: LogQuery) -> dict[str, Any]:
    """The reply of the RPC ``logs`` (blocking file reads: run it in a thread)."""
    if query.source == "gateway":
        if gateway_log is None:
            raise RpcError("the gateway writes no log file (logging.file is empty)")
        path = gateway_log
    else:
        path = controller_log
    files = rotated_files(path)
    if not files:
        raise RpcError(f"no {query.source} log at {path}")
    lines, stopped = tail(files, query)
    reply: dict[str, Any] = {"source": query.source, "file": str(path),
                             "truncated": stopped}
    if stopped:
        reply["note"] = (f"stopped after reading {MAX_SCAN_BYTES // 1048576} MiB: older "
                         "lines were not searched")
    return bounded_reply(reply, lines)


def register_logs_rpc(rpc: RpcDispatcher, gateway_log: Path | None,
                      controller_log: Path) -> None:
    """Register the RPC ``logs`` on the dispatcher."""

    async def logs(params: dict[str, Any]) -> Any:
        query = parse_query(params)
        return await asyncio.to_thread(read_logs, gateway_log, controller_log, query)

    rpc.register(
        "logs", "the last lines of the gateway's or the controller's log, filtered by level "
        f"and text; at most {MAX_REPLY_BYTES // 1024} KiB ('truncated': true when lines were "
        "left out)", logs,
        {"source": "\"gateway\" (default) or \"controller\"",
         "lines": f"integer 1..{MAX_LINES}, default {DEFAULT_LINES}",
         "level": "optional minimum level: DEBUG, INFO, WARNING, ERROR, CRITICAL",
         "grep": "optional text the lines must contain (case-insensitive)"})
