"""systemd's notification protocol (``Type=notify``) and its watchdog, standard library only.

When systemd starts a ``Type=notify`` service it sets ``NOTIFY_SOCKET`` to the address of a
Unix datagram socket; the service sends newline-separated ``KEY=VALUE`` datagrams to it:
``READY=1`` once it works, ``STATUS=...`` for ``systemctl status``, ``WATCHDOG=1`` at least
every ``WATCHDOG_USEC`` (else systemd kills and restarts it) and ``STOPPING=1`` when it
shuts down. An address starting with ``@`` is an abstract socket (a leading NUL byte).
Without ``NOTIFY_SOCKET`` every call here does nothing.

The watchdog pings come from a task on the gateway's event loop, so a hung loop stops
them and systemd restarts the gateway.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping

log = logging.getLogger(__name__)

#: At most one STATUS= datagram per this many seconds.
STATUS_PERIOD_S = 1.0
#: How often the status is read to see whether it changed. Reading it counts the outbox
#: rows (about 18 ms per million rows on a 2-core x86 VM, several times that on a Pi), so
#: not at every loop tick.
STATUS_POLL_S = 5.0
#: The variables systemd sets for the service; removed from the environment once read so
#: children (the controller, the reboot command) do not talk to systemd in our name.
ENV_NAMES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def socket_address(value: str) -> str | bytes | None:
    """The address to send to for a ``NOTIFY_SOCKET`` value, or None if unusable.

    ``/path`` is a file system socket, ``@name`` an abstract one (leading NUL byte)."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    return None


def watchdog_interval_s(env: Mapping[str, str], pid: int) -> float | None:
    """Seconds between watchdog pings (half of ``WATCHDOG_USEC``), or None when systemd
    expects none from this process (unset, invalid, or ``WATCHDOG_PID`` names another)."""
    usec = env.get("WATCHDOG_USEC", "")
    watchdog_pid = env.get("WATCHDOG_PID", "")
    if watchdog_pid:
        try:
            if int(watchdog_pid) != pid:
                return None
        except ValueError:
            return None
    try:
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    return value / 2 / 1_000_000


class Notifier:
    """Tells systemd how the gateway is doing. Every method is safe to call without
    systemd: it then does nothing. Sending never blocks and never raises."""

    def __init__(self, address: str | bytes | None, watchdog_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.address = address
        self.watchdog_s = watchdog_s
        self._clock = clock
        self._sleep = sleep
        self._sock: socket.socket | None = None
        self._last_status: str | None = None
        self._status_sent_at = -STATUS_PERIOD_S
        self._failed = False
        self.sent = 0

    @classmethod
    def from_environment(cls, env: MutableMapping[str, str] | None = None,
                         unset: bool = True) -> Notifier:
        """A notifier for the variables systemd set; ``unset`` removes them from ``env``."""
        env = os.environ if env is None else env
        raw = env.get("NOTIFY_SOCKET", "")
        address = socket_address(raw) if raw else None
        if raw and address is None:
            log.warning("NOTIFY_SOCKET=%r is not a Unix socket address; not notifying systemd",
                        raw)
        watchdog = watchdog_interval_s(env, os.getpid()) if address is not None else None
        if unset:
            for name in ENV_NAMES:
                env.pop(name, None)
        return cls(address, watchdog)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """Send ``KEY=VALUE`` fields in one datagram; False if not sent."""
        if self.address is None:
            return False
        message = "\n".join(fields).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.setblocking(False)
            self._sock.sendto(message, self.address)
        except OSError as exc:
            if not self._failed:  # once, not at every watchdog ping
                log.warning("cannot notify systemd at %r: %s", self.address, exc)
                self._failed = True
            return False
        self._failed = False
        self.sent += 1
        return True

    def ready(self, status: str | None = None) -> None:
        """The gateway works: systemd considers the service started."""
        self.send("READY=1", *([f"STATUS={status}"] if status else []))
        if status:
            self._remember_status(status)

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=shutting down")
        self._remember_status("shutting down")

    def ping(self) -> None:
        """One watchdog keep-alive."""
        self.send("WATCHDOG=1")

    def status(self, text: str) -> bool:
        """Send ``STATUS=text`` if it changed, at most once per STATUS_PERIOD_S; True if sent."""
        text = " ".join(text.split())  # one line
        if text == self._last_status or self.address is None:
            return False
        if self._clock() - self._status_sent_at < STATUS_PERIOD_S:
            return False
        if self.send(f"STATUS={text}"):
            self._remember_status(text)
            return True
        return False

    def _remember_status(self, text: str) -> None:
        self._last_status = text
        self._status_sent_at = self._clock()

    async def run(self, describe: Callable[[], str],
                  status_poll_s: float = STATUS_POLL_S) -> None:
        """Ping the watchdog every ``watchdog_s`` and send the status ``describe`` gives
        when it changed (read every ``status_poll_s``); runs until cancelled."""
        if self.address is None:
            return
        # A timer may fire a hair early: such a wake-up counts as on time (no extra sleep).
        slack = 0.01
        next_ping = next_status = self._clock()
        while True:
            now = self._clock()
            if self.watchdog_s is not None and now + slack >= next_ping:
                self.ping()
                next_ping = now + self.watchdog_s
            if now + slack >= next_status:
                next_status = now + status_poll_s
                try:
                    self.status(describe())
                except Exception as exc:  # an unreadable status must not stop the pings
                    log.debug("systemd status not available: %s", exc)
            wake = next_status if self.watchdog_s is None else min(next_status, next_ping)
            await self._sleep(max(0.0, wake - self._clock()))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def status_line(values: Mapping[str, object]) -> str:
    """The one-line STATUS= text from the gateway's status values: connection state,
    outbox depth, controller state (nothing that changes at every call, like uptime)."""
    return (f"ThingsBoard: {values.get('thingsboard')}; "
            f"outbox: {values.get('outbox_depth')} waiting; "
            f"controller: {values.get('controller')}")


def start_condition(argv: list[str] | None = None,
                    env: Mapping[str, str] | None = None) -> int:
    """The unit's ``ExecCondition=``: 0 (start) when the settings name a ThingsBoard host,
    1 (skip, not a failure) when they do not yet. A configuration that does not load
    answers 0 too, so the gateway itself starts and reports the error."""
    import argparse  # noqa: PLC0415 (only for this entry point)
    import sys  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    from teg_gateway.config import ConfigError, load_settings  # noqa: PLC0415

    parser = argparse.ArgumentParser(
        prog="python -m teg_gateway.systemd",
        description="Exit 0 if the gateway's settings name a ThingsBoard host, else 1.")
    parser.add_argument("--config", type=Path, default=None, metavar="PATH")
    args = parser.parse_args(argv)
    env = os.environ if env is None else env
    try:
        settings = load_settings(args.config, env, require_data=False)
    except ConfigError:
        return 0
    if settings.thingsboard.host.strip():
        return 0
    where = f" (or thingsboard.host in {args.config})" if args.config else ""
    print(f"teg-gateway: not starting: no ThingsBoard host configured yet; set TB_HOST in "
          f"the environment file{where}, then: systemctl restart teg-gateway",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(start_condition())
