"""Where a message from ThingsBoard goes, and how an operation asks for messages.

:class:`CloudRouter` holds

- a topic → handler table: exact topics first, then the longest matching prefix (a
  handler gets the rest of the topic after its prefix, and the payload). Built in: RPC
  requests go to the :class:`~teg_gateway.operations.rpc.RpcDispatcher`, attribute
  updates and answers to attribute requests to the shared-attribute cache. A message
  that matches nothing is offered to the registered operations' ``on_message``, in
  order of registration, until one takes it;
- the shared-attribute cache (:attr:`CloudRouter.shared`): every shared attribute
  ThingsBoard sent, deleted keys removed; each change is handed to every operation's
  ``on_shared`` (deleted keys as None);
- the registered operations (:meth:`CloudRouter.register`): their topics and wanted
  shared keys go to the session when it is built (:meth:`CloudRouter.attach`), their
  ``on_connect`` runs on every (re)connection;
- what goes back to ThingsBoard outside the outbox: RPC replies, shared attribute
  requests, an operation's own publishes.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterable
from typing import Any

from teg_gateway.cloud.session import CloudSession
from teg_gateway.cloud.topics import ATTRIBUTE_RESPONSE, ATTRIBUTES, RPC_REQUEST, RPC_RESPONSE
from teg_gateway.mqttlink import ConnectionLost
from teg_gateway.operations.engine import Operation
from teg_gateway.operations.rpc import RpcDispatcher

log = logging.getLogger(__name__)

#: A route's handler: the rest of the topic after the route's prefix ("" for an exact
#: topic), and the payload.
Handler = Callable[[str, bytes], None]


class CloudRouter:
    """The topic → handler table, the shared-attribute cache and the registered
    operations; see the module docstring."""

    def __init__(self) -> None:
        self.session: CloudSession | None = None
        self.shared: dict[str, Any] = {}
        self.operations: list[Operation] = []
        self.rpc = RpcDispatcher(self.send_rpc_reply)
        self._exact: dict[str, Handler] = {}
        self._prefixes: list[tuple[str, Handler]] = []
        self.route_prefix(RPC_REQUEST, self.rpc.handle)
        self.route_topic(ATTRIBUTES, lambda _rest, payload: self.on_attributes(payload,
                                                                               "update"))
        self.route_prefix(ATTRIBUTE_RESPONSE,
                          lambda _rest, payload: self.on_attributes(payload, "response"))

    # -- the table ------------------------------------------------------------------------

    def route_topic(self, topic: str, handler: Handler) -> None:
        """Messages on exactly ``topic`` go to ``handler``."""
        self._exact[topic] = handler

    def route_prefix(self, prefix: str, handler: Handler) -> None:
        """Messages on topics starting with ``prefix`` go to ``handler`` (the longest
        matching prefix wins)."""
        self._prefixes = [(p, h) for p, h in self._prefixes if p != prefix]
        self._prefixes.append((prefix, handler))
        self._prefixes.sort(key=lambda item: len(item[0]), reverse=True)

    def route(self, topic: str, payload: bytes) -> None:
        """One message from ThingsBoard (the session's message handler)."""
        handler = self._exact.get(topic)
        if handler is not None:
            self._call(handler, "", topic, payload)
            return
        for prefix, handler in self._prefixes:
            if topic.startswith(prefix):
                self._call(handler, topic[len(prefix):], topic, payload)
                return
        for op in self.operations:
            try:
                if op.on_message(topic, payload):
                    return
            except Exception:
                log.exception("%s: handling a message on %s failed", op.name, topic)
                return
        log.debug("message on %s ignored", topic)

    @staticmethod
    def _call(handler: Handler, rest: str, topic: str, payload: bytes) -> None:
        try:
            handler(rest, payload)
        except Exception:
            log.exception("handling a message on %s failed", topic)

    # -- operations -----------------------------------------------------------------------

    def register(self, op: Operation) -> None:
        """Take ``op``'s subscriptions, wanted shared keys and handlers (before
        :meth:`attach`); its RPC methods are answered from now on."""
        self.operations.append(op)
        for method in op.rpc_methods():
            self.rpc.register(method.name, method.description, method.handler,
                              method.params)

    def subscriptions(self) -> list[str]:
        """The registered operations' topics, each once, in order of registration."""
        return _unique(t for op in self.operations for t in op.subscriptions())

    def shared_keys(self) -> list[str]:
        """The shared keys the registered operations want, each once."""
        return _unique(k for op in self.operations for k in op.shared_keys())

    def attach(self, session: CloudSession) -> None:
        """Hand the operations' topics, shared keys and ``on_connect`` to ``session``
        (before it runs); replies and requests go through it from now on."""
        self.session = session
        session.subscriptions.extend(t for t in self.subscriptions()
                                     if t not in session.subscriptions)
        session.shared_keys.extend(k for k in self.shared_keys()
                                   if k not in session.shared_keys)
        for op in self.operations:
            session.on_connect.append(op.on_connect)

    # -- shared attributes ------------------------------------------------------------------

    def on_attributes(self, payload: bytes, kind: str) -> None:
        """An attribute update (``kind`` "update") or the answer to an attribute request
        ("response"): into the cache, then to every operation."""
        try:
            value = json.loads(payload)
        except (ValueError, RecursionError):
            log.warning("attribute %s is not JSON: %.200r", kind, payload)
            return
        if not isinstance(value, dict):
            log.warning("attribute %s is not a JSON object: %.200r", kind, payload)
            return
        if kind == "response":
            shared = value.get("shared", {})
            changes = shared if isinstance(shared, dict) else {}
        elif "deleted" in value and isinstance(value["deleted"], list):
            changes = {str(k): None for k in value["deleted"]}
        else:
            changes = value
        for key, item in changes.items():
            if item is None:
                self.shared.pop(key, None)
            else:
                self.shared[key] = item
        log.debug("shared attributes %s: %s", kind, sorted(changes))
        for op in self.operations:
            try:
                op.on_shared(changes)
            except Exception:
                log.exception("attribute handler failed")

    def request_shared(self, keys: list[str]) -> None:
        """Ask ThingsBoard for shared attributes now (nothing when not connected: every
        connect asks again)."""
        if self.session is not None and self.session.connected.is_set():
            self.session.request_shared_attributes(keys)

    # -- straight to ThingsBoard ----------------------------------------------------------

    def send_rpc_reply(self, request_id: str, reply: dict[str, Any]) -> None:
        # Replies go straight to the session: ThingsBoard forgets an RPC after ~10 s, so a
        # reply kept for a later connection would answer nobody.
        if self.session is None:
            return
        fut = self.session.publish(RPC_RESPONSE + request_id, json.dumps(reply, default=str))

        def delivered(f: asyncio.Future[None]) -> None:
            if not f.cancelled() and f.exception() is not None:
                log.warning("RPC reply %s not delivered: %s", request_id, f.exception())

        fut.add_done_callback(delivered)

    def publish(self, topic: str, payload: bytes | str) -> asyncio.Future[None]:
        """Publish straight to ThingsBoard (OTA chunk requests); fails when offline."""
        if self.session is None:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            fut.set_exception(ConnectionLost("not connected to ThingsBoard"))
            return fut
        return self.session.publish(topic, payload)


def _unique(items: Iterable[str]) -> list[str]:
    seen: list[str] = []
    for item in items:
        if item not in seen:
            seen.append(item)
    return seen
