"""Fault injection against the real gateway process and real files: a full disk, a
controller holding its queue locked, damaged files, dead letters against the quota, the
outbox deleted while running. Records are counted one by one at the stand-in.

The full-disk tests mount a small tmpfs (root only; skipped with the reason otherwise).
"""

from __future__ import annotations

import json
import shutil
import signal
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import GatewayFactory, needs_mosquitto
from teg_gateway.sandbox.controller import QueueWriter, make_records
from teg_gateway.sandbox.thingsboard import FakeThingsBoard
from teg_gateway.store.outbox import TELEMETRY
from teg_gateway.store.stores import Stores
from test_forwarding import (
    WAIT,
    Report,
    Stream,
    delivery,
    health_records,
    query,
    wait_connected,
    wait_delivered,
    wait_until,
)

pytestmark = needs_mosquitto

MountDisk = Callable[[int], Path]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[MountDisk]:
    """Mount tmpfs file systems of a given size (MB); unmounted at the end."""
    mounts: list[Path] = []

    def mount(size_mb: int) -> Path:
        path = tmp_path / f"disk{len(mounts)}"
        path.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs",
                               str(path)], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a {size_mb} MB tmpfs for a full disk (needs root): "
                        f"{done.stderr.strip() or done.returncode}")
        mounts.append(path)
        return path

    yield mount
    for path in reversed(mounts):
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def fill_disk(directory: Path) -> Path:
    """Write a file until the file system is full, to the last byte."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        for size in (1 << 20, 1 << 12, 1):
            block = b"\0" * size
            while True:
                try:
                    f.write(block)
                except OSError:
                    break
    return filler


def seqs_received(thingsboard: FakeThingsBoard) -> list[int]:
    return [v for v in thingsboard.telemetry_values("seq") if isinstance(v, int)]


def problems(thingsboard: FakeThingsBoard) -> list[str]:
    return [str(r["values"]["gateway_problem"]) for r in thingsboard.telemetry()
            if "gateway_problem" in r["values"]]


# -- 2. full disk --------------------------------------------------------------------------


def test_full_disk_for_30_s_under_1000_records_per_s_loses_nothing(
        make_gateway: GatewayFactory, thingsboard: FakeThingsBoard, small_disk: MountDisk,
        tmp_path: Path, report: Report) -> None:
    disk = small_disk(48)
    controller = tmp_path / "controller"
    controller.mkdir()
    gateway = make_gateway({"archive": {"min_free_mb": 4}},
                           env={"TEG_DATA_PATH": str(disk),
                                "TEG_CONTROLLER_DATA_PATH": str(controller)})
    gateway.start()
    wait_connected(thingsboard, gateway)
    total = 45_000
    writer = QueueWriter(controller)
    try:
        with Stream(writer, total, chunk=100, pause_s=0.1) as stream:
            wait_until(lambda: len(seqs_received(thingsboard)) >= 5000, "5000 records arrive",
                       gateway)
            filler = fill_disk(disk)
            full_at = stream.written
            time.sleep(30.0)
            during = stream.written - full_at
            filler.unlink()
            freed_at, freed_seq = time.monotonic(), stream.written
            wait_until(lambda: max(seqs_received(thingsboard), default=0) >= freed_seq,
                       "records written after the disk was freed arrive", gateway)
            resumed_s = time.monotonic() - freed_at
            stream.join(120.0)
        result = wait_delivered(thingsboard, range(total), gateway, timeout=120.0)
    finally:
        writer.close()

    report(f"full disk 30 s at ~1000 records/s ({during} records written meanwhile): "
           f"{result.describe()}; first record written after the disk was freed arrived "
           f"{resumed_s:.1f} s later")
    assert result.missing == [] and result.unexpected == []
    # With the disk full nothing can be queued for ThingsBoard: the error line in the
    # gateway's own log is the only report an operator gets, so its wording counts.
    log = gateway.log_text()
    assert "the disk is full" in log or "gave up" in log
    assert gateway.stop() == 0


def test_the_archive_gives_up_space_before_the_intake_stalls(
        make_gateway: GatewayFactory, thingsboard: FakeThingsBoard, small_disk: MountDisk,
        tmp_path: Path, report: Report) -> None:
    disk = small_disk(24)
    controller = tmp_path / "controller"
    controller.mkdir()
    gateway = make_gateway({"archive": {"min_free_mb": 8, "max_mb": 10_000}},
                           env={"TEG_DATA_PATH": str(disk),
                                "TEG_CONTROLLER_DATA_PATH": str(controller)})
    gateway.start()
    wait_connected(thingsboard, gateway)
    total = 25_000  # about 30 MB of records: more than the disk holds
    pad = "x" * 1000
    writer = QueueWriter(controller)
    try:
        for first in range(0, total, 500):
            writer.write([("telemetry", json.dumps({"ts": 1_700_000_000_000 + i,
                                                    "values": {"seq": i, "pad": pad}}))
                          for i in range(first, first + 500)])
            time.sleep(0.05)
        result = wait_delivered(thingsboard, range(total), gateway, timeout=120.0)
    finally:
        writer.close()
    kept = query(disk / "archive.db", "SELECT count(*) FROM records")[0][0]
    free_mb = shutil.disk_usage(disk).free / 1e6
    files = ", ".join(f"{p.name} {p.stat().st_size / 1e6:.1f} MB" for p in sorted(disk.iterdir()))

    report(f"archive on a 24 MB disk, reserve 8 MB: {result.describe()}; archive keeps "
           f"{kept} of {total} records; {free_mb:.1f} MB free ({files})")
    assert result.missing == []
    assert 0 < kept < total  # the archive gave up space
    # No outcome but the log would show the intake running into the full disk.
    assert "the disk is full" not in gateway.log_text()
    assert gateway.stop() == 0


# -- 3. a controller holding its queue locked ----------------------------------------------

LOCKING_CONTROLLER = textwrap.dedent("""
    import json, sqlite3, sys, time
    path, total, commit_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    conn = sqlite3.connect(path, timeout=30)  # implicit transactions, as Python does
    last = time.monotonic()
    for seq in range(total):
        conn.execute("INSERT INTO messages (type, message) VALUES (?, ?)",
                     ("telemetry", json.dumps({"ts": int(time.time() * 1000),
                                               "values": {"seq": seq}})))
        if time.monotonic() - last >= commit_s:
            conn.commit()
            last = time.monotonic()
        time.sleep(0.01)
    conn.commit()
    conn.close()
""")


def test_a_controller_holding_its_queue_locked_does_not_freeze_the_gateway(
        make_gateway: GatewayFactory, thingsboard: FakeThingsBoard,
        queue_writer: QueueWriter, tmp_path: Path, report: Report) -> None:
    gateway = make_gateway()
    gateway.start()
    wait_connected(thingsboard, gateway)
    script = tmp_path / "locking_controller.py"
    script.write_text(LOCKING_CONTROLLER)
    total = 3000  # 100 readings/s for about 30 s, committed every 8 s
    controller = subprocess.Popen([sys.executable, str(script), str(queue_writer.path),
                                   str(total), "8"])
    health_before = len(health_records(thingsboard))
    round_trips: list[float] = []
    try:
        while controller.poll() is None:
            start = time.monotonic()
            reply = thingsboard.rpc("ping", timeout=10.0)  # ThingsBoard's RPC timeout
            round_trips.append(time.monotonic() - start)
            assert reply == {"message": "pong"}
            time.sleep(0.5)
    finally:
        if controller.poll() is None:
            controller.kill()
        controller.wait()
    assert controller.returncode == 0
    result = wait_delivered(thingsboard, range(total), gateway)
    lags = [float(h["loop_lag_ms"]) for h in health_records(thingsboard)[health_before:]]

    report(f"controller holding its queue lock 8 s at a time: {len(round_trips)} pings, "
           f"round trip median {statistics.median(round_trips) * 1000:.0f} ms, max "
           f"{max(round_trips) * 1000:.0f} ms; loop_lag_ms median {statistics.median(lags):.1f}"
           f", max {max(lags):.1f}; {result.describe()}")
    assert result.missing == []
    # No error reported to the operator (only the log would show it).
    assert "database is locked" not in gateway.log_text()
    # The review measured 4,767 ms; the loop never waits for the queue's lock now. The
    # bound leaves room for a busy shared test machine.
    assert statistics.median(lags) < 100
    assert max(lags) < 1000
    assert gateway.stop() == 0


# -- 4. damaged files ----------------------------------------------------------------------


def populated_data(directory: Path) -> None:
    """An outbox and an archive with records in them, as a gateway leaves them."""
    stores = Stores(directory, 49152)
    stores.open()
    try:
        bodies = [json.dumps({"ts": 1_700_000_000_000 + i, "values": {"old": i}})
                  for i in range(1500)]
        stores.outbox.put(TELEMETRY, bodies)
        stores.conn.execute("BEGIN IMMEDIATE")
        stores.conn.executemany("INSERT INTO archive.records (ts, type, body) VALUES (?, ?, ?)",
                                [(1_700_000_000_000 + i, "t", b) for i, b in enumerate(bodies)])
        stores.conn.execute("COMMIT")
    finally:
        stores.close()
    (directory / "state").mkdir(exist_ok=True)
    (directory / "state" / "cloud.json").write_text(json.dumps(
        {"last_attempt_ms": 1_700_000_000_000, "result": "connected"}))


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]) if byte else b"\xff")


def flip_cases(template: Path) -> list[tuple[str, int]]:
    cases: list[tuple[str, int]] = []
    for name, count in (("outbox.db", 12), ("archive.db", 8)):
        size = (template / name).stat().st_size
        offsets = {0, 16, 20, 28, 60, 100, 4096, 4096 + 8, size // 2, size - 100}
        offsets |= {size * k // count for k in range(1, count)}
        cases += [(name, o) for o in sorted(offsets)][:count + 2]
    cases += [("state/cloud.json", 0), ("state/cloud.json", 5)]
    cases += [("tb_access_token", 0), ("tb_access_token", 3)]
    return cases


def test_damaged_files_never_stop_the_gateway(
        make_gateway: GatewayFactory, thingsboard: FakeThingsBoard, tmp_path: Path,
        report: Report) -> None:
    template = tmp_path / "template"
    gateway = make_gateway(env={"TEG_DATA_PATH": str(template)})
    gateway.start()  # provisioned once: its token is part of the template
    wait_connected(thingsboard, gateway)
    assert gateway.stop() == 0
    populated_data(template)
    outcomes: list[str] = []
    for n, (name, offset) in enumerate(flip_cases(template)):
        data = tmp_path / f"run{n}"
        shutil.copytree(template, data)
        flip(data / name, offset)
        thingsboard.clear()
        gateway = make_gateway(env={"TEG_DATA_PATH": str(data)})
        gateway.start()
        with QueueWriter(data) as writer:
            writer.write(make_records(50, start_seq=n * 1000))
            what = f"{name} flipped at {offset}: new records arrive"
            wait_until(lambda n=n: not delivery(  # type: ignore[misc]
                thingsboard, range(n * 1000, n * 1000 + 50)).missing, what, gateway,
                timeout=20.0)
        assert thingsboard.rpc("ping", timeout=10.0) == {"message": "pong"}
        moved = sorted(p.name for p in data.iterdir()
                       if ".corrupt-" in p.name or ".damaged-" in p.name)
        if any(".corrupt-" in m for m in moved):
            wait_until(lambda: bool(problems(thingsboard)), f"{name}: the damage is reported",
                       gateway)
        outcomes.append(f"{name}@{offset}: {'moved aside, reported' if moved else 'readable'}")
        assert gateway.stop() == 0, gateway.log_tail(30)
    damaged = sum("moved aside" in o for o in outcomes)
    report(f"byte flips: {len(outcomes)} starts, all forwarded new records and answered ping;"
           f" {damaged} damaged files moved aside and reported")


# -- 5. dead letters against the quota -----------------------------------------------------


def test_dead_letters_do_not_eat_the_outbox_quota(
        make_gateway: GatewayFactory, thingsboard: FakeThingsBoard, data_dir: Path,
        queue_writer: QueueWriter, report: Report) -> None:
    gateway = make_gateway({"outbox": {"quota_mb": 1, "dead_letters_mb": 1}})
    gateway.start()
    wait_connected(thingsboard, gateway)
    big = json.dumps({"ts": 1, "values": {"blob": "x" * 60_000}})
    good = make_records(1000)
    for n in range(40):
        queue_writer.write([("telemetry", big), *good[n * 25:(n + 1) * 25]])
    result = wait_delivered(thingsboard, range(1000), gateway)
    wait_until(lambda: any(h.get("dead_letters") == 40 for h in health_records(thingsboard)),
               "health counts 40 dead letters", gateway)
    health = health_records(thingsboard)[-1]
    outbox_mb = sum(p.stat().st_size for p in data_dir.glob("outbox.db*")) / 1e6

    report(f"40 oversized rows and 1000 good ones, 1 MB quota: {result.describe()}; "
           f"dropped {health['records_dropped']}, dead letters removed "
           f"{health['dead_letters_removed']}, outbox.db {outbox_mb:.1f} MB")
    assert result.missing == []
    assert health["records_dropped"] == 0
    assert health["dead_letters_removed"] > 0
    kept = query(data_dir / "outbox.db", "SELECT count(*) FROM dead_letter")[0][0]
    assert kept + health["dead_letters_removed"] == 40
    assert gateway.stop() == 0


# -- 8. outbox.db deleted while running ----------------------------------------------------


def test_a_deleted_outbox_is_detected_recreated_and_reported(
        make_gateway: GatewayFactory, thingsboard: FakeThingsBoard, data_dir: Path,
        queue_writer: QueueWriter, report: Report) -> None:
    gateway = make_gateway()
    gateway.start()
    wait_connected(thingsboard, gateway)
    total = 6000
    with Stream(queue_writer, total, chunk=100, pause_s=0.05) as stream:
        wait_until(lambda: len(seqs_received(thingsboard)) >= 1000, "1000 records arrive",
                   gateway)
        (data_dir / "outbox.db").unlink()
        deleted_at = stream.written
        wait_until((data_dir / "outbox.db").exists, "the outbox is recreated", gateway,
                   timeout=WAIT)
        detected_at = stream.written
    result = wait_delivered(thingsboard, range(detected_at, total), gateway)
    overall = delivery(thingsboard, range(total))
    wait_until(lambda: any("outbox.db was deleted" in p for p in problems(thingsboard)),
               "a gateway_problem telemetry arrives", gateway)

    report(f"outbox.db deleted after {deleted_at} records written, detected by "
           f"{detected_at}: after detection {result.describe()}; overall "
           f"{len(overall.missing)} of {total} lost (those in the deleted file)")
    assert result.missing == []
    assert (data_dir / "outbox.db").exists()
    assert gateway.stop() == 0


# -- kill -9 between the steps -------------------------------------------------------------


def test_kill_9_mid_intake_moves_every_row_once(
        make_gateway: GatewayFactory, thingsboard: FakeThingsBoard, data_dir: Path,
        queue_writer: QueueWriter, report: Report) -> None:
    """kill -9 while the intake moves large batches: every record reaches the archive
    exactly once and the stand-in at least once; the queue ends empty."""
    gateway = make_gateway({"queue": {"batch_size": 2000}})
    gateway.start()
    wait_connected(thingsboard, gateway)
    total, kills = 30_000, 0
    with Stream(queue_writer, total, chunk=1000, pause_s=0.01) as stream:
        for threshold in (5000, 12000, 20000):
            wait_until(lambda t=threshold: stream.written >= t,  # type: ignore[misc]
                       f"{threshold} written", gateway)
            assert gateway.kill() == -signal.SIGKILL
            kills += 1
            gateway.start()
    result = wait_delivered(thingsboard, range(total), gateway)
    wait_until(lambda: queue_writer.pending() == 0, "the queue is emptied", gateway)
    archived = [json.loads(b)["values"]["seq"] for (b,) in query(
        data_dir / "archive.db", "SELECT body FROM records ORDER BY id")]

    report(f"kill -9 x{kills} during intake: {result.describe()}; archive holds "
           f"{len(archived)} records, {len(archived) - len(set(archived))} twice")
    assert result.missing == []
    assert sorted(archived) == list(range(total))
    assert gateway.stop() == 0
