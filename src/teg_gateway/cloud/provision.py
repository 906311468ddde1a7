"""Self-provisioning against ThingsBoard (MQTT provisioning API).

Runs once per device: if the credentials file exists, nothing is asked. Otherwise the
gateway connects as user ``provision``, asks for credentials, and writes the answer
durably (mode 0600) before using it. A wrong key or an existing device stops with the
server's message; no answer at all is retried with backoff, forever.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
import ssl
import time
from pathlib import Path
from typing import Any

from teg_gateway.backoff import Backoff
from teg_gateway.cloud import credentials as creds_mod
from teg_gateway.cloud import topics
from teg_gateway.cloud.credentials import Credentials, CredentialsError
from teg_gateway.config import Settings, ThingsBoardSettings
from teg_gateway.fsutil import fsync_dir
from teg_gateway.mqttlink import ConnectionLost, ConnectRefused, MqttConnection, tls_context

log = logging.getLogger(__name__)

# Host names many devices share (stock images): a fleet must not provision them all as one
# ThingsBoard device.
COMMON_DEVICE_NAMES = frozenset({
    "raspberrypi", "localhost", "localhost.localdomain", "ubuntu", "debian", "dietpi",
    "raspbian", "armbian", "orangepi", "rockpi", "beaglebone", "openwrt", "pi", "rpi"})


def is_common_device_name(name: str) -> bool:
    """Whether ``name`` is a host name many devices share (``raspberrypi``, ...)."""
    return name.strip().lower() in COMMON_DEVICE_NAMES


class ProvisionError(Exception):
    """ThingsBoard refused to provision this device; the message is the server's."""


def device_name(configured: str, hostname: str | None = None,
                rng: random.Random | None = None) -> str:
    """Flag or environment (already merged in ``configured``), then the host name, then
    ``teg-`` followed by 7 random digits."""
    if configured.strip():
        return configured.strip()
    host = (socket.gethostname() if hostname is None else hostname).strip()
    if host:
        return host
    return "teg-" + "".join((rng or random.Random()).choice("0123456789") for _ in range(7))


def cloud_tls(tb: ThingsBoardSettings) -> ssl.SSLContext | None:
    """The TLS context for ThingsBoard, or None when plain MQTT was chosen explicitly."""
    if not tb.tls:
        return None
    return tls_context(tb.ca_cert or None)


async def request_credentials(settings: Settings, name: str) -> dict[str, Any] | None:
    """One provisioning attempt; the answer, or None when there was none in time."""
    tb = settings.thingsboard
    answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def on_message(topic: str, payload: bytes) -> None:
        if topic == topics.PROVISION_RESPONSE and not answer.done():
            answer.set_result(payload)

    conn = MqttConnection(f"provision-{name}", username="provision", tls=cloud_tls(tb),
                          keepalive=tb.keepalive_s, on_message=on_message)
    try:
        await conn.connect(tb.host, tb.port, timeout=tb.provision_timeout_s)
        await conn.subscribe([topics.PROVISION_RESPONSE], timeout=tb.provision_timeout_s)
        request = {"deviceName": name, "provisionDeviceKey": tb.provision_device_key,
                   "provisionDeviceSecret": tb.provision_device_secret}
        await asyncio.wait_for(conn.publish(topics.PROVISION_REQUEST, json.dumps(request)),
                               tb.provision_timeout_s)
        payload = await asyncio.wait_for(answer, tb.provision_timeout_s)
    finally:
        await conn.close()
    try:
        value = json.loads(payload)
    except ValueError:
        raise ProvisionError(f"provisioning answer is not JSON: {payload[:200]!r}") from None
    if not isinstance(value, dict):
        raise ProvisionError(f"provisioning answer is not a JSON object: {payload[:200]!r}")
    return value


async def provision(settings: Settings, name: str) -> Credentials:
    """Ask ThingsBoard for credentials until it answers; raise ProvisionError on a refusal."""
    tb = settings.thingsboard
    if not tb.provision_device_key or not tb.provision_device_secret:
        raise ProvisionError(
            "no credentials file and no provisioning key/secret: set "
            "THINGSBOARD_PROVISION_DEVICE_KEY and THINGSBOARD_PROVISION_DEVICE_SECRET "
            f"(or put an access token in {settings.access_token_path})")
    if not tb.host:
        raise ProvisionError("no ThingsBoard host: set TB_HOST or --tb-host")
    backoff = Backoff(tb.reconnect_min_s, tb.reconnect_max_s)
    while True:
        log.info("provisioning device %r at %s:%d", name, tb.host, tb.port)
        try:
            answer = await request_credentials(settings, name)
        except (TimeoutError, ConnectionLost, ConnectRefused, OSError) as exc:
            level = logging.ERROR if isinstance(exc, ssl.SSLCertVerificationError) else \
                logging.WARNING
            log.log(level, "provisioning: no answer from %s:%d (%s)", tb.host, tb.port,
                    describe_error(exc))
            answer = None
        if answer is not None:
            status = answer.get("status")
            if status == "SUCCESS":
                try:
                    return creds_mod.from_provision_answer(answer)
                except CredentialsError as exc:
                    raise ProvisionError(str(exc)) from None
            message = answer.get("errorMsg") or "no error message"
            raise ProvisionError(f"ThingsBoard refused provisioning ({status}): {message}")
        delay = backoff.next_delay()
        log.info("provisioning: next attempt in %.1f s", delay)
        await asyncio.sleep(delay)


def move_aside(path: Path) -> Path:
    """Rename a damaged file to ``<name>.damaged-<UTC time>`` (nothing is deleted)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.damaged-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.damaged-{stamp}-{n}")
    path.rename(target)
    fsync_dir(path.parent)
    return target


async def ensure_credentials(settings: Settings) -> tuple[bool, Credentials]:
    """The saved credentials, provisioning first when there are none.

    Returns (created, credentials); new credentials are on disk before they are returned.
    """
    path: Path = settings.access_token_path
    try:
        existing = creds_mod.load(path)
    except creds_mod.CredentialsDamaged as exc:
        # Kept for the operator; a device that cannot log in is not reachable at all.
        moved = move_aside(path)
        log.error("%s; moved aside to %s; provisioning again", exc, moved.name)
        existing = None
    if existing is not None:
        return False, existing
    name = device_name(settings.thingsboard.device_name)
    if is_common_device_name(name):
        log.warning("device name %r is a host name many devices share: each of them would "
                    "ask for the same ThingsBoard device. Set THINGSBOARD_DEVICE_NAME to a "
                    "unique name (see the README)", name)
    creds = await provision(settings, name)
    creds_mod.save(path, creds)
    log.info("provisioned device %r: %s saved to %s", name, creds.describe(), path)
    return True, creds


def describe_error(exc: BaseException) -> str:
    """A short human explanation of a connection error."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS verification failed: {exc.verify_message or exc}"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    return str(exc) or type(exc).__name__
