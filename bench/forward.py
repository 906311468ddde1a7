"""Benchmark of the hot path: controller queue -> gateway -> MQTT over TLS -> "ThingsBoard".

Everything is real: the gateway as a child process (``python -m teg_gateway run``,
default settings, credentials from a pre-written ``<data>/tb_access_token``), the
controller's SQLite queue database filled with ``QueueWriter``, and the cloud side over
TLS (sandbox PKI), one of (``--cloud``):

``server`` (default)
    the ThingsBoard stand-in (``FakeThingsBoard``, an MQTT server in this process) that
    answers ``getSessionLimits``, checks every payload and closes the connection on a
    violation, as ThingsBoard does; with ThingsBoard's limits when given
    (``make_thingsboard``, ``rig(..., "server", limits)``). It parses every payload as
    JSON before acknowledging it: about 1 us of CPU per record, which a 2-core machine
    takes from the gateway.
``mosquitto``
    mosquitto with a TLS listener and a lean paho subscriber on its plain listener: the
    least CPU on the cloud side, but nobody answers ``getSessionLimits``, so the gateway
    waits for that answer (3 s) before it sends telemetry.

Either way every telemetry payload that arrived goes to a lean counter,
``TelemetrySink``.

Two phases:

baseline (before throughput, unless ``--no-baseline``)
    A bare paho client sends the same N records, pre-built into JSON arrays of the
    gateway's payload size (49,152 bytes), QoS 1, 8 publishes in flight, over TLS to the
    same cloud side, in the same run: what the machine and the cloud side allow without
    the gateway. The gateway's records/s are reported as a ratio of it.

throughput
    ``--records`` N rows are written to the queue before the gateway starts. Measured:
    the time from starting the gateway (and, separately, from the first record received)
    until the subscriber has all N records *and* the outbox is empty (every publish
    PUBACKed and deleted); the gateway's CPU seconds (utime+stime) and peak RSS
    (VmHWM), both read from /proc just before it is stopped. At the end every seq is
    checked: missing ones and duplicates are reported.

latency
    A fresh gateway; a writer inserts one record every 10 ms (100 records/s) for
    ``--latency-seconds``, each with ``ts`` = wall clock at insertion (ms). The
    subscriber computes receive time - ts (same clock, ``time.time``) per record.

Run ``python bench/forward.py --help``; see bench/README.md for how to read the output.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from teg_gateway.cloud.limits import parse_rate_limit
from teg_gateway.sandbox.broker import Mosquitto, mosquitto_available
from teg_gateway.sandbox.certs import Pki, make_pki
from teg_gateway.sandbox.controller import QueueWriter, make_records, now_ms
from teg_gateway.sandbox.process import GatewayProcess
from teg_gateway.sandbox.publisher import publish_all
from teg_gateway.sandbox.thingsboard import FakeThingsBoard, Limits

TELEMETRY_TOPIC = "v1/devices/me/telemetry"
CONNECTED_LOG = "ThingsBoard: connected"
ACCESS_TOKEN = "bench-access-token"
FILL_CHUNK = 100_000
LATENCY_PERIOD_S = 0.010
SAMPLE_PERIOD_S = 0.05
PROGRESS_PERIOD_S = 2.0
IDLE_S = 30.0  # /proc counts CPU in 10 ms ticks: 0.03 % of a core over 30 s
# The bare client: what the gateway sends with its default settings.
BASELINE_PAYLOAD_BYTES = 49_152  # outbox.max_payload_bytes
BASELINE_INFLIGHT = 8  # outbox.max_inflight

# The goals (a 2-core machine).
TARGET_RATE = 150_000.0
TARGET_DRAIN_S = 7.0
TARGET_DRAIN_RECORDS = 1_000_000
TARGET_P99_MS = 10.0
TARGET_PEAK_MB = 40.0
TARGET_CPU_US_PER_RECORD = 6.0
TARGET_IDLE_CPU_PERCENT = 0.5
TARGET_UTILISATION = 0.9
TARGET_PACED_CPU_PERCENT = 2.0
TARGET_BASELINE_RATIO = 0.6
# The rate-limited phase: limits of a ThingsBoard Cloud-like tenant profile.
LIMITED = Limits(messages="60:1,1800:60", telemetry_messages="20:1,600:60",
                 telemetry_data_points="400:1,6000:60", max_payload_size=8192)

SEQ_KEY = b'"seq":'
SEQ_RE = re.compile(rb'"seq":(\d+)')


class BenchError(Exception):
    """The benchmark could not complete (a part failed or timed out)."""


# -- /proc ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcStats:
    """CPU seconds (user + system, all threads) and memory of one process, from /proc."""

    cpu_s: float
    rss_mb: float
    peak_rss_mb: float
    # The main thread's share (the gateway's event loop); the rest is mostly the intake.
    loop_cpu_s: float = float("nan")


def proc_stats(pid: int | None) -> ProcStats | None:
    """The process's CPU time and memory now; None when it is gone."""
    if pid is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    # Fields after "(comm)": state is field 3, utime field 14 and stime field 15.
    fields = stat.rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu_s = (int(fields[11]) + int(fields[12])) / ticks
    kib: dict[str, int] = {}
    for line in status.splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            kib[name] = int(value.split()[0])
    try:
        main = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        loop_cpu_s = (int(main[11]) + int(main[12])) / ticks
    except OSError:
        loop_cpu_s = float("nan")
    return ProcStats(cpu_s, kib.get("VmRSS", 0) / 1024, kib.get("VmHWM", 0) / 1024,
                     loop_cpu_s)


def thread_cpu_s(native_id: int | None) -> float:
    """CPU seconds (user + system) of one thread of this process; NaN when unknown."""
    if native_id is None:
        return float("nan")
    try:
        stat = Path(f"/proc/self/task/{native_id}/stat").read_text()
    except OSError:
        return float("nan")
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the ThingsBoard stand-in and what it received ----------------------------------------


class TelemetrySink:
    """Keeps every telemetry payload the stand-in accepted, with its receive time.

    Called on the stand-in's network thread, it only stamps, stores and counts
    (``bytes.count``) each publish; records are parsed after the measurement. Only records
    with a ``seq`` value are counted: the gateway's own health, log and attribute messages
    are not.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._payloads: list[tuple[float, bytes]] = []
        self.records = 0
        self.publishes = 0
        self.first_at: float | None = None
        self.last_at: float | None = None

    def reset(self) -> None:
        with self._lock:
            self._payloads = []
            self.records = 0
            self.publishes = 0
            self.first_at = None
            self.last_at = None

    def take(self) -> list[tuple[float, bytes]]:
        with self._lock:
            return list(self._payloads)

    def on_publish(self, payload: bytes, now: float) -> None:
        count = payload.count(SEQ_KEY)
        if not count:
            return
        with self._lock:
            self._payloads.append((now, payload))
            self.records += count
            self.publishes += 1
            if self.first_at is None:
                self.first_at = now
            self.last_at = now


def make_thingsboard(pki: Pki, sink: TelemetrySink, limits: Limits | None = None
                     ) -> FakeThingsBoard:
    """The benchmark's ThingsBoard (not started): TLS with `pki`, the bench's access token
    accepted, ThingsBoard's `limits` (None: no rate limit, the default payload limit).
    Telemetry goes to `sink` only; the stand-in keeps none of it."""
    tb = FakeThingsBoard(pki, limits=limits, keep_telemetry=False, on_telemetry=sink.on_publish)
    tb.accept_token(ACCESS_TOKEN)
    return tb


class Cloud:
    """The cloud side the gateway talks to: where it listens, its CPU, its closes."""

    name = ""
    tls_hostname = "localhost"

    @property
    def tls_port(self) -> int:
        raise NotImplementedError

    def cpu_s(self) -> float:
        """CPU seconds used so far by the cloud side (NaN when unknown)."""
        raise NotImplementedError

    def closes(self) -> list[str]:
        """Connections the cloud side closed, with the reasons (a broker closes none)."""
        return []

    def stop(self) -> None:
        raise NotImplementedError


class ServerCloud(Cloud):
    """The ThingsBoard stand-in."""

    name = "ThingsBoard stand-in"

    def __init__(self, pki: Pki, sink: TelemetrySink, limits: Limits | None) -> None:
        self.thingsboard = make_thingsboard(pki, sink, limits)
        self.thingsboard.start()

    @property
    def tls_port(self) -> int:
        return self.thingsboard.tls_port

    def cpu_s(self) -> float:
        return thread_cpu_s(self.thingsboard.native_thread_id)

    def closes(self) -> list[str]:
        return self.thingsboard.closes

    def stop(self) -> None:
        self.thingsboard.stop()


class MosquittoCloud(Cloud):
    """mosquitto (TLS for the gateway) and a paho subscriber on its plain listener."""

    name = "mosquitto"

    def __init__(self, workdir: Path, pki: Pki, sink: TelemetrySink) -> None:
        if not mosquitto_available():
            raise BenchError("--cloud mosquitto needs mosquitto: apt-get install -y mosquitto")
        self.broker = Mosquitto(workdir / "broker", pki)
        self.broker.start()
        self._sink = sink
        self._subscribed = threading.Event()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-sink",
                                   protocol=MQTTProtocolVersion.MQTTv311)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        try:
            self._client.connect(self.broker.host, self.broker.plain_port, keepalive=60)
            self._client.loop_start()
            if not self._subscribed.wait(10.0):
                raise BenchError("the subscriber did not connect to mosquitto")
        except BaseException:
            self.stop()
            raise

    @property
    def tls_port(self) -> int:
        return self.broker.tls_port

    def cpu_s(self) -> float:
        stats = proc_stats(self.broker.pid)
        return stats.cpu_s if stats else float("nan")

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._client.disconnect()
            self._client.loop_stop()
        self.broker.stop()

    def _on_connect(self, client: mqtt.Client, _userdata: Any, _flags: mqtt.ConnectFlags,
                    reason: ReasonCode, _props: Properties | None) -> None:
        if not reason.is_failure:
            # QoS 1: the broker does not drop what the subscriber has not taken yet.
            client.subscribe(TELEMETRY_TOPIC, qos=1)

    def _on_subscribe(self, _client: mqtt.Client, _userdata: Any, _mid: int,
                      _reasons: list[ReasonCode], _props: Properties | None) -> None:
        self._subscribed.set()

    def _on_message(self, _client: mqtt.Client, _userdata: Any,
                    message: mqtt.MQTTMessage) -> None:
        self._sink.on_publish(bytes(message.payload), time.time())


# -- the gateway's outbox, read-only --------------------------------------------------------


class OutboxReader:
    """Read-only look at ``<data>/outbox.db`` (depth and counters) while the gateway runs."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "outbox.db"
        self._conn: sqlite3.Connection | None = None

    def _connection(self) -> sqlite3.Connection | None:
        if self._conn is None:
            if not self.path.exists():
                return None
            conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True,
                                   isolation_level=None, timeout=1.0)
            conn.execute("PRAGMA busy_timeout = 1000")
            self._conn = conn
        return self._conn

    def depth(self) -> int | None:
        """Rows in the outbox, None when it cannot be read yet."""
        try:
            conn = self._connection()
            return None if conn is None else int(
                conn.execute("SELECT count(*) FROM outbox").fetchone()[0])
        except sqlite3.Error:
            return None

    def counter(self, name: str) -> int | None:
        try:
            conn = self._connection()
            if conn is None:
                return None
            row = conn.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        except sqlite3.Error:
            return None
        return 0 if row is None else int(row[0])

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


# -- optional profiling with py-spy ---------------------------------------------------------


class Profiler:
    """Samples a gateway with ``py-spy record`` (raw collapsed stacks) until it exits."""

    def __init__(self, out_dir: Path | None, native: bool = False) -> None:
        self.out_dir = out_dir
        self.native = native
        self._runs: list[tuple[str, Path, subprocess.Popen[bytes]]] = []

    @staticmethod
    def find() -> str | None:
        beside = Path(sys.executable).parent / "py-spy"
        return str(beside) if beside.is_file() else shutil.which("py-spy")

    def attach(self, name: str, pid: int | None) -> None:
        if self.out_dir is None or pid is None:
            return
        binary = self.find()
        if binary is None:
            raise BenchError("--profile needs py-spy: pip install py-spy")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        out = self.out_dir / f"{name}.folded"
        command = [binary, "record", "--pid", str(pid), "--rate", "200", "--format", "raw",
                   "--nonblocking", "--output", str(out)]
        if self.native:
            command.append("--native")
        log = (self.out_dir / f"{name}.py-spy.log").open("wb")
        self._runs.append((name, out, subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)))
        log.close()

    def finish(self, timeout: float = 30.0) -> None:
        """Wait for every py-spy (they end with their gateway) and print where time went."""
        for name, out, process in self._runs:
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGINT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(10.0)
                if process.poll() is None:
                    process.kill()
                    process.wait()
            if out.exists():
                say(f"\nprofile of the {name} phase ({out}): samples by function")
                for line in summarize_folded(out.read_text()):
                    say(f"  {line}")
        self._runs.clear()

    def kill(self) -> None:
        for _name, _out, process in self._runs:
            if process.poll() is None:
                process.kill()
                process.wait()


def summarize_folded(text: str, top: int = 15) -> list[str]:
    """The functions with most samples (inclusive and self) in py-spy's raw output."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
        for frame in set(frames[1:]):
            inclusive[frame] += count
        own[frames[-1]] += count
    if not total:
        return ["no samples"]
    lines = [f"{total} samples; inclusive % / self %"]
    for frame, count in inclusive.most_common(top):
        lines.append(f"{100 * count / total:5.1f} / {100 * own[frame] / total:5.1f}  {frame}")
    lines.append("most self time:")
    for frame, count in own.most_common(8):
        lines.append(f"{100 * count / total:5.1f}  {frame}")
    return lines


# -- the parts ------------------------------------------------------------------------------


@dataclass
class Rig:
    """The cloud side, what it received and the place where gateways live."""

    workdir: Path
    pki: Pki
    cloud: Cloud
    sink: TelemetrySink
    profiler: Profiler
    gateways: list[GatewayProcess] = field(default_factory=list)

    def gateway_env(self, data_dir: Path) -> dict[str, str]:
        return {
            "TB_HOST": self.cloud.tls_hostname,
            "TB_PORT": str(self.cloud.tls_port),
            "THINGSBOARD_CA_CERT": str(self.pki.ca_cert),
            "THINGSBOARD_DEVICE_NAME": "bench-device",
            "TEG_DATA_PATH": str(data_dir),
        }

    def new_gateway(self, name: str) -> tuple[GatewayProcess, Path]:
        """A gateway (not started) with its own data directory, already provisioned."""
        home = self.workdir / name
        data = home / "data"
        data.mkdir(parents=True)
        token = data / "tb_access_token"
        token.write_text(ACCESS_TOKEN + "\n")
        token.chmod(0o600)
        # Default settings: no config file at all.
        gateway = GatewayProcess(home, self.gateway_env(data))
        self.gateways.append(gateway)
        return gateway, data

    def stop_gateways(self) -> None:
        for gateway in self.gateways:
            if gateway.running:
                try:
                    gateway.stop(timeout=15.0)
                except Exception:
                    gateway.kill()


@contextlib.contextmanager
def rig(workdir: Path, profiler: Profiler, cloud_name: str = "server",
        limits: Limits | None = None) -> Iterator[Rig]:
    """The parts; `limits` (ThingsBoard's) need the stand-in: ``cloud_name="server"``."""
    pki = make_pki(workdir / "pki")
    sink = TelemetrySink()
    if limits is not None and cloud_name != "server":
        raise BenchError("ThingsBoard's limits need the stand-in (--cloud server)")
    cloud: Cloud = (ServerCloud(pki, sink, limits) if cloud_name == "server"
                    else MosquittoCloud(workdir, pki, sink))
    made: Rig | None = None
    try:
        made = Rig(workdir, pki, cloud, sink, profiler)
        yield made
    finally:
        if made is not None:
            made.stop_gateways()
        profiler.kill()
        cloud.stop()


def wait_until(condition: Callable[[], bool], timeout: float, what: str,
               gateway: GatewayProcess | None = None, period: float = SAMPLE_PERIOD_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if gateway is not None and not gateway.running:
            raise BenchError(f"the gateway exited (status {gateway.returncode}) while waiting "
                             f"for {what}\n--- gateway log ---\n{gateway.log_tail()}")
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(period)


def say(text: str) -> None:
    print(text, flush=True)


# -- throughput -----------------------------------------------------------------------------


@dataclass
class ThroughputResult:
    records: int
    fill_s: float
    drain_s: float
    first_record_s: float
    all_received_s: float
    intake_done_s: float | None
    rate_from_start: float
    rate_from_first: float
    gateway_cpu_s: float
    gateway_cpu_us_per_record: float
    gateway_peak_rss_mb: float
    gateway_loop_cpu_s: float
    cloud: str
    cloud_cpu_s: float
    bench_cpu_s: float
    publishes: int
    records_per_publish: float
    received: int
    distinct: int
    missing: int
    duplicates: int
    gateway_exit: int
    gateway_stop_s: float
    closes: list[str]
    timeline: list[dict[str, float]]
    baseline: BaselineResult | None = None
    # Gateway records/s (from its start; from the first record) / the bare client's.
    baseline_ratio: float | None = None
    baseline_ratio_from_first: float | None = None


# -- the bare paho client (same run, same cloud side) ----------------------------------------


@dataclass
class BaselineResult:
    records: int
    publishes: int
    payload_bytes_max: int
    inflight: int
    seconds: float
    records_per_s: float


def baseline_payloads(count: int, max_bytes: int = BASELINE_PAYLOAD_BYTES) -> list[bytes]:
    """``count`` records (``make_records``: the rows the gateway forwards) packed into JSON
    arrays of at most ``max_bytes``, as the gateway's outbox packs them."""
    payloads: list[bytes] = []
    for start in range(0, count, FILL_CHUNK):
        bodies = [body.encode() for _, body in
                  make_records(min(FILL_CHUNK, count - start), start_seq=start)]
        chunk: list[bytes] = []
        size = 2
        for body in bodies:
            if chunk and size + len(body) + 1 > max_bytes:
                payloads.append(b"[" + b",".join(chunk) + b"]")
                chunk, size = [], 2
            chunk.append(body)
            size += len(body) + (1 if len(chunk) > 1 else 0)
        if chunk:
            payloads.append(b"[" + b",".join(chunk) + b"]")
    return payloads


def run_baseline(parts: Rig, count: int, timeout: float) -> BaselineResult:
    """A bare paho client sends ``count`` pre-built records over TLS to the same cloud side
    (QoS 1, the gateway's window of publishes in flight); timed from its first publish until
    every publish is PUBACKed and every record counted by the sink."""
    payloads = baseline_payloads(count)
    sink = parts.sink
    sink.reset()
    say(f"baseline: a bare paho client sends {count:,} records in {len(payloads):,} "
        f"publishes ({BASELINE_INFLIGHT} in flight) ...")
    try:
        started = publish_all(parts.cloud.tls_hostname, parts.cloud.tls_port, payloads,
                              ca=parts.pki.ca_cert, username=ACCESS_TOKEN,
                              topic=TELEMETRY_TOPIC, inflight=BASELINE_INFLIGHT,
                              timeout=timeout)
    except RuntimeError as exc:
        raise BenchError(str(exc)) from None
    wait_until(lambda: sink.records >= count, max(0.1, started + timeout - time.monotonic()),
               "the bare client's records at the sink", period=0.001)
    seconds = time.monotonic() - started
    sink.reset()
    return BaselineResult(records=count, publishes=len(payloads),
                          payload_bytes_max=max(len(p) for p in payloads),
                          inflight=BASELINE_INFLIGHT, seconds=seconds,
                          records_per_s=count / seconds)


def fill_queue(data: Path, count: int) -> float:
    """Write ``count`` records (seq 0..count-1) into the queue db; returns the seconds."""
    started = time.monotonic()
    base = now_ms() - count
    with QueueWriter(data) as writer:
        for start in range(0, count, FILL_CHUNK):
            n = min(FILL_CHUNK, count - start)
            writer.write(make_records(n, start_seq=start, ts_ms=base + start))
    return time.monotonic() - started


def run_throughput(parts: Rig, count: int, timeout: float,
                   baseline: bool = False) -> ThroughputResult:
    gateway, data = parts.new_gateway("throughput")
    say(f"throughput: writing {count:,} records into the controller queue ...")
    fill_s = fill_queue(data, count)
    say(f"throughput: queue filled in {fill_s:.1f} s")
    bare: BaselineResult | None = None
    if baseline:
        bare = run_baseline(parts, count, timeout)
        say(f"baseline: {bare.records_per_s:,.0f} records/s ({bare.seconds:.2f} s)")
    say("throughput: starting the gateway")
    sink = parts.sink
    sink.reset()
    outbox = OutboxReader(data)
    timeline: list[dict[str, float]] = []
    bench_cpu_start = time.process_time()
    cloud_cpu_start = parts.cloud.cpu_s()
    started = time.time()
    gateway.start()
    parts.profiler.attach("throughput", gateway.pid)
    last: ProcStats | None = None
    intake_done: float | None = None
    all_received: float | None = None
    next_progress = started + PROGRESS_PERIOD_S
    next_sample = started
    deadline = started + timeout
    try:
        while True:
            now = time.time()
            if not gateway.running:
                raise BenchError(f"the gateway exited (status {gateway.returncode})\n"
                                 f"--- gateway log ---\n{gateway.log_tail()}")
            stats = proc_stats(gateway.pid)
            if stats is not None:
                last = stats
            received = sink.records
            if all_received is None and received >= count:
                all_received = sink.last_at or now
            if now >= next_sample:
                next_sample += 0.25
                accepted = outbox.counter("records_accepted")
                if intake_done is None and accepted is not None and accepted >= count:
                    intake_done = now
                timeline.append({"t": round(now - started, 3), "received": received,
                                 "accepted": -1 if accepted is None else accepted,
                                 "rss_mb": round(last.rss_mb, 1) if last else 0.0,
                                 "cpu_s": round(last.cpu_s, 2) if last else 0.0})
            if all_received is not None and outbox.depth() == 0:
                done = time.time()
                break
            if now >= next_progress:
                next_progress += PROGRESS_PERIOD_S
                entry = timeline[-1] if timeline else {}
                say(f"  {now - started:5.1f} s  taken from the queue "
                    f"{max(0, int(entry.get('accepted', 0))):>10,}  received {received:>10,}  "
                    f"gateway rss {last.rss_mb if last else 0:.0f} MB")
            if now > deadline:
                raise BenchError(f"timed out after {timeout:g} s: {received:,}/{count:,} "
                                 f"records received, outbox depth {outbox.depth()}")
            time.sleep(SAMPLE_PERIOD_S)
        # The last look before SIGTERM: CPU and peak memory of the whole run.
        final = proc_stats(gateway.pid) or last
        if final is None:
            raise BenchError("could not read the gateway's /proc entry")
        cloud_cpu_end = parts.cloud.cpu_s()
        bench_cpu = time.process_time() - bench_cpu_start
    finally:
        outbox.close()
    stop_started = time.monotonic()
    exit_code = gateway.stop(timeout=30.0)
    stop_s = time.monotonic() - stop_started

    payloads = sink.take()
    seqs = Counter(int(m) for _, payload in payloads for m in SEQ_RE.findall(payload))
    missing = sum(1 for seq in range(count) if seq not in seqs)
    duplicates = sum(n - 1 for n in seqs.values() if n > 1)
    first_at = sink.first_at or done
    assert all_received is not None
    drain_s = done - started
    rate_from_first = count / max(1e-9, done - first_at)
    return ThroughputResult(
        records=count,
        fill_s=fill_s,
        drain_s=drain_s,
        first_record_s=first_at - started,
        all_received_s=all_received - started,
        intake_done_s=None if intake_done is None else intake_done - started,
        rate_from_start=count / drain_s,
        rate_from_first=rate_from_first,
        gateway_cpu_s=final.cpu_s,
        gateway_cpu_us_per_record=final.cpu_s / count * 1e6,
        gateway_peak_rss_mb=final.peak_rss_mb,
        gateway_loop_cpu_s=final.loop_cpu_s,
        cloud=parts.cloud.name,
        cloud_cpu_s=cloud_cpu_end - cloud_cpu_start,
        bench_cpu_s=bench_cpu,
        publishes=len(payloads),
        records_per_publish=sink.records / max(1, len(payloads)),
        received=sum(seqs.values()),
        distinct=len(seqs),
        missing=missing,
        duplicates=duplicates,
        gateway_exit=exit_code,
        gateway_stop_s=stop_s,
        closes=parts.cloud.closes(),
        timeline=timeline,
        baseline=bare,
        baseline_ratio=None if bare is None else count / drain_s / bare.records_per_s,
        baseline_ratio_from_first=None if bare is None else rate_from_first / bare.records_per_s,
    )


# -- latency --------------------------------------------------------------------------------


@dataclass
class LatencyResult:
    seconds: float
    sent: int
    received: int
    missing: int
    duplicates: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    write_p99_ms: float
    gateway_idle_cpu_percent: float
    gateway_cpu_s: float
    gateway_cpu_percent: float
    gateway_peak_rss_mb: float
    gateway_exit: int


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list (NaN when empty)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def steady_writer(data: Path, seconds: float, stop: threading.Event,
                  write_ms: list[float]) -> int:
    """Insert one record every 10 ms with ts = now; returns how many were written."""
    count = int(seconds / LATENCY_PERIOD_S)
    written = 0
    with QueueWriter(data) as writer:
        start = time.monotonic()
        for seq in range(count):
            if stop.is_set():
                break
            delay = start + seq * LATENCY_PERIOD_S - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            before = time.time()
            ts = int(before * 1000)
            writer.write([("telemetry",
                           f'{{"ts":{ts},"values":{{"seq":{seq},"co2":{400 + seq % 600}}}}}')])
            write_ms.append((time.time() - before) * 1000)
            written += 1
    return written


def run_latency(parts: Rig, seconds: float) -> LatencyResult:
    gateway, data = parts.new_gateway("latency")
    # The queue exists before the gateway starts, as when a controller runs first.
    QueueWriter(data).close()
    gateway.start()
    parts.profiler.attach("latency", gateway.pid)
    gateway.wait_for_log(CONNECTED_LOG, timeout=30.0)
    time.sleep(1.0)  # let the connect-time messages (attributes, sys_info) pass
    idle_start = proc_stats(gateway.pid)
    time.sleep(IDLE_S)
    idle_end = proc_stats(gateway.pid)
    idle_percent = ((idle_end.cpu_s - idle_start.cpu_s) / IDLE_S * 100
                    if idle_start and idle_end else float("nan"))
    sink = parts.sink
    sink.reset()
    before = proc_stats(gateway.pid)
    say(f"latency: one record every {LATENCY_PERIOD_S * 1000:.0f} ms for {seconds:g} s ...")
    stop = threading.Event()
    write_ms: list[float] = []
    result: list[int] = []

    def writer() -> None:
        result.append(steady_writer(data, seconds, stop, write_ms))

    thread = threading.Thread(target=writer, name="steady-writer", daemon=True)
    started = time.monotonic()
    thread.start()
    try:
        while thread.is_alive():
            thread.join(PROGRESS_PERIOD_S)
            if not gateway.running:
                raise BenchError(f"the gateway exited (status {gateway.returncode})\n"
                                 f"--- gateway log ---\n{gateway.log_tail()}")
            if thread.is_alive():
                say(f"  {time.monotonic() - started:5.1f} s  received {sink.records:>6,}")
    finally:
        stop.set()
        thread.join()
    sent = result[0] if result else 0
    wait_until(lambda: sink.records >= sent, 10.0, f"the last of {sent} records", gateway)
    elapsed = time.monotonic() - started
    after = proc_stats(gateway.pid)
    exit_code = gateway.stop(timeout=30.0)

    latencies: list[float] = []
    seqs: Counter[int] = Counter()
    for received_at, payload in sink.take():
        for record in json.loads(payload):
            values = record.get("values", {})
            if "seq" in values:
                seqs[values["seq"]] += 1
                latencies.append(received_at * 1000 - record["ts"])
    latencies.sort()
    write_ms.sort()
    cpu = (after.cpu_s - before.cpu_s) if after and before else float("nan")
    return LatencyResult(
        seconds=seconds,
        sent=sent,
        received=sum(seqs.values()),
        missing=sum(1 for seq in range(sent) if seq not in seqs),
        duplicates=sum(n - 1 for n in seqs.values() if n > 1),
        p50_ms=percentile(latencies, 0.50),
        p90_ms=percentile(latencies, 0.90),
        p99_ms=percentile(latencies, 0.99),
        max_ms=latencies[-1] if latencies else float("nan"),
        mean_ms=sum(latencies) / len(latencies) if latencies else float("nan"),
        write_p99_ms=percentile(write_ms, 0.99),
        gateway_idle_cpu_percent=idle_percent,
        gateway_cpu_s=cpu,
        gateway_cpu_percent=cpu / elapsed * 100,
        gateway_peak_rss_mb=after.peak_rss_mb if after else float("nan"),
        gateway_exit=exit_code,
    )


# -- rate limited -----------------------------------------------------------------------------


@dataclass
class LimitedResult:
    records: int
    points: int
    limits: dict[str, Any]
    active_s: float
    allowed_s: float
    utilisation: float
    records_per_s: float
    points_per_s: float
    allowed_points_per_s: float
    publishes: int
    closes: list[str]
    paced_cpu_percent: float
    missing: int
    duplicates: int


def allowed_seconds(tokens: int, spec: str | None) -> float:
    """The shortest time ``tokens`` can take under ``spec``, ThingsBoard's buckets (full at
    the start, refilled continuously); 0 without a limit."""
    if not spec:
        return 0.0
    return max(max(0.0, (tokens - w.capacity) / w.rate) for w in parse_rate_limit(spec))


def run_limited(workdir: Path, profiler: Profiler, count: int, limits: Limits,
                timeout: float) -> LimitedResult:
    """A backlog drained into the stand-in enforcing ``limits``: how close the gateway gets
    to what the limits allow, and what it costs while it waits for tokens."""
    with rig(workdir / "limited", profiler, "server", limits) as parts:
        say(f"rate limited: messages {limits.messages}, telemetry messages "
            f"{limits.telemetry_messages}, data points {limits.telemetry_data_points}, "
            f"payloads up to {limits.max_payload_size} bytes")
        t = run_throughput(parts, count, timeout)
        payloads = parts.sink.take()
    points = sum(len(record["values"]) for _, payload in payloads
                 for record in json.loads(payload))
    # From the first record received to the last: the gateway's start and connect aside.
    active = max(1e-9, t.all_received_s - t.first_record_s)
    allowed = max(allowed_seconds(points, limits.telemetry_data_points),
                  allowed_seconds(t.publishes, limits.telemetry_messages))
    # The gateway's CPU over the same span, from the samples of its /proc entry.
    inside = [s for s in t.timeline if t.first_record_s <= s["t"] <= t.all_received_s]
    cpu = ((inside[-1]["cpu_s"] - inside[0]["cpu_s"]) / (inside[-1]["t"] - inside[0]["t"])
           * 100 if len(inside) >= 2 and inside[-1]["t"] > inside[0]["t"] else float("nan"))
    return LimitedResult(
        records=count, points=points,
        limits={"messages": limits.messages, "telemetryMessages": limits.telemetry_messages,
                "telemetryDataPoints": limits.telemetry_data_points,
                "maxPayloadSize": limits.max_payload_size},
        active_s=active, allowed_s=allowed, utilisation=allowed / active if allowed else 1.0,
        records_per_s=count / active, points_per_s=points / active,
        allowed_points_per_s=points / allowed if allowed else float("inf"),
        publishes=t.publishes, closes=t.closes, paced_cpu_percent=cpu,
        missing=t.missing, duplicates=t.duplicates)


# -- report ---------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def report(throughput: ThroughputResult | None, latency: LatencyResult | None,
           limited: LimitedResult | None = None) -> bool:
    """Print the results table; True when every measured target is met."""
    rows: list[tuple[str, str, str, str]] = []
    all_ok = True

    def row(name: str, value: str, target: str = "", ok: bool | None = None) -> None:
        nonlocal all_ok
        if ok is not None:
            all_ok = all_ok and ok
        rows.append((name, value, target, "" if ok is None else verdict(ok)))

    if throughput is not None:
        t = throughput
        drain_target = TARGET_DRAIN_S * t.records / TARGET_DRAIN_RECORDS
        row("records (backlog)", f"{t.records:,}")
        row("queue fill (not timed)", f"{t.fill_s:.1f} s")
        row("drain: gateway start -> all PUBACKed", f"{t.drain_s:.2f} s",
            f"< {drain_target:.1f} s", t.drain_s < drain_target)
        row("records/s from gateway start", f"{t.rate_from_start:,.0f}",
            f">= {TARGET_RATE:,.0f}", t.rate_from_start >= TARGET_RATE)
        row("records/s from first record received", f"{t.rate_from_first:,.0f}")
        if t.baseline is not None and t.baseline_ratio is not None:
            b = t.baseline
            row("bare paho client, same run", f"{b.records_per_s:,.0f} records/s",
                f"{b.publishes:,} publishes, {b.inflight} in flight")
            row("gateway / bare client (from start)", f"{t.baseline_ratio:.2f}",
                f">= {TARGET_BASELINE_RATIO:.1f}", t.baseline_ratio >= TARGET_BASELINE_RATIO)
            row("gateway / bare client (from first)", f"{t.baseline_ratio_from_first:.2f}")
        row("first record received after", f"{t.first_record_s:.2f} s")
        if t.intake_done_s is not None:
            row("queue emptied into outbox after", f"{t.intake_done_s:.2f} s")
        row("all records received after", f"{t.all_received_s:.2f} s")
        row("gateway CPU (user+sys)", f"{t.gateway_cpu_s:.2f} s")
        row("  event loop thread / other threads",
            f"{t.gateway_loop_cpu_s:.2f} s / {t.gateway_cpu_s - t.gateway_loop_cpu_s:.2f} s")
        row("gateway CPU per record", f"{t.gateway_cpu_us_per_record:.1f} us",
            f"<= {TARGET_CPU_US_PER_RECORD:.0f} us",
            t.gateway_cpu_us_per_record <= TARGET_CPU_US_PER_RECORD)
        row("gateway peak RSS (VmHWM)", f"{t.gateway_peak_rss_mb:.1f} MB",
            f"< {TARGET_PEAK_MB:.0f} MB", t.gateway_peak_rss_mb < TARGET_PEAK_MB)
        row("cloud side", t.cloud)
        row("cloud CPU / bench CPU", f"{t.cloud_cpu_s:.2f} s / {t.bench_cpu_s:.2f} s")
        row("server closes (reasons)", ", ".join(t.closes) or "none")
        row("publishes (records each)", f"{t.publishes:,} ({t.records_per_publish:.0f})")
        complete = t.missing == 0 and t.duplicates == 0
        row("verified: distinct / missing / dup", f"{t.distinct:,} / {t.missing} / "
            f"{t.duplicates}", "all, 0, 0", complete)
        row("gateway exit status (stop time)", f"{t.gateway_exit} ({t.gateway_stop_s:.1f} s)",
            "0", t.gateway_exit == 0)
    if latency is not None:
        lat = latency
        row("latency: records at 100/s", f"{lat.received:,}/{lat.sent:,} "
            f"(missing {lat.missing}, dup {lat.duplicates})", "all",
            lat.missing == 0)
        row("latency p50", f"{lat.p50_ms:.1f} ms")
        row("latency p90", f"{lat.p90_ms:.1f} ms")
        row("latency p99", f"{lat.p99_ms:.1f} ms", f"< {TARGET_P99_MS:.0f} ms",
            lat.p99_ms < TARGET_P99_MS)
        row("latency max (mean)", f"{lat.max_ms:.1f} ms ({lat.mean_ms:.1f} ms)")
        row("controller insert p99", f"{lat.write_p99_ms:.1f} ms")
        row("gateway CPU idle", f"{lat.gateway_idle_cpu_percent:.1f} % of a core",
            f"< {TARGET_IDLE_CPU_PERCENT:.1f} %",
            lat.gateway_idle_cpu_percent < TARGET_IDLE_CPU_PERCENT)
        row("gateway CPU at 100 records/s", f"{lat.gateway_cpu_percent:.1f} % of a core")
        row("gateway peak RSS (VmHWM)", f"{lat.gateway_peak_rss_mb:.1f} MB",
            f"< {TARGET_PEAK_MB:.0f} MB", lat.gateway_peak_rss_mb < TARGET_PEAK_MB)
        row("gateway exit status", str(lat.gateway_exit), "0", lat.gateway_exit == 0)
    if limited is not None:
        lim = limited
        row("rate limited: backlog", f"{lim.records:,} records, {lim.points:,} data points")
        row("  limits (data points)", str(lim.limits["telemetryDataPoints"]),
            f"telemetry msgs {lim.limits['telemetryMessages']}")
        row("  first to last record", f"{lim.active_s:.1f} s",
            f"limits allow {lim.allowed_s:.1f} s")
        row("  utilisation", f"{lim.utilisation * 100:.0f} %",
            f">= {TARGET_UTILISATION * 100:.0f} %", lim.utilisation >= TARGET_UTILISATION)
        row("  delivered", f"{lim.records_per_s:,.0f} records/s, "
            f"{lim.points_per_s:,.0f} points/s")
        row("  server cuts", ", ".join(lim.closes) or "0", "0", not lim.closes)
        row("  gateway CPU while paced", f"{lim.paced_cpu_percent:.2f} % of a core",
            f"< {TARGET_PACED_CPU_PERCENT:.0f} %",
            lim.paced_cpu_percent < TARGET_PACED_CPU_PERCENT)
        row("  verified: missing / dup", f"{lim.missing} / {lim.duplicates}", "0, 0",
            lim.missing == 0 and lim.duplicates == 0)

    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    heading = ("measure", "value", "target", "")
    widths = [max(w, len(h)) for w, h in zip(widths, heading, strict=True)]
    line = "  ".join("-" * w for w in widths)
    say("")
    say(f"teg-gateway forward benchmark ({os.cpu_count()} CPUs, Python "
        f"{sys.version.split()[0]}, SQLite {sqlite3.sqlite_version}, "
        f"load average now {os.getloadavg()[0]:.1f})")
    say(line)
    say("  ".join(h.ljust(w) for h, w in zip(heading, widths, strict=True)).rstrip())
    say(line)
    for r in rows:
        say("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    say(line)
    say("all targets met" if all_ok else "some targets MISSED")
    return all_ok


# -- main -----------------------------------------------------------------------------------


def _raise_interrupt(_sig: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python bench/forward.py",
        description="Throughput, CPU, memory and latency of the gateway's forwarding path "
                    "over TLS, against mosquitto or the ThingsBoard stand-in.")
    parser.add_argument("--records", type=int, default=1_000_000,
                        help="backlog for the throughput phase (default 1,000,000)")
    parser.add_argument("--latency-seconds", type=float, default=20.0,
                        help="length of the 100 records/s latency phase (default 20)")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--no-baseline", action="store_true",
                        help="do not run the bare paho client before the throughput phase")
    parser.add_argument("--timeout", type=float, default=180.0,
                        help="give up on the throughput phase after this many seconds")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="sample the gateway with py-spy (raw stacks in DIR/<phase>.folded) "
                             "and print where its time went; slows the gateway a little")
    parser.add_argument("--profile-native", action="store_true",
                        help="with --profile: include native (C) frames, e.g. inside SQLite")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results here")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work directory (logs, databases) and print its path")
    parser.add_argument("--workdir", type=Path, help="work directory (default: a new temp one)")
    parser.add_argument("--limited", action="store_true",
                        help="also drain a backlog into the stand-in enforcing ThingsBoard "
                             "Cloud-like limits (messages 60:1,1800:60, telemetry messages "
                             "20:1,600:60, data points 400:1,6000:60, 8192-byte payloads) "
                             "and report the utilisation")
    parser.add_argument("--limited-records", type=int, default=4000,
                        help="backlog of the rate-limited phase (default 4,000: about 60 s)")
    parser.add_argument("--cloud", choices=("server", "mosquitto"), default="server",
                        help="what the gateway talks to: the ThingsBoard stand-in server "
                             "(default), or mosquitto and a lean subscriber")
    args = parser.parse_args(argv)
    if args.records <= 0:
        parser.error("--records must be positive")
    if args.latency_seconds <= 0:
        parser.error("--latency-seconds must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Ctrl-C and SIGTERM both end up in the cleanup below (SIGINT explicitly: a shell
    # starts background jobs with it ignored).
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, _raise_interrupt)
    load = os.getloadavg()[0]
    if load > 0.5:
        say(f"warning: the machine is busy (load average {load:.1f}); figures will be low")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="teg-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    throughput: ThroughputResult | None = None
    latency: LatencyResult | None = None
    limited: LimitedResult | None = None
    failed = False
    interrupted = False
    profiler = Profiler(args.profile, args.profile_native)
    try:
        with rig(workdir, profiler, args.cloud) as parts:
            if not args.skip_throughput:
                throughput = run_throughput(parts, args.records, args.timeout,
                                            baseline=not args.no_baseline)
            if not args.skip_latency:
                latency = run_latency(parts, args.latency_seconds)
            profiler.finish()
        if args.limited:
            limited = run_limited(workdir, profiler, args.limited_records, LIMITED,
                                  args.timeout + 300.0)
    except BenchError as exc:
        say(f"benchmark failed: {exc}")
        failed = True
    except KeyboardInterrupt:
        say("interrupted")
        failed = interrupted = True
    except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
        say(f"benchmark failed: {exc!r}")
        failed = True
    finally:
        if args.keep or args.workdir or (failed and not interrupted):
            say(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if failed:
        return 1
    ok = report(throughput, latency, limited)
    if args.json:
        document = {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "sqlite": sqlite3.sqlite_version,
            "throughput": asdict(throughput) if throughput else None,
            "latency": asdict(latency) if latency else None,
            "limited": asdict(limited) if limited else None,
            "targets_met": ok,
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
