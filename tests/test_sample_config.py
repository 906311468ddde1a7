"""The commented configuration files the Debian package installs name every setting, and
every line in them is valid: uncommented, they load and give the defaults."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from teg_gateway.config import Settings, load_settings, settings_table
from teg_gateway.sample_config import env_text, main, toml_text


def test_toml_names_every_setting_and_sets_only_the_data_directory(tmp_path: Path) -> None:
    text = toml_text("/var/lib/teg-gateway")
    for name, env, _default, _doc in settings_table():
        section, key = name.split(".")
        assert f"\n[{section}]\n" in text
        assert re.search(rf"^(# )?{key} = ", text, re.MULTILINE), name
        if env:
            assert f"(environment: {env})" in text.replace("\n# ", " "), env
    path = tmp_path / "teg-gateway.toml"
    path.write_text(text)
    settings = load_settings(path, {})
    assert settings.paths.data == "/var/lib/teg-gateway"
    assert settings == load_settings(None, {"TEG_DATA_PATH": "/var/lib/teg-gateway"})


def test_every_commented_default_is_valid_and_is_the_default(tmp_path: Path) -> None:
    uncommented = re.sub(r"^# (\w+ = )", r"\1", toml_text("/data"), flags=re.MULTILINE)
    path = tmp_path / "all.toml"
    path.write_text(uncommented)
    expected = Settings()
    expected.paths.data = "/data"
    assert load_settings(path, {}) == expected


def test_env_file_names_every_environment_variable() -> None:
    text = env_text()
    for name, env, _default, _doc in settings_table():
        if env:
            assert re.search(rf"^#?{env}=", text, re.MULTILINE), (name, env)
    # The values to fill in are there, empty; nothing else is set.
    assigned = re.findall(r"^(\w+)=(.*)$", text, re.MULTILINE)
    assert assigned == [("TB_HOST", ""), ("THINGSBOARD_PROVISION_DEVICE_KEY", ""),
                        ("THINGSBOARD_PROVISION_DEVICE_SECRET", "")]


def test_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage" in capsys.readouterr().err
    assert main(["env"]) == 0
    assert capsys.readouterr().out == env_text()
    assert main(["toml", "/srv/teg"]) == 0
    assert 'data = "/srv/teg"' in capsys.readouterr().out
