"""The README tells the truth about what the code offers."""

from __future__ import annotations

import re
from pathlib import Path

from teg_gateway.config import settings_table
from teg_gateway.operations.rpc import RpcDispatcher

README = Path(__file__).resolve().parent.parent / "README.md"


def test_every_setting_is_documented() -> None:
    text = README.read_text()
    missing = [name for name, _env, _default, _doc in settings_table()
               if f"`{name}`" not in text]
    assert not missing, f"settings missing from the README: {missing}"


def test_every_environment_variable_is_documented() -> None:
    text = README.read_text()
    missing = [env for _name, env, _default, _doc in settings_table()
               if env and f"`{env}`" not in text]
    assert not missing, f"environment variables missing from the README: {missing}"


def test_every_rpc_method_is_documented() -> None:
    # Build the real dispatcher the gateway uses, with every method registered.
    from teg_gateway.config import load_settings
    from teg_gateway.gateway import Gateway

    settings = load_settings(env={"TEG_DATA_PATH": "/nonexistent"}, require_data=True)
    rpc: RpcDispatcher = Gateway(settings).rpc
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", README.read_text(), re.MULTILINE))
    missing = sorted(set(rpc.methods) - documented)
    assert not missing, f"RPC methods missing from the README: {missing}"


def test_settings_table_is_current() -> None:
    from teg_gateway.config import settings_markdown

    text = README.read_text()
    start = text.index("<!-- settings:")
    table = text[text.index("\n", start) + 1:text.index("<!-- /settings -->")].strip()
    assert table == settings_markdown(), "regenerate with: python -m teg_gateway.config"


def test_the_systemd_unit_is_the_packaged_file() -> None:
    # The README links the unit instead of copying it; what it says about it must hold.
    unit = README.parent / "packaging" / "teg-gateway.service"
    text = README.read_text()
    assert "(packaging/teg-gateway.service)" in text and unit.is_file()
    lines = unit.read_text().splitlines()
    for setting in ("Type=notify", "WatchdogSec=30", "Restart=always", "TimeoutStopSec=30",
                    "ProtectSystem=true", "PrivateTmp=yes", "ProtectControlGroups=yes"):
        assert setting in lines, setting
        assert f"`{setting}`" in text or f"`{setting.split('=')[0]}`" in text, setting
