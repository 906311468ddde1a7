"""thin-edge.io topic scheme (``te/<device-topic-id>/<channel>``) and its ThingsBoard mapping.

The gateway maps what the main device (``te/device/main///``) and its services
(``te/device/main/service/<s>``) publish; a service's keys get the prefix ``<s>.``:

- measurement ``m/<type>`` ``{"temp": 21}``: telemetry ``{"temp": 21}``, nested objects
  flattened with ``.``;
- event ``e/<type>`` ``{"text": "door open", ...}``: telemetry ``{"event.<type>": text}``
  plus ``event.<type>.<field>`` for other fields;
- alarm ``a/<type>`` ``{"text", "severity"}``: telemetry ``alarm.<type>.status`` (``active``,
  or ``cleared`` for an empty payload), ``alarm.<type>.severity``, ``alarm.<type>.text``;
- twin ``twin/<key>`` (a JSON value): client attribute ``{"<key>": value}``, ``null`` when
  the payload is empty;
- ``status/health`` of a service: telemetry ``{"service.<s>.status": "up"}``.

``time`` (RFC 3339 text or Unix seconds) becomes the record's ``ts``; without it, the time
of arrival. Prefixes of services keep two services' keys apart.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from teg_gateway.bounds import clip

ROOT = "te"
MAIN = ("device", "main", "", "")
RESTART_CAPABILITY = "te/device/main///cmd/restart"
HEALTH_CHECK_ALL = "te/device/main///cmd/health/check"

SUBSCRIPTIONS = (
    "te/device/main///m/+", "te/device/main///e/+", "te/device/main///a/+",
    "te/device/main///twin/+",
    "te/device/main/service/+/m/+", "te/device/main/service/+/e/+",
    "te/device/main/service/+/a/+", "te/device/main/service/+/twin/+",
    "te/device/main/service/+/status/health",
    HEALTH_CHECK_ALL,
)


def command_topic(name: str) -> str:
    """The capability topic of the main device's command ``name``; its commands are
    ``<this>/<id>``."""
    return f"te/device/main///cmd/{name}"


def service_topic_id(name: str) -> str:
    return f"device/main/service/{name}"


@dataclass(frozen=True)
class Topic:
    """A parsed ``te/`` topic: the entity (``None`` for the main device, else the service
    name) and the channel segments after the four id segments."""

    service: str | None
    channel: tuple[str, ...]


def parse(topic: str) -> Topic | None:
    """The entity and channel of a topic of the main device or one of its services."""
    parts = topic.split("/")
    if len(parts) < 6 or parts[0] != ROOT or parts[1] != "device" or parts[2] != "main":
        return None
    if parts[3] == "" and parts[4] == "":
        return Topic(None, tuple(parts[5:]))
    if parts[3] == "service" and parts[4]:
        return Topic(parts[4], tuple(parts[5:]))
    return None


@dataclass(frozen=True)
class Mapped:
    """What one local message becomes for ThingsBoard: telemetry and/or attributes."""

    telemetry: dict[str, Any] | None = None
    ts_ms: int | None = None
    attributes: dict[str, Any] | None = None


class MappingError(ValueError):
    """A message that cannot be mapped; the text says why."""


#: Times outside [year 1970, year 9999] are refused (a timestamp must fit SQLite and
#: ThingsBoard).
MAX_TIME_MS = 253_402_300_799_999
#: Objects nested deeper than this are refused (each level becomes a dotted name).
MAX_DEPTH = 32


def _time_ms(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise MappingError("time must be RFC 3339 text or Unix seconds")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise MappingError("time is not a finite number")
        ms = value * 1000
    elif isinstance(value, str):
        try:
            ms = datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1000
        except (ValueError, OverflowError, OSError):
            raise MappingError(f"time {clip(repr(value), 80)} is not RFC 3339") from None
    else:
        raise MappingError("time must be RFC 3339 text or Unix seconds")
    if not (math.isfinite(ms) and 0 <= ms <= MAX_TIME_MS):
        raise MappingError("time is out of range (1970 to 9999)")
    return int(ms)


def _flatten(prefix: str, value: dict[str, Any], out: dict[str, Any], depth: int = 0) -> None:
    if depth > MAX_DEPTH:
        raise MappingError(f"objects nested deeper than {MAX_DEPTH} levels")
    for key, item in value.items():
        name = f"{prefix}{key}"
        if isinstance(item, dict):
            _flatten(name + ".", item, out, depth + 1)
        else:
            out[name] = item


def _object(payload: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(payload)
    except (ValueError, RecursionError):
        raise MappingError(f"{what} is not valid JSON") from None
    if not isinstance(value, dict):
        raise MappingError(f"{what} is not a JSON object")
    return value


def map_message(topic: Topic, payload: bytes) -> Mapped | None:
    """Map one message; None when the channel is not one the gateway forwards."""
    channel = topic.channel
    prefix = f"{topic.service}." if topic.service else ""
    kind = channel[0] if channel else ""
    if kind == "m" and len(channel) == 2:
        body = _object(payload, "measurement")
        ts = _time_ms(body.pop("time", None))
        values: dict[str, Any] = {}
        _flatten(prefix, body, values)
        if not values:
            raise MappingError("measurement has no values")
        return Mapped(telemetry=values, ts_ms=ts)
    if kind == "e" and len(channel) == 2:
        body = _object(payload, "event") if payload else {}
        ts = _time_ms(body.pop("time", None))
        name = f"{prefix}event.{channel[1]}"
        values = {name: body.pop("text", channel[1])}
        _flatten(name + ".", body, values)
        return Mapped(telemetry=values, ts_ms=ts)
    if kind == "a" and len(channel) == 2:
        name = f"{prefix}alarm.{channel[1]}"
        if not payload:
            return Mapped(telemetry={f"{name}.status": "cleared"})
        body = _object(payload, "alarm")
        ts = _time_ms(body.pop("time", None))
        values = {f"{name}.status": "active",
                  f"{name}.severity": body.pop("severity", "major"),
                  f"{name}.text": body.pop("text", channel[1])}
        _flatten(name + ".", body, values)
        return Mapped(telemetry=values, ts_ms=ts)
    if kind == "twin" and len(channel) == 2:
        if not payload:
            return Mapped(attributes={f"{prefix}{channel[1]}": None})
        try:
            value = json.loads(payload)
        except (ValueError, RecursionError):
            raise MappingError("twin value is not valid JSON") from None
        return Mapped(attributes={f"{prefix}{channel[1]}": value})
    if channel == ("status", "health") and topic.service:
        body = _object(payload, "health status") if payload else {"status": "down"}
        status = body.get("status")
        if not isinstance(status, str):
            raise MappingError("health status has no status text")
        return Mapped(telemetry={f"service.{topic.service}.status": status})
    return None
