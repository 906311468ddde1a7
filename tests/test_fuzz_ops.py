"""Property-based tests of every parser of outside input in the operations: RPC params of
every registered method, the shared attributes of remote files and OTA, local-bus
payloads (measurements, events, alarms, twins, health, restart commands) and package
archives.

The invariant everywhere: no exception escapes a handler; every input gets a reply, a
refusal or a reported error; what goes back is bounded in size. The components run
in-process on real files in temporary directories (a gateway process per example would
be too slow); examples are few and bounded so the whole file runs in seconds.
"""

from __future__ import annotations

import asyncio
import io
import json
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from teg_gateway.clock import Clock
from teg_gateway.config import Settings, load_settings
from teg_gateway.gateway import Gateway
from teg_gateway.local import topics
from teg_gateway.operations.engine import CommandChannel
from teg_gateway.operations.files import FileArea, FileManager
from teg_gateway.operations.ota import OtaManager
from teg_gateway.operations.packages import OtaError, unpack_package
from teg_gateway.operations.restart import RestartOperation
from teg_gateway.operations.update import Updates

FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
KIB64 = 64 * 1024

scalars = (st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
           | st.floats(allow_nan=False) | st.text(max_size=40)
           | st.sampled_from(["", "*", "../../etc/passwd", "x" * 3000, "\x00", "-exec"]))
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12)


def make_settings(data: Path, **sections: dict[str, Any]) -> Settings:
    found = load_settings(env={"TEG_DATA_PATH": str(data)})
    for section, values in sections.items():
        for name, value in values.items():
            setattr(getattr(found, section), name, value)
    return found


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """One event loop for a whole property (a loop per example would be slow); every
    exception a task lets escape is kept and fails the test."""
    made = asyncio.new_event_loop()
    errors: list[dict[str, Any]] = []
    made.set_exception_handler(lambda _loop, context: errors.append(context))
    asyncio.set_event_loop(made)
    yield made
    pending = [t for t in asyncio.all_tasks(made) if not t.done()]
    for task in pending:
        task.cancel()
    made.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    made.close()
    asyncio.set_event_loop(None)
    assert not errors, errors


# -- RPC ----------------------------------------------------------------------------------


PARAM_NAMES = ["command", "timeout_s", "start_timestamp_ms", "end_timestamp_ms", "reason"]


@st.composite
def rpc_requests(draw: st.DrawFn, methods: list[str]) -> bytes:
    method = draw(st.sampled_from(methods) | st.text(max_size=30)
                  | st.just("m" * 100_000))
    params = draw(st.dictionaries(st.sampled_from(PARAM_NAMES) | st.text(max_size=8),
                                  json_values, max_size=4))
    if draw(st.booleans()) and "command" in params:
        params["command"] = draw(st.lists(st.sampled_from(["true", "find", "sh", "-c", "id",
                                                           "*", "x"]), max_size=5))
    shape = draw(st.sampled_from(["object", "string", "raw"]))
    if shape == "raw":
        return draw(st.binary(max_size=60))
    body: dict[str, Any] = {"method": method,
                            "params": json.dumps(params) if shape == "string" else params}
    return json.dumps(body).encode()


def test_every_rpc_method_answers_every_params_within_bounds(
        data: Path, loop: asyncio.AbstractEventLoop) -> None:
    boot_id = data.parent / "boot_id"
    boot_id.write_text("boot-1\n")
    gateway = Gateway(make_settings(
        data, restart={"command": ["false"], "boot_id_file": str(boot_id), "timeout_s": 5.0},
        rpc={"shutdown_command": ["true"], "run_command_enabled": True,
             "run_command_allow": ["true", ["find", "/nonexistent", "-name", "*"]]}))
    gateway.stores.open()
    replies: list[tuple[str, dict[str, Any]]] = []
    gateway.rpc._reply = lambda request_id, reply: replies.append((request_id, reply))
    methods = sorted(gateway.rpc.methods)
    counter = iter(range(10**9))

    @FUZZ
    @given(rpc_requests(methods))
    def check(payload: bytes) -> None:
        request_id = str(next(counter))
        before = len(replies)
        loop.run_until_complete(gateway.rpc._serve(request_id, payload))
        assert len(replies) == before + 1
        answered_id, reply = replies[-1]
        assert answered_id == request_id
        text = json.dumps(reply, default=str)
        assert len(text.encode()) < KIB64
        assert not str(reply.get("message")).startswith("internal error"), reply

    try:
        check()
    finally:
        gateway.stores.close()


# -- shared attributes ----------------------------------------------------------------------


paths = st.sampled_from(["a.txt", "$DATA_PATH/b.conf", "${DATA_PATH}/sub/c.json", "../x",
                         "/etc/passwd", "sub/../a.txt", "state/ota.json", "ota/1.part",
                         "controller/versions/1/app.py", "outbox.db", "", " ", "a\x00b",
                         "sub/", "."]) | st.text(max_size=20)
file_entries = st.fixed_dictionaries(
    {"path": paths | scalars},
    optional={"encoding": st.sampled_from(["text", "json", "base64"]) | scalars,
              "write_version": json_values, "restart_controller_on_change": scalars,
              "create_if_not_exist": scalars})
files_values = (st.dictionaries(st.text(min_size=0, max_size=8), file_entries | json_values,
                                max_size=4)
                | json_values | st.builds(json.dumps, st.dictionaries(
                    st.sampled_from(["a", "b"]), file_entries, max_size=2)))


def test_remote_file_attributes_never_escape_and_stay_bounded(
        data: Path, loop: asyncio.AbstractEventLoop) -> None:
    published: list[dict[str, Any]] = []
    reported: list[dict[str, Any]] = []
    restarts: list[str] = []

    async def restart(reason: str) -> str:
        restarts.append(reason)
        return "ok"

    found = make_settings(data)
    manager = FileManager(found.files, FileArea.of(found), publish_attributes=published.append,
                          report=reported.append, request_shared=lambda _keys: None,
                          restart_controller=restart,
                          max_payload_bytes=found.outbox.max_payload_bytes, clock=Clock())

    @FUZZ
    @given(files_values, st.dictionaries(st.sampled_from(["a", "b", "k", ""]),
                                         json_values | st.binary(max_size=20).map(
                                             lambda b: b.hex()), max_size=3))
    def check(files: Any, contents: dict[str, Any]) -> None:
        published.clear()
        reported.clear()
        manager.on_shared({"FILES": files})
        manager.on_shared({f"FILE_CONTENT_{k}": v for k, v in contents.items()})
        loop.run_until_complete(manager.reconcile())
        loop.run_until_complete(manager.changed_on_disk())
        for values in published:
            assert len(json.dumps(values).encode()) <= found.outbox.max_payload_bytes
        for values in reported:
            assert len(json.dumps(values).encode()) < 4096, values
        assert not (data.parent / "x").exists()

    check()
    # The gateway's own files were never touched.
    assert not (data / "ota").exists() and not (data / "controller").exists()
    assert not (data / "outbox.db").exists()


def test_ota_attributes_never_escape_and_stay_bounded(
        data: Path, loop: asyncio.AbstractEventLoop) -> None:
    reported: list[dict[str, Any]] = []

    def publish(_topic: str, _payload: bytes | str) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = loop.create_future()
        fut.set_result(None)
        return fut

    found = make_settings(data)
    manager = OtaManager(found.ota, Updates.of(found, None, reported.append,
                                        data / "state" / "ota.json"), publish)
    sw_values = st.fixed_dictionaries({}, optional={
        "sw_title": json_values, "sw_version": st.sampled_from(["2.0", "x" * 500, "../1"])
        | json_values, "sw_url": st.sampled_from(["https://h/p", "http://h/p", "ftp://x",
                                                  "https://" + "h" * 5000]) | json_values,
        "sw_checksum": json_values, "sw_checksum_algorithm": st.sampled_from(
            ["SHA256", "MD5", "CRC32", "nope"]) | json_values, "sw_size": json_values})

    @FUZZ
    @given(sw_values)
    def check(changes: dict[str, Any]) -> None:
        reported.clear()
        manager.on_shared(changes)
        loop.run_until_complete(manager._step())
        for values in reported:
            assert len(json.dumps(values, default=str).encode()) < 4096, values

    check()


# -- local bus ------------------------------------------------------------------------------


channels = st.sampled_from([("m", "x"), ("e", "boot"), ("a", "temp"), ("twin", "cfg"),
                            ("status", "health"), ("m",), ("cmd", "restart", "1")])
payloads = (st.binary(max_size=60) | json_values.map(lambda v: json.dumps(v).encode())
            | st.sampled_from([b"[" * 100_000, b'{"a":' * 50_000, b'{"time": 1e308, "v": 1}',
                               b'{"time": "0001-01-01T00:00:00", "v": 1}',
                               b'{"time": -5, "v": 1}', b'{"time": "9999-12-31T23:59:59Z"}']))


@FUZZ
@given(st.sampled_from([None, "ctl", "a" * 300]), channels, payloads)
def test_local_bus_payloads_map_or_are_refused(service: str | None,
                                               channel: tuple[str, ...],
                                               payload: bytes) -> None:
    topic = topics.Topic(service, channel)
    try:
        mapped = topics.map_message(topic, payload)
    except topics.MappingError as exc:
        assert len(str(exc)) < 300
        return
    if mapped is not None and mapped.ts_ms is not None:
        assert 0 <= mapped.ts_ms <= topics.MAX_TIME_MS


def test_restart_command_payloads_never_escape(data: Path,
                                               loop: asyncio.AbstractEventLoop) -> None:
    boot_id = data / "boot_id"
    boot_id.write_text("boot-1\n")
    found = make_settings(data, restart={"command": ["false"], "boot_id_file": str(boot_id),
                                         "timeout_s": 5.0})
    reported: list[dict[str, Any]] = []
    connected = asyncio.Event()

    def publish(_topic: str, _payload: bytes) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = loop.create_future()
        fut.set_result(None)
        return fut

    clock = Clock()
    operation = RestartOperation(found.restart, data / "state" / "restart.json",
                                 CommandChannel(publish, connected, clock), reported.append,
                                 clock)
    connected.set()

    @FUZZ
    @given(st.sampled_from(["c1", "c2", "tb-rpc-1", "x" * 500]),
           payloads | st.sampled_from([b'{"status": "init"}',
                                       b'{"status": "init", "extra": [1, {"a": null}]}']))
    def check(command_id: str, payload: bytes) -> None:
        operation.on_command(command_id, payload)
        loop.run_until_complete(asyncio.sleep(0.01))

    check()
    loop.run_until_complete(asyncio.sleep(0.2))
    for values in reported:
        assert len(json.dumps(values).encode()) < 4096


# -- package archives -----------------------------------------------------------------------


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return buf.getvalue()


def _tar_gz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as archive:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    return buf.getvalue()


SEEDS = [_zip({"app.py": b"print(1)\n" * 50, "lib/a.py": b"x" * 300}),
         _tar_gz({"ctl/app.py": b"print(1)\n" * 50, "ctl/lib/a.py": b"x" * 300})]


@st.composite
def archives(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        return draw(st.binary(max_size=400))
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(min_value=1, max_value=6))):
        where = draw(st.integers(min_value=0, max_value=len(data) - 1))
        data[where] = draw(st.integers(min_value=0, max_value=255))
    if draw(st.booleans()):
        data = data[:draw(st.integers(min_value=0, max_value=len(data)))]
    return bytes(data)


def test_any_package_bytes_unpack_or_are_refused_with_a_reason(tmp_path: Path) -> None:
    counter = iter(range(10**9))

    @FUZZ
    @given(archives())
    def check(package_bytes: bytes) -> None:
        n = next(counter)
        work = tmp_path / f"case-{n}"
        work.mkdir()
        package = work / "package"
        package.write_bytes(package_bytes)
        try:
            unpack_package(package, work / "out", 10**6)
        except OtaError as exc:
            assert str(exc) and len(str(exc)) < 1500
        # Nothing lands beside the target.
        assert sorted(p.name for p in work.iterdir()) in (["package"], ["out", "package"])

    check()


def test_a_large_reply_is_cut_and_says_so() -> None:
    from teg_gateway.bounds import REPLY_LIMIT, clip
    from teg_gateway.operations.rpc import bound_reply

    small = {"message": {"a": 1}}
    assert bound_reply(small) is small
    big = bound_reply({"message": {"stdout": "\u00e9\"" * 100_000}, "error": True})
    assert big["truncated"] is True and big["error"] is True
    assert big["size_bytes"] > REPLY_LIMIT
    assert len(json.dumps(big).encode()) <= REPLY_LIMIT
    assert big["message"].startswith('{"stdout": "\u00e9\\"')
    assert clip("x" * 1000, 50).endswith("(950 more characters)")
    assert len(clip("x" * 1000, 50)) == 50
