"""Size bounds for what the gateway builds from outside input (replies, telemetry, logs).

Anything that echoes input (a method name, a path, a parameter, a server's message)
goes through :func:`clip`, so one hostile value can never make a reply or a telemetry
value large enough for ThingsBoard to close the connection.
"""

from __future__ import annotations

import json
from typing import Any

#: Longest echoed text in a reply, an error or a telemetry value.
ECHO_LIMIT = 200
#: Longest error text (which may hold a few echoed values).
ERROR_LIMIT = 1000
#: An RPC reply as a whole stays well under ThingsBoard's usual 64 KiB payload limit.
REPLY_LIMIT = 48 * 1024
#: Longest telemetry text built from a command's output or a result.
VALUE_LIMIT = 32 * 1024


def clip(text: Any, limit: int = ECHO_LIMIT) -> str:
    """``text`` (made a string) cut to at most ``limit`` characters, saying how much was
    left out."""
    value = text if isinstance(text, str) else str(text)
    if len(value) <= limit:
        return value
    note = f"... ({len(value) - limit} more characters)"
    return value[:max(0, limit - len(note))] + note


def show(value: Any, limit: int = ECHO_LIMIT) -> str:
    """``repr(value)`` clipped: for echoing a parameter in an error message."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):
        text = f"<{type(value).__name__}>"
    return clip(text, limit)


def bounded_json(value: Any, limit: int) -> str:
    """``value`` as compact JSON of at most ``limit`` bytes; a larger one is replaced by
    an object that says it was truncated and holds the start of the text."""
    try:
        text = json.dumps(value, separators=(",", ":"), default=str)
    except (ValueError, TypeError, RecursionError) as exc:
        text = json.dumps({"error": f"value cannot be shown: {exc}"})
    if len(text.encode()) <= limit:
        return text
    size = len(text.encode())
    keep = max(0, limit - 200)
    while True:  # escaping can make the kept start longer: shrink until it fits
        head = text.encode()[:keep].decode(errors="ignore")
        out = json.dumps({"truncated": True, "size_bytes": size, "start": head},
                         ensure_ascii=False)
        if len(out.encode()) <= limit or keep == 0:
            return out
        keep //= 2
