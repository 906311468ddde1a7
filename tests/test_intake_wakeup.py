"""The intake sleeps until the controller commits: counted in rounds, never in time.

An idle intake makes (almost) no rounds, and a record committed by the controller is
taken by a round woken by that commit, not by the fallback timer (set here far beyond the
test's waits, so a record taken at all was taken on the change).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import outbox_seqs
from teg_gateway.controller import intake, watch
from teg_gateway.controller.intake import IntakeConfig, IntakePump, IntakeResult
from teg_gateway.sandbox.controller import QueueWriter, make_records
from teg_gateway.store.stores import Stores

MAX_PAYLOAD = 49152
WAIT_S = 20.0  # generous: only how long a failing test takes to fail


@pytest.fixture
def no_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fallback poll far away: only a change (or a set) can wake the intake."""
    monkeypatch.setattr(intake, "FALLBACK_S", 3600.0)


async def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def make_pump(stores: Stores, writer: QueueWriter, taken: list[IntakeResult]) -> IntakePump:
    config = IntakeConfig(writer.path, stores.outbox_path, stores.archive_path, 1000,
                          MAX_PAYLOAD)
    return IntakePump(config, 0.02, on_batch=taken.append, on_stores=lambda _p: None,
                      hold=lambda: False)


def test_an_idle_intake_makes_almost_no_rounds(stores: Stores, writer: QueueWriter) -> None:
    taken: list[IntakeResult] = []

    async def scenario() -> tuple[int, dict[str, int]]:
        pump = make_pump(stores, writer, taken)
        pump.start()
        try:
            await until(lambda: pump.rounds >= 1, "the first round")
            assert pump.watching
            before = pump.rounds
            await asyncio.sleep(3.0)  # idle; a 20 ms poll would make ~150 rounds here
            return pump.rounds - before, dict(pump.woken)
        finally:
            await pump.stop()

    idle_rounds, woken = asyncio.run(scenario())
    # The fallback poll (1 s) and the hold checks; nothing per 20 ms.
    assert idle_rounds <= 3 / intake.FALLBACK_S + 3, (idle_rounds, woken)
    assert not taken


def test_a_committed_record_is_taken_on_the_change_not_on_a_timer(
        stores: Stores, writer: QueueWriter, no_fallback: None) -> None:
    taken: list[IntakeResult] = []

    async def scenario() -> tuple[int, dict[str, int]]:
        pump = make_pump(stores, writer, taken)
        pump.start()
        try:
            await until(lambda: pump.rounds >= 1, "the first round")
            assert pump.watching
            await asyncio.sleep(0.2)  # the first round's own writes settle
            rounds = pump.rounds
            changes = pump.woken[watch.CHANGE]
            for seq in range(5):
                writer.write(make_records(1, start_seq=seq))
                wanted = seq + 1
                await until(lambda: sum(r.taken for r in taken) >= wanted,  # noqa: B023
                            f"record {seq} in the outbox")
            assert pump.woken[watch.TIMEOUT] == 0  # never woken by the (far) timer
            assert pump.woken[watch.CHANGE] > changes
            return pump.rounds - rounds, dict(pump.woken)
        finally:
            await pump.stop()

    used, woken = asyncio.run(scenario())
    # A round on the change, a few second looks and the intake's own queue delete: a
    # handful per record, not a poll's worth.
    assert used <= 5 * (2 + len(intake.RECHECK_S)) + 10, (used, woken)
    assert outbox_seqs(stores.conn) == [0, 1, 2, 3, 4]


def test_without_inotify_the_intake_polls_at_its_interval(
        stores: Stores, writer: QueueWriter, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_inotify(_cls: type[watch._Inotify]) -> None:
        return None

    monkeypatch.setattr(watch._Inotify, "open", classmethod(no_inotify))
    taken: list[IntakeResult] = []

    async def scenario() -> None:
        pump = make_pump(stores, writer, taken)
        pump.start()
        try:
            assert not pump.watching
            writer.write(make_records(3))
            await until(lambda: sum(r.taken for r in taken) >= 3, "the records")
            await until(lambda: pump.woken[watch.TIMEOUT] >= 20, "polling rounds")
        finally:
            await pump.stop()

    asyncio.run(scenario())
    assert outbox_seqs(stores.conn) == [0, 1, 2]


def test_a_wakeup_reports_only_writes_to_the_watched_names(tmp_path: Path) -> None:
    wake = watch.Wakeup(tmp_path, ("queue.db", "queue.db-wal"))
    try:
        assert wake.watching
        assert wake.wait(0.0) == watch.TIMEOUT
        (tmp_path / "outbox.db").write_bytes(b"x")  # another file in the directory
        assert wake.wait(0.05) == watch.TIMEOUT
        (tmp_path / "queue.db-wal").write_bytes(b"x")
        assert wake.wait(WAIT_S) == watch.CHANGE
        assert wake.wait(0.0) == watch.TIMEOUT  # every pending event was read
        wake.set()
        assert wake.wait(WAIT_S) == watch.SET
    finally:
        wake.close()
    wake.set()  # harmless after close


def test_a_backlog_holds_the_intake_and_its_release_resumes_it(
        stores: Stores, writer: QueueWriter) -> None:
    """``hold()`` is asked after every batch (so a backlog stops the intake within a batch
    or two), often while held, and seldom while not held."""
    taken: list[IntakeResult] = []
    released = False

    def backlogged() -> bool:
        return not released and len(taken) >= 2

    async def scenario() -> None:
        nonlocal released
        config = IntakeConfig(writer.path, stores.outbox_path, stores.archive_path, 1000,
                              MAX_PAYLOAD)
        pump = IntakePump(config, 0.02, on_batch=taken.append, on_stores=lambda _p: None,
                          hold=backlogged)
        pump.start()
        try:
            await until(lambda: pump.rounds >= 1, "the first round")
            await asyncio.sleep(0.1)
            checks = pump.hold_checks
            await asyncio.sleep(3.0)  # idle, not held
            assert pump.hold_checks - checks <= 3 / intake.HOLD_IDLE_S + 2
            writer.write(make_records(10_000))
            await until(lambda: pump.held, "the hold")
            # A batch taken just before the hold reaches the loop a moment later.
            rounds = pump.rounds
            await until(lambda: pump.rounds >= rounds + 10, "rounds while held")
            batches = len(taken)
            assert batches < 10
            rounds = pump.rounds
            await until(lambda: pump.rounds >= rounds + 10, "more rounds while held")
            assert len(taken) == batches  # nothing taken while held
            released = True
            await until(lambda: sum(r.taken for r in taken) >= 10_000, "the rest")
        finally:
            await pump.stop()

    asyncio.run(scenario())
    assert outbox_seqs(stores.conn) == list(range(10_000))
