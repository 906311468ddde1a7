"""``teg-gateway status``: what the data directory says about the gateway, read-only."""

from __future__ import annotations

import socket
import sqlite3
from pathlib import Path

from teg_gateway.clock import now_ms
from teg_gateway.cloud import credentials
from teg_gateway.config import Settings
from teg_gateway.controller.queue import QUEUE_FILE
from teg_gateway.store.outbox import pending_records
from teg_gateway.store.state import cloud_state
from teg_gateway.store.stores import ARCHIVE_FILE, OUTBOX_FILE


def _open_ro(path: Path) -> sqlite3.Connection | None:
    if not path.exists():
        return None
    # as_uri() percent-encodes the path: a '#', '?' or '%' in it stays part of the name.
    return sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, timeout=5.0)


def _age(ms: int) -> str:
    seconds = ms / 1000
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def status_lines(settings: Settings) -> list[str]:
    now = now_ms()
    lines = [f"data directory: {settings.data_dir}"]
    try:
        creds = credentials.load(settings.access_token_path)
        lines.append(f"provisioned: yes ({creds.describe()} in {settings.access_token_path})"
                     if creds else f"provisioned: no (no {settings.access_token_path})")
    except credentials.CredentialsError as exc:
        lines.append(f"provisioned: unusable credentials: {exc}")
    lines.extend(_outbox_lines(settings.data_dir / OUTBOX_FILE, now))
    lines.extend(_archive_lines(settings.data_dir / ARCHIVE_FILE))
    state = cloud_state(settings.data_dir).read()
    if state:
        result = state.get("last_result", "unknown")
        when = state.get("last_failure_ms") if result != "connected" else \
            state.get("last_connected_ms")
        ago = f" ({_age(now - int(when))} ago)" if isinstance(when, int) else ""
        lines.append(f"last connection: {result}{ago}")
        limits = state.get("session_limits")
        if isinstance(limits, dict):
            lines.append(f"session limits: {describe_limits(limits)}")
    else:
        lines.append("last connection: never tried")
    lines.append(_health_line(settings.controller_data_dir / QUEUE_FILE, now))
    lines.append(_local_broker_line(settings))
    return lines


def describe_limits(limits: dict[str, object]) -> str:
    """One line for the session limits as stored in the cloud state."""
    rates = limits.get("rateLimits")
    rates = rates if isinstance(rates, dict) else {}
    parts = [f"{name} {rates.get(key) or 'unlimited'}" for key, name in
             (("messages", "messages"), ("telemetryMessages", "telemetry messages"),
              ("telemetryDataPoints", "data points"))]
    payload = limits.get("maxPayloadSize")
    inflight = limits.get("maxInflightMessages")
    parts.append(f"max payload {payload or 'unlimited'}")
    parts.append(f"max in flight {inflight or 'unlimited'}")
    return f"{', '.join(parts)} (from the {limits.get('source', 'config')})"


def _local_broker_line(settings: Settings) -> str:
    local = settings.local_mqtt
    if not local.enabled:
        return "local broker: disabled (local_mqtt.enabled = false)"
    try:
        with socket.create_connection((local.host, local.port), timeout=1.0):
            return f"local broker: {local.host}:{local.port} accepts connections"
    except OSError as exc:
        return (f"local broker: {local.host}:{local.port} not reachable "
                f"({exc.strerror or exc}); the gateway works without it")


def _outbox_lines(path: Path, now: int) -> list[str]:
    try:
        conn = _open_ro(path)
        if conn is None:
            return ["outbox: not created yet"]
        with conn:
            depth = pending_records(conn)
            oldest = conn.execute("SELECT created_ms FROM outbox ORDER BY id LIMIT 1").fetchone()
            counters = dict(conn.execute("SELECT name, value FROM counters").fetchall())
            dead = conn.execute("SELECT count(*) FROM dead_letter").fetchone()[0]
        conn.close()
    except sqlite3.Error as exc:
        return [f"outbox: cannot be read: {exc}"]
    age = f", oldest pending {_age(now - oldest[0])} old" if oldest else ""
    return [f"outbox: {depth} records pending{age}",
            f"records: {counters.get('records_accepted', 0)} accepted, "
            f"{counters.get('records_sent', 0)} sent, "
            f"{counters.get('records_dropped', 0)} dropped (quota), {dead} dead letters"]


def _archive_lines(path: Path) -> list[str]:
    try:
        conn = _open_ro(path)
        if conn is None:
            return ["archive: not created yet"]
        with conn:
            count = conn.execute("SELECT count(*) FROM records").fetchone()[0]
        conn.close()
    except sqlite3.Error as exc:
        return [f"archive: cannot be read: {exc}"]
    size = path.stat().st_size
    return [f"archive: {count} records, {size / 1048576:.1f} MiB"]


def _health_line(path: Path, now: int) -> str:
    try:
        conn = _open_ro(path)
        if conn is None:
            return "controller health check: no queue database yet"
        with conn:
            row = conn.execute("SELECT max(timestamp_ms) FROM health_check").fetchone()
        conn.close()
    except sqlite3.Error as exc:
        return f"controller health check: cannot be read: {exc}"
    if not row or row[0] is None:
        return "controller health check: never"
    return f"controller health check: {_age(now - int(row[0]))} ago"
