"""The gateway's rotating log file and the RPC ``logs``: a real gateway process answers the
ThingsBoard stand-in over a real mosquitto; the tail reader on large files alone."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from conftest import GatewayFactory, needs_mosquitto
from teg_gateway.operations.logs_rpc import (
    MAX_REPLY_BYTES,
    LogQuery,
    bounded_reply,
    lines_backwards,
    rotated_files,
    tail,
)
from teg_gateway.sandbox.process import GatewayProcess
from teg_gateway.sandbox.thingsboard import FakeThingsBoard
from test_forwarding import wait_connected, wait_until


def log_line(level: str, text: str) -> str:
    return f"2026-12-01 10:00:00,000 {level} teg_gateway.test: {text}\n"


@pytest.fixture
def gateway(make_gateway: GatewayFactory, thingsboard: FakeThingsBoard,
            data_dir: Path) -> GatewayProcess:
    logs = data_dir / "logs"
    logs.mkdir()
    # An older, rotated gateway log with a traceback and a marker to find.
    (logs / "gateway.log.1").write_text(
        log_line("INFO", "old info line")
        + log_line("ERROR", "old failure marker-in-rotated-file")
        + "Traceback (most recent call last):\n  File \"x.py\", line 1\nValueError: boom\n"
        + log_line("INFO", "old info after"))
    (logs / "controller.log").write_text(
        "".join(f"controller line {n}\n" for n in range(50)) + "controller WARNING hot\n")
    started = make_gateway()
    started.start()
    wait_connected(thingsboard, started)
    return started


def logs(thingsboard: FakeThingsBoard, params: dict[str, Any]) -> dict[str, Any]:
    reply = thingsboard.rpc("logs", params)
    assert "error" not in reply, reply
    message = reply["message"]
    assert isinstance(message, dict)
    assert len(json.dumps(reply).encode()) <= MAX_REPLY_BYTES
    return message


@needs_mosquitto
def test_logs_rpc_end_to_end(gateway: GatewayProcess, thingsboard: FakeThingsBoard,
                             data_dir: Path) -> None:
    log_file = data_dir / "logs" / "gateway.log"
    wait_until(lambda: log_file.exists() and "connected" in log_file.read_text(),
               "the gateway writes its own log file", gateway)
    listed = thingsboard.rpc("list")["message"]
    assert "logs" in listed and "source" in listed["logs"]["params"]

    recent = logs(thingsboard, {"lines": 5})
    assert recent["source"] == "gateway" and recent["file"] == str(log_file)
    assert recent["count"] == len(recent["lines"]) == 5
    assert recent["truncated"] is False

    # Across the rotated file, filtered by level: the traceback comes with its record.
    errors = logs(thingsboard, {"level": "ERROR", "lines": 50})
    text = "\n".join(errors["lines"])
    assert "old failure marker-in-rotated-file" in text
    assert "ValueError: boom" in text
    assert "old info line" not in text

    found = logs(thingsboard, {"grep": "MARKER-in-rotated", "lines": 10})
    assert len(found["lines"]) == 1

    ctl = logs(thingsboard, {"source": "controller", "lines": 3})
    assert ctl["lines"] == ["controller line 48", "controller line 49", "controller WARNING hot"]
    assert logs(thingsboard, {"source": "controller", "level": "WARN"})["lines"] == [
        "controller WARNING hot"]

    for params, message in (
            ({"source": "kernel"}, "param 'source' must be \"gateway\" or \"controller\""),
            ({"lines": 0}, "param 'lines' must be an integer from 1 to 2000"),
            ({"lines": "5"}, "param 'lines' must be an integer"),
            ({"level": "LOUD"}, "param 'level' must be DEBUG, INFO, WARNING (or WARN)")):
        reply = thingsboard.rpc("logs", params)
        assert reply.get("error") is True, reply
        assert reply["message"].startswith(message), reply


@needs_mosquitto
def test_logs_rpc_truncates_to_the_payload_limit(
        gateway: GatewayProcess, thingsboard: FakeThingsBoard, data_dir: Path) -> None:
    (data_dir / "logs" / "controller.log").write_text(
        "".join(f"{n:05d} " + "x" * 900 + "\n" for n in range(1000)))
    reply = logs(thingsboard, {"source": "controller", "lines": 1000})
    assert reply["truncated"] is True
    assert 30 < reply["count"] < 1000
    # The newest lines are kept, in order.
    assert reply["lines"][-1].startswith("00999 ")
    numbers = [int(line[:5]) for line in reply["lines"]]
    assert numbers == list(range(1000 - len(numbers), 1000))


def test_tail_reads_a_large_file_in_blocks(tmp_path: Path) -> None:
    path = tmp_path / "big.log"
    with path.open("w") as fh:
        line = log_line("INFO", "filler " + "y" * 200)
        for _ in range(12 * 1024 * 1024 // len(line)):
            fh.write(line)
        fh.write(log_line("WARNING", "the last warning"))
    tracemalloc.start()
    try:
        lines, stopped = tail(rotated_files(path), LogQuery("gateway", 100, None, "absent"))
        _now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert lines == [] and not stopped
    assert peak < 4 * 1024 * 1024, f"peak {peak} bytes for a 12 MiB file"
    lines, _ = tail([path], LogQuery("gateway", 1, 30, ""))
    assert lines == [log_line("WARNING", "the last warning").rstrip("\n")]
    # A file larger than the scan limit: the search stops there and says so.
    with path.open("a") as fh:
        for _ in range(6 * 1024 * 1024 // len(line)):
            fh.write(line)
    lines, stopped = tail([path], LogQuery("gateway", 100, None, "absent"))
    assert lines == [] and stopped


def test_lines_backwards_keeps_every_line_across_blocks(tmp_path: Path) -> None:
    path = tmp_path / "x.log"
    expected = [f"line {n} " + "z" * (n % 300) for n in range(5000)]
    path.write_text("\n".join(expected) + "\n")
    assert list(reversed([b.decode() for b in lines_backwards(path, [1 << 30])])) == expected
    path.write_text("no newline at the end")
    assert [b.decode() for b in lines_backwards(path, [1 << 30])] == ["no newline at the end"]


def test_bounded_reply_says_truncated() -> None:
    lines = [f"{n} " + "a" * 1000 for n in range(100)]
    reply = bounded_reply({"source": "gateway", "truncated": False}, lines)
    assert reply["truncated"] is True
    assert len(json.dumps({"message": reply}).encode()) <= MAX_REPLY_BYTES
    assert reply["lines"] == lines[-len(reply["lines"]):]
