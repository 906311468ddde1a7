"""``teg-gateway sandbox``: the whole chain on one machine, no ThingsBoard server needed.

The ThingsBoard stand-in (an MQTT server with TLS, optionally rate limited) + mosquitto as
the device's local broker + the sample controller + the real gateway as a child process.
The gateway provisions itself, forwards what the controller writes and answers an RPC; at
the end the run shows what "ThingsBoard" received and checks, record by record, that
nothing was lost.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

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


def _say(text: str) -> None:
    print(text, flush=True)


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
        controller_log = (workdir / "controller.log").open("w")
        controller = subprocess.Popen(
            [sys.executable, "-m", "teg_gateway.sandbox.controller", "--data", str(data),
             "--rate", str(rate), "--count", str(count)],
            stdout=controller_log, stderr=subprocess.STDOUT)
        config = SANDBOX_CONFIG + (f"\n[local_mqtt]\nenabled = true\nhost = \"{broker.host}\"\n"
                                   f"port = {broker.plain_port}\n")
        gateway = GatewayProcess(workdir / "gateway", env, config)
        try:
            gateway.start()
            _say(f"sample controller: writing {count} CO2 records at {rate:g}/s; "
                 f"gateway pid {gateway.pid} (log {workdir / 'gateway' / 'gateway.log'})")
            deadline = time.monotonic() + seconds + 60
            while time.monotonic() < deadline:
                received = len(tb.telemetry_values("seq"))
                _say(f"  ThingsBoard has {received}/{count} records")
                if controller.poll() is not None and received >= count:
                    break
                time.sleep(1.0)
            rpc = tb.rpc("ping", timeout=10)
            _say(f"RPC ping answered: {json.dumps(rpc)}")
            rc = gateway.stop()
        finally:
            if controller.poll() is None:
                controller.terminate()
                controller.wait(10)
            controller_log.close()
            if gateway.running:
                gateway.kill()
        return _report(tb, count, rc, workdir, env)


def _report(tb: FakeThingsBoard, count: int, gateway_rc: int, workdir: Path,
            env: dict[str, str]) -> int:
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
    ok = not missing and gateway_rc == 0
    _say("")
    _say("OK: every record reached ThingsBoard" if ok else
         f"PROBLEM: {len(missing)} records missing (first: {missing[:10]}), "
         f"gateway exit code {gateway_rc}")
    return 0 if ok else 1


def sandbox_limits(messages: str | None, telemetry_messages: str | None,
                   data_points: str | None, max_payload_bytes: int) -> Limits:
    """The stand-in's limits from the command line options; ValueError with the reason."""
    return Limits(messages=messages, telemetry_messages=telemetry_messages,
                  telemetry_data_points=data_points, max_payload_size=max_payload_bytes)
