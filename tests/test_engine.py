"""The operations engine: typed commands, the repository (atomic, salvage, quarantine),
the runner, the lane and the clock."""

from __future__ import annotations

import asyncio
import enum
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from teg_gateway.clock import FakeClock
from teg_gateway.operations.engine import (
    Command,
    CommandRepository,
    Lane,
    Nothing,
    PayloadError,
    Runner,
    Status,
    decode,
    encode,
)


class Step(enum.StrEnum):
    FETCH = "fetch"
    SWITCH = "switch"


@dataclass
class Job:
    version: str
    step: Step = Step.FETCH
    size: int | None = None
    tries: int = 0
    modules: list[dict[str, str]] = field(default_factory=list)


@dataclass
class Facts:
    current: str = ""
    counter: int = 0


def repo(path: Path) -> CommandRepository[Job, Facts]:
    r = CommandRepository(path / "op.json", Job, Facts, clock=FakeClock())
    assert r.load() is None
    return r


def test_decode_keeps_unknown_fields_and_checks_types() -> None:
    job, unknown = decode(Job, {"version": "1.2", "step": "switch", "size": 5, "x": {"y": 1}})
    assert job == Job("1.2", Step.SWITCH, 5) and unknown == {"x": {"y": 1}}
    assert encode(job)["step"] == "switch"
    for bad, says in [({"step": "fetch"}, "no 'version'"), ({"version": 3}, "must be a string"),
                      ({"version": "1", "step": "fly"}, "not one of"),
                      ({"version": "1", "size": True}, "wrong type"),
                      ({"version": "1", "modules": [{"a": 1}]}, "must be a string")]:
        with pytest.raises(PayloadError, match=says):
            decode(Job, bad)


def test_message_carries_unknown_fields_and_reason_only_when_failed() -> None:
    cmd = Command("c1", Status.EXECUTING, Nothing(), extra={"requester": "me",
                                                             "reason": "old"})
    assert cmd.message() == {"requester": "me", "status": "executing"}
    cmd.status, cmd.reason = Status.FAILED, "because"
    assert cmd.message() == {"requester": "me", "status": "failed", "reason": "because"}


def test_repository_round_trip(tmp_path: Path) -> None:
    r = repo(tmp_path)
    cmd = r.create("a", Job("1.0"), extra={"keep": [1, 2]})
    cmd.payload.step = Step.SWITCH
    r.put(cmd)
    r.set_facts(Facts("0.9", 3))
    again = repo(tmp_path)
    assert again.facts == Facts("0.9", 3)
    loaded = again.get("a")
    assert loaded is not None and loaded.payload == Job("1.0", Step.SWITCH)
    assert loaded.extra == {"keep": [1, 2]} and loaded.status is Status.EXECUTING
    assert [c.id for c in again.active()] == ["a"]
    again.resolve(loaded, Status.SUCCESSFUL)
    assert [c.id for c in repo(tmp_path).undelivered()] == ["a"]


def test_finished_and_delivered_commands_are_bounded(tmp_path: Path) -> None:
    r = CommandRepository(tmp_path / "op.json", Job, Facts, keep_finished=3)
    r.load()
    for n in range(10):
        cmd = r.create(f"c{n}", Job(str(n)))
        r.resolve(cmd, Status.SUCCESSFUL)
        r.delivered(cmd)
    assert list(r.commands) == ["c7", "c8", "c9"]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "bad-type", "not-object"])
def test_damaged_file_is_quarantined_and_running_commands_fail(tmp_path: Path,
                                                              damage: str) -> None:
    r = repo(tmp_path)
    r.set_facts(Facts("0.9", 7))
    r.create("done", Job("0.8"))
    r.resolve(r.commands["done"], Status.SUCCESSFUL)
    r.create("running", Job("1.0"))
    raw = r.path.read_bytes()
    if damage == "truncate":
        r.path.write_bytes(raw[:len(raw) - 40])  # the last command line is cut
    elif damage == "garbage":
        r.path.write_bytes(raw.replace(b'"commands": [', b'"commands": \x00['))
    elif damage == "bad-type":
        r.path.write_bytes(raw.replace(b'"counter": 7', b'"counter": "seven"'))
    else:
        r.path.write_text(json.dumps([1, 2]))
    again = CommandRepository(tmp_path / "op.json", Job, Facts)
    found = again.load()
    assert found is not None and again.damage is found
    corrupt = list(tmp_path.glob("op.json.corrupt-*"))
    assert len(corrupt) == 1 and found.quarantined == corrupt[0]
    if damage == "garbage":
        # Every line still reads: nothing is lost, the running command ends failed.
        assert again.facts == Facts("0.9", 7)
        assert again.commands["done"].status is Status.SUCCESSFUL
        assert found.failed == ("running",)
        running = again.commands["running"]
        assert running.status is Status.FAILED and "damaged" in running.reason
    if damage == "bad-type":
        assert found.failed == ("running",) and again.facts == Facts()
    # The repository is whole again on disk.
    third = CommandRepository(tmp_path / "op.json", Job, Facts)
    assert third.load() is None
    assert all(c.final for c in third.commands.values())


def test_runner_spawns_once_per_key_and_reports_failures() -> None:
    asyncio.run(_runner_spawns_once_per_key_and_reports_failures())


async def _runner_spawns_once_per_key_and_reports_failures() -> None:
    runner = Runner()
    gate = asyncio.Event()
    seen: list[BaseException] = []

    async def work() -> None:
        await gate.wait()
        raise RuntimeError("boom")

    assert runner.spawn(work(), key="k", on_error=seen.append)
    assert not runner.spawn(work(), key="k")  # one task a key at a time
    gate.set()
    for _ in range(5):
        await asyncio.sleep(0)
    assert [str(e) for e in seen] == ["boom"]
    assert runner.spawn(asyncio.sleep(0), key="k")  # the key is free again
    runner.spawn(asyncio.sleep(3600))
    await runner.close()


def test_lane_holds_one_at_a_time() -> None:
    asyncio.run(_lane_holds_one_at_a_time())


async def _lane_holds_one_at_a_time() -> None:
    lane = Lane("controller update")
    assert lane.take("ota") and lane.take("ota") and not lane.take("local-1")
    lane.release("local-1")  # only the holder releases
    assert lane.holder == "ota"
    lane.release("ota")
    assert lane.take("local-1") and lane.holder == "local-1"


def test_fake_clock_wakes_sleepers_in_order() -> None:
    asyncio.run(_fake_clock_wakes_sleepers_in_order())


async def _fake_clock_wakes_sleepers_in_order() -> None:
    clock = FakeClock()
    woke: list[str] = []

    async def sleeper(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append(name)

    tasks = [asyncio.ensure_future(sleeper("late", 5)), asyncio.ensure_future(
        sleeper("early", 1))]
    await asyncio.sleep(0)
    assert clock.sleeping() == 2
    start = clock.now_ms()
    await clock.advance(2)
    assert woke == ["early"] and clock.now_ms() - start == 2000
    await clock.advance(3)
    assert woke == ["early", "late"]
    await asyncio.gather(*tasks)
