"""Server-side RPC: a registry of methods, and the dispatcher that answers every request.

Replies have the shape ``{"message": ...}`` like the original gateway; an error adds
``"error": true``. A method that takes long starts its work and replies at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from teg_gateway.bounds import ERROR_LIMIT, REPLY_LIMIT, clip, show

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[Any]]
Reply = Callable[[str, dict[str, Any]], None]


# ThingsBoard forgets an RPC after about 10 s (the dispatcher gives up after 8 s): work
# that takes longer goes on, and the reply says so.
REPLY_WITHIN_S = 6.0

# The id of the request being served (each request runs in its own task).
current_request_id: ContextVar[str] = ContextVar("current_request_id", default="")


class RpcError(Exception):
    """A request that cannot be served; the message goes back to the caller."""


@dataclass
class Method:
    name: str
    description: str
    handler: Handler
    params: dict[str, str] = field(default_factory=dict)


class RpcDispatcher:
    """Parses requests, validates the method, runs it, and always replies."""

    def __init__(self, reply: Reply, timeout_s: float = 8.0) -> None:
        self._reply = reply
        self.timeout_s = timeout_s
        self.methods: dict[str, Method] = {}
        self._tasks: set[asyncio.Future[Any]] = set()
        self.register("list", "every method with a one-line description and its params",
                      self._list)

    def register(self, name: str, description: str, handler: Handler,
                 params: dict[str, str] | None = None) -> None:
        self.methods[name] = Method(name, description, handler, params or {})

    async def _list(self, _params: dict[str, Any]) -> Any:
        return {m.name: {"description": m.description, "params": m.params}
                for m in sorted(self.methods.values(), key=lambda m: m.name)}

    async def result_or_progress(
            self, work: Awaitable[Any], still_running: str,
            on_late_result: Callable[[Any, BaseException | None], None] | None = None,
            within_s: float = REPLY_WITHIN_S) -> Any:
        """The result of ``work`` if it finishes within ``within_s``; otherwise
        ``still_running``, and the work goes on (``on_late_result`` gets its result or
        error when it ends)."""
        task = asyncio.ensure_future(work)
        done, _ = await asyncio.wait({task}, timeout=within_s)
        if task in done:
            return task.result()
        self._tasks.add(task)

        def finished(t: asyncio.Future[Any]) -> None:
            self._tasks.discard(t)
            if t.cancelled():
                return
            error = t.exception()
            if on_late_result is not None:
                on_late_result(None if error else t.result(), error)

        task.add_done_callback(finished)
        return still_running

    def handle(self, request_id: str, payload: bytes) -> None:
        """Serve one request (called from the MQTT message handler)."""
        task = asyncio.ensure_future(self._serve(request_id, payload))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, request_id: str, payload: bytes) -> None:
        current_request_id.set(request_id)
        shown_id = clip(request_id, 64)
        try:
            method, params = parse_request(payload)
            entry = self.methods.get(method)
            if entry is None:
                raise RpcError(f"unknown method {show(method, 100)}; the method 'list' shows "
                               "them all")
            result = await asyncio.wait_for(entry.handler(params), self.timeout_s)
            self._send(request_id, {"message": result})
            log.info("RPC %s (%s) answered", method, shown_id)
        except RpcError as exc:
            log.warning("RPC %s refused: %s", shown_id, clip(exc, ERROR_LIMIT))
            self._send(request_id, {"message": clip(exc, ERROR_LIMIT), "error": True})
        except TimeoutError:
            log.error("RPC %s did not finish in %.0f s", shown_id, self.timeout_s)
            self._send(request_id, {"message": "timed out", "error": True})
        except Exception as exc:
            log.exception("RPC %s failed", shown_id)
            self._send(request_id, {"message": f"internal error: {type(exc).__name__}: "
                                               f"{clip(exc)}", "error": True})

    def _send(self, request_id: str, reply: dict[str, Any]) -> None:
        """Reply, bounded: a reply above REPLY_LIMIT bytes is cut and says so."""
        self._reply(request_id, bound_reply(reply))


def bound_reply(reply: dict[str, Any], limit: int = REPLY_LIMIT) -> dict[str, Any]:
    """``reply`` when its JSON fits in ``limit`` bytes; else its message as the start of
    its JSON text, with ``"truncated": true`` and the full size."""
    try:
        size = len(json.dumps(reply, default=str).encode())
    except (ValueError, TypeError, RecursionError) as exc:
        return {"message": f"the reply cannot be encoded: {clip(exc)}", "error": True}
    if size <= limit:
        return reply
    message = reply.get("message")
    text = message if isinstance(message, str) else json.dumps(message, default=str,
                                                                 ensure_ascii=False)
    keep = limit - 1024
    while True:  # escaping can make the kept start longer: shrink until it fits
        cut: dict[str, Any] = {
            "message": text[:keep], "truncated": True, "size_bytes": size,
            "note": f"the reply was {size} bytes; the message holds the start of it"}
        if reply.get("error"):
            cut["error"] = True
        if len(json.dumps(cut).encode()) <= limit or keep == 0:
            return cut
        keep //= 2


def parse_request(payload: bytes) -> tuple[str, dict[str, Any]]:
    """(method, params) of a request; params default to {} and must be an object."""
    try:
        request = json.loads(payload)
    except (ValueError, RecursionError):
        raise RpcError("request is not valid JSON") from None
    if not isinstance(request, dict):
        raise RpcError("request is not a JSON object")
    method = request.get("method")
    if not isinstance(method, str) or not method:
        raise RpcError("request has no method")
    params = request.get("params")
    if params is None or params in ("", {}):
        params = {}
    if isinstance(params, str):
        try:
            params = json.loads(params)
        except (ValueError, RecursionError):
            raise RpcError("params is a string that is not JSON") from None
    if not isinstance(params, dict):
        raise RpcError("params must be a JSON object")
    return method, params





INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def require_int(params: dict[str, Any], name: str, low: int = INT64_MIN,
                high: int = INT64_MAX) -> int:
    """The integer param ``name`` within [low, high] (a 64-bit integer by default)."""
    value = params.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RpcError(f"param {name!r} must be an integer, got {show(value)}")
    if not low <= value <= high:
        raise RpcError(f"param {name!r} must be from {low} to {high}, got {show(value)}")
    return value
