"""One typed settings object built from defaults, a TOML file, the environment and flags.

Precedence: flag > environment > file > default. Every setting lives in a section
dataclass; its metadata names the environment variable (if any) and says what it
is for, so the README's table and the validation come from one place.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import shlex
import ssl
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from teg_gateway.cloud.limits import LimitsError, parse_rate_limit

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL")
LOG_LEVELS_TEXT = "DEBUG, INFO, WARNING (or WARN), ERROR or CRITICAL"
DATA_LOG_FILE = "<data>/logs/gateway.log"


class ConfigError(Exception):
    """A setting is missing or wrong; the message names it and says why."""


def setting(default: Any, doc: str, env: str | None = None, check: str | None = None) -> Any:
    """Declare one setting: its default, a one-line description, its environment variable
    and an optional check (``port``, ``positive``, ``non_negative``, ``level``)."""
    return field(default=default, metadata={"doc": doc, "env": env, "check": check})


def list_setting(default: list[str], doc: str) -> Any:
    return field(default_factory=lambda: list(default), metadata={"doc": doc, "env": None,
                                                                  "check": None})


@dataclass
class ThingsBoardSettings:
    host: str = setting("", "ThingsBoard MQTT host", env="TB_HOST")
    port: int = setting(8883, "ThingsBoard MQTT port (TLS)", env="TB_PORT", check="port")
    device_name: str = setting(
        "", "device name used for provisioning (default: host name, else teg-NNNNNNN)",
        env="THINGSBOARD_DEVICE_NAME")
    provision_device_key: str = setting(
        "", "provisioning key of the device profile", env="THINGSBOARD_PROVISION_DEVICE_KEY")
    provision_device_secret: str = setting(
        "", "provisioning secret of the device profile",
        env="THINGSBOARD_PROVISION_DEVICE_SECRET")
    ca_cert: str = setting("", "CA bundle that verifies the server (default: system store)",
                           env="THINGSBOARD_CA_CERT")
    access_token_file: str = setting(
        "", "path of the file holding the device credentials (default <data>/tb_access_token)",
        env="THINGSBOARD_ACCESS_TOKEN")
    tls: bool = setting(True, "TLS with server verification; false = plain MQTT, for local "
                              "tests only (logged loudly)")
    keepalive_s: int = setting(60, "MQTT keepalive in seconds", check="positive")
    reconnect_min_s: float = setting(1.0, "first reconnect delay", check="positive")
    reconnect_max_s: float = setting(60.0, "reconnect delay cap", check="positive")
    provision_timeout_s: float = setting(10.0, "wait for a provisioning answer before retrying",
                                         check="positive")
    rate_limits_messages: str = setting(
        "", "messages limit (N:S,N:S = N per S seconds, every window at once) used when the "
            "server does not answer getSessionLimits; empty = none", check="rate_limits")
    rate_limits_telemetry_messages: str = setting(
        "", "telemetry messages limit (N:S,...) used when the server does not answer "
            "getSessionLimits; empty = none", check="rate_limits")
    rate_limits_telemetry_data_points: str = setting(
        "", "telemetry data points limit (N:S,...; one point per key of each record) used "
            "when the server does not answer getSessionLimits; empty = none",
        check="rate_limits")
    max_payload_bytes: int = setting(65536, "the server's largest accepted publish, used when "
                                            "it does not answer getSessionLimits",
                                     check="server_payload")


@dataclass
class PathSettings:
    data: str = setting("", "gateway data directory (databases, state); required",
                        env="TEG_DATA_PATH")
    controller_data: str = setting("", "controller data directory (its queue db); "
                                       "default: the data directory",
                                   env="TEG_CONTROLLER_DATA_PATH")
    controller_logs: str = setting("", "controller logs (default <controller data>/logs)",
                                   env="TEG_CONTROLLER_LOGS_PATH")
    controller_git: str = setting("", "controller git repository (docker runtime)",
                                  env="TEG_CONTROLLER_GIT_PATH")
    controller_dockercontext: str = setting("", "docker build context (default <git>/docker)",
                                            env="TEG_CONTROLLER_DOCKERCONTEXT_PATH")
    controller_dockerfile: str = setting("./Dockerfile", "Dockerfile inside the build context",
                                         env="TEG_CONTROLLER_DOCKERFILE_PATH")


@dataclass
class OutboxSettings:
    max_payload_bytes: int = setting(49152, "largest telemetry publish in bytes (ThingsBoard "
                                            "closes the connection above 65536)",
                                     check="payload")
    max_inflight: int = setting(8, "publishes awaiting PUBACK at once", check="positive")
    puback_timeout_s: float = setting(30.0, "a publish without PUBACK after this long is "
                                            "treated as lost: reconnect and send again",
                                      check="positive")
    quota_mb: float = setting(512.0, "disk quota of the outbox; when full the oldest telemetry "
                                     "is dropped (it stays in the archive)", check="positive")
    dead_letters_mb: float = setting(8.0, "cap of the dead letters (records that can never be "
                                          "sent), outside the quota; the oldest are removed "
                                          "above it", check="positive")


@dataclass
class QueueSettings:
    poll_interval_ms: int = setting(20, "how often the controller queue is checked where "
                                    "its changes cannot be watched (no inotify)",
                                    check="positive")
    batch_size: int = setting(5000, "rows moved per transaction", check="positive")


@dataclass
class ArchiveSettings:
    retention_days: float = setting(30.0, "records older than this (counted back from the "
                                          "newest record, with a plausible clock) are removed",
                                    check="positive")
    max_mb: float = setting(1024.0, "size cap; the oldest records are removed above it",
                            check="positive")
    min_free_mb: float = setting(64.0, "free disk to keep on the data directory's file system: "
                                       "below it the archive gives up its oldest records "
                                       "(0: never)", check="non_negative")


@dataclass
class LoggingSettings:
    level: str = setting("INFO", "log level on stdout", env="LOG_LEVEL", check="level")
    cloud_level: str = setting("WARNING", "records at or above this level also go to "
                                          "ThingsBoard as telemetry", check="level")
    cloud_per_minute: int = setting(60, "at most this many log records a minute go to "
                                        "ThingsBoard", check="positive")
    cloud_burst: int = setting(20, "short bursts allowed above the per-minute rate",
                               check="positive")
    file: str = setting(DATA_LOG_FILE, "the gateway's own log file, rotated by size (read by "
                                       "the RPC logs and `diag`); empty: no file")
    file_max_mb: float = setting(10.0, "rotate the log file at this size", check="positive")
    file_count: int = setting(5, "rotated log files kept besides the current one (at least "
                                 "1)", check="positive")


@dataclass
class HealthSettings:
    interval_s: float = setting(20.0, "health telemetry period", check="positive")


@dataclass
class ShutdownSettings:
    timeout_s: float = setting(20.0, "graceful shutdown deadline; past it SIGALRM forces the "
                                     "exit (non-zero)", check="positive")
    drain_s: float = setting(10.0, "how long in-flight publishes may take to be acknowledged "
                                   "during shutdown", check="non_negative")


@dataclass
class LocalMqttSettings:
    enabled: bool = setting(True, "connect to the device's local broker (thin-edge.io topics)")
    host: str = setting("127.0.0.1", "local broker host")
    port: int = setting(1883, "local broker port (plain MQTT on the device)", check="port")
    reconnect_max_s: float = setting(30.0, "reconnect delay cap for the local broker",
                                     check="positive")


@dataclass
class RestartSettings:
    command: list[str] = list_setting(["sudo", "reboot"],
                                      "reboot command, run without a shell")
    timeout_s: float = setting(300.0, "a device that has not restarted this long after the "
                                      "command makes the restart fail", check="positive")
    boot_id_file: str = setting("/proc/sys/kernel/random/boot_id",
                                "file whose content changes at every boot")


@dataclass
class RpcSettings:
    shutdown_command: list[str] = list_setting(["sudo", "poweroff"],
                                               "power-off command of the RPC shutdown")
    run_command_enabled: bool = setting(False, "allow the RPC run_command at all")
    run_command_allow: list[str | list[str]] = list_setting(
        [], "what run_command may start. An exact command line: `\"df -h\"` (split like a "
            "shell would) or `[\"systemctl\", \"status\", \"*\"]` (a list: no "
            "splitting), the program then its arguments, each argument a glob (`*` = any "
            "one argument), the count fixed; `[\"uptime\"]` = no arguments. A bare program "
            "name or path (`\"uptime\"`) allows it with ANY arguments: never do that for a "
            "program that runs its arguments (sh, env, find, xargs, python, awk, sudo, "
            "timeout, ...), which would allow anything (warned at start)")
    run_command_max_timeout_s: float = setting(300.0, "longest timeout_s run_command accepts",
                                               check="positive")
    run_command_max_output: int = setting(16384, "bytes of stdout/stderr kept per command",
                                          check="positive")


@dataclass
class ControllerSettings:
    runtime: str = setting("none", "how the controller runs: process, docker or none",
                           check="runtime")
    command: list[str] = list_setting([], "process runtime: the command (no shell)")
    workdir: str = setting("", "process runtime: working directory (default: the active "
                               "version's directory, else the controller data directory)")
    env: dict[str, str] = field(default_factory=dict, metadata={
        "doc": "process runtime: extra environment variables", "env": None, "check": None})
    health_service: str = setting("", "the controller's service name on the local bus "
                                      "(te/device/main/service/<name>/status/health); empty: "
                                      "any service but the gateway's own")
    default_version: str = setting("", "version to launch when none was launched before",
                                   env="TEG_DEFAULT_CONTROLLER_VERSION")
    stop_grace_s: float = setting(10.0, "SIGTERM, then SIGKILL after this long",
                                  check="positive")
    restart_min_s: float = setting(1.0, "first restart delay after a crash", check="positive")
    restart_max_s: float = setting(300.0, "restart delay cap", check="positive")
    healthy_after_s: float = setting(120.0, "running healthily this long resets the backoff",
                                     check="positive")
    health_timeout_s: float = setting(21600.0, "no health signal this long means hung: "
                                               "restart it", check="positive")
    stop_on_shutdown: str = setting("auto", "stop the controller when the gateway stops: "
                                            "auto (process yes, docker no), always, never",
                                    check="stop_on_shutdown")
    log_max_bytes: int = setting(10 * 1024 * 1024, "process runtime: rotate the log file "
                                                   "at this size", check="positive")
    log_backups: int = setting(5, "process runtime: rotated log files kept",
                               check="non_negative")


@dataclass
class FilesSettings:
    allowed_dirs: list[str] = list_setting(
        [], "directories managed files may be written in (default: the controller data "
            "directory only); the gateway's own files (databases, token, state/, ota/, "
            "controller/versions/) are never managed, whatever this says")
    max_bytes: int = setting(1024 * 1024, "largest managed file", check="positive")
    poll_interval_s: float = setting(5.0, "how often managed files are checked for local "
                                          "changes", check="positive")


@dataclass
class OtaSettings:
    chunk_size: int = setting(16384, "bytes asked for per chunk of a package download",
                              check="chunk")
    health_timeout_s: float = setting(120.0, "a new version must give a health signal within "
                                             "this long, or it is rolled back",
                                      check="positive")
    keep_versions: int = setting(3, "controller versions kept on disk", check="positive")
    chunk_timeout_s: float = setting(30.0, "a chunk not answered this long is asked again",
                                     check="positive")
    max_package_bytes: int = setting(512 * 1024 * 1024, "largest package accepted",
                                     check="positive")
    url_ca_cert: str = setting("", "extra CA certificate (PEM) trusted for sw_url downloads, "
                                   "besides the system's")
    allow_http: bool = setting(False, "allow sw_url downloads over plain http (no TLS)")


@dataclass
class Settings:
    thingsboard: ThingsBoardSettings = field(default_factory=ThingsBoardSettings)
    paths: PathSettings = field(default_factory=PathSettings)
    outbox: OutboxSettings = field(default_factory=OutboxSettings)
    queue: QueueSettings = field(default_factory=QueueSettings)
    archive: ArchiveSettings = field(default_factory=ArchiveSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    health: HealthSettings = field(default_factory=HealthSettings)
    shutdown: ShutdownSettings = field(default_factory=ShutdownSettings)
    local_mqtt: LocalMqttSettings = field(default_factory=LocalMqttSettings)
    restart: RestartSettings = field(default_factory=RestartSettings)
    rpc: RpcSettings = field(default_factory=RpcSettings)
    controller: ControllerSettings = field(default_factory=ControllerSettings)
    files: FilesSettings = field(default_factory=FilesSettings)
    ota: OtaSettings = field(default_factory=OtaSettings)

    # Derived paths, resolved once by `load_settings`.
    @property
    def data_dir(self) -> Path:
        return Path(self.paths.data)

    @property
    def controller_data_dir(self) -> Path:
        return Path(self.paths.controller_data or self.paths.data)

    @property
    def controller_logs_dir(self) -> Path:
        return Path(self.paths.controller_logs or self.controller_data_dir / "logs")

    @property
    def access_token_path(self) -> Path:
        return Path(self.thingsboard.access_token_file or self.data_dir / "tb_access_token")

    @property
    def log_file(self) -> Path | None:
        """The gateway's own log file, None when off (``logging.file = ""``)."""
        name = self.logging.file.strip()
        if not name:
            return None
        if name.startswith("<data>/"):
            return self.data_dir / name[len("<data>/"):]
        return Path(name)

    @property
    def log_level(self) -> int:
        return level_number(self.logging.level)


def level_number(name: str) -> int:
    """Numeric level of a level name (WARN is accepted for WARNING)."""
    name = name.upper()
    return logging.WARNING if name == "WARN" else int(logging.getLevelName(name))


def sections() -> list[tuple[str, type]]:
    """(section name, section dataclass) in declaration order."""
    hints = typing.get_type_hints(Settings)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(Settings)]


def section_fields(cls: type) -> list[tuple[dataclasses.Field[Any], Any]]:
    """(field, resolved type) of one section."""
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def _describe(section: str, name: str, meta: Mapping[str, Any]) -> str:
    env = meta.get("env")
    return f"{section}.{name}" + (f" ({env})" if env else "")


def _got(value: Any) -> str:
    """How a wrong value is shown: a string from a TOML file is said to be a string."""
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    return repr(value)


def _convert(value: Any, kind: Any, where: str, from_text: bool) -> Any:
    origin = typing.get_origin(kind)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if from_text and str(value).strip().lower() in ("1", "true", "yes", "on"):
            return True
        if from_text and str(value).strip().lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"setting {where}: must be true or false, got {_got(value)}")
    if kind is int:
        if isinstance(value, bool):
            raise ConfigError(f"setting {where}: must be a whole number, got {_got(value)}")
        if isinstance(value, int):
            return value
        if from_text:
            try:
                return int(str(value).strip())
            except ValueError:
                pass
        raise ConfigError(f"setting {where}: must be a whole number, got {_got(value)}")
    if kind is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if from_text:
            try:
                return float(str(value).strip())
            except ValueError:
                pass
        raise ConfigError(f"setting {where}: must be a number, got {_got(value)}")
    if kind is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"setting {where}: must be a string, got {_got(value)}")
    if origin is list:
        if typing.get_args(kind) in ((), (str,)):
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return list(value)
            raise ConfigError(f"setting {where}: must be a list of strings, got {_got(value)}")
        # list[str | list[str]]: each item a string or a non-empty list of strings
        if isinstance(value, list) and all(
                isinstance(v, str) or (isinstance(v, list) and v and all(
                    isinstance(w, str) for w in v)) for v in value):
            return [list(v) if isinstance(v, list) else v for v in value]
        raise ConfigError(f"setting {where}: must be a list whose items are strings or "
                          f"non-empty lists of strings, got {_got(value)}")
    if origin is dict:
        if isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str)
                                           for k, v in value.items()):
            return dict(value)
        raise ConfigError(f"setting {where}: must be a table of strings, got {_got(value)}")
    if origin in (types.UnionType, typing.Union):
        raise ConfigError(f"setting {where}: unsupported type")  # pragma: no cover
    raise ConfigError(f"setting {where}: unsupported type {kind!r}")  # pragma: no cover


def _check(value: Any, check: str | None, where: str) -> None:
    if check == "port" and not 1 <= value <= 65535:
        raise ConfigError(f"setting {where}: must be a port from 1 to 65535, got {value}")
    if check == "positive" and not value > 0:
        raise ConfigError(f"setting {where}: must be greater than 0, got {value}")
    if check == "non_negative" and value < 0:
        raise ConfigError(f"setting {where}: must not be negative, got {value}")
    if check == "rate_limits":
        try:
            parse_rate_limit(value)
        except LimitsError as exc:
            raise ConfigError(f"setting {where}: {exc}") from None
    if check == "server_payload" and not 1024 <= value <= 256 * 1024 * 1024:
        raise ConfigError(f"setting {where}: must be from 1024 bytes to 256 MiB, got {value}")
    if check == "payload" and not 1024 <= value <= 65536:
        raise ConfigError(f"setting {where}: must be from 1024 to 65536 bytes, got {value}")
    if check == "runtime" and value not in ("process", "docker", "none"):
        raise ConfigError(f"setting {where}: must be process, docker or none, got {value!r}")
    if check == "stop_on_shutdown" and value not in ("auto", "always", "never"):
        raise ConfigError(f"setting {where}: must be auto, always or never, got {value!r}")
    if check == "chunk" and not 256 <= value <= 60000:
        raise ConfigError(f"setting {where}: must be from 256 to 60000 bytes, got {value}")
    if check == "level" and value.upper() not in LOG_LEVELS:
        raise ConfigError(f"setting {where}: must be {LOG_LEVELS_TEXT}, got {value!r}")


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse the TOML file; a missing or malformed file is a ConfigError."""
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found") from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot be read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: not valid TOML: {exc}") from None


def load_settings(
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
    require_data: bool = True,
    require_host: bool = False,
) -> Settings:
    """Build and validate the settings.

    ``flags`` maps ``"section.name"`` to a value given on the command line.
    ``require_host``: the ThingsBoard host must be set (commands that talk to it).
    """
    env = env or {}
    flags = flags or {}
    file_values = read_config_file(config_file) if config_file else {}
    known_sections = dict(sections())
    for name, value in file_values.items():
        if name not in known_sections:
            raise ConfigError(f"config file {config_file}: unknown section [{name}]"
                              f"{_suggest(name, known_sections)}")
        if not isinstance(value, dict):
            raise ConfigError(f"config file {config_file}: [{name}] must be a table")
    settings = Settings()
    for section_name, cls in known_sections.items():
        section = getattr(settings, section_name)
        table = file_values.get(section_name, {})
        known = {f.name for f in dataclasses.fields(cls)}
        for key in table:
            if key not in known:
                raise ConfigError(f"config file {config_file}: unknown setting "
                                  f"{section_name}.{key}{_suggest(key, known)}")
        for fld, kind in section_fields(cls):
            where = _describe(section_name, fld.name, fld.metadata)
            value = getattr(section, fld.name)
            if fld.name in table:
                value = _convert(table[fld.name], kind,
                                 f"{section_name}.{fld.name} (in {config_file})", False)
            env_name = fld.metadata.get("env")
            if env_name and env.get(env_name, "") != "":
                value = _convert(env[env_name], kind, where, True)
            flag_key = f"{section_name}.{fld.name}"
            if flags.get(flag_key) is not None:
                value = _convert(flags[flag_key], kind, where, True)
            _check(value, fld.metadata.get("check"), where)
            setattr(section, fld.name, value)
    _check_whole(settings, require_data, require_host)
    return settings


def _suggest(name: str, known: typing.Iterable[str]) -> str:
    """``; did you mean `quota_mb`?`` for a near miss, else nothing."""
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    return f"; did you mean `{close[0]}`?" if close else ""


def _check_whole(settings: Settings, require_data: bool, require_host: bool = False) -> None:
    tb = settings.thingsboard
    if tb.reconnect_max_s < tb.reconnect_min_s:
        raise ConfigError("setting thingsboard.reconnect_max_s: must not be below "
                          "thingsboard.reconnect_min_s")
    if require_data and not settings.paths.data:
        raise ConfigError("setting paths.data (TEG_DATA_PATH): required: the directory where "
                          "the gateway keeps its databases")
    for name, env, value in (("paths.data", "TEG_DATA_PATH", settings.paths.data),
                             ("paths.controller_data", "TEG_CONTROLLER_DATA_PATH",
                              settings.paths.controller_data)):
        if value and Path(value).exists() and not Path(value).is_dir():
            raise ConfigError(f"setting {name} ({env}): not a directory: {value}")
    if require_host and not tb.host.strip():
        raise ConfigError("setting thingsboard.host (TB_HOST): required: the ThingsBoard "
                          "MQTT host")
    ctl = settings.controller
    if ctl.runtime == "process" and not ctl.command:
        raise ConfigError("setting controller.command: required with controller.runtime = "
                          "\"process\" (a list of strings, e.g. [\"python3\", \"main.py\"])")
    if ctl.restart_max_s < ctl.restart_min_s:
        raise ConfigError("setting controller.restart_max_s: must not be below "
                          "controller.restart_min_s")
    if not settings.restart.command:
        raise ConfigError("setting restart.command: must not be empty")
    for name, value in (("thingsboard.ca_cert (THINGSBOARD_CA_CERT)", tb.ca_cert),
                        ("ota.url_ca_cert", settings.ota.url_ca_cert)):
        if value:
            _check_ca_file(name, value)
    for entry in settings.rpc.run_command_allow:
        try:
            words = entry if isinstance(entry, list) else shlex.split(entry)
        except ValueError as exc:
            raise ConfigError(f"setting rpc.run_command_allow: entry {entry!r} cannot be "
                              f"split: {exc}") from None
        if not words or not words[0]:
            raise ConfigError(f"setting rpc.run_command_allow: entry {entry!r} names no "
                              "program")


def _check_ca_file(name: str, path: str) -> None:
    """ConfigError unless ``path`` is a file of PEM (or DER) CA certificates."""
    if not Path(path).is_file():
        raise ConfigError(f"setting {name}: no such file: {path}")
    try:
        ssl.create_default_context(cafile=path)
    except (ssl.SSLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
        raise ConfigError(f"setting {name}: {path} is not a readable PEM CA certificate "
                          f"file ({reason})") from None


def settings_table() -> list[tuple[str, str, str, str]]:
    """(TOML name, environment variable, default, description) of every setting."""
    rows = []
    for section_name, cls in sections():
        for fld, _kind in section_fields(cls):
            default = fld.default if fld.default is not dataclasses.MISSING else (
                fld.default_factory() if fld.default_factory is not dataclasses.MISSING else "")
            shown = "" if default == "" else json.dumps(default)
            rows.append((f"{section_name}.{fld.name}", fld.metadata.get("env") or "", shown,
                         fld.metadata["doc"]))
    return rows


def settings_markdown() -> str:
    """The README's table of settings."""
    lines = ["| TOML setting | environment | default | meaning |", "|---|---|---|---|"]
    for name, env, default, doc in settings_table():
        lines.append(f"| `{name}` | {f'`{env}`' if env else ''} | "
                     f"{f'`{default}`' if default else ''} | {doc} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(settings_markdown())
