"""Server-side RPC end to end: the ThingsBoard stand-in sends requests over a real mosquitto
to a real gateway process, which answers ``{"message": ...}`` (``"error": true`` when it
refuses). Every method's happy path and every bad-params path.

The RPC ``reboot`` is covered with the restart operation in test_restart.py.
"""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import GatewayFactory, alive
from teg_gateway import __version__
from teg_gateway.sandbox.controller import QueueWriter, now_ms
from teg_gateway.sandbox.process import GatewayProcess
from teg_gateway.sandbox.thingsboard import FakeThingsBoard
from test_forwarding import WAIT, wait_connected, wait_until

METHODS = {"list", "ping", "status", "reboot", "shutdown", "exit", "restart_controller",
           "run_command", "archive_republish_messages", "archive_discard_messages",
           "init_files"}
MAX_OUTPUT = 64
MAX_TIMEOUT = 20
PY = sys.executable


def error(message: str) -> dict[str, Any]:
    return {"message": message, "error": True}


def write_script(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def shutdown_marker(tmp_path: Path) -> Path:
    return tmp_path / "powered-off"


@pytest.fixture
def gateway(make_gateway: GatewayFactory, thingsboard: FakeThingsBoard, tmp_path: Path,
            shutdown_marker: Path) -> GatewayProcess:
    """A connected gateway with run_command on (a small allow-list) and a harmless
    shutdown command that leaves a marker."""
    poweroff = write_script(tmp_path / "poweroff", f'#!/bin/sh\necho "$@" > {shutdown_marker}\n')
    started = make_gateway(config={"rpc": {
        "run_command_enabled": True,
        "run_command_allow": ["echo", PY, "no-such-program-on-path", "/nonexistent/tool",
                              "df -h", ["find", "/nonexistent", "-name", "*.log"],
                              ["uptime"], "env"],
        "run_command_max_timeout_s": MAX_TIMEOUT, "run_command_max_output": MAX_OUTPUT,
        "shutdown_command": [str(poweroff), "--now"]}})
    started.start()
    wait_connected(thingsboard, started)
    return started


# -- list, ping, status, init_files, unknown methods, malformed requests ------------------


def test_list_describes_every_method(gateway: GatewayProcess,
                                     thingsboard: FakeThingsBoard) -> None:
    reply = thingsboard.rpc("list")
    assert set(reply) == {"message"}
    methods = reply["message"]
    assert set(methods) >= METHODS
    for name, entry in methods.items():
        assert isinstance(entry["description"], str) and entry["description"], name
        assert isinstance(entry["params"], dict), name
    assert set(methods["run_command"]["params"]) == {"command", "timeout_s"}
    for name in ("archive_republish_messages", "archive_discard_messages"):
        assert set(methods[name]["params"]) == {"start_timestamp_ms", "end_timestamp_ms"}


def test_ping_status_and_init_files(gateway: GatewayProcess,
                                    thingsboard: FakeThingsBoard) -> None:
    assert thingsboard.rpc("ping") == {"message": "pong"}
    assert thingsboard.rpc("ping", {}) == {"message": "pong"}
    status = thingsboard.rpc("status")["message"]
    assert status["version"] == __version__
    assert status["thingsboard"] == "connected"
    assert status["local_broker"] == "disabled"
    assert status["controller"] == "not supervised"
    assert status["restart_pending"] is None
    assert isinstance(status["outbox_depth"], int)
    assert isinstance(status["uptime_s"], float | int) and status["uptime_s"] >= 0
    reply = thingsboard.rpc("init_files")
    assert "error" not in reply and isinstance(reply["message"], str)


def test_an_unknown_method_points_to_list(gateway: GatewayProcess,
                                          thingsboard: FakeThingsBoard) -> None:
    assert thingsboard.rpc("reboot_now", {"x": 1}) == error(
        "unknown method 'reboot_now'; the method 'list' shows them all")


def test_a_huge_method_name_gets_a_small_reply(gateway: GatewayProcess,
                                               thingsboard: FakeThingsBoard) -> None:
    reply = thingsboard.rpc("m" * 200_000)
    assert reply["error"] is True and reply["message"].startswith("unknown method 'mmm")
    assert len(json.dumps(reply)) < 1000
    assert thingsboard.rpc("ping") == {"message": "pong"}  # still connected


@pytest.mark.parametrize(("payload", "reply"), [
    (b"not json", error("request is not valid JSON")),
    (b"[1, 2]", error("request is not a JSON object")),
    (b'{"params": {}}', error("request has no method")),
    (b'{"method": "", "params": {}}', error("request has no method")),
    (b'{"method": 5, "params": {}}', error("request has no method")),
    (b'{"method": "ping", "params": [1]}', error("params must be a JSON object")),
    (b'{"method": "ping", "params": 7}', error("params must be a JSON object")),
    (b'{"method": "ping", "params": "{bad"}', error("params is a string that is not JSON")),
    (b'{"method": "ping", "params": "[1]"}', error("params must be a JSON object")),
    # ThingsBoard's forms of "no params", and params as a JSON string, are accepted.
    (b'{"method": "ping"}', {"message": "pong"}),
    (b'{"method": "ping", "params": null}', {"message": "pong"}),
    (b'{"method": "ping", "params": ""}', {"message": "pong"}),
    (b'{"method": "ping", "params": "{}"}', {"message": "pong"}),
])
def test_malformed_requests_get_a_clear_error(gateway: GatewayProcess,
                                              thingsboard: FakeThingsBoard,
                                              payload: bytes,
                                              reply: dict[str, Any]) -> None:
    request_id = thingsboard.rpc_raw(payload)
    assert thingsboard.wait_rpc_response(request_id) == reply


# -- run_command -----------------------------------------------------------------------------


def run(thingsboard: FakeThingsBoard, command: list[str], timeout_s: int = 10) -> Any:
    return thingsboard.rpc("run_command", {"command": command, "timeout_s": timeout_s},
                           timeout=timeout_s + 10)


def test_run_command_runs_an_allowed_program_without_a_shell(
        gateway: GatewayProcess, thingsboard: FakeThingsBoard) -> None:
    result = run(thingsboard, [PY, "-c", "import sys; print('out'); "
                                         "print('err', file=sys.stderr); sys.exit(3)"])["message"]
    assert {k: v for k, v in result.items() if k != "duration_s"} == {
        "exit_code": 3, "timed_out": False, "stdout": "out\n", "stderr": "err\n",
        "truncated": False}
    # No shell: the arguments arrive as they were sent.
    result = run(thingsboard, ["echo", "$HOME", ";", "ls", "|", "`id`"])["message"]
    assert (result["exit_code"], result["stdout"]) == (0, "$HOME ; ls | `id`\n")


def test_run_command_exact_command_lines_run_and_any_arguments_warn(
        gateway: GatewayProcess, thingsboard: FakeThingsBoard) -> None:
    result = run(thingsboard, ["find", "/nonexistent", "-name", "app.log"])["message"]
    assert result["exit_code"] == 1 and "No such file" in result["stderr"]
    assert run(thingsboard, ["df", "-h"])["message"]["exit_code"] == 0
    assert run(thingsboard, ["uptime"])["message"]["exit_code"] == 0
    # The old form (a bare name: any arguments) still works, and is warned about at start
    # for a program that runs its arguments.
    assert run(thingsboard, ["env", "true"])["message"]["exit_code"] == 0
    # The warning at start is the product here: a line for the operator who wrote the list.
    log = gateway.log_text()
    assert "'env' is allowed with ANY arguments" in log
    assert "'echo' is allowed with ANY" not in log


def test_run_command_output_is_capped(gateway: GatewayProcess,
                                      thingsboard: FakeThingsBoard) -> None:
    result = run(thingsboard, [PY, "-c", "import sys; sys.stdout.write('x' * 100000); "
                                         "sys.stderr.write('e' * 10)"])["message"]
    assert result["stdout"] == "x" * MAX_OUTPUT
    assert result["stderr"] == "e" * 10
    assert result["truncated"] is True
    assert result["exit_code"] == 0


def test_run_command_is_killed_at_its_timeout(gateway: GatewayProcess,
                                              thingsboard: FakeThingsBoard,
                                              tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    # The program and a child it started (same process group) are both killed.
    script = ("import os, subprocess, sys, time; "
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
              f"open({str(pid_file)!r}, 'w').write(str(child.pid)); "
              "print('started', flush=True); time.sleep(60)")
    result = run(thingsboard, [PY, "-c", script], timeout_s=1)["message"]
    assert result["timed_out"] is True
    assert result["exit_code"] == -9
    assert result["stdout"] == "started\n"
    child = int(pid_file.read_text())
    wait_until(lambda: not alive(child), "the program's child is gone too", gateway)


def test_long_work_does_not_block_and_is_reported_later(gateway: GatewayProcess,
                                                        thingsboard: FakeThingsBoard,
                                                        tmp_path: Path) -> None:
    """A command that outlasts the reply window: other requests are served meanwhile, the
    reply says it goes on, and its result comes as telemetry rpc_result."""
    gate = tmp_path / "gate"
    script = (f"import os, time\nwhile not os.path.exists({str(gate)!r}): time.sleep(0.02)\n"
              "print('done')")
    request_id = thingsboard.rpc_async("run_command", {"command": [PY, "-c", script],
                                                       "timeout_s": MAX_TIMEOUT})
    assert thingsboard.rpc("ping") == {"message": "pong"}
    assert thingsboard.rpc("status")["message"]["thingsboard"] == "connected"
    assert request_id not in thingsboard.rpc_responses
    assert thingsboard.wait_rpc_response(request_id, timeout=WAIT) == {
        "message": "command started; its result is reported as telemetry rpc_result"}
    gate.write_text("")
    wait_until(lambda: bool(thingsboard.telemetry_values("rpc_result")),
               "the late result as telemetry", gateway)
    outcome = json.loads(thingsboard.telemetry_values("rpc_result")[0])
    assert (outcome["id"], outcome["method"]) == (str(request_id), "run_command")
    assert (outcome["result"]["exit_code"], outcome["result"]["stdout"]) == (0, "done\n")


@pytest.mark.parametrize(("params", "message"), [
    ({"timeout_s": 5}, "param 'command' must be a non-empty list of strings"),
    ({"command": "echo hi", "timeout_s": 5},
     "param 'command' must be a non-empty list of strings"),
    ({"command": [], "timeout_s": 5}, "param 'command' must be a non-empty list of strings"),
    ({"command": ["echo", 1], "timeout_s": 5},
     "param 'command' must be a non-empty list of strings"),
    ({"command": ["echo", "a\u0000b"], "timeout_s": 5},
     "param 'command' must be a non-empty list of strings"),
    ({"command": ["echo"]}, "param 'timeout_s' must be an integer, got None"),
    ({"command": ["echo"], "timeout_s": "5"}, "param 'timeout_s' must be an integer, got '5'"),
    ({"command": ["echo"], "timeout_s": 2.5}, "param 'timeout_s' must be an integer, got 2.5"),
    ({"command": ["echo"], "timeout_s": True},
     "param 'timeout_s' must be an integer, got True"),
    ({"command": ["echo"], "timeout_s": 0}, f"param 'timeout_s' must be from 1 to {MAX_TIMEOUT}"),
    ({"command": ["echo"], "timeout_s": MAX_TIMEOUT + 1},
     f"param 'timeout_s' must be from 1 to {MAX_TIMEOUT}"),
    ({"command": ["rm", "-rf", "/tmp/nothing"], "timeout_s": 5},
     "program 'rm' is not on the allow-list ([rpc] run_command_allow)"),
    # A path is not allowed because its base name is, nor a name because a path is.
    ({"command": ["/bin/echo", "x"], "timeout_s": 5},
     "program '/bin/echo' is not on the allow-list ([rpc] run_command_allow)"),
    ({"command": ["tool"], "timeout_s": 5},
     "program 'tool' is not on the allow-list ([rpc] run_command_allow)"),
    ({"command": ["no-such-program-on-path"], "timeout_s": 5},
     "program 'no-such-program-on-path' is allowed but not found on PATH"),
    ({"command": ["/nonexistent/tool"], "timeout_s": 5},
     "cannot start '/nonexistent/tool': No such file or directory"),
    # Exact command lines: the arguments count, one glob per argument.
    ({"command": ["find", "/nonexistent", "-name", "*.log", "-exec", "id", ";"],
      "timeout_s": 5}, "the arguments of 'find' match no allowed command line ([rpc] "
                       "run_command_allow: find /nonexistent -name '*.log')"),
    ({"command": ["find", "/", "-name", "x.log"], "timeout_s": 5},
     "the arguments of 'find' match no allowed command line ([rpc] run_command_allow: find "
     "/nonexistent -name '*.log')"),
    ({"command": ["df", "-h", "/"], "timeout_s": 5},
     "the arguments of 'df' match no allowed command line ([rpc] run_command_allow: df -h)"),
    ({"command": ["uptime", "-p"], "timeout_s": 5},
     "the arguments of 'uptime' match no allowed command line ([rpc] run_command_allow: "
     "uptime)"),
])
def test_run_command_bad_params(gateway: GatewayProcess, thingsboard: FakeThingsBoard,
                                params: dict[str, Any], message: str) -> None:
    assert thingsboard.rpc("run_command", params) == error(message)


# -- archive ---------------------------------------------------------------------------------


def test_archive_republish_and_discard_inclusive_ranges(gateway: GatewayProcess,
                                                        thingsboard: FakeThingsBoard,
                                                        queue_writer: QueueWriter) -> None:
    base = now_ms() - 60_000
    for seq in range(10):
        queue_writer.write_record({"seq": seq}, ts_ms=base + seq * 1000)
    wait_until(lambda: sorted(thingsboard.telemetry_values("seq")) == list(range(10)),
               "the records are forwarded", gateway)

    def republish(start: int, end: int) -> Any:
        return thingsboard.rpc("archive_republish_messages",
                               {"start_timestamp_ms": start, "end_timestamp_ms": end})

    def discard(start: int, end: int) -> Any:
        return thingsboard.rpc("archive_discard_messages",
                               {"start_timestamp_ms": start, "end_timestamp_ms": end})

    # Both ends are included.
    assert republish(base + 2000, base + 5000) == {"message": 4}
    wait_until(lambda: len(thingsboard.telemetry_values("seq")) == 14,
               "the republished records arrive", gateway)
    assert thingsboard.telemetry_values("seq")[10:] == [2, 3, 4, 5]
    again = [r for r in thingsboard.telemetry() if "seq" in r["values"]][10:]
    assert [r["ts"] for r in again] == [base + s * 1000 for s in (2, 3, 4, 5)]

    assert discard(base, base + 2000) == {"message": 3}
    assert discard(base, base + 2000) == {"message": 0}
    assert republish(base - 10_000, base + 9000) == {"message": 7}
    wait_until(lambda: len(thingsboard.telemetry_values("seq")) == 21,
               "the remaining records arrive again", gateway)
    assert thingsboard.telemetry_values("seq")[14:] == [3, 4, 5, 6, 7, 8, 9]
    assert republish(base + 100_000, base + 200_000) == {"message": 0}


@pytest.mark.parametrize("method", ["archive_republish_messages", "archive_discard_messages"])
@pytest.mark.parametrize(("params", "message"), [
    ({}, "param 'start_timestamp_ms' must be an integer, got None"),
    ({"end_timestamp_ms": 5}, "param 'start_timestamp_ms' must be an integer, got None"),
    ({"start_timestamp_ms": 5}, "param 'end_timestamp_ms' must be an integer, got None"),
    ({"start_timestamp_ms": "1", "end_timestamp_ms": 5},
     "param 'start_timestamp_ms' must be an integer, got '1'"),
    ({"start_timestamp_ms": 1, "end_timestamp_ms": 5.5},
     "param 'end_timestamp_ms' must be an integer, got 5.5"),
    ({"start_timestamp_ms": False, "end_timestamp_ms": 5},
     "param 'start_timestamp_ms' must be an integer, got False"),
    ({"start_timestamp_ms": 5, "end_timestamp_ms": 5},
     "start_timestamp_ms must be before end_timestamp_ms"),
    ({"start_timestamp_ms": 6, "end_timestamp_ms": 5},
     "start_timestamp_ms must be before end_timestamp_ms"),
    # Beyond 64 bits: a refusal, not an internal error.
    ({"start_timestamp_ms": 1, "end_timestamp_ms": 2**64},
     f"param 'end_timestamp_ms' must be from {-2**63} to {2**63 - 1}, got {2**64}"),
    ({"start_timestamp_ms": -2**63 - 1, "end_timestamp_ms": 5},
     f"param 'start_timestamp_ms' must be from {-2**63} to {2**63 - 1}, got {-2**63 - 1}"),
])
def test_archive_bad_params(gateway: GatewayProcess, thingsboard: FakeThingsBoard, method: str,
                            params: dict[str, Any], message: str) -> None:
    assert thingsboard.rpc(method, params) == error(message)


# -- shutdown, exit, restart_controller ------------------------------------------------------


def test_shutdown_runs_the_configured_command_after_replying(
        gateway: GatewayProcess, thingsboard: FakeThingsBoard, shutdown_marker: Path,
        tmp_path: Path) -> None:
    assert thingsboard.rpc("shutdown") == {
        "message": f"powering off with {tmp_path / 'poweroff'} --now"}
    wait_until(shutdown_marker.exists, "the shutdown command runs", gateway)
    wait_until(lambda: shutdown_marker.read_text() == "--now\n",
               "the shutdown command got its arguments", gateway)


def test_exit_stops_the_gateway_gracefully(gateway: GatewayProcess,
                                           thingsboard: FakeThingsBoard) -> None:
    assert thingsboard.rpc("exit") == {
        "message": "gateway exiting; its service manager starts it again"}
    assert gateway.wait(WAIT) == 0


def test_restart_controller_restarts_the_supervised_controller(
        make_gateway: GatewayFactory, thingsboard: FakeThingsBoard, tmp_path: Path) -> None:
    starts = tmp_path / "starts"
    controller = (f"import os, time\nopen({str(starts)!r}, 'a').write(f'{{os.getpid()}}\\n')\n"
                  "time.sleep(60)")
    gateway = make_gateway(config={"controller": {
        "runtime": "process", "command": [PY, "-c", controller], "stop_grace_s": 2.0}})
    gateway.start()
    wait_connected(thingsboard, gateway)
    wait_until(lambda: starts.exists() and len(starts.read_text().split()) == 1,
               "the controller starts", gateway)
    reply = thingsboard.rpc("restart_controller", {"reason": "test"})
    assert "error" not in reply, reply
    assert reply["message"].startswith("controller restarted (")
    # Started: the new process writes its pid once the interpreter is up.
    wait_until(lambda: len(starts.read_text().split()) == 2, "the new run", gateway)
    wait_until(lambda: "RPC restart_controller: test" in thingsboard.telemetry_values(
        "controller_restart_reason"), "the reason is reported", gateway)
    # Without params too; and a reason that is not text is refused.
    assert "error" not in thingsboard.rpc("restart_controller")
    assert thingsboard.rpc("restart_controller", {"reason": 5}) == error(
        "param 'reason' must be text, got 5")


# -- a gateway with the defaults: run_command off, no controller ------------------------------


def test_disabled_and_unavailable_methods_say_why(make_gateway: GatewayFactory,
                                                  thingsboard: FakeThingsBoard) -> None:
    gateway = make_gateway(config={"rpc": {"shutdown_command": ["/nonexistent/poweroff"]}})
    gateway.start()
    wait_connected(thingsboard, gateway)
    assert thingsboard.rpc("run_command", {"command": ["echo", "hi"], "timeout_s": 5}) == error(
        "run_command is disabled; enable it with [rpc] run_command_enabled = true and list "
        "the programs in [rpc] run_command_allow")
    assert thingsboard.rpc("shutdown") == error(
        "the shutdown command '/nonexistent/poweroff' is not available on this host")
    assert thingsboard.rpc("restart_controller") == error(
        'no controller is supervised (controller.runtime is "none")')
    assert gateway.running
