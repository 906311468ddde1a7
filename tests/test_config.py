"""Configuration: defaults, TOML file, environment and flags (flag > environment > file >
default), the original gateway's environment variables and flags, derived paths, and the
one-line exit 2 for every invalid setting."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import GatewayFactory, render_toml
from teg_gateway.config import ConfigError, Settings, load_settings, section_fields, sections
from teg_gateway.sandbox.broker import free_tcp_ports
from teg_gateway.sandbox.certs import Pki
from teg_gateway.sandbox.process import run_command
from teg_gateway.sandbox.thingsboard import FakeThingsBoard

# Every environment variable of SPEC.md section 1.
SPEC_ENVIRONMENT = (
    "TB_HOST", "TB_PORT", "THINGSBOARD_PROVISION_DEVICE_KEY",
    "THINGSBOARD_PROVISION_DEVICE_SECRET", "THINGSBOARD_DEVICE_NAME", "THINGSBOARD_CA_CERT",
    "THINGSBOARD_ACCESS_TOKEN", "TEG_DATA_PATH", "TEG_CONTROLLER_DATA_PATH",
    "TEG_CONTROLLER_LOGS_PATH", "TEG_CONTROLLER_GIT_PATH", "TEG_CONTROLLER_DOCKERCONTEXT_PATH",
    "TEG_CONTROLLER_DOCKERFILE_PATH", "TEG_DEFAULT_CONTROLLER_VERSION", "LOG_LEVEL",
)

WAIT = 30.0


def cli_env(**values: str) -> dict[str, str]:
    """An environment for a gateway child process: every SPEC variable blanked (an empty
    variable counts as unset), so the test runner's own environment cannot leak in."""
    env = dict.fromkeys(SPEC_ENVIRONMENT, "")
    env.update(values)
    return env


def run_cli(workdir: Path, env: dict[str, str], *args: str,
            config: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m teg_gateway [--config workdir/gateway.toml] ARGS`` to completion."""
    return run_command(workdir, cli_env(**env), config, args, timeout=60)


def setting_value(settings: Settings, dotted: str) -> Any:
    section, name = dotted.split(".")
    return getattr(getattr(settings, section), name)


# -- precedence -----------------------------------------------------------------------------

# (setting, file value, environment variable, environment value, flag value)
LAYERS: list[tuple[str, Any, str, str, Any]] = [
    ("thingsboard.host", "file.example", "TB_HOST", "env.example", "flag.example"),
    ("thingsboard.port", 1001, "TB_PORT", "1002", "1003"),
    ("thingsboard.device_name", "file-dev", "THINGSBOARD_DEVICE_NAME", "env-dev", "flag-dev"),
    ("paths.data", "/file/data", "TEG_DATA_PATH", "/env/data", "/flag/data"),
    ("logging.level", "ERROR", "LOG_LEVEL", "WARN", "DEBUG"),
]


def write_layers_file(path: Path) -> Path:
    config: dict[str, dict[str, Any]] = {}
    for dotted, file_value, _env, _env_value, _flag in LAYERS:
        section, name = dotted.split(".")
        config.setdefault(section, {})[name] = file_value
    path.write_text(render_toml(config))
    return path


@pytest.mark.parametrize("layer", LAYERS, ids=[layer[0] for layer in LAYERS])
def test_each_layer_overrides_the_one_below(tmp_path: Path,
                                            layer: tuple[str, Any, str, str, Any]) -> None:
    dotted, file_value, env_name, env_value, flag_value = layer
    config_file = write_layers_file(tmp_path / "gateway.toml")
    env = {name: value for _d, _f, name, value, _fl in LAYERS}
    flags = {d: flag for d, _f, _n, _v, flag in LAYERS}
    converted = type(file_value)

    defaults = load_settings(require_data=False)
    from_file = load_settings(config_file, {}, {}, require_data=False)
    from_env = load_settings(config_file, env, {}, require_data=False)
    from_flag = load_settings(config_file, env, flags, require_data=False)
    env_only = load_settings(None, {env_name: env_value}, {}, require_data=False)

    assert setting_value(from_file, dotted) == file_value
    assert setting_value(from_file, dotted) != setting_value(defaults, dotted)
    assert setting_value(from_env, dotted) == converted(env_value)
    assert setting_value(from_flag, dotted) == converted(flag_value)
    assert setting_value(env_only, dotted) == converted(env_value)


def test_defaults_apply_where_nothing_is_given(tmp_path: Path) -> None:
    settings = load_settings(None, {"TEG_DATA_PATH": str(tmp_path)}, {})
    assert settings.thingsboard.port == 8883
    assert settings.thingsboard.host == ""
    assert settings.thingsboard.tls is True
    assert settings.thingsboard.ca_cert == ""
    assert settings.logging.level == "INFO"
    assert settings.log_level == logging.INFO
    assert settings.paths.controller_dockerfile == "./Dockerfile"


def test_an_empty_environment_variable_counts_as_unset(tmp_path: Path) -> None:
    config_file = tmp_path / "gateway.toml"
    config_file.write_text(render_toml({"thingsboard": {"host": "file.example", "port": 1883}}))
    settings = load_settings(config_file, {"TB_HOST": "", "TB_PORT": "",
                                           "TEG_DATA_PATH": str(tmp_path)}, {})
    assert settings.thingsboard.host == "file.example"
    assert settings.thingsboard.port == 1883


def test_a_flag_of_none_leaves_the_lower_layers_alone(tmp_path: Path) -> None:
    settings = load_settings(None, {"TB_PORT": "1884", "TEG_DATA_PATH": str(tmp_path)},
                             {"thingsboard.port": None})
    assert settings.thingsboard.port == 1884


def test_settings_without_environment_variable_come_from_the_file(tmp_path: Path) -> None:
    config_file = tmp_path / "gateway.toml"
    config_file.write_text(render_toml({
        "thingsboard": {"tls": False, "keepalive_s": 30, "reconnect_min_s": 0.5},
        "outbox": {"max_payload_bytes": 2048, "quota_mb": 1.5},
        "archive": {"retention_days": 7},
        "shutdown": {"drain_s": 0},
    }))
    settings = load_settings(config_file, {"TEG_DATA_PATH": str(tmp_path)}, {})
    assert settings.thingsboard.tls is False
    assert settings.thingsboard.keepalive_s == 30
    assert settings.thingsboard.reconnect_min_s == 0.5
    assert settings.outbox.max_payload_bytes == 2048
    assert settings.outbox.quota_mb == 1.5
    # A whole number is accepted where a number is expected, and stays a float.
    assert settings.archive.retention_days == 7.0
    assert isinstance(settings.archive.retention_days, float)
    assert settings.shutdown.drain_s == 0.0


# -- the original gateway's environment -------------------------------------------------------

# Environment variable -> (setting, value given, value expected).
MAPPED_ENVIRONMENT: dict[str, tuple[str, str, Any]] = {
    "TB_HOST": ("thingsboard.host", "tb.example.com", "tb.example.com"),
    "TB_PORT": ("thingsboard.port", "1883", 1883),
    "THINGSBOARD_PROVISION_DEVICE_KEY": ("thingsboard.provision_device_key", "pk", "pk"),
    "THINGSBOARD_PROVISION_DEVICE_SECRET": ("thingsboard.provision_device_secret", "ps", "ps"),
    "THINGSBOARD_DEVICE_NAME": ("thingsboard.device_name", "dev-7", "dev-7"),
    "THINGSBOARD_CA_CERT": ("thingsboard.ca_cert", "<ca>", "<ca>"),
    "THINGSBOARD_ACCESS_TOKEN": ("thingsboard.access_token_file", "/secrets/token",
                                 "/secrets/token"),
    "TEG_DATA_PATH": ("paths.data", "/var/lib/teg", "/var/lib/teg"),
    "TEG_CONTROLLER_DATA_PATH": ("paths.controller_data", "/var/lib/ctl", "/var/lib/ctl"),
    "TEG_CONTROLLER_LOGS_PATH": ("paths.controller_logs", "/var/log/ctl", "/var/log/ctl"),
    "TEG_CONTROLLER_GIT_PATH": ("paths.controller_git", "/opt/ctl", "/opt/ctl"),
    "TEG_CONTROLLER_DOCKERCONTEXT_PATH": ("paths.controller_dockercontext", "/opt/ctx",
                                          "/opt/ctx"),
    "TEG_CONTROLLER_DOCKERFILE_PATH": ("paths.controller_dockerfile", "./Dockerfile.arm",
                                       "./Dockerfile.arm"),
    "TEG_DEFAULT_CONTROLLER_VERSION": ("controller.default_version", "v1.2.3", "v1.2.3"),
    "LOG_LEVEL": ("logging.level", "ERROR", "ERROR"),
}


def declared_environment() -> dict[str, str]:
    """Environment variable -> setting, as declared in config.py."""
    found = {}
    for section_name, cls in sections():
        for fld, _kind in section_fields(cls):
            if fld.metadata.get("env"):
                found[fld.metadata["env"]] = f"{section_name}.{fld.name}"
    return found


def test_config_declares_only_spec_environment_variables() -> None:
    declared = declared_environment()
    assert set(declared) <= set(SPEC_ENVIRONMENT)
    for name, (dotted, _given, _expected) in MAPPED_ENVIRONMENT.items():
        assert declared.get(name) == dotted, name


def test_every_mapped_environment_variable_is_honored(pki: Pki) -> None:
    env = {name: given for name, (_d, given, _e) in MAPPED_ENVIRONMENT.items()}
    env["THINGSBOARD_CA_CERT"] = str(pki.ca_cert)  # it must exist
    settings = load_settings(None, env, {})
    for name, (dotted, _given, expected) in MAPPED_ENVIRONMENT.items():
        wanted = str(pki.ca_cert) if name == "THINGSBOARD_CA_CERT" else expected
        assert setting_value(settings, dotted) == wanted, name
    assert settings.access_token_path == Path("/secrets/token")
    assert settings.controller_data_dir == Path("/var/lib/ctl")
    assert settings.controller_logs_dir == Path("/var/log/ctl")
    assert settings.log_level == logging.ERROR


@pytest.mark.parametrize(("given", "level"), [
    ("DEBUG", logging.DEBUG), ("info", logging.INFO), ("WARN", logging.WARNING),
    ("WARNING", logging.WARNING), ("Error", logging.ERROR),
])
def test_log_levels_of_the_original_are_accepted(given: str, level: int) -> None:
    settings = load_settings(None, {"LOG_LEVEL": given}, {}, require_data=False)
    assert settings.log_level == level


# -- derived paths ----------------------------------------------------------------------------

def test_derived_paths_default_to_the_data_directory() -> None:
    settings = load_settings(None, {"TEG_DATA_PATH": "/data/teg"}, {})
    assert settings.data_dir == Path("/data/teg")
    assert settings.access_token_path == Path("/data/teg/tb_access_token")
    assert settings.controller_data_dir == Path("/data/teg")
    assert settings.controller_logs_dir == Path("/data/teg/logs")


def test_controller_logs_follow_the_controller_data_directory() -> None:
    settings = load_settings(None, {"TEG_DATA_PATH": "/data/teg",
                                    "TEG_CONTROLLER_DATA_PATH": "/data/ctl"}, {})
    assert settings.controller_data_dir == Path("/data/ctl")
    assert settings.controller_logs_dir == Path("/data/ctl/logs")
    assert settings.access_token_path == Path("/data/teg/tb_access_token")


def test_derived_paths_can_be_set_in_the_file(tmp_path: Path) -> None:
    config_file = tmp_path / "gateway.toml"
    config_file.write_text(render_toml({
        "paths": {"data": "/d", "controller_data": "/c", "controller_logs": "/l"},
        "thingsboard": {"access_token_file": "/t/token"},
    }))
    settings = load_settings(config_file, {}, {})
    assert settings.access_token_path == Path("/t/token")
    assert settings.controller_data_dir == Path("/c")
    assert settings.controller_logs_dir == Path("/l")


# -- invalid settings, in the library ---------------------------------------------------------

@pytest.mark.parametrize(("env", "named"), [
    ({"TB_PORT": "0"}, "TB_PORT"),
    ({"TB_PORT": "65536"}, "TB_PORT"),
    ({"TB_PORT": "8883.5"}, "TB_PORT"),
    ({"TB_PORT": "https"}, "TB_PORT"),
    ({"LOG_LEVEL": "VERBOSE"}, "LOG_LEVEL"),
    ({"TEG_DATA_PATH": ""}, "TEG_DATA_PATH"),
    ({"THINGSBOARD_CA_CERT": "/no/such/ca.pem"}, "THINGSBOARD_CA_CERT"),
])
def test_invalid_environment_is_a_config_error_naming_it(tmp_path: Path, env: dict[str, str],
                                                         named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_settings(None, {"TEG_DATA_PATH": str(tmp_path), **env}, {})


@pytest.mark.parametrize(("text", "named"), [
    ("[thingsboard]\nport = \"8883\"\n", "thingsboard.port"),
    ("[thingsboard]\ntls = \"yes\"\n", "thingsboard.tls"),
    ("[outbox]\nmax_payload_bytes = 100000\n", "outbox.max_payload_bytes"),
    ("[outbox]\nmax_inflight = 0\n", "outbox.max_inflight"),
    ("[queue]\nbatch_size = true\n", "queue.batch_size"),
    ("[archive]\nretention_days = \"long\"\n", "archive.retention_days"),
    ("[shutdown]\ndrain_s = -1\n", "shutdown.drain_s"),
    ("[thingsboard]\nreconnect_min_s = 5\nreconnect_max_s = 1\n", "reconnect_max_s"),
    ("[thingsboard]\nhots = \"x\"\n", "thingsboard.hots"),
    ("[thingsbored]\nhost = \"x\"\n", "thingsbored"),
    ("thingsboard = 1\n", "thingsboard"),
    ("[thingsboard\nhost = \"x\"\n", "not valid TOML"),
    ("[ota]\nurl_ca_cert = \"/no/such/ca.pem\"\n", "ota.url_ca_cert: no such file"),
    ("[ota]\nurl_ca_cert = \"/etc/hostname\"\n",
     "ota.url_ca_cert: /etc/hostname is not a readable PEM CA certificate file"),
    ("[rpc]\nrun_command_allow = [\"df 'unclosed\"]\n", "rpc.run_command_allow"),
    ("[rpc]\nrun_command_allow = [[]]\n", "rpc.run_command_allow"),
    ("[rpc]\nrun_command_allow = [[\"df\", 1]]\n", "rpc.run_command_allow"),
    ("[archive]\nmin_free_mb = -1\n", "archive.min_free_mb"),
    ("[outbox]\ndead_letters_mb = 0\n", "outbox.dead_letters_mb"),
])
def test_invalid_file_is_a_config_error_naming_it(tmp_path: Path, text: str,
                                                  named: str) -> None:
    config_file = tmp_path / "gateway.toml"
    config_file.write_text(text)
    with pytest.raises(ConfigError, match=named):
        load_settings(config_file, {"TEG_DATA_PATH": str(tmp_path)}, {})


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "absent.toml", {"TEG_DATA_PATH": str(tmp_path)}, {})


def test_bad_flag_value_is_a_config_error_naming_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"thingsboard\.port \(TB_PORT\)"):
        load_settings(None, {"TEG_DATA_PATH": str(tmp_path)}, {"thingsboard.port": "eighty"})


def test_data_path_that_is_a_file_is_a_config_error(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with pytest.raises(ConfigError, match="TEG_DATA_PATH"):
        load_settings(None, {"TEG_DATA_PATH": str(not_a_dir)}, {})


def test_host_is_required_only_when_asked(tmp_path: Path) -> None:
    load_settings(None, {"TEG_DATA_PATH": str(tmp_path)}, {})
    with pytest.raises(ConfigError, match="TB_HOST"):
        load_settings(None, {"TEG_DATA_PATH": str(tmp_path)}, {}, require_host=True)


# -- invalid settings stop `teg-gateway run` --------------------------------------------------

# (environment over a valid one, config file text, extra arguments, the text naming the setting)
INVALID_RUNS: list[tuple[str, dict[str, str], str | None, tuple[str, ...], str]] = [
    ("port out of range", {"TB_PORT": "70000"}, None, (), "TB_PORT"),
    ("port zero", {"TB_PORT": "0"}, None, (), "TB_PORT"),
    ("port not a number", {"TB_PORT": "eighty"}, None, (), "TB_PORT"),
    ("flag port not a number", {}, None, ("--tb-port", "x"), "TB_PORT"),
    ("flag port before command", {}, None, ("--tb-port", "-5", "run"), "TB_PORT"),
    ("file number not a number", {}, "[outbox]\nmax_inflight = \"many\"\n", (),
     "outbox.max_inflight"),
    ("unknown section", {}, "[nonsense]\nx = 1\n", (), "[nonsense]"),
    ("unknown key", {}, "[thingsboard]\nhots = \"x\"\n", (), "thingsboard.hots"),
    ("malformed toml", {}, "[thingsboard\nhost = 1\n", (), "not valid TOML"),
    ("missing data path", {"TEG_DATA_PATH": ""}, None, (), "TEG_DATA_PATH"),
    ("CA file not PEM", {"THINGSBOARD_CA_CERT": "/etc/hostname"}, None, (),
     "THINGSBOARD_CA_CERT): /etc/hostname is not a readable PEM CA certificate file"),
    ("missing CA file", {"THINGSBOARD_CA_CERT": "/no/such/ca.pem"}, None, (),
     "THINGSBOARD_CA_CERT"),
    ("bad LOG_LEVEL", {"LOG_LEVEL": "LOUD"}, None, (), "LOG_LEVEL"),
    ("bad --log-level", {}, None, ("--log-level", "chatty"), "LOG_LEVEL"),
    ("missing host", {"TB_HOST": ""}, None, (), "TB_HOST"),
]


@pytest.mark.parametrize("case", INVALID_RUNS, ids=[case[0] for case in INVALID_RUNS])
def test_invalid_setting_stops_run_with_exit_2_and_one_line(
        tmp_path: Path,
        case: tuple[str, dict[str, str], str | None, tuple[str, ...], str]) -> None:
    _name, env, config, args, named = case
    data = tmp_path / "data"
    data.mkdir()
    valid = {"TB_HOST": "localhost", "TB_PORT": "8883", "TEG_DATA_PATH": str(data),
             "THINGSBOARD_PROVISION_DEVICE_KEY": "k", "THINGSBOARD_PROVISION_DEVICE_SECRET": "s"}
    command = args if "run" in args else (*args, "run")
    result = run_cli(tmp_path / "work", {**valid, **env}, *command, config=config)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert named in lines[0]
    assert lines[0].startswith("teg-gateway: ")
    assert "Traceback" not in result.stderr + result.stdout
    assert list(data.iterdir()) == [], "the gateway must not start"


def test_data_path_that_is_a_file_stops_run_with_exit_2(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "data"
    not_a_dir.write_text("")
    result = run_cli(tmp_path, {"TB_HOST": "localhost", "TEG_DATA_PATH": str(not_a_dir)}, "run")
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1
    assert "TEG_DATA_PATH" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_missing_config_file_stops_run_with_exit_2(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    result = run_command(tmp_path, cli_env(TB_HOST="localhost", TEG_DATA_PATH=str(data)), None,
                         ["--config", str(tmp_path / "absent.toml"), "run"], timeout=60)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"teg-gateway: config file {tmp_path / 'absent.toml'}: not found"]


# -- precedence through the command line ------------------------------------------------------

def precedence_setup(tmp_path: Path, pki: Pki
                     ) -> tuple[dict[str, str], str, int]:
    """Environment and config file that point at a dead port and a wrong name; returns
    (environment, config text, dead port)."""
    data = tmp_path / "data"
    data.mkdir()
    dead_port = free_tcp_ports(1)[0]
    config = render_toml({
        "thingsboard": {"host": "file.invalid", "port": dead_port, "device_name": "file-name",
                        "provision_timeout_s": 2.0, "reconnect_min_s": 0.2,
                        "reconnect_max_s": 0.5},
    })
    env = {"TB_HOST": "env.invalid", "TB_PORT": str(dead_port),
           "THINGSBOARD_DEVICE_NAME": "env-name", "THINGSBOARD_CA_CERT": str(pki.ca_cert),
           "THINGSBOARD_PROVISION_DEVICE_KEY": "test-key",
           "THINGSBOARD_PROVISION_DEVICE_SECRET": "test-secret", "TEG_DATA_PATH": str(data)}
    return env, config, dead_port


@pytest.mark.parametrize("where", ["before", "after"])
def test_original_flags_win_over_environment_and_file(
        tmp_path: Path, pki: Pki, thingsboard: FakeThingsBoard,
        where: str) -> None:
    env, config, _dead = precedence_setup(tmp_path, pki)
    flags = ("--tb-host", thingsboard.tls_hostname, "--tb-port", str(thingsboard.tls_port),
             "--device-name", "flag-name")
    args = (*flags, "provision") if where == "before" else ("provision", *flags)
    result = run_cli(tmp_path / "work", env, *args, config=config)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "provisioned" in result.stdout
    assert [r["deviceName"] for r in thingsboard.provision_requests] == ["flag-name"]


def test_environment_wins_over_file_through_the_command_line(
        tmp_path: Path, pki: Pki, thingsboard: FakeThingsBoard) -> None:
    env, config, _dead = precedence_setup(tmp_path, pki)
    env.update(TB_HOST=thingsboard.tls_hostname, TB_PORT=str(thingsboard.tls_port))
    result = run_cli(tmp_path / "work", env, "provision", config=config)
    assert result.returncode == 0, result.stdout + result.stderr
    assert [r["deviceName"] for r in thingsboard.provision_requests] == ["env-name"]


def test_file_wins_over_defaults_through_the_command_line(
        tmp_path: Path, pki: Pki, thingsboard: FakeThingsBoard) -> None:
    env, _config, _dead = precedence_setup(tmp_path, pki)
    for name in ("TB_HOST", "TB_PORT", "THINGSBOARD_DEVICE_NAME"):
        env[name] = ""
    config = render_toml({"thingsboard": {"host": thingsboard.tls_hostname,
                                          "port": thingsboard.tls_port,
                                          "device_name": "file-name"}})
    result = run_cli(tmp_path / "work", env, "provision", config=config)
    assert result.returncode == 0, result.stdout + result.stderr
    assert [r["deviceName"] for r in thingsboard.provision_requests] == ["file-name"]


@pytest.mark.parametrize("args", [
    pytest.param(("run", "--tb-port", "{port}", "--device-name", "flag-name"), id="after-run"),
    pytest.param(("--tb-port", "{port}", "--device-name", "flag-name", "run"), id="before-run"),
    pytest.param(("--tb-port", "{port}", "--device-name", "flag-name"), id="no-command"),
])
def test_run_takes_the_original_flags(make_gateway: GatewayFactory,
                                      thingsboard: FakeThingsBoard,
                                      args: tuple[str, ...]) -> None:
    dead_port = free_tcp_ports(1)[0]
    gateway = make_gateway(
        env={"TB_PORT": str(dead_port), "THINGSBOARD_DEVICE_NAME": "env-name"},
        args=tuple(a.format(port=thingsboard.tls_port) for a in args))
    gateway.start()
    thingsboard.wait_for(
        lambda: ("flag-name", thingsboard.access_token) in thingsboard.connected_usernames(),
        timeout=WAIT, message="the gateway did not connect with the flag's device name")
    assert {r["deviceName"] for r in thingsboard.provision_requests} == {"flag-name"}
    assert gateway.stop() == 0


def test_config_and_data_path_flags_after_the_command(tmp_path: Path) -> None:
    from_file, from_env, from_flag = (tmp_path / name for name in ("file", "env", "flag"))
    for directory in (from_file, from_env, from_flag):
        directory.mkdir()  # status on a missing data directory is an error
    config_file = tmp_path / "gateway.toml"
    config_file.write_text(render_toml({"paths": {"data": str(from_file)}}))
    result = run_command(tmp_path, cli_env(), None, ["status", "--config", str(config_file)],
                         timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"data directory: {from_file}" in result.stdout.splitlines()
    result = run_command(tmp_path, cli_env(TEG_DATA_PATH=str(from_env)), None,
                         ["status", "--config", str(config_file)], timeout=60)
    assert f"data directory: {from_env}" in result.stdout.splitlines()
    result = run_command(tmp_path, cli_env(TEG_DATA_PATH=str(from_env)), None,
                         ["status", "--config", str(config_file), "--data-path",
                          str(from_flag)], timeout=60)
    assert f"data directory: {from_flag}" in result.stdout.splitlines()


def test_help_lists_the_original_flags() -> None:
    result = subprocess.run([sys.executable, "-m", "teg_gateway", "run", "--help"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0
    for flag in ("--tb-host", "--tb-port", "--device-name", "--config", "--data-path",
                 "--log-level"):
        assert flag in result.stdout
