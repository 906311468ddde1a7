"""Logging: stdout for the operator, and a rate-limited copy to ThingsBoard via the outbox."""

from __future__ import annotations

import logging
import logging.handlers
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from teg_gateway.clock import ms
from teg_gateway.store.outbox import telemetry_body

if TYPE_CHECKING:
    from teg_gateway.config import Settings

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
PREFIX = "GATEWAY - "
MAX_MESSAGE_CHARS = 4000


def setup_stdout(level: int) -> None:
    """Log to stdout at ``level`` (the gateway's own loggers; paho stays at WARNING)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "teg_stdout", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.teg_stdout = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("paho").setLevel(max(level, logging.WARNING))


def setup_file(settings: Settings) -> None:
    """Also log to ``settings.log_file`` (rotated by size) unless it is off.

    OSError when the file cannot be opened (the caller says which setting to fix).
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "teg_file", False):
            root.removeHandler(handler)
            handler.close()
    path = settings.log_file
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.handlers.RotatingFileHandler(
        path, maxBytes=int(settings.logging.file_max_mb * 1024 * 1024),
        backupCount=settings.logging.file_count, encoding="utf-8")
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.teg_file = True  # type: ignore[attr-defined]
    root.addHandler(handler)


class CloudLogHandler(logging.Handler):
    """Keeps log records bound for ThingsBoard until the main loop moves them to the outbox.

    A token bucket (``per_minute`` with bursts of ``burst``) limits what goes out; what is
    held back is counted and reported in one summary record, so a log storm costs a few
    rows, not millions. Safe to call from any thread. ``notify`` (when set) is called,
    from the logging thread, when a record starts waiting: the loop then flushes, and
    sleeps otherwise.
    """

    def __init__(self, level: int, per_minute: int, burst: int) -> None:
        super().__init__(level)
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self._tokens = float(burst)
        self._last = time.monotonic()
        self._pending: deque[str] = deque(maxlen=max(burst, 100))
        self.suppressed = 0
        self._suppressed_unreported = 0
        self.notify: Callable[[], None] | None = None
        self.setFormatter(logging.Formatter("%(name)s: %(message)s"))

    def _refill(self) -> None:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._refill()
            if self._tokens < 1.0:
                self.suppressed += 1
                self._suppressed_unreported += 1
                if self._suppressed_unreported == 1 and self.notify is not None:
                    self.notify()  # a summary is owed from now on
                return
            self._tokens -= 1.0
            text = self.format(record)
            if len(text) > MAX_MESSAGE_CHARS:
                text = text[:MAX_MESSAGE_CHARS] + "…"
            self._pending.append(telemetry_body(
                {"severity": record.levelname, "message": PREFIX + text},
                ms(record.created)))
            if self.notify is not None:
                self.notify()
        except Exception:
            self.handleError(record)

    def owed(self) -> bool:
        """Records wait, or a summary of suppressed ones is owed."""
        return bool(self._pending) or self._suppressed_unreported > 0

    def take(self) -> list[str]:
        """Telemetry bodies waiting for the outbox (and a summary of suppressed records)."""
        bodies = []
        while self._pending:
            bodies.append(self._pending.popleft())
        self.acquire()  # emit() runs under this lock, from any thread
        try:
            # Tokens come back with time, not only when something is logged: the summary
            # must not wait for the next log record, which may never come.
            self._refill()
            if self._suppressed_unreported and self._tokens >= 1.0:
                self._tokens -= 1.0
                bodies.append(telemetry_body({
                    "severity": "WARNING",
                    "message": f"{PREFIX}{self._suppressed_unreported} log records were not "
                               "sent (rate limit); see the gateway's own log"}))
                self._suppressed_unreported = 0
        finally:
            self.release()
        return bodies
