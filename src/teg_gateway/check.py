"""``teg-gateway check``: a preflight check, one line per step, a fix hint on every failure.

Every step has its own timeout and the whole check stays within about ten seconds. It
changes nothing: no provisioning, no file written, the data directory is not created.
The credentials step opens one MQTT session with the saved credentials and closes it at
once; a gateway running with the same credentials may be pushed off for a moment by
ThingsBoard and reconnects by itself.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import ssl
import struct
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from teg_gateway.cloud import credentials
from teg_gateway.cloud.provision import device_name, is_common_device_name
from teg_gateway.config import ConfigError, Settings
from teg_gateway.mqttlink import tls_context

OK = "✓"
FAIL = "✗"
BUDGET_S = 10.0
STEP_TIMEOUT_S = 3.0
MIN_FREE_MB = 10.0
DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"
CONNACK_REASONS = {
    1: "unacceptable protocol version",
    2: "client identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
}


@dataclass
class Step:
    """The outcome of one step: ``ok``, what was found, and a fix when it failed."""

    name: str
    ok: bool
    detail: str
    hint: str = ""

    def lines(self) -> list[str]:
        out = [f"{OK if self.ok else FAIL} {self.name}: {self.detail}"]
        if not self.ok and self.hint:
            out.append(f"    fix: {self.hint}")
        return out


@dataclass
class Report:
    steps: list[Step] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(step.ok for step in self.steps)

    def lines(self) -> list[str]:
        out = [line for step in self.steps for line in step.lines()]
        failed = sum(1 for step in self.steps if not step.ok)
        out.append("all checks passed" if not failed else
                   f"{failed} check(s) failed; see the fix lines above")
        return out


class _Budget:
    def __init__(self, total_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._deadline = clock() + total_s

    def timeout(self, wanted: float = STEP_TIMEOUT_S) -> float:
        return max(0.0, min(wanted, self._deadline - self._clock()))


def run_check(load: Callable[[], Settings], budget_s: float = BUDGET_S) -> Report:
    """Run every step; ``load`` builds the settings (a ConfigError fails the first step)."""
    report = Report()
    try:
        settings = load()
    except ConfigError as exc:
        report.steps.append(Step("configuration", False, str(exc),
                                 "correct the setting named above (see the README's "
                                 "settings table)"))
        return report
    report.steps.append(Step("configuration", True, "valid"))
    budget = _Budget(budget_s)
    report.steps.append(check_data_dir(settings.data_dir))
    report.steps.append(check_free_disk(settings.data_dir))
    report.steps.extend(check_thingsboard(settings, budget))
    report.steps.append(check_local_broker(settings, budget))
    report.steps.append(check_controller(settings, budget))
    return report


# -- files -------------------------------------------------------------------------------


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def check_data_dir(data_dir: Path) -> Step:
    name = "data directory"
    if data_dir.is_dir():
        if _read_only_fs(data_dir):
            return Step(name, False, f"{data_dir} is on a read-only file system",
                        "remount it read-write or set TEG_DATA_PATH to a writable directory")
        if not os.access(data_dir, os.W_OK | os.X_OK):
            return Step(name, False, f"{data_dir} is not writable by user {_user()}",
                        f"chown {_user()} {data_dir} (or run the gateway as its owner)")
        return Step(name, True, f"{data_dir} is writable")
    if data_dir.exists():
        return Step(name, False, f"{data_dir} exists but is not a directory",
                    "set TEG_DATA_PATH to a directory")
    parent = _existing_ancestor(data_dir)
    if not parent.is_dir():
        return Step(name, False, f"{data_dir} does not exist and {parent} is not a directory",
                    "set TEG_DATA_PATH to a directory")
    if _read_only_fs(parent) or not os.access(parent, os.W_OK | os.X_OK):
        return Step(name, False, f"{data_dir} does not exist and cannot be created: {parent} "
                    "is not writable", f"mkdir -p {data_dir} and give it to user {_user()}")
    return Step(name, True, f"{data_dir} does not exist yet (not created by this check); "
                f"`run` creates it under {parent}: check the path for a typo")


def _user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def check_free_disk(data_dir: Path) -> Step:
    where = _existing_ancestor(data_dir)
    try:
        usage = shutil.disk_usage(where)
    except OSError as exc:
        return Step("free disk", False, f"cannot read the free space of {where}: "
                    f"{exc.strerror}", "check that the data directory's disk is mounted")
    free_mb = usage.free / 1048576
    text = f"{free_mb:,.1f} MiB free of {usage.total / 1048576:,.0f} MiB at {where}"
    if free_mb < MIN_FREE_MB:
        return Step("free disk", False, text,
                    f"free some space (at least {MIN_FREE_MB:g} MiB): old logs, "
                    "archive.max_mb, outbox.quota_mb")
    return Step("free disk", True, text)


# -- ThingsBoard -------------------------------------------------------------------------


def _in_thread(fn: Callable[[], Any], timeout: float) -> Any:
    """``fn()`` in a daemon thread; TimeoutError when it takes longer than ``timeout``."""
    result: list[Any] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError
    if error:
        raise error[0]
    return result[0]


def check_thingsboard(settings: Settings, budget: _Budget) -> list[Step]:
    tb = settings.thingsboard
    host, port = tb.host.strip(), tb.port
    if not host:
        return [Step("DNS", False, "no ThingsBoard host configured",
                     "set TB_HOST (or thingsboard.host, --tb-host)")]
    steps: list[Step] = []
    try:
        infos = _in_thread(lambda: socket.getaddrinfo(host, port, type=socket.SOCK_STREAM),
                           budget.timeout())
        addresses = sorted({str(info[4][0]) for info in infos})
        steps.append(Step("DNS", True, f"{host} is {', '.join(addresses[:3])}"))
    except TimeoutError:
        steps.append(Step("DNS", False, f"no answer for {host} in time",
                          "check the device's DNS servers (/etc/resolv.conf) and network"))
        return steps
    except (OSError, UnicodeError) as exc:
        steps.append(Step("DNS", False, f"cannot resolve {host!r}: {exc}",
                          "check TB_HOST for a typo, and the device's DNS and network"))
        return steps
    try:
        sock = socket.create_connection((host, port), timeout=max(budget.timeout(), 0.01))
    except TimeoutError:
        steps.append(Step("TCP", False, f"{host}:{port} did not answer in time",
                          "a firewall drops the connection, or the host is down; check "
                          "TB_PORT (ThingsBoard's MQTT over TLS is 8883)"))
        return steps
    except OSError as exc:
        steps.append(Step("TCP", False, f"{host}:{port}: {exc.strerror or exc}",
                          "check TB_PORT (ThingsBoard's MQTT over TLS is 8883) and that "
                          "ThingsBoard's MQTT transport listens there"))
        return steps
    steps.append(Step("TCP", True, f"connected to {host}:{port}"))
    stream: socket.socket = sock
    try:
        if tb.tls:
            tls_step, tls_sock = _tls_step(settings, sock, budget)
            steps.append(tls_step)
            if tls_sock is None:
                return steps
            stream = tls_sock
        else:
            steps.append(Step("TLS", True, "off (thingsboard.tls = false): plain MQTT, for "
                              "local tests only"))
        steps.append(_credentials_step(settings, stream, budget))
    finally:
        stream.close()
    return steps


def _tls_step(settings: Settings, sock: socket.socket,
              budget: _Budget) -> tuple[Step, ssl.SSLSocket | None]:
    tb = settings.thingsboard
    ca = tb.ca_cert or "the system's CA store"
    try:
        context = tls_context(tb.ca_cert or None)
        sock.settimeout(max(budget.timeout(), 0.01))
        tls_sock = context.wrap_socket(sock, server_hostname=tb.host.strip())
    except ssl.SSLCertVerificationError as exc:
        sock.close()
        return Step("TLS", False, f"server certificate not accepted with {ca}: "
                    f"{exc.verify_message or exc}",
                    "set THINGSBOARD_CA_CERT to the CA that signed ThingsBoard's "
                    "certificate, and TB_HOST to a name the certificate is for"), None
    except (OSError, ssl.SSLError) as exc:
        sock.close()
        return Step("TLS", False, f"handshake failed: {exc}",
                    "is TB_PORT the MQTT over TLS port (8883), not plain MQTT (1883)?"), None
    cert = tls_sock.getpeercert() or {}
    subject = _name(cert.get("subject", ()))
    expires = str(cert.get("notAfter", "unknown"))
    detail = f"server certificate {subject} verified with {ca}, valid until {expires}"
    try:
        left_days = (ssl.cert_time_to_seconds(expires) - time.time()) / 86400
        if left_days < 30:
            detail += f" (expires in {left_days:.0f} days)"
    except ValueError:
        pass
    return Step("TLS", True, detail), tls_sock


_SHORT_NAMES = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
                "countryName": "C", "localityName": "L", "stateOrProvinceName": "ST"}


def _name(rdns: Any) -> str:
    parts = [f"{_SHORT_NAMES.get(key, key)}={value}" for rdn in rdns for key, value in rdn]
    return ", ".join(parts) or "(no subject)"


def _mqtt_string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("!H", len(data)) + data


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def mqtt_connect(stream: socket.socket, client_id: str, username: str | None,
                 password: str | None, timeout: float) -> int:
    """Send an MQTT 3.1.1 CONNECT on ``stream``; the CONNACK return code (0 = accepted).

    A DISCONNECT follows an accepted CONNACK. OSError/TimeoutError when the server closes
    the connection or does not answer.
    """
    flags = 0x02  # clean session
    payload = _mqtt_string(client_id)
    if username is not None:
        flags |= 0x80
        payload += _mqtt_string(username)
        if password is not None:
            flags |= 0x40
            payload += _mqtt_string(password)
    variable = _mqtt_string("MQTT") + bytes([4, flags]) + struct.pack("!H", 30)
    body = variable + payload
    stream.settimeout(max(timeout, 0.01))
    stream.sendall(b"\x10" + _remaining_length(len(body)) + body)
    answer = b""
    while len(answer) < 4:
        chunk = stream.recv(4 - len(answer))
        if not chunk:
            raise ConnectionError("the server closed the connection without a CONNACK")
        answer += chunk
    if answer[0] != 0x20:
        raise ConnectionError(f"unexpected answer to CONNECT: {answer!r}")
    code = answer[3]
    if code == 0:
        with contextlib.suppress(OSError):
            stream.sendall(b"\xe0\x00")
    return code


def _credentials_step(settings: Settings, stream: socket.socket, budget: _Budget) -> Step:
    tb = settings.thingsboard
    path = settings.access_token_path
    try:
        creds = credentials.load(path, tighten=False)
    except credentials.CredentialsError as exc:
        return Step("credentials", False, str(exc),
                    f"delete {path} so the gateway provisions again, or write a valid "
                    "access token into it")
    if creds is None:
        name = device_name(tb.device_name)
        if not (tb.provision_device_key and tb.provision_device_secret):
            return Step("credentials", False, f"not provisioned ({path} missing) and no "
                        "provisioning key and secret",
                        "set THINGSBOARD_PROVISION_DEVICE_KEY and "
                        "THINGSBOARD_PROVISION_DEVICE_SECRET from the device profile, or "
                        f"put the device's access token in {path}")
        detail = (f"not provisioned yet; provisioning key and secret are set; the device "
                  f"will be named {name!r}")
        if is_common_device_name(name):
            detail += (", a host name many devices share: set THINGSBOARD_DEVICE_NAME to a "
                       "name unique to this device (see the README)")
        return Step("credentials", True, detail)
    client_id, username, password = creds.login(device_name(tb.device_name) + "-check")
    try:
        code = mqtt_connect(stream, client_id, username, password, budget.timeout())
    except (OSError, ConnectionError) as exc:
        return Step("credentials", False, f"no CONNACK: {exc}",
                    "the server closed the connection: check that TB_HOST:TB_PORT is "
                    "ThingsBoard's MQTT transport")
    if code == 0:
        if path.stat().st_mode & 0o077:
            return Step("credentials", False, f"{creds.describe()} accepted (CONNACK "
                        f"accepted), but {path} is readable by other users",
                        f"chmod 600 {path} (the gateway also does so at its next start)")
        return Step("credentials", True, f"{creds.describe()} from {path} accepted "
                    "(CONNACK accepted)")
    reason = CONNACK_REASONS.get(code, f"code {code}")
    return Step("credentials", False, f"CONNACK refused ({reason}): token revoked or wrong",
                f"check the device's credentials in ThingsBoard; to provision again, "
                f"delete {path} (the device must be deleted in ThingsBoard first)")


# -- local broker and controller ---------------------------------------------------------


def check_local_broker(settings: Settings, budget: _Budget) -> Step:
    local = settings.local_mqtt
    if not local.enabled:
        return Step("local broker", True, "disabled (local_mqtt.enabled = false)")
    where = f"{local.host}:{local.port}"
    try:
        with socket.create_connection((local.host, local.port),
                                      timeout=max(budget.timeout(2.0), 0.01)) as sock:
            code = mqtt_connect(sock, f"teg-gateway-check-{os.getpid()}", None, None,
                                budget.timeout(2.0))
    except (OSError, ConnectionError) as exc:
        return Step("local broker", False, f"{where}: {getattr(exc, 'strerror', None) or exc}",
                    "install and start mosquitto (apt-get install -y mosquitto), or set "
                    "local_mqtt.enabled = false; the gateway works without it")
    if code != 0:
        return Step("local broker", False, f"{where} refused the connection "
                    f"({CONNACK_REASONS.get(code, code)})",
                    "allow anonymous local connections on the device's broker")
    return Step("local broker", True, f"{where} answers")


def check_controller(settings: Settings, budget: _Budget) -> Step:
    ctl = settings.controller
    if ctl.runtime == "none":
        return Step("controller runtime", True, "none (the controller is started another way)")
    if ctl.runtime == "process":
        program = ctl.command[0]
        workdir = Path(ctl.workdir or settings.controller_data_dir)
        if "/" in program:
            path = Path(program) if Path(program).is_absolute() else workdir / program
            found = path.is_file() and os.access(path, os.X_OK)
            shown = str(path)
        else:
            found_at = shutil.which(program)
            found, shown = found_at is not None, found_at or program
        if found:
            return Step("controller runtime", True, f"process: {shown} found")
        if "/" in program and not Path(program).is_absolute():
            # A relative program may live in the active version's directory (after OTA).
            return Step("controller runtime", True, f"process: {program} (relative: looked "
                        "up in the active version's directory at start)")
        return Step("controller runtime", False, f"process: {program} not found",
                    "install it, or correct controller.command (a list of strings)")
    url = os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_HOST
    try:
        answer = _docker_ping(url, budget.timeout())
    except (OSError, ValueError) as exc:
        return Step("controller runtime", False, f"docker: {url} does not answer: {exc}",
                    "start the Docker engine (systemctl start docker) and make its socket "
                    "readable by the gateway's user (group docker)")
    if answer != "OK":
        return Step("controller runtime", False, f"docker: {url} answered {answer!r}",
                    "check the Docker engine (systemctl status docker)")
    return Step("controller runtime", True, f"docker: engine at {url} answers")


def _docker_ping(url: str, timeout: float) -> str:
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(max(timeout, 0.01))
        sock.connect(parsed.path)
    elif parsed.scheme in ("tcp", "http"):
        sock = socket.create_connection((parsed.hostname or "localhost", parsed.port or 2375),
                                        timeout=max(timeout, 0.01))
    else:
        raise ValueError(f"unsupported DOCKER_HOST {url!r}")
    with sock:
        sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
        data = b""
        while len(data) < 65536:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    _head, _sep, body = data.partition(b"\r\n\r\n")
    return body.decode(errors="replace").strip()
