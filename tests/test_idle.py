"""An idle gateway (connected, nothing to send) sleeps: its threads' wake-ups are counted
from ``/proc`` (voluntary context switches: each is a sleep that ended), not timed."""

from __future__ import annotations

import time
from pathlib import Path

from conftest import GatewayFactory, needs_mosquitto
from teg_gateway.sandbox.thingsboard import FakeThingsBoard
from test_forwarding import Report, wait_connected

pytestmark = needs_mosquitto

WINDOW_S = 5.0


def wakeups(pid: int) -> dict[int, int]:
    """Voluntary context switches of each thread of ``pid`` so far."""
    counts = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                counts[int(task.name)] = int(line.split()[1])
    return counts


def test_an_idle_gateway_wakes_up_a_few_times_a_second(
        make_gateway: GatewayFactory, thingsboard: FakeThingsBoard, report: Report) -> None:
    gateway = make_gateway({"health": {"interval_s": 60.0}})
    gateway.start()
    wait_connected(thingsboard, gateway)
    time.sleep(2.0)  # start-up work done
    pid = gateway.pid
    assert pid is not None
    before = wakeups(pid)
    time.sleep(WINDOW_S)
    after = wakeups(pid)
    rates = {tid: (count - before.get(tid, 0)) / WINDOW_S for tid, count in after.items()}
    loop = rates.pop(pid)
    report(f"idle wake-ups a second: event loop {loop:.1f}, other threads "
           f"{sorted(round(r, 1) for r in rates.values())}")
    # The loop: the lag probe (2 a second), the forwarder's and the backlog check's
    # second, paho's keepalive check; the log flush sleeps until a record comes.
    assert loop <= 8.0
    # The intake: its one-second look at the queue; the others sleep on a queue.
    assert all(rate <= 2.0 for rate in rates.values())
    assert gateway.stop() == 0
