"""The DB-error policy (store/recovery.py) on real SQLite files, with a fake clock for the
once-a-minute reporting."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from teg_gateway.clock import FakeClock
from teg_gateway.config import OutboxSettings
from teg_gateway.store.outbox import TELEMETRY
from teg_gateway.store.recovery import ERROR_REPEAT_S, RateLimitedLog, StoreRecovery
from teg_gateway.store.stores import Stores

LOGGER = "teg_gateway.store.recovery"


def warnings_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == LOGGER and r.levelno >= logging.WARNING]


def rows(stores: Stores) -> list[tuple[int, dict[str, object]]]:
    return [(int(i), json.loads(body)) for i, body in stores.outbox.conn.execute(
        "SELECT id, body FROM outbox ORDER BY id")]


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[Stores]:
    opened = Stores(tmp_path / "gateway", 49152)
    opened.open()
    yield opened
    opened.close()


def test_a_kind_of_problem_is_logged_at_most_once_a_minute(
        caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> list[bool]:
        clock = FakeClock()
        errors = RateLimitedLog(clock)
        said = [errors.report_every("disk-full", logging.ERROR, "full"),
                errors.report_every("disk-full", logging.ERROR, "full")]
        await clock.advance(ERROR_REPEAT_S - 0.5)
        said.append(errors.report_every("disk-full", logging.ERROR, "full"))
        said.append(errors.report_every("quota", logging.WARNING, "quota"))  # another kind
        await clock.advance(0.5)
        said.append(errors.report_every("disk-full", logging.ERROR, "full"))
        said.append(errors.report_every("quota", logging.WARNING, "quota"))
        return said

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        said = asyncio.run(scenario())
    assert said == [True, False, False, True, True, False]
    assert len(warnings_logged(caplog)) == 3


def test_a_full_disk_is_said_once_a_minute_and_nothing_is_recovered(
        stores: Stores, caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    recovery = StoreRecovery(stores, OutboxSettings(), clock, forwarder=lambda: None)
    stores.outbox.put_telemetry({"before": 1})
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = sqlite3.SQLITE_FULL
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for _ in range(5):
            recovery.on_db_error(full, "outbox")
        asyncio.run(clock.advance(ERROR_REPEAT_S))
        recovery.on_db_error(full, "outbox")
    assert len(warnings_logged(caplog)) == 2
    assert [body["values"] for _id, body in rows(stores)] == [{"before": 1}]


def test_a_damaged_database_is_checked_and_reported_and_keeps_its_records(
        stores: Stores) -> None:
    recovery = StoreRecovery(stores, OutboxSettings(), FakeClock(), forwarder=lambda: None)
    for n in range(10):
        stores.outbox.put_telemetry({"n": n})
    before = rows(stores)
    # Without an intake pump the recovery runs at once (with one, once it let go).
    recovery.on_db_error(sqlite3.DatabaseError("database disk image is malformed"), "outbox")
    after = rows(stores)
    assert after[:10] == before
    assert len(after) == 11
    problem = after[10][1]["values"]
    assert isinstance(problem, dict) and "gateway_problem" in problem
    assert after[10][0] > before[-1][0]


def test_a_database_replaced_under_the_gateway_is_reopened_and_reported(
        stores: Stores) -> None:
    recovery = StoreRecovery(stores, OutboxSettings(), FakeClock(), forwarder=lambda: None)
    for n in range(3):
        stores.outbox.put_telemetry({"n": n})
    last_id = rows(stores)[-1][0]
    stores.outbox_path.unlink()
    recovery.on_stores_problem(None)
    after = rows(stores)
    assert len(after) == 1
    assert after[0][0] > last_id  # ids go on: an old acknowledgement deletes nothing new
    assert "gateway_problem" in after[0][1]["values"]  # type: ignore[operator]


def test_the_outbox_quota_drops_the_oldest_and_says_so_once_a_minute(
        stores: Stores, caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    settings = OutboxSettings(quota_mb=0.05)
    recovery = StoreRecovery(stores, settings, clock, forwarder=lambda: None)
    body = json.dumps({"ts": 1, "values": {"v": "x" * 200}})
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for _ in range(3):
            stores.outbox.put(TELEMETRY, [body] * 400)
            recovery.enforce_quota()
        first = warnings_logged(caplog)
        asyncio.run(clock.advance(ERROR_REPEAT_S))
        stores.outbox.put(TELEMETRY, [body] * 400)
        recovery.enforce_quota()
    dropped = stores.outbox.counter("records_dropped")
    assert dropped > 0
    assert stores.outbox.depth() == 1600 - dropped
    assert len(first) == 1
    assert len(warnings_logged(caplog)) == 2
    # Every drop is counted in one of the two reports: none is lost from the count.
    counts = [int(word) for text in warnings_logged(caplog) for word in text.split()
              if word.isdigit()]
    assert sum(counts) == dropped


# -- health (health.py): what it reads, on the fake clock ----------------------------------


def test_health_reads_the_parts_on_its_clock(stores: Stores, tmp_path: Path) -> None:
    from teg_gateway.config import ArchiveSettings, HealthSettings
    from teg_gateway.controller.feed import Feed
    from teg_gateway.controller.intake import IntakeConfig
    from teg_gateway.health import Health
    from teg_gateway.logs import CloudLogHandler
    from teg_gateway.telemetry_keys import HEALTH_KEYS

    async def scenario() -> None:
        clock = FakeClock()
        recovery = StoreRecovery(stores, OutboxSettings(), clock, forwarder=lambda: None)
        logs = CloudLogHandler(logging.WARNING, 60, 20)
        feed = Feed(IntakeConfig(tmp_path / "queue.db", stores.outbox_path,
                                 stores.archive_path, 100),
                    0.02, archive=ArchiveSettings(), stores=stores, recovery=recovery,
                    cloud_logs=logs, session=lambda: None, clock=clock)
        health = Health(HealthSettings(interval_s=20.0), clock, stores=stores,
                        recovery=recovery, intake=feed.intake, cloud_logs=logs,
                        supervisor=None, session=lambda: None, forwarder=lambda: None,
                        local_broker=lambda: "disabled", restart_pending=lambda: None)
        stores.outbox.put_telemetry({"n": 1})
        await clock.advance(12.5)
        values = health.health_values()
        assert set(values) <= set(HEALTH_KEYS)
        assert values["gateway_uptime_ms"] == 12_500
        assert values["outbox_depth"] == 1
        assert values["outbox_eta_s"] == 0  # no session yet: no rate to tell
        status = health.status_values()
        assert status["uptime_s"] == 12.5
        assert status["thingsboard"] == "not provisioned yet"
        assert status["local_broker"] == "disabled"

        # The loop sends the health telemetry every interval_s, into the outbox.
        loop = asyncio.ensure_future(health.run())
        while clock.sleeping() == 0:
            await asyncio.sleep(0)
        await clock.advance(20.0)
        await clock.advance(20.0)
        loop.cancel()
        sent = [body["values"] for _id, body in rows(stores)
                if "gateway_uptime_ms" in body["values"]]  # type: ignore[operator]
        assert [v["gateway_uptime_ms"] for v in sent] == [32_500, 52_500]  # type: ignore[index]

    asyncio.run(scenario())
