"""A minimal controller for teg-gateway: standard library only.

Every second it reads a (simulated) sensor, writes the reading into the gateway's queue
database and updates ``health_check``, which is how the gateway's supervisor knows it is
alive (SPEC.md section 4). It stops cleanly on SIGTERM, which is how the gateway (or
``docker stop``) asks it to stop.

Environment (set by the gateway's process runtime and docker runtime):
    TEG_DATA_PATH           the controller data directory, home of communication_queue.db
    TEG_CONTROLLER_VERSION  the version it was launched as ("" when none is known)
Optional:
    EXAMPLE_PERIOD_S        seconds between readings (default 1)
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import sys
import time
from pathlib import Path
from types import FrameType

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
  id INTEGER PRIMARY KEY AUTOINCREMENT, type TEXT, message TEXT);
CREATE TABLE IF NOT EXISTS health_check (
  id INTEGER PRIMARY KEY, timestamp_ms INTEGER);
"""


class Stop:
    """Set by SIGTERM or SIGINT: finish the current round and exit."""

    requested = False

    @classmethod
    def request(cls, _signum: int, _frame: FrameType | None) -> None:
        cls.requested = True


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def main() -> int:
    data = Path(os.environ.get("TEG_DATA_PATH", "."))
    version = os.environ.get("TEG_CONTROLLER_VERSION", "")
    period = float(os.environ.get("EXAMPLE_PERIOD_S", "1"))
    signal.signal(signal.SIGTERM, Stop.request)
    signal.signal(signal.SIGINT, Stop.request)

    data.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(data / "communication_queue.db", timeout=5.0)
    db.execute("PRAGMA journal_mode = WAL")
    db.executescript(SCHEMA)
    print(f"example controller {version or '(no version)'} writing to {data}", flush=True)

    temperature = 21.0
    count = 0
    while not Stop.requested:
        temperature += random.uniform(-0.1, 0.1)
        ts = now_ms()
        rows = [("telemetry", json.dumps({"ts": ts, "values": {
            "temperature": round(temperature, 2), "controller_version": version}}))]
        if count % 60 == 0:
            # A type containing "log" is forwarded but not archived.
            rows.append(("log", json.dumps({"ts": ts, "values": {
                "message": f"example controller alive, {count} readings", "level": "INFO"}})))
        try:
            with db:  # one transaction: the readings and the health check together
                db.executemany("INSERT INTO messages (type, message) VALUES (?, ?)", rows)
                db.execute("INSERT INTO health_check (id, timestamp_ms) VALUES (1, ?) "
                           "ON CONFLICT (id) DO UPDATE SET timestamp_ms = excluded.timestamp_ms",
                           (ts,))
        except sqlite3.OperationalError as exc:  # busy: try again next round
            print(f"queue database busy: {exc}", file=sys.stderr, flush=True)
        count += 1
        deadline = time.monotonic() + period
        while not Stop.requested and time.monotonic() < deadline:
            time.sleep(min(0.05, period))
    db.close()
    print(f"example controller stopped after {count} readings", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
