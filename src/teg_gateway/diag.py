"""``teg-gateway diag``: a support bundle (.tar.gz) an operator can attach to a question.

It holds the ``status`` output, the effective configuration with every secret redacted,
the last lines of the gateway's and the controller's logs, versions, database sizes and
row counts, disk and memory, and the output of ``check``. It works with the gateway
running or stopped, and offline. Databases are opened read-only, one short query each,
so the controller's queue is never locked for long.

Secrets never enter the bundle: settings that hold one are replaced by ``<redacted>``,
the token file's content is never read into it, and as a last guard every known secret
value (provisioning key and secret, token, password, controller environment values) is
replaced in every member before it is written.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import platform
import re
import shutil
import socket
import sqlite3
import subprocess
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from teg_gateway import __version__
from teg_gateway.check import run_check
from teg_gateway.cloud import credentials
from teg_gateway.config import Settings
from teg_gateway.controller.queue import QUEUE_FILE
from teg_gateway.controller.runtime import LOG_FILE_NAME as CONTROLLER_LOG_FILE
from teg_gateway.operations.logs_rpc import LogQuery, rotated_files, tail
from teg_gateway.status import status_lines
from teg_gateway.store.stores import ARCHIVE_FILE, OUTBOX_FILE

REDACTED = "<redacted>"
MIN_GUESSED_SECRET = 6
LOG_LINES = 1000
# Setting names whose value is a secret (paths to secrets, like access_token_file, are not).
SECRET_SETTINGS = frozenset({"provision_device_key", "provision_device_secret"})
SECRET_NAME = re.compile(r"(SECRET|PASSWORD|PASSWD|TOKEN|KEY|CREDENTIAL)", re.IGNORECASE)
# Environment variables whose value is a path, not a secret.
PATH_VARIABLES = frozenset({"THINGSBOARD_ACCESS_TOKEN", "THINGSBOARD_CA_CERT"})
ENV_PREFIXES = ("TB_", "THINGSBOARD_", "TEG_", "LOG_LEVEL", "DOCKER_HOST")


def write_bundle(settings: Settings, load: Callable[[], Settings], output: Path | None,
                 run_checks: bool = True) -> Path:
    """Write the bundle; returns its path."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = output or Path.cwd() / f"teg-gateway-diag-{socket.gethostname()}-{stamp}.tar.gz"
    members = collect(settings, load, run_checks)
    secrets = secret_values(settings)
    prefix = f"teg-gateway-diag-{stamp}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as bundle:
        for name, text in members.items():
            data = scrub(text, secrets).encode()
            info = tarfile.TarInfo(f"{prefix}/{name}")
            info.size = len(data)
            info.mtime = int(time.time())
            info.mode = 0o600
            bundle.addfile(info, io.BytesIO(data))
    return path


def collect(settings: Settings, load: Callable[[], Settings],
            run_checks: bool) -> dict[str, str]:
    """Member name -> text. Each part that fails says why instead of failing the bundle."""
    parts: dict[str, Callable[[], str]] = {
        "status.txt": lambda: _status(settings),
        "config.json": lambda: json.dumps(redacted_settings(settings), indent=2) + "\n",
        "environment.txt": _environment,
        "versions.txt": _versions,
        "databases.txt": lambda: _databases(settings),
        "system.txt": lambda: _system(settings),
        "gateway.log": lambda: _log_tail(settings.log_file),
        "controller.log": lambda: _log_tail(settings.controller_logs_dir
                                            / CONTROLLER_LOG_FILE),
        "check.txt": (lambda: "\n".join(run_check(load).lines()) + "\n") if run_checks
        else (lambda: "not run (--no-check)\n"),
    }
    members = {}
    for name, make in parts.items():
        try:
            members[name] = make()
        except Exception as exc:  # a part that cannot be made must not stop the others
            members[name] = f"could not be collected: {type(exc).__name__}: {exc}\n"
    return members


def secret_values(settings: Settings) -> list[str]:
    """Every secret value known to the gateway, longest first."""
    tb = settings.thingsboard
    values = {tb.provision_device_key, tb.provision_device_secret}
    # Values only guessed to be secret must be long enough not to blank out ordinary
    # words ("true", "1") everywhere in the bundle.
    guessed = set(settings.controller.env.values())
    for name, value in os.environ.items():
        if SECRET_NAME.search(name) and name not in PATH_VARIABLES:
            guessed.add(value)
    values |= {value for value in guessed if len(value) >= MIN_GUESSED_SECRET}
    try:
        creds = credentials.load(settings.access_token_path, tighten=False)
    except (credentials.CredentialsError, OSError):
        creds = None
    if creds is not None:
        values |= {creds.token, creds.password, creds.username}
    try:
        raw = settings.access_token_path.read_text(errors="replace").strip()
        values.add(raw)
    except OSError:
        pass
    return sorted((v for v in values if v and len(v) >= 4), key=len, reverse=True)


def scrub(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    return text


def redacted_settings(settings: Settings) -> dict[str, Any]:
    values = dataclasses.asdict(settings)
    for section in values.values():
        for name in list(section):
            if name in SECRET_SETTINGS and section[name]:
                section[name] = REDACTED
    env = values["controller"]["env"]
    values["controller"]["env"] = dict.fromkeys(env, REDACTED)
    return values


def _status(settings: Settings) -> str:
    if not settings.data_dir.is_dir():
        return f"data directory {settings.data_dir} does not exist\n"
    return "\n".join(status_lines(settings)) + "\n"


def _environment() -> str:
    lines = []
    for name in sorted(os.environ):
        if not name.startswith(ENV_PREFIXES):
            continue
        value = os.environ[name]
        if SECRET_NAME.search(name) and name not in PATH_VARIABLES:
            value = REDACTED if value else ""
        lines.append(f"{name}={value}")
    return "\n".join(lines) + "\n" if lines else "no gateway variables set\n"


def _versions() -> str:
    lines = [f"teg-gateway {__version__}",
             f"python {platform.python_version()} ({platform.python_implementation()})",
             f"sqlite {sqlite3.sqlite_version}",
             f"platform {platform.platform()} {platform.machine()}"]
    try:
        release = Path("/etc/os-release").read_text()
        pretty = re.search(r'^PRETTY_NAME="?([^"\n]*)"?', release, re.MULTILINE)
        if pretty:
            lines.append(f"os {pretty.group(1)}")
    except OSError:
        pass
    docker = shutil.which("docker")
    if docker is None:
        lines.append("docker: not installed")
    else:
        try:
            result = subprocess.run([docker, "version", "--format",
                                     "{{.Client.Version}} / engine {{.Server.Version}}"],
                                    capture_output=True, text=True, timeout=5, check=False)
            out = (result.stdout or result.stderr).strip().splitlines()
            lines.append(f"docker {out[0] if out else 'no answer'}")
        except (OSError, subprocess.TimeoutExpired) as exc:
            lines.append(f"docker: {exc}")
    return "\n".join(lines) + "\n"


def _count(path: Path, queries: dict[str, str]) -> list[str]:
    if not path.exists():
        return [f"{path}: does not exist"]
    size = sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())
    lines = [f"{path}: {size / 1048576:.2f} MiB (with its WAL)"]
    try:
        # Read-only, and a reader in WAL mode never blocks the writer; a short busy
        # timeout so a locked file costs a second, not the bundle.
        conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, timeout=1.0)
        try:
            for label, sql in queries.items():
                try:
                    lines.append(f"  {label}: {conn.execute(sql).fetchone()[0]}")
                except sqlite3.Error as exc:
                    lines.append(f"  {label}: {exc}")
        finally:
            conn.close()
    except sqlite3.Error as exc:
        lines.append(f"  cannot be opened: {exc}")
    return lines


def _databases(settings: Settings) -> str:
    lines = _count(settings.data_dir / OUTBOX_FILE, {
        "outbox rows": "SELECT count(*) FROM outbox",
        "outbox records": "SELECT coalesce(sum(records), count(*)) FROM outbox",
        "dead letters": "SELECT count(*) FROM dead_letter",
        "counters": "SELECT group_concat(name || '=' || value, ', ') FROM counters"})
    lines += _count(settings.data_dir / ARCHIVE_FILE,
                    {"archive rows": "SELECT count(*) FROM records"})
    lines += _count(settings.controller_data_dir / QUEUE_FILE,
                    {"controller queue rows": "SELECT count(*) FROM messages"})
    return "\n".join(lines) + "\n"


def _system(settings: Settings) -> str:
    lines = [f"host {socket.gethostname()}",
             f"time {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}"]
    where = settings.data_dir if settings.data_dir.exists() else Path("/")
    usage = shutil.disk_usage(where)
    lines.append(f"disk at {where}: {usage.free / 1048576:,.0f} MiB free of "
                 f"{usage.total / 1048576:,.0f} MiB")
    try:
        meminfo = dict(line.split(":", 1) for line in
                       Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        lines.append(f"memory: {meminfo.get('MemAvailable', '?').strip()} available of "
                     f"{meminfo.get('MemTotal', '?').strip()}")
    except OSError:
        pass
    try:
        lines.append(f"load average: {Path('/proc/loadavg').read_text().strip()}")
        uptime_s = float(Path("/proc/uptime").read_text().split()[0])
        lines.append(f"uptime: {uptime_s / 3600:.1f} h")
    except (OSError, ValueError):
        pass
    return "\n".join(lines) + "\n"


def _log_tail(path: Path | None) -> str:
    if path is None:
        return "no log file (logging.file is empty)\n"
    files = rotated_files(path)
    if not files:
        return f"no log at {path}\n"
    lines, _stopped = tail(files, LogQuery("", LOG_LINES, None, ""))
    return f"# last {len(lines)} lines of {path}\n" + "\n".join(lines) + "\n"
