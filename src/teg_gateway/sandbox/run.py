"""``teg-gateway sandbox``: the whole chain on one machine, no ThingsBoard server needed.

The ThingsBoard stand-in (an MQTT server with TLS, optionally rate limited) + mosquitto as
the device's local broker + the sample controller + the real gateway as a child process.
The gateway provisions itself, forwards what the controller writes and answers an RPC; at
the end the run shows what "ThingsBoard" received and checks, record by record, that
nothing was lost.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from teg_gateway.sandbox.broker import Mosquitto, mosquitto_available
from teg_gateway.sandbox.certs import make_pki
from teg_gateway.sandbox.process import GatewayProcess, run_command
from teg_gateway.sandbox.thingsboard import FakeThingsBoard, Limits

SANDBOX_CONFIG = """
[thingsboard]
reconnect_min_s = 0.5
reconnect_max_s = 5.0

[health]
interval_s = 5.0
"""


EXIT_INTERRUPTED = 130
CONTROLLER_STOP_S = 10.0
CATCH_UP_S = 5.0
_STOPPED_AFTER = re.compile(r"sample controller stopped after (\d+) records")
_WROTE = re.compile(r"^wrote (\d+) records", re.MULTILINE)


def _say(text: str) -> None:
    print(text, flush=True)


class _Interrupt:
    """Ctrl-C (SIGINT) or SIGTERM asks the run to stop in order; a second one forces it."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self.force: list[Callable[[], object]] = []
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Interrupt:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *_exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, _sig: int, _frame: FrameType | None) -> None:
        if not self.requested.is_set():
            self.requested.set()
            return
        for action in self.force:
            with contextlib.suppress(Exception):
                action()
        print("\nforced: stopped", flush=True)
        raise SystemExit(EXIT_INTERRUPTED)


def _written_by_controller(log_path: Path, received_seqs: set[int]) -> int | None:
    """How many records the sample controller wrote, from its own log (None: unknown)."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return None
    stopped = _STOPPED_AFTER.search(text)
    if stopped:
        return int(stopped.group(1))
    wrote = _WROTE.findall(text)
    at_least = int(wrote[-1]) if wrote else 0
    return max(at_least, max(received_seqs, default=-1) + 1)


def _stop_controller(controller: subprocess.Popen[bytes]) -> None:
    if controller.poll() is None:
        controller.terminate()
        try:
            controller.wait(CONTROLLER_STOP_S)
        except subprocess.TimeoutExpired:
            controller.kill()
            controller.wait()


def run_sandbox(seconds: float = 15.0, rate: float = 20.0, workdir: Path | None = None,
                limits: Limits | None = None) -> int:
    """Run the demo; 0 when every record the controller wrote reached the stand-in."""
    if not mosquitto_available():
        _say("teg-gateway sandbox needs the mosquitto broker: install it with\n"
             "    sudo apt-get install -y mosquitto\n(Debian/Ubuntu/Raspberry Pi OS), then run "
             "this command again.")
        return 1
    workdir = workdir or Path(tempfile.mkdtemp(prefix="teg-sandbox-"))
    workdir.mkdir(parents=True, exist_ok=True)
    count = max(1, int(seconds * rate))
    _say(f"sandbox in {workdir}")
    with _Interrupt() as interrupt:
        return _run(workdir, count, seconds, rate, interrupt, limits=limits)


def _run(workdir: Path, count: int, seconds: float, rate: float, interrupt: _Interrupt, *,
         limits: Limits | None) -> int:
    pki = make_pki(workdir / "pki")
    with Mosquitto(workdir / "broker") as broker, FakeThingsBoard(pki, limits=limits) as tb:
        data = workdir / "data"
        env = {
            "TB_HOST": tb.tls_hostname,
            "TB_PORT": str(tb.tls_port),
            "THINGSBOARD_CA_CERT": str(pki.ca_cert),
            "THINGSBOARD_PROVISION_DEVICE_KEY": "sandbox-key",
            "THINGSBOARD_PROVISION_DEVICE_SECRET": "sandbox-secret",
            "THINGSBOARD_DEVICE_NAME": "sandbox-device",
            "TEG_DATA_PATH": str(data),
        }
        _say(f"ThingsBoard stand-in: TLS on {tb.tls_hostname}:{tb.tls_port} (CA {pki.ca_cert}), "
             f"limits {json.dumps(tb.limits.session_limits())}")
        _say(f"mosquitto (the device's local broker): {broker.host}:{broker.plain_port}")
        controller_log_path = workdir / "controller.log"
        controller_log = controller_log_path.open("w")
        # Its own session: Ctrl-C in the terminal reaches only this process, which stops
        # the children in order (controller, then gateway, then the servers).
        controller = subprocess.Popen(
            [sys.executable, "-m", "teg_gateway.sandbox.controller", "--data", str(data),
             "--rate", str(rate), "--count", str(count)],
            stdout=controller_log, stderr=subprocess.STDOUT, start_new_session=True)
        config = SANDBOX_CONFIG + (f"\n[local_mqtt]\nenabled = true\nhost = \"{broker.host}\"\n"
                                   f"port = {broker.plain_port}\n")
        gateway = GatewayProcess(workdir / "gateway", env, config)
        interrupt.force += [controller.kill, lambda: gateway.kill(whole_group=True),
                            broker.kill]
        written: int | None = None
        try:
            gateway.start()
            _say(f"sample controller: writing {count} CO2 records at {rate:g}/s; "
                 f"gateway pid {gateway.pid} (log {workdir / 'gateway' / 'gateway.log'})")
            deadline = time.monotonic() + seconds + 60
            while time.monotonic() < deadline and not interrupt.requested.is_set():
                seqs = set(tb.telemetry_values("seq"))
                if controller.poll() is not None and written is None:
                    written = _written_by_controller(controller_log_path, seqs)
                    if written is not None and written < count:
                        _say(f"  the sample controller stopped early, after {written} "
                             "records")
                target = count if written is None else written
                _say(f"  ThingsBoard has {len(seqs)}/{target} records")
                if written is not None and len(seqs) >= written:
                    break
                if not gateway.running:
                    _say(f"  the gateway exited (code {gateway.returncode})")
                    break
                interrupt.requested.wait(1.0)
            if interrupt.requested.is_set():
                _say("interrupted: stopping the sample controller, then the gateway ...")
                _stop_controller(controller)
                written = _written_by_controller(controller_log_path,
                                                 set(tb.telemetry_values("seq")))
                _catch_up(tb, written, gateway)
            else:
                rpc = tb.rpc("ping", timeout=10)
                _say(f"RPC ping answered: {json.dumps(rpc)}")
            _stop_controller(controller)
            rc = gateway.stop()
        finally:
            _stop_controller(controller)
            controller_log.close()
            if gateway.running:
                gateway.kill(whole_group=True)
        if written is None:
            written = _written_by_controller(controller_log_path,
                                             set(tb.telemetry_values("seq")))
        if interrupt.requested.is_set():
            _say("stopped")
        code = _report(tb, count if written is None else written, rc, workdir, env,
                       interrupted=interrupt.requested.is_set())
    _say(f"\nThis run's files are in {workdir} (logs, databases, and a throw-away CA with "
         f"its private key); remove them with: rm -rf {workdir}")
    return EXIT_INTERRUPTED if interrupt.requested.is_set() else code


def _catch_up(tb: FakeThingsBoard, written: int | None, gateway: GatewayProcess) -> None:
    """A few seconds for the gateway to forward what was written before it stops."""
    deadline = time.monotonic() + CATCH_UP_S
    while written is not None and gateway.running and time.monotonic() < deadline:
        if len(set(tb.telemetry_values("seq"))) >= written:
            return
        time.sleep(0.2)


def _report(tb: FakeThingsBoard, count: int, gateway_rc: int, workdir: Path,
            env: dict[str, str], *, interrupted: bool = False) -> int:
    seqs = tb.telemetry_values("seq")
    counts = Counter(seqs)
    missing = sorted(set(range(count)) - set(counts))
    duplicates = sum(n - 1 for n in counts.values() if n > 1)
    telemetry = tb.telemetry()
    health = [r for r in telemetry if "outbox_depth" in r["values"]]
    logs = [r for r in telemetry
            if str(r["values"].get("message", "")).startswith("GATEWAY - ")]
    _say("")
    _say("What ThingsBoard received")
    _say(f"  provisioning requests: {len(tb.provision_requests)} "
         f"(device {tb.provision_requests[0].get('deviceName') if tb.provision_requests else '-'})")
    _say(f"  telemetry publishes:   {tb.publish_count}")
    _say(f"  connections:           {tb.connection_count} accepted, closed by the server: "
         f"{', '.join(tb.closes) or 'none'}")
    _say(f"  controller records:    {len(counts)}/{count} distinct, {len(missing)} missing, "
         f"{duplicates} duplicates")
    if seqs:
        last = next(r for r in reversed(telemetry) if "seq" in r["values"])
        _say(f"  last record:           {json.dumps(last)}")
    controller_logs = sum(1 for r in telemetry if "message" in r["values"]) - len(logs)
    _say(f"  controller log records: {controller_logs}")
    _say(f"  gateway log records:   {len(logs)}")
    if health:
        _say(f"  last health telemetry: {json.dumps(health[-1]['values'])}")
    _say(f"  client attributes:     {', '.join(sorted(tb.client_attributes)) or '-'}")
    _say(f"  gateway exit code:     {gateway_rc}")
    status = run_command(workdir / "gateway", env, None, ["status"], timeout=30)
    _say("")
    _say("teg-gateway status")
    _say("\n".join("  " + line for line in status.stdout.splitlines()))
    waiting = _waiting_seqs(workdir / "data") & set(missing)
    lost = [seq for seq in missing if seq not in waiting]
    ok = not lost and gateway_rc == 0
    _say("")
    if interrupted:
        _say(f"interrupted: the sample controller wrote {count} records, "
             f"{count - len(missing)} reached ThingsBoard"
             + (f"; the other {len(missing)} wait in the gateway's outbox "
                f"({workdir / 'data'}) and would be sent at its next start" if missing
                else ""))
        return EXIT_INTERRUPTED
    if ok and waiting:
        eta = health[-1]["values"].get("outbox_eta_s") if health else None
        _say(f"OK: {count - len(waiting)} of the {count} records the sample controller wrote "
             f"reached ThingsBoard; the other {len(waiting)} wait, on disk, in the gateway's "
             f"outbox and queue ({workdir / 'data'}): the stand-in's rate limits allow no "
             f"more in this time (the gateway's last estimate to drain: {eta} s). Nothing "
             "is lost; they go at the gateway's next start.")
        return 0
    _say(f"OK: every record the sample controller wrote ({count}) reached ThingsBoard"
         if ok else
         f"PROBLEM: {len(missing)} of {count} written records missing (first: "
         f"{missing[:10]}), gateway exit code {gateway_rc}. Logs: {workdir}/gateway/"
         "gateway.log and controller.log. On a device, `teg-gateway check` tests the "
         "settings, DNS, TLS and the credentials and says how to fix what fails.")
    return 0 if ok else 1


def _waiting_seqs(data: Path) -> set[int]:
    """The ``seq`` of every record still in the gateway's outbox or the controller queue."""
    found: set[int] = set()
    for name, sql in (("outbox.db", "SELECT body FROM outbox"),
                      ("communication_queue.db", "SELECT message FROM messages")):
        path = data / name
        if not path.exists():
            continue
        try:
            conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
            try:
                for (text,) in conn.execute(sql):
                    # An outbox row may hold several records.
                    found.update(int(m.group(1)) for m in _SEQ.finditer(str(text)))
            finally:
                conn.close()
        except sqlite3.Error:
            continue
    return found


_SEQ = re.compile(r'"seq":\s*(\d+)')


def sandbox_limits(messages: str | None, telemetry_messages: str | None,
                   data_points: str | None, max_payload_bytes: int) -> Limits:
    """The stand-in's limits from the command line options; ValueError with the reason."""
    return Limits(messages=messages, telemetry_messages=telemetry_messages,
                  telemetry_data_points=data_points, max_payload_size=max_payload_bytes)
