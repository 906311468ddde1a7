"""The ``teg-gateway`` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from teg_gateway import __version__
from teg_gateway.config import ConfigError, Settings, load_settings

log = logging.getLogger("teg_gateway")

# Exit codes (the README lists them): 1 ThingsBoard refused provisioning or the
# credentials file is unusable, `check` found a problem; 2 a setting is missing or wrong,
# or the data directory is unusable; 3 and 4 come from `run` (forced exit, failed task);
# 5 `provision` got no answer within --timeout; 130 interrupted.
EXIT_CONFIG = 2
EXIT_PROVISION = 1
EXIT_CHECK_FAILED = 1
EXIT_NO_ANSWER = 5
EXIT_INTERRUPTED = 130

REQUIRED = """required settings (environment variable, TOML setting or flag):
  TB_HOST          ThingsBoard MQTT host (thingsboard.host, --tb-host)
  TEG_DATA_PATH    data directory for databases and state (paths.data, --data-path)
  and either THINGSBOARD_PROVISION_DEVICE_KEY + THINGSBOARD_PROVISION_DEVICE_SECRET
  (from the ThingsBoard device profile) or an access token in <data>/tb_access_token.
  THINGSBOARD_CA_CERT names the CA of a server not in the system's store.

`teg-gateway check` tests every setting and connection and says how to fix a problem.
Every setting, the exit codes and the guides: README.md (in the source tree; it is also
the package's long description) and docs/."""

# Flag -> setting; the original gateway's --tb-host, --tb-port, --device-name included.
FLAGS: dict[str, tuple[str, str]] = {
    "tb_host": ("thingsboard.host", "ThingsBoard MQTT host (TB_HOST)"),
    "tb_port": ("thingsboard.port", "ThingsBoard MQTT port (TB_PORT)"),
    "device_name": ("thingsboard.device_name", "device name for provisioning"),
    "data_path": ("paths.data", "gateway data directory (TEG_DATA_PATH)"),
    "log_level": ("logging.level", "DEBUG, INFO, WARNING (or WARN), ERROR or CRITICAL "
                                   "(LOG_LEVEL)"),
}


def _add_common(parser: argparse.ArgumentParser, suppress: bool) -> None:
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument("--config", type=Path, default=default, metavar="PATH",
                        help="TOML configuration file")
    for dest, (_setting, text) in FLAGS.items():
        parser.add_argument("--" + dest.replace("_", "-"), dest=dest, default=default,
                            help=text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="teg-gateway",
        description="Edge gateway between a local controller and ThingsBoard.",
        epilog=REQUIRED, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"teg-gateway {__version__}")
    _add_common(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands: dict[str, argparse.ArgumentParser] = {}
    for name, text in (
        ("run", "run the gateway (the default when no command is given)"),
        ("provision", "provision the device once and exit"),
        ("status", "print what the data directory says about the gateway"),
        ("check", "preflight: test the settings, the data directory, DNS, TCP, TLS, the "
                  "credentials, the local broker and the controller runtime (about 10 s, "
                  "changes nothing)"),
        ("diag", "write a support bundle (.tar.gz) with status, check, logs, versions and "
                 "the configuration with every secret redacted"),
    ):
        commands[name] = sub.add_parser(
            name, help=text, description=text, epilog=REQUIRED,
            formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_common(commands[name], suppress=True)
    commands["provision"].add_argument(
        "--timeout", type=float, default=60.0, metavar="SECONDS",
        help="give up after this long without an answer from ThingsBoard (exit code 5; "
             "default 60)")
    commands["diag"].add_argument(
        "--output", "-o", type=Path, default=None, metavar="PATH",
        help="where to write the bundle (default: teg-gateway-diag-<host>-<time>.tar.gz "
             "in the current directory)")
    commands["diag"].add_argument(
        "--no-check", action="store_true",
        help="do not run `check` (offline: the bundle then holds no check output)")
    sandbox = sub.add_parser(
        "sandbox", help="run the whole chain on this machine against a ThingsBoard stand-in",
        description="Start a ThingsBoard stand-in (an MQTT server with TLS), mosquitto as "
                    "the local broker, a sample controller and the gateway; show what "
                    "ThingsBoard received. Rate limits are ThingsBoard's: N:S[,N:S...] = N "
                    "per S seconds in every window; a publish over a limit closes the "
                    "connection, as ThingsBoard does.")
    sandbox.add_argument("--seconds", type=float, default=15.0,
                         help="how long the sample controller writes records")
    sandbox.add_argument("--rate", type=float, default=20.0, help="records per second")
    sandbox.add_argument("--workdir", type=Path, default=None,
                         help="directory for the run (default: a new temporary one)")
    sandbox.add_argument("--rate-limit-messages", metavar="N:S,...",
                         help="limit on every publish of the device (default: none)")
    sandbox.add_argument("--rate-limit-telemetry-messages", metavar="N:S,...",
                         help="limit on telemetry publishes (default: none)")
    sandbox.add_argument("--rate-limit-data-points", metavar="N:S,...",
                         help="limit on telemetry data points, one per key of each record "
                              "(default: none)")
    sandbox.add_argument("--max-payload-bytes", type=int, metavar="BYTES", default=65536,
                         help="largest payload the stand-in accepts (default: 65536)")
    return parser


def settings_from_args(args: argparse.Namespace, require_data: bool = True,
                       require_host: bool = False) -> Settings:
    flags: dict[str, Any] = {}
    for dest, (setting_name, _text) in FLAGS.items():
        value = getattr(args, dest, None)
        if value is not None:
            flags[setting_name] = value
    return load_settings(getattr(args, "config", None), os.environ, flags, require_data,
                         require_host)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = args.command or "run"
    if command == "sandbox":
        from teg_gateway.sandbox.run import run_sandbox, sandbox_limits
        try:
            limits = sandbox_limits(args.rate_limit_messages, args.rate_limit_telemetry_messages,
                                    args.rate_limit_data_points, args.max_payload_bytes)
        except ValueError as exc:
            print(f"teg-gateway sandbox: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        return run_sandbox(seconds=args.seconds, rate=args.rate, workdir=args.workdir,
                           limits=limits)
    if command == "check":
        from teg_gateway.check import run_check
        report = run_check(lambda: settings_from_args(args, require_host=True))
        print("\n".join(report.lines()), flush=True)
        return 0 if report.ok else EXIT_CHECK_FAILED
    try:
        settings = settings_from_args(args, require_host=command in ("run", "provision"))
        if command in ("run", "provision"):
            _require_credentials(settings)
    except ConfigError as exc:
        print(f"teg-gateway: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    from teg_gateway.logs import setup_file, setup_stdout
    setup_stdout(settings.log_level)
    if command == "status":
        from teg_gateway.status import status_lines
        if not settings.data_dir.is_dir():
            print(f"teg-gateway: data directory {settings.data_dir} does not exist (setting "
                  "paths.data, TEG_DATA_PATH): nothing has run with this path; check it for "
                  "a typo", file=sys.stderr)
            return EXIT_CONFIG
        print("\n".join(status_lines(settings)))
        return 0
    if command == "diag":
        from teg_gateway.diag import write_bundle
        path = write_bundle(settings, lambda: settings_from_args(args), args.output,
                            run_checks=not args.no_check)
        print(f"support bundle written to {path} (secrets redacted)")
        return 0
    from teg_gateway.datadir import DataDirError, prepare_data_dir
    try:
        prepare_data_dir(settings.data_dir)
    except DataDirError as exc:
        print(f"teg-gateway: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if command == "provision":
        return _provision(settings, args.timeout)
    try:
        setup_file(settings)
    except OSError as exc:
        print(f"teg-gateway: setting logging.file: cannot write {settings.log_file}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return EXIT_CONFIG
    from teg_gateway.cloud.credentials import CredentialsError
    from teg_gateway.cloud.provision import ProvisionError
    from teg_gateway.gateway import Gateway
    try:
        return asyncio.run(Gateway(settings).run())
    except ProvisionError as exc:
        log.error("provisioning failed: %s", exc)
        return EXIT_PROVISION
    except CredentialsError as exc:
        log.error("%s", exc)
        return EXIT_PROVISION
    except DataDirError as exc:
        log.error("%s", exc)
        return EXIT_CONFIG
    except (sqlite3.Error, OSError) as exc:
        # At start: a database that cannot be opened or created (read-only, full disk,
        # wrong owner). One line naming the directory, never a traceback.
        log.error("cannot open the gateway's databases (outbox.db, archive.db) in the data "
                  "directory %s: %s", settings.data_dir, exc)
        return EXIT_CONFIG


def _require_credentials(settings: Settings) -> None:
    """Without saved credentials, the provisioning key and secret are required settings."""
    tb = settings.thingsboard
    if settings.access_token_path.exists():
        return
    if not tb.provision_device_key or not tb.provision_device_secret:
        raise ConfigError(
            "settings thingsboard.provision_device_key and provision_device_secret "
            "(THINGSBOARD_PROVISION_DEVICE_KEY, THINGSBOARD_PROVISION_DEVICE_SECRET): "
            f"required while there are no saved credentials ({settings.access_token_path})")


def _provision(settings: Settings, timeout_s: float) -> int:
    from teg_gateway.cloud.credentials import CredentialsError
    from teg_gateway.cloud.provision import ProvisionError, ensure_credentials

    tb = settings.thingsboard
    try:
        created, creds = asyncio.run(asyncio.wait_for(ensure_credentials(settings),
                                                      timeout_s))
    except (ProvisionError, CredentialsError) as exc:
        print(f"teg-gateway: provisioning failed: {exc}", file=sys.stderr)
        return EXIT_PROVISION
    except TimeoutError:
        print(f"teg-gateway: provisioning failed: no answer from {tb.host}:{tb.port} within "
              f"{timeout_s:g} s (run `teg-gateway check` to see why)", file=sys.stderr)
        return EXIT_NO_ANSWER
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    where = settings.access_token_path
    print(f"provisioned: {creds.describe()} saved to {where}" if created
          else f"already provisioned: {creds.describe()} in {where}")
    return 0
