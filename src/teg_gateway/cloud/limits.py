"""ThingsBoard's session limits, and the pacing that keeps every publish under them.

ThingsBoard closes a device's connection, without a PUBACK, when the device exceeds a
limit of its profile. The limits come from the client-side RPC ``getSessionLimits``
(or from the configuration when the server does not answer):

- ``maxPayloadSize``: the largest publish;
- ``maxInflightMessages``: QoS 1 publishes awaiting PUBACK at once;
- ``rateLimits``: three multi-window token buckets, ``"N:S,N:S"`` (N per S seconds, every
  window at once): ``messages`` (every publish), ``telemetryMessages`` (publishes on the
  telemetry topic) and ``telemetryDataPoints`` (one per key of each record's ``values``).

The buckets are modelled as ThingsBoard's are: each window starts full and refills
continuously at N/S tokens a second. The pacer answers "how long until this publish may
go", so waiting costs a timer, never a polling loop.

Operations first: telemetry (and everything else from the outbox) may use the
``messages`` budget only down to a reserve, a fifth of each window; RPC replies,
attribute requests and OTA chunk requests may use all of it. So an RPC answer never
waits behind a telemetry backlog.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

Clock = Callable[[], float]

# Share of each messages window kept for operations (RPC replies, requests).
OPERATIONS_RESERVE = 0.2
# A publish may reach the server this long after it was sent (a slow link, a TCP stack
# holding a segment back). While the server's window is full, what it would have refilled
# meanwhile is lost to it, but not to the gateway's copy: that much is taken too.
LATENCY_ALLOWANCE_S = 0.5
# Largest count or period accepted in a limit (a typo such as 10:100000000 stays sane).
MAX_WINDOW_VALUE = 10**9
RATE_LIMIT_KINDS = ("messages", "telemetryMessages", "telemetryDataPoints")


class LimitsError(ValueError):
    """A limit specification that cannot be understood."""


@dataclass(frozen=True)
class Window:
    """``capacity`` tokens per ``period_s`` seconds."""

    capacity: int
    period_s: float

    @property
    def rate(self) -> float:
        return self.capacity / self.period_s


def parse_rate_limit(text: str) -> tuple[Window, ...]:
    """Windows of ``"N:S,N:S,..."``; empty text means no limit. LimitsError if malformed."""
    windows = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        count, sep, period = part.partition(":")
        if not sep or not count.isdigit() or not period.isdigit():
            raise LimitsError(f"{part!r} is not N:S (N messages per S seconds)")
        capacity, seconds = int(count), int(period)
        if not (0 < capacity <= MAX_WINDOW_VALUE and 0 < seconds <= MAX_WINDOW_VALUE):
            raise LimitsError(f"{part!r}: N and S must be whole numbers from 1 to "
                              f"{MAX_WINDOW_VALUE}")
        windows.append(Window(capacity, float(seconds)))
    return tuple(sorted(windows, key=lambda w: (w.period_s, w.capacity)))


def format_rate_limit(windows: tuple[Window, ...]) -> str:
    return ",".join(f"{w.capacity}:{w.period_s:g}" for w in windows)


class Bucket:
    """A multi-window token bucket: every window must hold the tokens a take needs."""

    def __init__(self, windows: tuple[Window, ...], now: float, full: bool = True) -> None:
        self.windows = windows
        self._levels = [float(w.capacity) if full else 0.0 for w in windows]
        self._at = now

    def _refill(self, now: float) -> None:
        elapsed = max(0.0, now - self._at)
        self._at = max(self._at, now)
        if elapsed:
            self._levels = [min(float(w.capacity), level + elapsed * w.rate)
                            for w, level in zip(self.windows, self._levels, strict=True)]

    def delay(self, tokens: float, now: float, keep: float = 0.0) -> float:
        """Seconds until ``tokens`` can be taken leaving ``keep`` (a share of each window)
        in every window; 0 when they can be taken now, ``inf`` when they never can."""
        self._refill(now)
        wait = 0.0
        for window, level in zip(self.windows, self._levels, strict=True):
            reserve = reserve_of(window, keep)
            need = tokens + reserve
            if need > window.capacity:
                return math.inf
            if level < need:
                wait = max(wait, (need - level) / window.rate)
        return wait

    def take(self, tokens: float, now: float) -> None:
        """Use ``tokens`` (levels may go below zero: the debt is paid by waiting).

        A window that would fill up before the publish reaches the server also gives up
        the refill the server cannot store (see LATENCY_ALLOWANCE_S)."""
        self._refill(now)
        self._levels = [
            level - tokens - min(tokens, max(0.0, level + w.rate * LATENCY_ALLOWANCE_S
                                             - w.capacity))
            for w, level in zip(self.windows, self._levels, strict=True)]

    def empty(self, now: float) -> None:
        """Assume every window is used up (after the server cut the connection)."""
        self._refill(now)
        self._levels = [min(level, 0.0) for level in self._levels]

    def largest_take(self, keep: float = 0.0) -> int:
        """The most tokens one take can ever need and still succeed."""
        return min((w.capacity - reserve_of(w, keep) for w in self.windows), default=0)

    @property
    def rate(self) -> float:
        """The sustained rate: the slowest window's."""
        return min(w.rate for w in self.windows)


def reserve_of(window: Window, share: float) -> int:
    """Tokens of ``window`` kept back for others: ``share`` of it, at least one, but
    never the whole window."""
    if share <= 0:
        return 0
    return min(window.capacity - 1, max(1, round(window.capacity * share)))


@dataclass(frozen=True)
class SessionLimits:
    """The limits of one ThingsBoard session; None or empty means no limit."""

    max_payload_size: int | None = None
    max_inflight: int | None = None
    messages: tuple[Window, ...] = ()
    telemetry_messages: tuple[Window, ...] = ()
    telemetry_data_points: tuple[Window, ...] = ()
    source: str = "config"
    problems: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def from_settings(cls, messages: str, telemetry_messages: str, data_points: str,
                      max_payload_bytes: int) -> SessionLimits:
        """The configured limits (already validated by the configuration)."""
        return cls(max_payload_size=max_payload_bytes, messages=parse_rate_limit(messages),
                   telemetry_messages=parse_rate_limit(telemetry_messages),
                   telemetry_data_points=parse_rate_limit(data_points), source="config")

    @classmethod
    def from_answer(cls, answer: Any) -> SessionLimits:
        """The limits of a ``getSessionLimits`` answer. Missing or empty keys mean no limit;
        a value that cannot be understood is left out and named in ``problems``."""
        if not isinstance(answer, Mapping):
            return cls(source="server", problems=("the answer is not a JSON object",))
        problems: list[str] = []
        payload = _positive_int(answer.get("maxPayloadSize"), "maxPayloadSize", problems)
        inflight = _positive_int(answer.get("maxInflightMessages"), "maxInflightMessages",
                                 problems)
        rates = answer.get("rateLimits")
        if rates is None:
            rates = {}
        if not isinstance(rates, Mapping):
            problems.append("rateLimits is not an object")
            rates = {}
        parsed: dict[str, tuple[Window, ...]] = {}
        for kind in RATE_LIMIT_KINDS:
            value = rates.get(kind)
            if value is None or value == "":
                parsed[kind] = ()
                continue
            if not isinstance(value, str):
                problems.append(f"rateLimits.{kind} is not a string")
                parsed[kind] = ()
                continue
            try:
                parsed[kind] = parse_rate_limit(value)
            except LimitsError as exc:
                problems.append(f"rateLimits.{kind}: {exc}"[:200])
                parsed[kind] = ()
        return cls(max_payload_size=payload, max_inflight=inflight,
                   messages=parsed["messages"],
                   telemetry_messages=parsed["telemetryMessages"],
                   telemetry_data_points=parsed["telemetryDataPoints"],
                   source="server", problems=tuple(problems))

    @staticmethod
    def understood(answer: Any) -> bool:
        """Whether ``answer`` is a session-limits answer at all (an object with at least one
        of its keys), not some other server's reply to an RPC it does not know."""
        return isinstance(answer, Mapping) and any(
            key in answer for key in ("maxPayloadSize", "maxInflightMessages", "rateLimits"))

    def describe(self) -> dict[str, Any]:
        """The limits as reported in the ``session_limits`` client attribute and status."""
        return {
            "source": self.source,
            "maxPayloadSize": self.max_payload_size,
            "maxInflightMessages": self.max_inflight,
            "rateLimits": {
                "messages": format_rate_limit(self.messages),
                "telemetryMessages": format_rate_limit(self.telemetry_messages),
                "telemetryDataPoints": format_rate_limit(self.telemetry_data_points),
            },
        }

    @property
    def shortest_period_s(self) -> float:
        periods = [w.period_s for ws in (self.messages, self.telemetry_messages,
                                         self.telemetry_data_points) for w in ws]
        return min(periods, default=0.0)


def payload_room(max_payload_size: int, topic: str) -> int:
    """The largest payload on ``topic`` within a server maximum that may count the whole
    MQTT message (topic and packet id besides the payload)."""
    return max(1, max_payload_size - len(topic.encode()) - 8)


def _positive_int(value: Any, name: str, problems: list[str]) -> int | None:
    if value in (None, "", 0):
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        problems.append(f"{name} is not a positive whole number: {str(value)[:50]!r}")
        return None
    return value


class Pacer:
    """Paces publishes under the session limits in force.

    Buckets outlive connections: ThingsBoard keeps its own per device, so what the gateway
    used before a reconnect still counts. A kind of limit seen for the first time starts
    full, as the server's does; a kind whose limits change starts empty, so that a server
    that lowered its limits is never overrun while its new buckets fill.
    """

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self.clock = clock
        self.limits = SessionLimits()
        self.messages: Bucket | None = None
        self.telemetry_messages: Bucket | None = None
        self.data_points: Bucket | None = None
        self._known: set[str] = set()
        self.waited_s = 0.0

    def apply(self, limits: SessionLimits) -> None:
        """Put new limits in force; buckets whose windows did not change are kept."""
        now = self.clock()
        self.messages = self._bucket("messages", self.messages, limits.messages, now)
        self.telemetry_messages = self._bucket("telemetryMessages", self.telemetry_messages,
                                               limits.telemetry_messages, now)
        self.data_points = self._bucket("telemetryDataPoints", self.data_points,
                                        limits.telemetry_data_points, now)
        self.limits = limits

    def _bucket(self, kind: str, old: Bucket | None, windows: tuple[Window, ...],
                now: float) -> Bucket | None:
        if not windows:
            return None
        if old is not None and old.windows == windows:
            return old
        first = kind not in self._known
        self._known.add(kind)
        return Bucket(windows, now, full=first)

    def cut(self) -> None:
        """The server closed the connection on us: assume every bucket is used up, those
        of limits it has not told yet included."""
        now = self.clock()
        self._known.update(RATE_LIMIT_KINDS)
        for bucket in (self.messages, self.telemetry_messages, self.data_points):
            if bucket is not None:
                bucket.empty(now)

    # -- what fits ---------------------------------------------------------------------------

    def max_points(self) -> int | None:
        """The most data points one telemetry publish may carry (None: no limit)."""
        if self.data_points is None:
            return None
        return max(1, self.data_points.largest_take())

    def payload_limit(self, topic: str, configured: int) -> int:
        """The largest payload for ``topic``: the configured maximum, and below the server's
        maximum with room for the MQTT header (topic and packet id)."""
        server = self.limits.max_payload_size
        if server is None:
            return configured
        return min(configured, payload_room(server, topic))

    def max_inflight(self, configured: int) -> int:
        server = self.limits.max_inflight
        return configured if server is None else max(1, min(configured, server))

    # -- when ----------------------------------------------------------------------------------

    def outbox_delay(self, telemetry: bool, points: int) -> float:
        """Seconds until a publish from the outbox (telemetry with ``points`` data points,
        or another kind) may go, leaving the operations' reserve untouched."""
        now = self.clock()
        wait = 0.0
        if self.messages is not None:
            wait = self.messages.delay(1, now, keep=OPERATIONS_RESERVE)
        if telemetry:
            if self.telemetry_messages is not None:
                wait = max(wait, self.telemetry_messages.delay(1, now))
            if self.data_points is not None and points:
                wait = max(wait, self.data_points.delay(points, now))
        return wait

    def take_outbox(self, telemetry: bool, points: int) -> None:
        now = self.clock()
        if self.messages is not None:
            self.messages.take(1, now)
        if telemetry:
            if self.telemetry_messages is not None:
                self.telemetry_messages.take(1, now)
            if self.data_points is not None:
                self.data_points.take(points, now)

    def operation_delay(self) -> float:
        """Seconds until an operation's publish (RPC reply, request) may go."""
        if self.messages is None:
            return 0.0
        return self.messages.delay(1, self.clock())

    def take_operation(self) -> None:
        if self.messages is not None:
            self.messages.take(1, self.clock())

    # -- figures -------------------------------------------------------------------------------

    def records_per_s(self, points_per_record: float, records_per_publish: float) -> float | None:
        """The sustained telemetry rate the limits allow, in records a second (None: no
        limit)."""
        rates = []
        if self.data_points is not None and points_per_record > 0:
            rates.append(self.data_points.rate / points_per_record)
        per_publish = max(1.0, records_per_publish)
        if self.telemetry_messages is not None:
            rates.append(self.telemetry_messages.rate * per_publish)
        if self.messages is not None:
            rates.append(self.messages.rate * (1 - OPERATIONS_RESERVE) * per_publish)
        return min(rates) if rates else None

    def take_waited_ms(self) -> int:
        """Time spent waiting for tokens since the last call, in milliseconds."""
        value, self.waited_s = self.waited_s, 0.0
        return round(value * 1000)
