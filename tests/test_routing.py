"""The ThingsBoard message router (cloud/routing.py): the topic table, the shared-attribute
cache, and what a registered operation gets. Pure logic: the messages are handed to the
router as the session would hand them; no broker is needed."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from teg_gateway.cloud.credentials import ACCESS_TOKEN, Credentials
from teg_gateway.cloud.routing import CloudRouter
from teg_gateway.cloud.session import CloudSession
from teg_gateway.cloud.topics import (
    ATTRIBUTE_RESPONSE,
    ATTRIBUTES,
    RPC_REQUEST,
    SESSION_SUBSCRIPTIONS,
)
from teg_gateway.config import load_settings
from teg_gateway.operations.engine import Operation
from teg_gateway.store.state import StateFile


class Recording(Operation):
    """An operation that records what the router hands it."""

    def __init__(self, name: str, topics: list[str], keys: list[str],
                 takes: str | None = None) -> None:
        self.name = name
        self.topics = topics
        self.keys = keys
        self.takes = takes
        self.shared: list[dict[str, Any]] = []
        self.messages: list[tuple[str, bytes]] = []
        self.connects = 0

    def subscriptions(self) -> list[str]:
        return self.topics

    def shared_keys(self) -> list[str]:
        return self.keys

    def on_connect(self) -> None:
        self.connects += 1

    def on_shared(self, changes: dict[str, Any]) -> None:
        self.shared.append(dict(changes))

    def on_message(self, topic: str, payload: bytes) -> bool:
        self.messages.append((topic, payload))
        return self.takes is not None and topic.startswith(self.takes)


class Broken(Operation):
    name = "broken"

    def on_shared(self, changes: dict[str, Any]) -> None:
        raise RuntimeError("boom")

    def on_message(self, topic: str, payload: bytes) -> bool:
        raise RuntimeError("boom")


class RepliesKept(CloudRouter):
    """The router with its RPC replies kept instead of published."""

    def __init__(self) -> None:
        self.replies: list[tuple[str, dict[str, Any]]] = []
        super().__init__()

    def send_rpc_reply(self, request_id: str, reply: dict[str, Any]) -> None:
        self.replies.append((request_id, reply))


def test_an_rpc_request_goes_to_the_dispatcher_and_is_answered() -> None:
    async def scenario() -> list[tuple[str, dict[str, Any]]]:
        router = RepliesKept()
        op = Recording("op", [], [])
        router.register(op)
        router.route(RPC_REQUEST + "17", json.dumps({"method": "list", "params": {}}).encode())
        for _ in range(20):
            await asyncio.sleep(0)
        assert op.messages == []  # not offered to the operations
        return router.replies

    replies = asyncio.run(scenario())
    assert len(replies) == 1
    request_id, reply = replies[0]
    assert request_id == "17"
    assert "list" in json.dumps(reply)


def test_the_attribute_cache_follows_updates_deletions_and_responses() -> None:
    router = CloudRouter()
    op = Recording("op", [], [])
    router.register(op)

    router.route(ATTRIBUTES, json.dumps({"a": 1, "b": {"x": 2}}).encode())
    assert router.shared == {"a": 1, "b": {"x": 2}}
    router.route(ATTRIBUTES, json.dumps({"deleted": ["a", "never-set"]}).encode())
    assert router.shared == {"b": {"x": 2}}
    router.route(ATTRIBUTE_RESPONSE + "3",
                 json.dumps({"client": {"c": 9}, "shared": {"c": 3, "b": None}}).encode())
    assert router.shared == {"c": 3}
    # Not JSON, not an object, a response without "shared": the cache stays as it is.
    for topic, payload in [(ATTRIBUTES, b"{nope"), (ATTRIBUTES, b"[1, 2]"),
                           (ATTRIBUTE_RESPONSE + "4", b'{"client": {"d": 1}}'),
                           (ATTRIBUTES, b"[" * 100_000)]:
        router.route(topic, payload)
    assert router.shared == {"c": 3}

    assert op.shared == [{"a": 1, "b": {"x": 2}}, {"a": None, "never-set": None},
                         {"c": 3, "b": None}, {}]
    assert op.messages == []


def test_a_registered_operation_gets_its_subscriptions_keys_and_messages(
        tmp_path: Path) -> None:
    router = CloudRouter()
    ota = Recording("ota", ["v2/fw/response/+/chunk/+", "v2/fw/error"],
                    ["sw_title", "sw_version", "sw_url"], takes="v2/fw/")
    files = Recording("files", ["v2/fw/error"], ["FILES"], takes="files/")
    for op in (ota, files):
        router.register(op)
    assert router.subscriptions() == ["v2/fw/response/+/chunk/+", "v2/fw/error"]
    assert router.shared_keys() == ["sw_title", "sw_version", "sw_url", "FILES"]

    settings = load_settings(env={"TEG_DATA_PATH": str(tmp_path)})
    session = CloudSession(settings.thingsboard, Credentials(ACCESS_TOKEN, token="t"),
                           "device", router.route, StateFile(tmp_path / "cloud.json"),
                           token_path=settings.access_token_path)
    router.attach(session)
    assert router.session is session
    assert session.subscriptions == [*SESSION_SUBSCRIPTIONS, "v2/fw/response/+/chunk/+",
                                     "v2/fw/error"]
    # Every wanted key is asked for once on every connect.
    assert sorted(session.shared_keys) == sorted({"sw_title", "sw_version", "sw_url",
                                                  "FILES"})
    assert len(session.shared_keys) == len(set(session.shared_keys))
    for callback in session.on_connect:
        callback()
    assert (ota.connects, files.connects) == (1, 1)

    # A topic outside the table goes to the operations in order, until one takes it.
    router.route("v2/fw/response/5/chunk/0", b"chunk")
    assert ota.messages == [("v2/fw/response/5/chunk/0", b"chunk")]
    assert files.messages == []
    router.route("files/x", b"1")
    assert ota.messages[-1] == ("files/x", b"1")
    assert files.messages == [("files/x", b"1")]
    router.route("nobody/wants/this", b"2")
    assert files.messages[-1] == ("nobody/wants/this", b"2")


def test_a_failing_operation_does_not_stop_the_others() -> None:
    router = CloudRouter()
    broken = Broken()
    after = Recording("after", [], [])
    router.register(broken)
    router.register(after)
    router.route(ATTRIBUTES, b'{"k": 1}')
    assert router.shared == {"k": 1}
    assert after.shared == [{"k": 1}]
    router.route("some/topic", b"x")  # raises inside the broken operation: logged only


def test_the_table_prefers_exact_topics_then_the_longest_prefix() -> None:
    router = CloudRouter()
    seen: list[tuple[str, str, bytes]] = []
    router.route_prefix("a/", lambda rest, p: seen.append(("a/", rest, p)))
    router.route_prefix("a/b/", lambda rest, p: seen.append(("a/b/", rest, p)))
    router.route_topic("a/b/c", lambda rest, p: seen.append(("a/b/c", rest, p)))
    router.route("a/b/c", b"1")
    router.route("a/b/d", b"2")
    router.route("a/x", b"3")
    assert seen == [("a/b/c", "", b"1"), ("a/b/", "d", b"2"), ("a/", "x", b"3")]


def test_requests_and_publishes_without_a_session_fail_cleanly() -> None:
    async def scenario() -> None:
        router = CloudRouter()
        router.request_shared(["FILES"])  # nothing to ask through: no error
        router.send_rpc_reply("1", {"ok": True})
        fut = router.publish("v2/fw/request/1/chunk/0", b"")
        try:
            await fut
        except Exception as exc:
            assert "not connected" in str(exc)
        else:
            raise AssertionError("a publish without a session succeeded")

    asyncio.run(scenario())
