"""The ``teg-gateway`` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from teg_gateway import __version__
from teg_gateway.config import ConfigError, Settings, load_settings

log = logging.getLogger("teg_gateway")

EXIT_CONFIG = 2
EXIT_PROVISION = 1

# Flag -> setting; the original gateway's --tb-host, --tb-port, --device-name included.
FLAGS: dict[str, tuple[str, str]] = {
    "tb_host": ("thingsboard.host", "ThingsBoard MQTT host (TB_HOST)"),
    "tb_port": ("thingsboard.port", "ThingsBoard MQTT port (TB_PORT)"),
    "device_name": ("thingsboard.device_name", "device name for provisioning"),
    "data_path": ("paths.data", "gateway data directory (TEG_DATA_PATH)"),
    "log_level": ("logging.level", "DEBUG, INFO, WARN or ERROR (LOG_LEVEL)"),
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
        description="Edge gateway between a local controller and ThingsBoard.")
    parser.add_argument("--version", action="version", version=f"teg-gateway {__version__}")
    _add_common(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, text in (
        ("run", "run the gateway (the default when no command is given)"),
        ("provision", "provision the device once and exit"),
        ("status", "print what the data directory says about the gateway"),
    ):
        _add_common(sub.add_parser(name, help=text, description=text), suppress=True)
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
    try:
        settings = settings_from_args(args, require_host=command in ("run", "provision"))
    except ConfigError as exc:
        print(f"teg-gateway: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    from teg_gateway.logs import setup_stdout
    setup_stdout(settings.log_level)
    if command == "status":
        from teg_gateway.status import status_lines
        print("\n".join(status_lines(settings)))
        return 0
    if command == "provision":
        return _provision(settings)
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


def _provision(settings: Settings) -> int:
    from teg_gateway.cloud.credentials import CredentialsError
    from teg_gateway.cloud.provision import ProvisionError, ensure_credentials

    try:
        created, creds = asyncio.run(ensure_credentials(settings))
    except (ProvisionError, CredentialsError) as exc:
        print(f"teg-gateway: provisioning failed: {exc}", file=sys.stderr)
        return EXIT_PROVISION
    except KeyboardInterrupt:
        return 130
    where = settings.access_token_path
    print(f"provisioned: {creds.describe()} saved to {where}" if created
          else f"already provisioned: {creds.describe()} in {where}")
    return 0
