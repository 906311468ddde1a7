"""A real mosquitto broker as a child process, for tests, benchmarks and the demo."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from teg_gateway.sandbox.certs import Pki

MOSQUITTO_FALLBACK_PATH = Path("/usr/sbin/mosquitto")
INSTALL_HINT = "install it with `apt-get install -y mosquitto`"

_USERNAME_IN_LOG = re.compile(r"New client connected from \S+ as (\S+) \([^)]*u'([^']*)'\)")


def find_mosquitto() -> Path | None:
    """The mosquitto binary on PATH, else /usr/sbin/mosquitto, else None."""
    found = shutil.which("mosquitto")
    if found:
        return Path(found)
    if MOSQUITTO_FALLBACK_PATH.is_file() and os.access(MOSQUITTO_FALLBACK_PATH, os.X_OK):
        return MOSQUITTO_FALLBACK_PATH
    return None


def mosquitto_available() -> bool:
    """Whether a mosquitto binary can be found."""
    return find_mosquitto() is not None


def free_tcp_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct TCP ports that were free on `host` a moment ago."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class Mosquitto:
    """A mosquitto broker with a plain listener and (given a PKI) a TLS listener on 127.0.0.1.

    Ports are chosen once, at construction, and kept across stop/start so that
    clients can reconnect after a simulated outage.
    """

    host = "127.0.0.1"
    tls_hostname = "localhost"

    def __init__(self, workdir: Path, pki: Pki | None = None) -> None:
        binary = find_mosquitto()
        if binary is None:
            raise RuntimeError(f"mosquitto is not installed; {INSTALL_HINT}")
        self._binary = binary
        self.workdir = workdir
        self.pki = pki
        workdir.mkdir(parents=True, exist_ok=True)
        ports = free_tcp_ports(2 if pki else 1, self.host)
        self._plain_port = ports[0]
        self._tls_port = ports[1] if pki else None
        self.config_path = workdir / "mosquitto.conf"
        self.log_path = workdir / "mosquitto.log"
        self.output_path = workdir / "mosquitto.out"
        self._process: subprocess.Popen[bytes] | None = None
        self._paused = False

    @property
    def plain_port(self) -> int:
        """Port of the plain (unencrypted) MQTT listener."""
        return self._plain_port

    @property
    def tls_port(self) -> int:
        """Port of the TLS listener; RuntimeError when the broker has no PKI."""
        if self._tls_port is None:
            raise RuntimeError("this broker has no TLS listener (constructed without a Pki)")
        return self._tls_port

    @property
    def running(self) -> bool:
        """Whether the broker process is alive (paused counts as running)."""
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """Process id of the running broker, if any."""
        return self._process.pid if self.running and self._process else None

    def start(self, timeout: float = 10.0) -> None:
        """Start the broker and wait until every listener accepts TCP connections."""
        if self.running:
            return
        self.config_path.write_text(self._config_text())
        with self.output_path.open("ab") as output:
            self._process = subprocess.Popen(
                [str(self._binary), "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._paused = False
        deadline = time.monotonic() + timeout
        pending = [self._plain_port] + ([self._tls_port] if self._tls_port else [])
        while pending:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"mosquitto exited with status {self._process.returncode} while starting\n"
                    + self.log_tail()
                )
            if _accepts_connections(self.host, pending[0]):
                pending.pop(0)
                continue
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(
                    f"mosquitto did not listen on port {pending[0]} within {timeout:.0f} s\n"
                    + self.log_tail()
                )
            time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the broker with SIGTERM, falling back to SIGKILL after `timeout` seconds."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            if self._paused:
                process.send_signal(signal.SIGCONT)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._process = None
        self._paused = False

    def kill(self) -> None:
        """Kill the broker with SIGKILL (an abrupt outage) and reap it."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.kill()
            process.wait()
        self._process = None
        self._paused = False

    def pause(self) -> None:
        """Freeze the broker (SIGSTOP): connections stay open but nothing is answered."""
        if self._process is None or not self.running:
            raise RuntimeError("the broker is not running")
        self._process.send_signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """Unfreeze a paused broker (SIGCONT)."""
        if self._process is not None and self.running:
            self._process.send_signal(signal.SIGCONT)
        self._paused = False

    def restart(self) -> None:
        """Stop and start again on the same ports."""
        self.stop()
        self.start()

    def log_text(self) -> str:
        """The broker's log file (all runs)."""
        parts = []
        for path in (self.output_path, self.log_path):
            with contextlib.suppress(FileNotFoundError):
                parts.append(path.read_text(errors="replace"))
        return "".join(parts)

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the broker's output and log file, for error messages."""
        tail = self.log_text().splitlines()[-lines:]
        return "mosquitto log tail:\n" + "\n".join(tail)

    def connected_usernames(self) -> list[tuple[str, str]]:
        """(client id, user name) of every connection the log shows, oldest first."""
        return _USERNAME_IN_LOG.findall(self.log_text())

    def __enter__(self) -> Mosquitto:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _config_text(self) -> str:
        lines = [
            "per_listener_settings false",
            "allow_anonymous true",
            "persistence false",
            f"log_dest file {self.log_path}",
            "log_type all",
            "connection_messages true",
            "log_timestamp true",
        ]
        if os.geteuid() == 0:
            # As root, mosquitto would otherwise switch to the `mosquitto` user,
            # which cannot read the sandbox's key or write its log.
            lines.append("user root")
        lines.append(f"listener {self._plain_port} {self.host}")
        if self.pki is not None:
            lines += [
                f"listener {self._tls_port} {self.host}",
                f"cafile {self.pki.ca_cert}",
                f"certfile {self.pki.server_cert}",
                f"keyfile {self.pki.server_key}",
            ]
        return "\n".join(lines) + "\n"


def _accepts_connections(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False
