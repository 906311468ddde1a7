"""The controller side of the queue database (SPEC.md section 4): a writer and a sample controller.

`QueueWriter` and `make_records` feed the gateway in tests and benchmarks.
Run `python -m teg_gateway.sandbox.controller --data DIR` for a sample
controller that behaves like a CO2 sensor; it uses only the standard library.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from teg_gateway.controller.queue import QUEUE_FILE, QUEUE_SCHEMA

# The sample controller writes the same schema the gateway reads (SPEC.md section 4).
QUEUE_DB_NAME = QUEUE_FILE


def now_ms() -> int:
    """Wall-clock time in milliseconds."""
    return time.time_ns() // 1_000_000


def open_queue_db(controller_data: Path, *, check_same_thread: bool = True) -> sqlite3.Connection:
    """Open (creating if needed) `<controller_data>/communication_queue.db` in WAL mode."""
    controller_data.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(
        controller_data / QUEUE_DB_NAME, timeout=5.0, check_same_thread=check_same_thread
    )
    connection.execute("PRAGMA busy_timeout = 5000")
    connection.execute("PRAGMA journal_mode = WAL")
    connection.executescript(QUEUE_SCHEMA)
    connection.commit()
    return connection


class QueueWriter:
    """Writes records into the queue database the way a controller does. Thread-safe."""

    def __init__(self, controller_data: Path) -> None:
        self.path = controller_data / QUEUE_DB_NAME
        self._connection = open_queue_db(controller_data, check_same_thread=False)
        self._lock = threading.Lock()

    def write(self, records: Iterable[tuple[str, str]]) -> None:
        """Insert (type, message JSON text) rows in one transaction."""
        with self._lock, self._connection:
            self._connection.executemany(
                "INSERT INTO messages (type, message) VALUES (?, ?)", records
            )

    def write_record(
        self, values: dict[str, Any], ts_ms: int | None = None, type: str = "telemetry"
    ) -> None:
        """Insert one record `{"ts", "values"}`; `ts_ms` defaults to now."""
        message = json.dumps({"ts": now_ms() if ts_ms is None else ts_ms, "values": values})
        self.write([(type, message)])

    def health_check(self, ts_ms: int | None = None) -> None:
        """Set `health_check(id=1)` to `ts_ms` (default now), as a controller does every loop."""
        with self._lock, self._connection:
            self._connection.execute(
                "INSERT INTO health_check (id, timestamp_ms) VALUES (1, ?) "
                "ON CONFLICT (id) DO UPDATE SET timestamp_ms = excluded.timestamp_ms",
                (now_ms() if ts_ms is None else ts_ms,),
            )

    def pending(self) -> int:
        """Number of rows still in the `messages` table."""
        with self._lock:
            row = self._connection.execute("SELECT COUNT(*) FROM messages").fetchone()
        return int(row[0])

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._connection.close()

    def __enter__(self) -> QueueWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def make_records(n: int, start_seq: int = 0, ts_ms: int | None = None) -> list[tuple[str, str]]:
    """`n` telemetry rows with values `{"seq", "co2", "temperature"}` and increasing ts.

    Record i has `seq = start_seq + i` and `ts = ts_ms + i` (ts_ms defaults to now).
    """
    base = now_ms() if ts_ms is None else ts_ms
    return [
        (
            "telemetry",
            f'{{"ts":{base + i},"values":{{"seq":{seq},"co2":{400 + seq % 600},'
            f'"temperature":{20 + seq % 100 / 10:.1f}}}}}',
        )
        for i, seq in enumerate(range(start_seq, start_seq + n))
    ]


class _Sensor:
    """A CO2 sensor in a room: slowly drifting readings."""

    def __init__(self) -> None:
        self.co2 = 450.0
        self.temperature = 21.0

    def read(self) -> tuple[int, float]:
        self.co2 = min(2000.0, max(400.0, self.co2 + random.gauss(0, 8)))
        self.temperature = min(30.0, max(15.0, self.temperature + random.gauss(0, 0.05)))
        return round(self.co2), round(self.temperature, 2)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sample controller; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m teg_gateway.sandbox.controller",
        description="Sample controller: writes CO2 readings into the gateway's queue database.",
    )
    parser.add_argument("--data", type=Path, required=True, help="controller data directory")
    parser.add_argument("--rate", type=float, default=10.0, help="records per second")
    parser.add_argument("--count", type=int, default=0, help="stop after N records (0: never)")
    parser.add_argument(
        "--log-every", type=int, default=50, help="write a log record every N records (0: never)"
    )
    args = parser.parse_args(argv)
    if args.rate <= 0:
        parser.error("--rate must be positive")

    stopping = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    writer = QueueWriter(args.data)
    sensor = _Sensor()
    period = 1.0 / args.rate
    next_tick = time.monotonic()
    seq = 0
    print(f"sample controller writing to {writer.path} at {args.rate:g}/s", flush=True)
    try:
        while not stopping.is_set() and (args.count <= 0 or seq < args.count):
            co2, temperature = sensor.read()
            ts = now_ms()
            reading = {"seq": seq, "co2": co2, "temperature": temperature}
            records = [("telemetry", json.dumps({"ts": ts, "values": reading}))]
            if args.log_every > 0 and (seq + 1) % args.log_every == 0:
                entry = {
                    "message": f"sample controller wrote {seq + 1} records",
                    "severity": "INFO",
                }
                records.append(("log", json.dumps({"ts": ts, "values": entry})))
            try:
                writer.write(records)
                writer.health_check(ts)
            except sqlite3.OperationalError as error:
                print(f"queue database busy, retrying: {error}", file=sys.stderr, flush=True)
            else:
                seq += 1
                if seq % 10 == 0:
                    print(f"wrote {seq} records (co2={co2} ppm)", flush=True)
            next_tick = max(next_tick + period, time.monotonic() - period)
            _sleep_until(next_tick, stopping)
    finally:
        writer.close()
    print(f"sample controller stopped after {seq} records", flush=True)
    return 0


def _sleep_until(deadline: float, stopping: threading.Event) -> None:
    # Short slices: a signal handler's Event.set() is noticed promptly.
    while not stopping.is_set():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        time.sleep(min(remaining, 0.05))


if __name__ == "__main__":
    sys.exit(main())
