"""Device credentials: read from and written to the access token file (mode 0600).

An access token is stored as plain text, as the original gateway did, so an existing
token file keeps working. MQTT_BASIC credentials are stored as a JSON object.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from teg_gateway.fsutil import atomic_write

log = logging.getLogger(__name__)

ACCESS_TOKEN = "ACCESS_TOKEN"
MQTT_BASIC = "MQTT_BASIC"


class CredentialsError(Exception):
    """The credentials file or a provisioning answer cannot be used."""


@dataclass(frozen=True)
class Credentials:
    kind: str
    token: str = ""
    client_id: str = ""
    username: str = ""
    password: str = ""

    def login(self, fallback_client_id: str) -> tuple[str, str, str | None]:
        """(client id, user name, password) for the MQTT CONNECT."""
        if self.kind == ACCESS_TOKEN:
            return fallback_client_id, self.token, None
        return self.client_id or fallback_client_id, self.username, self.password or None

    def describe(self) -> str:
        if self.kind == ACCESS_TOKEN:
            return "access token"
        return f"MQTT basic credentials (client id {self.client_id!r}, user {self.username!r})"


def from_provision_answer(answer: dict[str, Any]) -> Credentials:
    """Credentials from a SUCCESS answer of ThingsBoard's provisioning API."""
    kind = answer.get("credentialsType", ACCESS_TOKEN)
    value = answer.get("credentialsValue")
    if kind == ACCESS_TOKEN:
        if not isinstance(value, str) or not value.strip():
            raise CredentialsError("provisioning answer has no access token")
        return Credentials(ACCESS_TOKEN, token=value.strip())
    if kind == MQTT_BASIC:
        if not isinstance(value, dict):
            raise CredentialsError("provisioning answer has no MQTT_BASIC credentials object")
        return Credentials(MQTT_BASIC, client_id=str(value.get("clientId") or ""),
                           username=str(value.get("userName") or ""),
                           password=str(value.get("password") or ""))
    raise CredentialsError(f"provisioning answer has unsupported credentials type {kind!r}")


def save(path: Path, creds: Credentials) -> None:
    """Write the credentials durably with mode 0600."""
    if creds.kind == ACCESS_TOKEN:
        data = creds.token.encode() + b"\n"
    else:
        data = json.dumps({"credentialsType": MQTT_BASIC, "clientId": creds.client_id,
                           "userName": creds.username, "password": creds.password}).encode()
    atomic_write(path, data, mode=0o600)


class CredentialsDamaged(CredentialsError):
    """The credentials file holds bytes no credentials have (not UTF-8, control bytes)."""


def load(path: Path, tighten: bool = True) -> Credentials | None:
    """The saved credentials, or None when the file does not exist.

    ``tighten``: a file readable by others is set to mode 0600 (off for read-only tools).
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CredentialsError(f"cannot read credentials file {path}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CredentialsDamaged(f"credentials file {path} is damaged (not UTF-8)") from None
    if not text.isprintable():
        raise CredentialsDamaged(f"credentials file {path} is damaged (control characters)")
    if tighten:
        _tighten_mode(path)
    if not text:
        raise CredentialsError(f"credentials file {path} is empty; delete it to provision again")
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except ValueError:
            raise CredentialsError(f"credentials file {path} is not valid JSON") from None
        if not isinstance(value, dict) or value.get("credentialsType") != MQTT_BASIC:
            raise CredentialsError(f"credentials file {path} holds an unknown JSON object")
        return Credentials(MQTT_BASIC, client_id=str(value.get("clientId") or ""),
                           username=str(value.get("userName") or ""),
                           password=str(value.get("password") or ""))
    if not text.isascii() or any(c.isspace() for c in text):
        raise CredentialsDamaged(f"credentials file {path} is damaged (not an access token)")
    return Credentials(ACCESS_TOKEN, token=text)


def _tighten_mode(path: Path) -> None:
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            os.chmod(path, 0o600)
            log.warning("credentials file %s was readable by others (mode %o); set to 0600",
                        path, mode)
    except OSError:
        pass
