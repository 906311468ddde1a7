"""Commented configuration files naming every setting, from config.py's declarations.

The Debian package installs both as ``/etc/teg-gateway/teg-gateway.toml`` and
``/etc/teg-gateway/teg-gateway.env``; anyone can print them:
``python -m teg_gateway.sample_config toml|env [DATA_DIR]``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import textwrap
from typing import Any

from teg_gateway.config import section_fields, sections

# Environment variables the operator fills in: left uncommented (empty) in the env file.
FILL_IN = ("TB_HOST", "THINGSBOARD_PROVISION_DEVICE_KEY", "THINGSBOARD_PROVISION_DEVICE_SECRET")


def _default(fld: dataclasses.Field[Any]) -> Any:
    if fld.default is not dataclasses.MISSING:
        return fld.default
    if fld.default_factory is not dataclasses.MISSING:
        return fld.default_factory()
    return ""  # pragma: no cover (every setting has a default)


def toml_value(value: Any) -> str:
    """A default as TOML text (strings, numbers, booleans, lists of strings, tables)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}"
                               for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value)  # str, int, float: JSON and TOML agree


def _comment(text: str) -> list[str]:
    return ["# " + line for line in textwrap.wrap(text, 88)]


def toml_text(data_dir: str = "/var/lib/teg-gateway") -> str:
    """The TOML file: every setting commented out at its default, except ``paths.data``."""
    lines = [
        "# teg-gateway settings. Every setting is listed at its default, commented out;",
        "# remove the '#' to change one. An environment variable (named in the comment) set in",
        "# the environment file overrides the value here. Check with:",
        "#   sudo -u teg teg-gateway --config /etc/teg-gateway/teg-gateway.toml status",
        "# then apply with: systemctl restart teg-gateway",
    ]
    for section, cls in sections():
        lines += ["", f"[{section}]"]
        for fld, _kind in section_fields(cls):
            env = fld.metadata.get("env")
            lines += _comment(fld.metadata["doc"] + (f" (environment: {env})" if env else ""))
            if section == "paths" and fld.name == "data":
                lines.append(f"data = {toml_value(data_dir)}")
            else:
                lines.append(f"# {fld.name} = {toml_value(_default(fld))}")
    return "\n".join(lines) + "\n"


def env_text() -> str:
    """The environment file read by systemd: every setting that has an environment
    variable; the host and provisioning credentials to fill in, the rest commented out."""
    lines = [
        "# teg-gateway environment, read by systemd (teg-gateway.service) as root.",
        "# It holds the provisioning secret: keep it mode 0600.",
        "# The service starts once TB_HOST is set: edit, then systemctl restart teg-gateway",
        "# Values here override the same settings in teg-gateway.toml, which sets the data",
        "# directory (paths.data).",
    ]
    for section, cls in sections():
        for fld, _kind in section_fields(cls):
            env = fld.metadata.get("env")
            if not env:
                continue
            lines.append("")
            lines += _comment(f"{fld.metadata['doc']} ({section}.{fld.name})")
            default = _default(fld)
            shown = "" if default == "" else str(default)
            lines.append(f"{env}=" if env in FILL_IN else f"#{env}={shown}")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("toml", "env"):
        print("usage: python -m teg_gateway.sample_config toml|env [DATA_DIR]", file=sys.stderr)
        return 2
    if argv[0] == "toml":
        sys.stdout.write(toml_text(*argv[1:2]))
    else:
        sys.stdout.write(env_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
