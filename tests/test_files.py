"""Remote file management (SPEC.md section 5): path checks, decoding, reconciliation,
and the whole chain through a real gateway, a real mosquitto and the ThingsBoard stand-in."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from conftest import GatewayFactory, needs_mosquitto
from teg_gateway.clock import Clock, FakeClock
from teg_gateway.config import Settings, load_settings
from teg_gateway.operations.files import (
    NO_FILE,
    NOT_A_FILE,
    FileArea,
    FileHash,
    FileManager,
    FileRefused,
    _hash_file,
    _read_file,
    _signature_of,
    _write_file,
    encode_content,
    locate,
    parse_entry,
    parse_files,
    resolve_path,
)
from teg_gateway.sandbox.thingsboard import FakeThingsBoard

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def make_settings(data: Path, **files: Any) -> Settings:
    settings = load_settings(env={"TEG_DATA_PATH": str(data)})
    for name, value in files.items():
        setattr(settings.files, name, value)
    return settings


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


class Recorder:
    """The FileManager's outputs, collected."""

    def __init__(self) -> None:
        self.attributes: dict[str, Any] = {}
        self.publishes: list[dict[str, Any]] = []
        self.telemetry: list[dict[str, Any]] = []
        self.requests: list[list[str]] = []
        self.restarts: list[str] = []

    def publish(self, attributes: dict[str, Any]) -> None:
        self.publishes.append(attributes)
        self.attributes.update(attributes)

    def report(self, values: dict[str, Any]) -> None:
        self.telemetry.append(values)

    def request(self, keys: list[str]) -> None:
        self.requests.append(keys)

    async def restart(self, reason: str) -> str:
        self.restarts.append(reason)
        return "restarted"

    def errors(self) -> list[str]:
        return [t["files_error"] for t in self.telemetry if "files_error" in t]


def manager(settings: Settings, rec: Recorder, restart: bool = True,
            clock: Clock | None = None) -> FileManager:
    return FileManager(settings.files, FileArea.of(settings), publish_attributes=rec.publish,
                       report=rec.report, request_shared=rec.request,
                       restart_controller=rec.restart if restart else None,
                       max_payload_bytes=settings.outbox.max_payload_bytes,
                       clock=clock or Clock())


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


# -- path checks ---------------------------------------------------------------------------


def test_paths_inside_the_controller_data_dir_are_allowed(data: Path) -> None:
    area = FileArea.of(make_settings(data))
    assert resolve_path("$DATA_PATH/conf/a.txt", area) == data.resolve() / "conf/a.txt"
    assert resolve_path("${DATA_PATH}/b.txt", area) == data.resolve() / "b.txt"
    assert resolve_path("relative/c.txt", area) == data.resolve() / "relative/c.txt"
    assert resolve_path(str(data / "x/../d.txt"), area) == data.resolve() / "d.txt"


@pytest.mark.parametrize("raw", ["$DATA_PATH/../escape.txt", "$DATA_PATH/a/../../escape.txt",
                                 "/etc/passwd", "../escape.txt", "$DATA_PATH", "/",
                                 "$DATA_PATH/bad\x00name"])
def test_hostile_paths_are_refused(data: Path, raw: str) -> None:
    with pytest.raises(FileRefused):
        resolve_path(raw, FileArea.of(make_settings(data)))


def test_a_symlink_out_of_the_allowed_dirs_is_refused(data: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (data / "link").symlink_to(outside)
    (data / "file-link").symlink_to(outside / "target.txt")
    settings = make_settings(data)
    with pytest.raises(FileRefused, match="outside the allowed directories"):
        resolve_path("$DATA_PATH/link/evil.txt", FileArea.of(settings))
    with pytest.raises(FileRefused, match="outside the allowed directories"):
        resolve_path("$DATA_PATH/file-link", FileArea.of(settings))
    # A link that stays inside is followed: the target is what gets written.
    (data / "inner").mkdir()
    (data / "inner-link").symlink_to(data / "inner")
    assert resolve_path("$DATA_PATH/inner-link/ok.txt", FileArea.of(settings)) == \
        data.resolve() / "inner/ok.txt"


def test_a_directory_swapped_for_a_link_after_the_check_leads_nowhere(
        data: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "app.conf").write_text("secret outside")
    (data / "conf").mkdir()
    settings = make_settings(data)
    loc = locate("$DATA_PATH/conf/app.conf", FileArea.of(settings))
    assert loc.path == data.resolve() / "conf" / "app.conf"
    # Checked; now someone who can write in the data directory swaps conf for a link.
    (data / "conf").rename(data / "conf.old")
    (data / "conf").symlink_to(outside)
    refused = "conf is not a directory .a symbolic link or a file.: refused"
    with pytest.raises(FileRefused, match=refused):
        _write_file(loc, b"from the server", create_dirs=True)
    with pytest.raises(FileRefused, match=refused):
        _read_file(loc, 1000)
    with pytest.raises(FileRefused, match=refused):
        _hash_file(loc)
    with pytest.raises(FileRefused, match=refused):
        _signature_of(loc)
    assert (outside / "app.conf").read_text() == "secret outside"
    assert sorted(p.name for p in outside.iterdir()) == ["app.conf"]


def test_a_file_swapped_for_a_link_or_a_fifo_is_not_followed(data: Path,
                                                              tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("secret outside")
    settings = make_settings(data)
    loc = locate("$DATA_PATH/app.conf", FileArea.of(settings))
    (data / "app.conf").symlink_to(secret)
    read = _read_file(loc, 1000)
    assert read.data is None and read.problem == NOT_A_FILE  # not the secret
    assert _hash_file(loc)[0] is None
    _write_file(loc, b"from the server", create_dirs=False)  # replaces the link itself
    assert not (data / "app.conf").is_symlink()
    assert (data / "app.conf").read_bytes() == b"from the server"
    assert secret.read_text() == "secret outside"
    # A FIFO never blocks a read.
    fifo = locate("$DATA_PATH/fifo", FileArea.of(settings))
    os.mkfifo(data / "fifo")
    assert _read_file(fifo, 1000).problem == NOT_A_FILE


def test_the_gateway_own_files_are_refused(data: Path) -> None:
    settings = make_settings(data)
    for raw in ("$DATA_PATH/outbox.db", "$DATA_PATH/archive.db-wal", "$DATA_PATH/tb_access_token",
                "$DATA_PATH/state/files.json", "$DATA_PATH/communication_queue.db"):
        with pytest.raises(FileRefused, match="the gateway itself"):
            resolve_path(raw, FileArea.of(settings))


def test_configured_allowed_dirs_replace_the_default(data: Path, tmp_path: Path) -> None:
    etc = tmp_path / "etc-app"
    settings = make_settings(data, allowed_dirs=[str(etc)])
    assert resolve_path(str(etc / "app.conf"), FileArea.of(settings)) == etc.resolve() / "app.conf"
    with pytest.raises(FileRefused):
        resolve_path("$DATA_PATH/a.txt", FileArea.of(settings))


# -- FILES and contents --------------------------------------------------------------------


def test_files_entries_are_validated_one_by_one() -> None:
    specs, errors = parse_files(json.dumps({
        "ok": {"path": "a.txt", "encoding": "json", "write_version": 3},
        "enc": {"path": "b.txt", "encoding": "rot13"},
        "nopath": {"encoding": "text"},
        "flag": {"path": "c.txt", "restart_controller_on_change": "yes"},
    }))
    assert list(specs) == ["ok"]
    assert specs["ok"].create_if_not_exist is True
    assert specs["ok"].restart_controller_on_change is False
    assert "unknown encoding" in errors["enc"]
    assert "path" in errors["nopath"]
    assert "restart_controller_on_change" in errors["flag"]
    with pytest.raises(FileRefused, match="not valid JSON"):
        parse_files("{oops")
    with pytest.raises(FileRefused, match="object"):
        parse_files([1, 2])


def test_contents_are_decoded_by_encoding() -> None:
    text = parse_entry("t", {"path": "t", "encoding": "text"})
    b64 = parse_entry("b", {"path": "b", "encoding": "base64"})
    js = parse_entry("j", {"path": "j", "encoding": "json"})
    assert encode_content(text, "héllo\n", 100) == "héllo\n".encode()
    assert encode_content(b64, base64.b64encode(b"\x00\xff").decode(), 100) == b"\x00\xff"
    assert encode_content(b64, "AAEC\nAwQ=\n", 100) == b"\x00\x01\x02\x03\x04"
    assert json.loads(encode_content(js, {"a": [1, 2]}, 100)) == {"a": [1, 2]}
    assert json.loads(encode_content(js, '{"a": 1}', 100)) == {"a": 1}
    with pytest.raises(FileRefused, match="base64"):
        encode_content(b64, "not*base64!", 100)
    with pytest.raises(FileRefused, match="JSON"):
        encode_content(js, "{not json", 100)
    with pytest.raises(FileRefused, match="string"):
        encode_content(text, {"a": 1}, 100)
    with pytest.raises(FileRefused, match="over the limit"):
        encode_content(text, "x" * 101, 100)


# -- reconciliation, without MQTT ----------------------------------------------------------


def files_attr(**entries: dict[str, Any]) -> dict[str, Any]:
    return {"FILES": entries}


def test_a_pass_writes_mirrors_and_hashes(data: Path) -> None:
    rec = Recorder()
    files = manager(make_settings(data), rec)
    files.on_connect()
    files.on_shared(files_attr(
        a={"path": "$DATA_PATH/conf/a.txt", "encoding": "text", "write_version": 7},
        b={"path": "$DATA_PATH/b.bin", "encoding": "base64"},
        c={"path": "$DATA_PATH/c.json", "encoding": "json"}))
    assert rec.requests[-1] == ["FILE_CONTENT_a", "FILE_CONTENT_b", "FILE_CONTENT_c"]
    files.on_shared({"FILE_CONTENT_a": "hello", "FILE_CONTENT_b": "AAEC"})
    result = run(files.reconcile())
    assert sorted(result.written) == ["a", "b"] and result.no_content == ["c"]
    assert (data / "conf/a.txt").read_text() == "hello"
    assert (data / "b.bin").read_bytes() == b"\x00\x01\x02"
    assert rec.attributes["FILE_READ_a"] == "hello"
    assert rec.attributes["FILE_READ_b"] == "AAEC"
    assert rec.attributes["FILE_READ_c"] == NO_FILE
    assert rec.attributes["FILE_HASHES"] == {
        "a": {"hash": md5(b"hello"), "write_version": 7},
        "b": {"hash": md5(b"\x00\x01\x02"), "write_version": None}}
    # Durable: a new manager starts from the saved hashes.
    saved = json.loads((data / "state/files.json").read_text())
    assert saved["facts"]["hashes"]["a"] == {"hash": md5(b"hello"), "write_version": 7}
    assert manager(make_settings(data), Recorder()).hashes == files.hashes
    # A second pass with nothing changed writes and publishes nothing.
    before = len(rec.publishes)
    assert run(files.reconcile()).written == []
    assert len(rec.publishes) == before


def test_refused_files_do_not_stop_the_others(data: Path, tmp_path: Path) -> None:
    rec = Recorder()
    files = manager(make_settings(data, max_bytes=64), rec)
    files.on_shared({**files_attr(
        good={"path": "good.txt"},
        up={"path": "$DATA_PATH/../up.txt"},
        absolute={"path": str(tmp_path / "abs.txt")},
        b64={"path": "b64.bin", "encoding": "base64"},
        js={"path": "j.json", "encoding": "json"},
        big={"path": "big.txt"},
        enc={"path": "e.txt", "encoding": "utf-16"}),
        "FILE_CONTENT_good": "fine", "FILE_CONTENT_up": "x", "FILE_CONTENT_absolute": "x",
        "FILE_CONTENT_b64": "@@@", "FILE_CONTENT_js": "{not json",
        "FILE_CONTENT_big": "x" * 65, "FILE_CONTENT_enc": "x"})
    result = run(files.reconcile())
    assert result.written == ["good"]
    assert sorted(result.errors) == ["absolute", "b64", "big", "enc", "js", "up"]
    assert (data / "good.txt").read_text() == "fine"
    assert not (tmp_path / "up.txt").exists() and not (tmp_path / "abs.txt").exists()
    assert sorted(p.name for p in data.iterdir()) == ["good.txt", "state"]
    assert set(rec.attributes["FILE_HASHES"]) == {"good"}
    errors = rec.errors()
    assert len(errors) == 6
    assert any("outside the allowed directories" in e for e in errors)
    assert any("base64" in e for e in errors) and any("JSON" in e for e in errors)
    # A refused path is never read back either.
    assert "FILE_READ_up" not in rec.attributes and "FILE_READ_absolute" not in rec.attributes
    # The same errors are not reported again at every pass.
    run(files.reconcile())
    assert len(rec.errors()) == 6


def test_a_failed_write_keeps_the_hash_and_is_retried(data: Path) -> None:
    rec = Recorder()
    files = manager(make_settings(data), rec)
    files.on_shared({**files_attr(a={"path": "sub/a.txt", "create_if_not_exist": False}),
                     "FILE_CONTENT_a": "v1"})
    result = run(files.reconcile())
    assert "does not exist" in result.errors["a"]
    assert rec.attributes["FILE_HASHES"] == {}
    assert rec.attributes["FILE_READ_a"] == NO_FILE
    assert run(files.changed_on_disk()), "a failed write must be retried at the next poll"
    (data / "sub").mkdir()
    result = run(files.reconcile())
    assert result.written == ["a"]
    assert rec.attributes["FILE_HASHES"]["a"]["hash"] == md5(b"v1")
    assert not run(files.changed_on_disk())


def test_a_local_change_is_found_by_the_poll_and_put_back(data: Path) -> None:
    rec = Recorder()
    files = manager(make_settings(data), rec)
    files.on_shared({**files_attr(a={"path": "a.txt"}), "FILE_CONTENT_a": "server"})
    run(files.reconcile())
    assert not run(files.changed_on_disk())
    (data / "a.txt").write_text("local edit")
    assert run(files.changed_on_disk())
    assert run(files.reconcile()).written == ["a"]
    assert (data / "a.txt").read_text() == "server"
    (data / "a.txt").unlink()
    assert run(files.changed_on_disk())
    run(files.reconcile())
    assert (data / "a.txt").read_text() == "server"


def test_big_files_are_hashed_and_put_back(data: Path) -> None:
    rec = Recorder()
    files = manager(make_settings(data), rec)
    content = base64.b64encode(os.urandom(200_000)).decode()
    files.on_shared({**files_attr(big={"path": "big.bin", "encoding": "base64"}),
                     "FILE_CONTENT_big": content})
    assert run(files.reconcile()).written == ["big"]
    # Far over a ThingsBoard payload: the mirror says so instead of sending it.
    assert rec.attributes["FILE_READ_big"] == "E_TOO_LARGE"
    assert not run(files.changed_on_disk())
    with (data / "big.bin").open("r+b") as fh:
        fh.seek(150_000)
        fh.write(b"local")
    assert run(files.changed_on_disk())
    assert run(files.reconcile()).written == ["big"]
    assert (data / "big.bin").read_bytes() == base64.b64decode(content)


def test_deleted_attributes(data: Path) -> None:
    rec = Recorder()
    files = manager(make_settings(data), rec)
    files.on_shared({**files_attr(a={"path": "a.txt"}, b={"path": "b.txt"}),
                     "FILE_CONTENT_a": "1", "FILE_CONTENT_b": "2"})
    run(files.reconcile())
    # Content deleted: the file stays as it is and is no longer put back.
    files.on_shared({"FILE_CONTENT_b": None})
    (data / "b.txt").write_text("local")
    run(files.reconcile())
    assert (data / "b.txt").read_text() == "local"
    assert rec.attributes["FILE_READ_b"] == "local"
    # An entry removed from FILES leaves FILE_HASHES; FILES deleted manages nothing.
    files.on_shared(files_attr(a={"path": "a.txt"}))
    run(files.reconcile())
    assert set(rec.attributes["FILE_HASHES"]) == {"a"}
    files.on_shared({"FILES": None})
    run(files.reconcile())
    assert rec.attributes["FILE_HASHES"] == {}
    assert (data / "a.txt").read_text() == "1"


def test_restart_once_per_batch_of_changes(data: Path) -> None:
    rec = Recorder()
    files = manager(make_settings(data), rec)
    restart = {"restart_controller_on_change": True}
    files.on_shared({**files_attr(a={"path": "a.txt", **restart}, b={"path": "b.txt", **restart},
                                  c={"path": "c.txt"}),
                     "FILE_CONTENT_a": "1", "FILE_CONTENT_b": "2", "FILE_CONTENT_c": "3"})
    assert run(files.reconcile()).restarted
    assert len(rec.restarts) == 1 and "a, b" in rec.restarts[0]
    run(files.reconcile())
    assert len(rec.restarts) == 1, "nothing changed: no restart"
    files.on_shared({"FILE_CONTENT_c": "33"})
    run(files.reconcile())
    assert len(rec.restarts) == 1, "c does not ask for a restart"


def test_a_file_deleted_right_after_its_write_is_written_again(data: Path) -> None:
    rec = Recorder()
    files = manager(make_settings(data), rec, restart=False)
    original_write = files._write
    deleted: list[Path] = []

    async def write_then_someone_deletes(loc: Any, content: bytes, create: bool) -> None:
        await original_write(loc, content, create)
        if not deleted:  # once, between the write and the read back
            loc.path.unlink()
            deleted.append(loc.path)

    files._write = write_then_someone_deletes  # type: ignore[method-assign,assignment]
    files.on_shared({**files_attr(a={"path": "a.txt"}), "FILE_CONTENT_a": "x"})
    run(files.reconcile())
    assert deleted and not (data / "a.txt").exists()
    assert run(files.changed_on_disk()), "the next poll must retry"
    run(files.reconcile())
    assert (data / "a.txt").read_text() == "x"
    assert not run(files.changed_on_disk())


def test_a_burst_of_changes_gives_one_pass(data: Path) -> None:
    rec = Recorder()
    files = manager(make_settings(data, poll_interval_s=60.0), rec)

    async def scenario() -> None:
        task = asyncio.ensure_future(files.run())
        files.on_shared(files_attr(a={"path": "a.txt", "restart_controller_on_change": True},
                                   b={"path": "b.txt", "restart_controller_on_change": True}))
        files.on_shared({"FILE_CONTENT_a": "1"})
        files.on_shared({"FILE_CONTENT_b": "2"})
        for _ in range(200):
            if "FILE_HASHES" in rec.attributes and len(rec.attributes["FILE_HASHES"]) == 2:
                break
            await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    run(scenario())
    assert set(rec.attributes["FILE_HASHES"]) == {"a", "b"}
    assert len(rec.restarts) == 1
    assert len([p for p in rec.publishes if "FILE_HASHES" in p]) == 1


def test_init_files_resets_and_reconciles(data: Path) -> None:
    rec = Recorder()
    files = manager(make_settings(data), rec, restart=False)
    files.on_shared({**files_attr(a={"path": "a.txt"}), "FILE_CONTENT_a": "x"})
    run(files.reconcile())
    rec.publishes.clear()
    answer = run(files.init_files())
    assert "1 file(s) reconciled" in answer
    assert rec.publishes[0] == {"FILE_HASHES": {}}
    assert rec.attributes["FILE_HASHES"] == {"a": {"hash": md5(b"x"), "write_version": None}}
    assert rec.attributes["FILE_READ_a"] == "x"
    assert rec.requests[-1] == ["FILES", "FILE_CONTENT_a"]


def test_without_files_nothing_happens(data: Path) -> None:
    rec = Recorder()
    files = manager(make_settings(data), rec)
    files.on_shared({"FILE_CONTENT_a": "x", "other": 1})
    assert run(files.reconcile()).written == []
    assert not run(files.changed_on_disk())
    assert rec.publishes == []
    assert "FILES" in run(files.init_files())


def test_existing_file_mode_is_kept(data: Path) -> None:
    target = data / "script.sh"
    target.write_text("old")
    target.chmod(0o750)
    rec = Recorder()
    files = manager(make_settings(data), rec)
    files.on_shared({**files_attr(s={"path": "script.sh"}), "FILE_CONTENT_s": "new"})
    run(files.reconcile())
    assert target.read_text() == "new"
    assert os.stat(target).st_mode & 0o777 == 0o750


# -- end to end: a real gateway, mosquitto and the ThingsBoard stand-in --------------------

FAST_FILES = {"files": {"poll_interval_s": 0.2}}


def wait_attr(tb: FakeThingsBoard, check: Callable[[dict[str, Any]], bool],
              message: str, timeout: float = 15.0) -> None:
    tb.wait_for(lambda: check(tb.client_attributes), timeout=timeout,
                message=f"{message}; client attributes: {tb.client_attributes}")


@needs_mosquitto
def test_gateway_writes_files_and_puts_local_changes_back(
        make_gateway: GatewayFactory, thingsboard: FakeThingsBoard, data_dir: Path) -> None:
    # Set before the gateway starts: it must ask for FILES and the contents on connect.
    thingsboard.set_shared({
        "FILES": {"cfg": {"path": "$DATA_PATH/conf/app.json", "encoding": "json",
                          "write_version": 1},
                  "note": {"path": "$DATA_PATH/note.txt", "encoding": "text"}},
        "FILE_CONTENT_cfg": {"rate": 5},
        "FILE_CONTENT_note": "hello"})
    gateway = make_gateway(FAST_FILES)
    gateway.start()
    wait_attr(thingsboard, lambda a: set(a.get("FILE_HASHES", {})) == {"cfg", "note"},
              "both files written")
    cfg = data_dir / "conf/app.json"
    assert json.loads(cfg.read_text()) == {"rate": 5}
    assert (data_dir / "note.txt").read_text() == "hello"
    attrs = thingsboard.client_attributes
    assert attrs["FILE_READ_cfg"] == {"rate": 5}
    assert attrs["FILE_READ_note"] == "hello"
    assert attrs["FILE_HASHES"]["cfg"] == {"hash": md5(cfg.read_bytes()), "write_version": 1}
    requested = {k for r in thingsboard.attribute_requests for k in r["sharedKeys"]}
    assert {"FILES", "FILE_CONTENT_cfg", "FILE_CONTENT_note"} <= requested

    # A change on the server is written.
    thingsboard.set_shared({"FILE_CONTENT_note": "second"})
    wait_attr(thingsboard, lambda a: a.get("FILE_READ_note") == "second", "update written")
    assert (data_dir / "note.txt").read_text() == "second"

    # A change on the device is put back.
    (data_dir / "note.txt").write_text("tampered")
    thingsboard.wait_for(lambda: (data_dir / "note.txt").read_text() == "second", timeout=15,
                         message="local change not put back")
    (data_dir / "note.txt").unlink()
    thingsboard.wait_for((data_dir / "note.txt").exists, timeout=15,
                         message="deleted file not put back")
    assert (data_dir / "note.txt").read_text() == "second"

    # init_files resets the attributes and reconciles again.
    thingsboard.clear()
    answer = thingsboard.rpc("init_files")
    assert "reconciled" in answer["message"], answer
    wait_attr(thingsboard, lambda a: set(a.get("FILE_HASHES", {})) == {"cfg", "note"},
              "hashes published again after init_files")
    assert {} in [p.get("FILE_HASHES") for p in thingsboard.attribute_publishes]
    assert gateway.stop() == 0


@needs_mosquitto
def test_gateway_refuses_hostile_paths_and_bad_content(
        make_gateway: GatewayFactory, thingsboard: FakeThingsBoard, data_dir: Path,
        tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (data_dir / "escape").symlink_to(outside)
    thingsboard.set_shared({
        "FILES": {
            "dotdot": {"path": "$DATA_PATH/../dotdot.txt"},
            "link": {"path": "$DATA_PATH/escape/link.txt"},
            "abs": {"path": str(outside / "abs.txt")},
            "b64": {"path": "$DATA_PATH/b64.bin", "encoding": "base64"},
            "js": {"path": "$DATA_PATH/bad.json", "encoding": "json"},
            "good": {"path": "$DATA_PATH/good.txt"},
        },
        "FILE_CONTENT_dotdot": "x", "FILE_CONTENT_link": "x", "FILE_CONTENT_abs": "x",
        "FILE_CONTENT_b64": "not base64 at all!", "FILE_CONTENT_js": "{\"a\": ",
        "FILE_CONTENT_good": "fine"})
    gateway = make_gateway(FAST_FILES)
    gateway.start()
    wait_attr(thingsboard, lambda a: "good" in a.get("FILE_HASHES", {}), "good file written")
    assert (data_dir / "good.txt").read_text() == "fine"

    def errors() -> list[str]:
        return [str(v) for v in thingsboard.telemetry_values("files_error")]

    thingsboard.wait_for(lambda: len(errors()) >= 5, timeout=15,
                         message=f"five refusals in telemetry, got {errors()}")
    by_key = {e.split(":", 1)[0]: e for e in errors()}
    for key in ("dotdot", "link", "abs"):
        assert "outside the allowed directories" in by_key[key], by_key[key]
    assert "base64" in by_key["b64"] and "JSON" in by_key["js"]
    assert set(thingsboard.client_attributes["FILE_HASHES"]) == {"good"}
    assert list(outside.iterdir()) == []
    assert not (tmp_path / "dotdot.txt").exists()
    assert not (data_dir / "b64.bin").exists() and not (data_dir / "bad.json").exists()
    for key in ("dotdot", "link", "abs", "b64", "js"):
        gateway.wait_for_log(f"files: {key} refused")

    # Fixing the content on the server makes the file appear; the others stay refused.
    thingsboard.set_shared({"FILE_CONTENT_js": {"a": 1}})
    wait_attr(thingsboard, lambda a: "js" in a.get("FILE_HASHES", {}), "fixed file written")
    assert json.loads((data_dir / "bad.json").read_text()) == {"a": 1}
    assert list(outside.iterdir()) == []
    assert gateway.stop() == 0


# -- hostile setups ------------------------------------------------------------------------


def test_ota_and_state_areas_are_never_managed_even_when_allowed(data: Path) -> None:
    settings = make_settings(data, allowed_dirs=[str(data), str(data / "controller")])
    for raw in ("$DATA_PATH/controller/versions/2.0/app.py", "$DATA_PATH/ota/2.0.part",
                "$DATA_PATH/state/ota.json", "$DATA_PATH/controller/versions"):
        with pytest.raises(FileRefused, match="the gateway itself"):
            resolve_path(raw, FileArea.of(settings))
    assert resolve_path("$DATA_PATH/controller/app.conf", FileArea.of(settings)) == \
        data.resolve() / "controller/app.conf"


def test_two_keys_for_one_file_are_refused_and_neither_is_written(data: Path) -> None:
    rec = Recorder()
    files = manager(make_settings(data), rec)
    (data / "sub").mkdir()
    (data / "alias").symlink_to(data / "sub")
    files.on_shared(files_attr(
        a={"path": "$DATA_PATH/sub/x.conf", "restart_controller_on_change": True},
        b={"path": "$DATA_PATH/alias/../sub/./x.conf"},
        c={"path": "$DATA_PATH/alias/x.conf"},
        d={"path": "$DATA_PATH/other.conf"}))
    files.on_shared({"FILE_CONTENT_a": "A", "FILE_CONTENT_b": "B", "FILE_CONTENT_c": "C",
                     "FILE_CONTENT_d": "D"})
    result = run(files.reconcile())
    assert result.written == ["d"] and not result.restarted
    assert not (data / "sub" / "x.conf").exists()
    assert sorted(result.errors) == ["a", "b", "c"]
    assert all("also managed by" in e for e in result.errors.values())
    assert len(rec.errors()) == 3
    # The poll does not bring them back at every interval, and nothing is restarted.
    assert not run(files.changed_on_disk())
    run(files.reconcile())
    assert len(rec.errors()) == 3 and rec.restarts == []
    # Once one path changes, both are written.
    files.on_shared(files_attr(a={"path": "$DATA_PATH/sub/x.conf"},
                               b={"path": "$DATA_PATH/sub/y.conf"}))
    assert sorted(run(files.reconcile()).written) == ["a", "b"]
    assert (data / "sub" / "x.conf").read_text() == "A"


def test_a_hard_link_is_neither_read_nor_written(data: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    os.link(secret, data / "leak.txt")
    rec = Recorder()
    files = manager(make_settings(data), rec)
    files.on_shared(files_attr(leak={"path": "$DATA_PATH/leak.txt"}))
    result = run(files.reconcile())
    assert rec.attributes["FILE_READ_leak"] == "E_LINKED"
    assert "top secret" not in json.dumps(rec.publishes)
    assert "more than one hard link" in result.errors["leak"]
    files.on_shared({"FILE_CONTENT_leak": "overwritten"})
    result = run(files.reconcile())
    assert "more than one hard link" in result.errors["leak"]
    assert secret.read_text() == "top secret" and (data / "leak.txt").read_text() == "top secret"


def test_a_damaged_hash_file_is_quarantined_and_reported(data: Path) -> None:
    (data / "state").mkdir()
    (data / "state" / "files.json").write_text('{"hashes": {"a": ')
    rec = Recorder()
    files = manager(make_settings(data), rec)

    async def first_poll() -> None:
        task = asyncio.ensure_future(files.run())
        await asyncio.sleep(0.05)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    run(first_poll())
    assert "file-management state was damaged" in rec.errors()[0]
    assert len(list((data / "state").glob("files.json.corrupt-*"))) == 1


def test_a_damaged_hash_file_keeps_what_can_be_read(data: Path) -> None:
    settings = make_settings(data)
    rec = Recorder()
    files = manager(settings, rec)
    files.on_shared(files_attr(a={"path": "a.txt", "write_version": 2}))
    files.on_shared({"FILE_CONTENT_a": "A"})
    run(files.reconcile())
    path = data / "state" / "files.json"
    whole = path.read_text()
    path.write_text(whole[:whole.rindex("]")])  # the end of the file is lost
    again = manager(settings, Recorder())
    assert again.hashes == {"a": FileHash(md5(b"A"), 2)}
    assert len(list((data / "state").glob("files.json.corrupt-*"))) == 1
    assert json.loads(path.read_text())["facts"]["hashes"]["a"]["hash"] == md5(b"A")


def test_the_hash_file_of_an_earlier_release_is_read(data: Path) -> None:
    (data / "state").mkdir()
    (data / "a.txt").write_text("A")
    (data / "state" / "files.json").write_text(json.dumps({"hashes": {
        "a": {"hash": md5(b"A"), "write_version": 3}, "junk": 5,
        "no-hash": {"write_version": 1}}}))
    rec = Recorder()
    files = manager(make_settings(data), rec)
    assert files.hashes == {"a": FileHash(md5(b"A"), 3)}
    files.on_shared(files_attr(a={"path": "a.txt", "write_version": 3}))
    files.on_shared({"FILE_CONTENT_a": "A"})
    result = run(files.reconcile())
    assert result.written == [] and result.unchanged == ["a"]
    assert rec.attributes["FILE_HASHES"] == {"a": {"hash": md5(b"A"), "write_version": 3}}
    assert rec.errors() == []
    assert not list((data / "state").glob("files.json.corrupt-*"))
    # Written in today's layout at the next change.
    files.on_shared({"FILE_CONTENT_a": "B"})
    run(files.reconcile())
    saved = json.loads((data / "state" / "files.json").read_text())
    assert saved["format"] == 1
    assert saved["facts"]["hashes"] == {"a": {"hash": md5(b"B"), "write_version": 3}}


def test_changes_are_coalesced_and_the_disk_polled_on_the_clock(data: Path) -> None:
    """Nothing happens before the clock says so: a burst of changes gives one pass after
    the coalescing delay, a local change is put back at the next poll."""
    rec = Recorder()
    clock = FakeClock()
    files = manager(make_settings(data, poll_interval_s=30.0), rec, clock=clock)

    def hashes_published() -> int:
        return len([p for p in rec.publishes if "FILE_HASHES" in p])

    async def scenario() -> None:
        task = asyncio.ensure_future(files.run())
        try:
            await asyncio.sleep(0)
            files.on_shared(files_attr(a={"path": "a.txt", "restart_controller_on_change": True},
                                       b={"path": "b.txt"}))
            files.on_shared({"FILE_CONTENT_a": "1"})
            await clock.advance(0.1)
            files.on_shared({"FILE_CONTENT_b": "2"})
            await clock.advance(0.1)
            assert not (data / "a.txt").exists() and hashes_published() == 0
            await clock.advance(0.2)
            for _ in range(100):
                if hashes_published():
                    break
                await asyncio.sleep(0.01)
            assert (data / "a.txt").read_text() == "1" and (data / "b.txt").read_text() == "2"
            assert hashes_published() == 1 and len(rec.restarts) == 1
            # A local change waits for the poll.
            (data / "b.txt").write_text("changed here")
            await clock.advance(29.0)
            assert (data / "b.txt").read_text() == "changed here"
            await clock.advance(1.0)
            for _ in range(100):
                if (data / "b.txt").read_text() == "2":
                    break
                await asyncio.sleep(0.01)
            assert (data / "b.txt").read_text() == "2"
            assert rec.attributes["FILE_READ_b"] == "2"
            assert len(rec.restarts) == 1  # b does not restart the controller
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    run(scenario())


def test_oversized_files_entries_are_refused() -> None:
    with pytest.raises(FileRefused, match="at most 200"):
        parse_files({f"k{i}": {"path": "x"} for i in range(201)})
    specs, errors = parse_files({"k" * 5000: {"path": "x"},
                                 "v": {"path": "x", "write_version": "w" * 5000}})
    assert specs == {} and len(json.dumps(errors)) < 1000
