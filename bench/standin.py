"""How fast the ThingsBoard stand-in takes telemetry, next to mosquitto.

One paho client publishes telemetry over TLS as fast as PUBACKs allow (a window of
``--inflight`` QoS 1 publishes), each payload a JSON array of ``--records-per-publish``
records of about 245 bytes (200 records: about 49 KB, what the gateway sends). Measured:
records/s from the first publish until every record is acknowledged *and* counted on
the receiving side, and the receiver's CPU time.

``server``
    `FakeThingsBoard` (TLS, no limits, telemetry handed to a counter and not kept): it
    parses and checks every payload, counts records, then acknowledges.
``mosquitto``
    mosquitto with TLS, a paho subscriber (QoS 1) on its plain listener counting
    ``"seq":`` occurrences: the old way of standing in for ThingsBoard.

Run ``python bench/standin.py --help``. Needs mosquitto for the second mode.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from teg_gateway.sandbox.broker import Mosquitto, mosquitto_available
from teg_gateway.sandbox.certs import Pki, make_pki
from teg_gateway.sandbox.publisher import publish_all
from teg_gateway.sandbox.thingsboard import FakeThingsBoard

TOPIC = "v1/devices/me/telemetry"
TOKEN = "bench-token"
SEQ_KEY = b'"seq":'


class Counter:
    """Counts records (``"seq":`` occurrences) of every payload handed to it."""

    def __init__(self) -> None:
        self.records = 0
        self.changed = threading.Condition()

    def add(self, payload: bytes, _now: float = 0.0) -> None:
        with self.changed:
            self.records += payload.count(SEQ_KEY)
            self.changed.notify_all()

    def wait_for(self, records: int, timeout: float) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: self.records >= records, timeout)


def make_payloads(count: int, per_publish: int) -> list[bytes]:
    pad = "x" * 160
    payloads = []
    for first in range(0, count, per_publish):
        records = ",".join(
            f'{{"ts":{1_700_000_000_000 + seq},"values":{{"seq":{seq},"co2":{400 + seq % 600},'
            f'"temperature":{20 + seq % 10 / 10},"note":"{pad}"}}}}'
            for seq in range(first, min(count, first + per_publish)))
        payloads.append(f"[{records}]".encode())
    return payloads


def run_server(pki: Pki, payloads: list[bytes], records: int, inflight: int
               ) -> tuple[float, float]:
    counter = Counter()
    with FakeThingsBoard(pki, keep_telemetry=False, on_telemetry=counter.add) as tb:
        tb.accept_token(TOKEN)
        cpu_before = _thread_cpu(tb.native_thread_id)
        started = publish_all("localhost", tb.tls_port, payloads, ca=pki.ca_cert,
                              username=TOKEN, topic=TOPIC, inflight=inflight)
        if not counter.wait_for(records, 30):
            raise RuntimeError(f"the server counted {counter.records}/{records} records")
        elapsed = time.monotonic() - started
        return elapsed, _thread_cpu(tb.native_thread_id) - cpu_before


def run_mosquitto(pki: Pki, workdir: Path, payloads: list[bytes], records: int,
                  inflight: int) -> tuple[float, float]:
    counter = Counter()
    subscribed = threading.Event()
    with Mosquitto(workdir / "broker", pki) as broker:
        sink = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-sink",
                           protocol=MQTTProtocolVersion.MQTTv311)
        sink.on_connect = lambda c, *_: c.subscribe(TOPIC, qos=1)
        sink.on_subscribe = lambda *_: subscribed.set()
        sink.on_message = lambda _c, _u, message: counter.add(bytes(message.payload))
        sink.connect(broker.host, broker.plain_port)
        sink.loop_start()
        try:
            if not subscribed.wait(10):
                raise RuntimeError("the subscriber did not subscribe")
            cpu_before = _process_cpu(broker.pid)
            started = publish_all("localhost", broker.tls_port, payloads, ca=pki.ca_cert,
                                  username=TOKEN, topic=TOPIC, inflight=inflight)
            if not counter.wait_for(records, 60):
                raise RuntimeError(f"the subscriber counted {counter.records}/{records}")
            elapsed = time.monotonic() - started
            return elapsed, _process_cpu(broker.pid) - cpu_before
        finally:
            sink.disconnect()
            sink.loop_stop()


def _cpu_of(stat_path: str) -> float:
    try:
        fields = Path(stat_path).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _thread_cpu(native_id: int | None) -> float:
    return _cpu_of(f"/proc/self/task/{native_id}/stat") if native_id else float("nan")


def _process_cpu(pid: int | None) -> float:
    return _cpu_of(f"/proc/{pid}/stat") if pid else float("nan")


Runner = Callable[[Pki, Path, list[bytes], int, int], tuple[float, float]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/standin.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--records-per-publish", type=int, default=200)
    parser.add_argument("--inflight", type=int, default=20)
    parser.add_argument("--mode", choices=("server", "mosquitto", "both"), default="both")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="teg-bench-standin-"))
    pki = make_pki(workdir / "pki")
    payloads = make_payloads(args.records, args.records_per_publish)
    print(f"{len(payloads)} publishes of {len(payloads[0]):,} bytes "
          f"({args.records_per_publish} records), {args.inflight} in flight")
    runners: list[tuple[str, Runner]] = []
    if args.mode in ("server", "both"):
        runners.append(("server", lambda p, _w, pl, r, i: run_server(p, pl, r, i)))
    if args.mode in ("mosquitto", "both"):
        if not mosquitto_available():
            print("mosquitto is not installed: apt-get install -y mosquitto")
            return 2
        runners.append(("mosquitto + subscriber", run_mosquitto))
    for name, runner in runners:
        elapsed, cpu = runner(pki, workdir, payloads, args.records, args.inflight)
        print(f"{name:24s} {args.records / elapsed:>10,.0f} records/s "
              f"({len(payloads) / elapsed:,.0f} publishes/s), receiver CPU {cpu:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
