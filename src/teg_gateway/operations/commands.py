"""The gateway's own RPC methods (``status``, ``reboot``, ``run_command``, archive, ...)."""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import logging
import os
import shlex
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from teg_gateway import __version__
from teg_gateway.bounds import VALUE_LIMIT, bounded_json, clip, show
from teg_gateway.config import RpcSettings
from teg_gateway.mqttlink import ConnectionLost
from teg_gateway.operations.restart import RPC_PREFIX, RestartOperation
from teg_gateway.operations.rpc import RpcDispatcher, RpcError, current_request_id, require_int
from teg_gateway.store.archive import discard_chunk, republish_chunk
from teg_gateway.store.stores import Stores

log = logging.getLogger(__name__)

ARCHIVE_CHUNK = 20_000
ACTION_DELAY_S = 1.0  # lets the reply leave before the gateway or the host goes down


@dataclass
class GatewayControls:
    """What the RPC methods may touch, handed over by the gateway."""

    stores: Stores
    rpc_settings: RpcSettings
    restart: RestartOperation
    bus_publish: Callable[[str, bytes], asyncio.Future[None]]
    bus_connected: asyncio.Event
    status: Callable[[], dict[str, Any]]
    report: Callable[[dict[str, Any]], None]
    request_stop: Callable[[], None]
    wake_forwarder: Callable[[], None]


def register_gateway_rpc(rpc: RpcDispatcher, controls: GatewayControls) -> None:
    """Register every gateway method on the dispatcher."""
    methods = GatewayMethods(rpc, controls)
    rpc.register("ping", "answers pong", methods.ping)
    rpc.register("status", "the gateway's own state: version, uptime, connections, outbox, "
                 "controller", methods.status)
    rpc.register("reboot", "reboot the host through the restart operation; the outcome is "
                 "reported as telemetry restart_status/restart_reason", methods.reboot)
    rpc.register("shutdown", "power off the host with the configured command",
                 methods.shutdown)
    rpc.register("exit", "stop the gateway gracefully (its service manager starts it again)",
                 methods.exit)
    rpc.register("run_command", "run an allowed program without a shell (off unless "
                 "configured)", methods.run_command,
                 {"command": "list of strings", "timeout_s": "integer seconds"})
    range_params = {"start_timestamp_ms": "integer, inclusive",
                    "end_timestamp_ms": "integer, inclusive, after the start"}
    rpc.register("archive_republish_messages", "send archived records of a time range again "
                 "(through the outbox)", methods.archive_republish, range_params)
    rpc.register("archive_discard_messages", "delete archived records of a time range",
                 methods.archive_discard, range_params)


class GatewayMethods:
    def __init__(self, rpc: RpcDispatcher, controls: GatewayControls) -> None:
        self.rpc = rpc
        self.c = controls
        self._later: set[asyncio.Task[None]] = set()
        self.allow_rules = parse_allow(controls.rpc_settings.run_command_allow)
        if controls.rpc_settings.run_command_enabled:
            warn_about_allow_rules(self.allow_rules)

    def _late_reporter(self, method: str) -> Callable[[Any, BaseException | None], None]:
        request_id = current_request_id.get()

        def report(result: Any, error: BaseException | None) -> None:
            outcome = {"id": request_id, "method": method}
            if error is None:
                outcome["result"] = result
            else:
                outcome["error"] = clip(error, 1000)
            text = bounded_json(outcome, VALUE_LIMIT)
            log.info("RPC %s (%s) finished: %s", method, clip(request_id, 64), clip(text, 2000))
            self.c.report({"rpc_result": text})

        return report

    def _after_reply(self, action: Callable[[], Any]) -> None:
        async def later() -> None:
            await asyncio.sleep(ACTION_DELAY_S)
            result = action()
            if asyncio.iscoroutine(result):
                await result

        task = asyncio.ensure_future(later())
        self._later.add(task)
        task.add_done_callback(self._later.discard)

    async def ping(self, _params: dict[str, Any]) -> Any:
        return "pong"

    async def status(self, _params: dict[str, Any]) -> Any:
        return {"version": __version__, **self.c.status()}

    async def reboot(self, _params: dict[str, Any]) -> Any:
        other = self.c.restart.in_progress()
        if other is not None:
            raise RpcError(f"another restart ({other}) is in progress")
        command_id = f"{RPC_PREFIX}{current_request_id.get()}"
        self.c.restart.request(command_id)
        topic = f"te/device/main///cmd/restart/{command_id}"
        if self.c.bus_connected.is_set():
            try:
                await asyncio.wait_for(self.c.bus_publish(
                    topic, json.dumps({"status": "init"}).encode()), 5.0)
            except (ConnectionLost, TimeoutError):
                self.c.restart.start(command_id)
        else:
            self.c.restart.start(command_id)
        return (f"restart {command_id} started; its outcome is reported as telemetry "
                "restart_status and restart_reason")

    async def shutdown(self, _params: dict[str, Any]) -> Any:
        argv = self.c.rpc_settings.shutdown_command
        if shutil.which(argv[0]) is None:
            raise RpcError(f"the shutdown command {argv[0]!r} is not available on this host")

        async def power_off() -> None:
            log.warning("RPC shutdown: running %s", argv)
            result = await run_program(argv, 60.0, 4096)
            if result["exit_code"] != 0:
                log.error("shutdown command failed: %s", result)
                self.c.report({"rpc_result": bounded_json({"method": "shutdown",
                                                           "error": result}, VALUE_LIMIT)})

        self._after_reply(power_off)
        return f"powering off with {' '.join(argv)}"

    async def exit(self, _params: dict[str, Any]) -> Any:
        self._after_reply(self.c.request_stop)
        return "gateway exiting; its service manager starts it again"

    async def run_command(self, params: dict[str, Any]) -> Any:
        settings = self.c.rpc_settings
        if not settings.run_command_enabled:
            raise RpcError("run_command is disabled; enable it with [rpc] run_command_enabled "
                           "= true and list the programs in [rpc] run_command_allow")
        argv = params.get("command")
        if not isinstance(argv, list) or not argv or not all(
                isinstance(a, str) and "\0" not in a for a in argv):
            raise RpcError("param 'command' must be a non-empty list of strings")
        timeout = require_int(params, "timeout_s")
        if not 1 <= timeout <= settings.run_command_max_timeout_s:
            raise RpcError(f"param 'timeout_s' must be from 1 to "
                           f"{settings.run_command_max_timeout_s:g}")
        program = allowed_program(argv, self.allow_rules)
        work = run_program([program, *argv[1:]], float(timeout), settings.run_command_max_output)
        return await self.rpc.result_or_progress(
            work, "command started; its result is reported as telemetry rpc_result",
            self._late_reporter("run_command"))

    def _time_range(self, params: dict[str, Any]) -> tuple[int, int]:
        start = require_int(params, "start_timestamp_ms")
        end = require_int(params, "end_timestamp_ms")
        if start >= end:
            raise RpcError("start_timestamp_ms must be before end_timestamp_ms")
        return start, end

    async def archive_republish(self, params: dict[str, Any]) -> Any:
        start, end = self._time_range(params)

        async def work() -> int:
            total, after = 0, 0
            while True:
                count, after = republish_chunk(self.c.stores.archive, start, end, after,
                                               ARCHIVE_CHUNK)
                if not count:
                    return total
                total += count
                self.c.wake_forwarder()
                await asyncio.sleep(0)

        return await self.rpc.result_or_progress(
            work(), "republishing; the count is reported as telemetry rpc_result",
            self._late_reporter("archive_republish_messages"))

    async def archive_discard(self, params: dict[str, Any]) -> Any:
        start, end = self._time_range(params)

        async def work() -> int:
            total = 0
            while True:
                count = discard_chunk(self.c.stores.archive, start, end, ARCHIVE_CHUNK)
                total += count
                if count < ARCHIVE_CHUNK:
                    return total
                await asyncio.sleep(0)

        return await self.rpc.result_or_progress(
            work(), "discarding; the count is reported as telemetry rpc_result",
            self._late_reporter("archive_discard_messages"))


#: Programs that run their arguments as a command or as code: allowed with any arguments,
#: they allow anything (matched on the base name, as globs).
RUNS_ITS_ARGUMENTS = (
    "sh", "bash", "dash", "zsh", "ksh", "csh", "tcsh", "fish", "busybox", "env", "find",
    "xargs", "python*", "pypy*", "perl*", "ruby*", "node*", "nodejs", "lua*", "php*",
    "tclsh*", "awk", "gawk", "mawk", "nawk", "sed", "sudo", "su", "doas", "runuser", "nice",
    "ionice", "nohup", "timeout", "stdbuf", "setsid", "chroot", "watch", "time", "strace",
    "ltrace", "gdb", "flock", "script", "ssh", "systemd-run", "docker", "podman", "git",
    "tar", "rsync", "make", "vi", "vim", "nsenter", "unshare", "chrt", "taskset", "caffeinate")


@dataclass(frozen=True)
class AllowRule:
    """One entry of ``[rpc] run_command_allow``: the program (a name looked up on PATH,
    or an absolute path), and the argument globs (None: any arguments)."""

    program: str
    args: tuple[str, ...] | None

    def matches(self, argv: list[str]) -> bool:
        if argv[0] != self.program:
            return False
        if self.args is None:
            return True
        return len(argv) - 1 == len(self.args) and all(
            fnmatch.fnmatchcase(arg, pattern) for arg, pattern in zip(argv[1:], self.args,
                                                                     strict=True))

    def describe(self) -> str:
        if self.args is None:
            return f"{self.program} (any arguments)"
        return shlex.join([self.program, *self.args])

    @property
    def runs_anything(self) -> bool:
        """Any arguments to a program that executes its arguments."""
        name = os.path.basename(self.program)
        return self.args is None and any(fnmatch.fnmatchcase(name, p)
                                         for p in RUNS_ITS_ARGUMENTS)


def parse_allow(entries: list[str | list[str]]) -> list[AllowRule]:
    """The rules of ``[rpc] run_command_allow`` (checked at start by the config): a list
    is an exact command line; a string with spaces is split like a shell would; a bare
    program name or path allows any arguments."""
    rules = []
    for entry in entries:
        if isinstance(entry, list):
            words = list(entry)
        elif entry.strip() != entry or any(c.isspace() for c in entry):
            words = shlex.split(entry)
        else:
            rules.append(AllowRule(entry, None))
            continue
        rules.append(AllowRule(words[0], tuple(words[1:])))
    return rules


def warn_about_allow_rules(rules: list[AllowRule]) -> None:
    """One warning per rule that would let run_command run anything."""
    for rule in rules:
        if rule.runs_anything:
            log.warning("[rpc] run_command_allow: %r is allowed with ANY arguments, and it "
                        "runs what its arguments say: run_command can run anything. Allow "
                        "exact command lines instead, e.g. [\"%s\", \"--version\"]",
                        rule.program, rule.program)


def allowed_program(argv: list[str], rules: list[AllowRule]) -> str:
    """The path to run for ``argv[0]`` if a rule allows ``argv``; RpcError otherwise.

    An entry with a ``/`` allows exactly that path; a bare name allows that name, looked
    up on PATH. A path that is not itself on the list is refused even if its base name is.
    """
    program = argv[0]
    mine = [r for r in rules if r.program == program]
    if not mine:
        raise RpcError(f"program {show(program)} is not on the allow-list ([rpc] "
                       "run_command_allow)")
    if not any(r.matches(argv) for r in mine):
        shown = "; ".join(r.describe() for r in mine)
        raise RpcError(f"the arguments of {show(program)} match no allowed command line "
                       f"([rpc] run_command_allow: {clip(shown, 500)})")
    resolved = program if "/" in program else shutil.which(program)
    if resolved is None:
        raise RpcError(f"program {show(program)} is allowed but not found on PATH")
    return resolved


async def run_program(argv: list[str], timeout_s: float, max_output: int) -> dict[str, Any]:
    """Run without a shell; capture at most ``max_output`` bytes of each stream; kill the
    whole process group at the timeout."""
    started = time.monotonic()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, start_new_session=True)
    except OSError as exc:
        raise RpcError(f"cannot start {argv[0]!r}: {exc.strerror or exc}") from None
    assert proc.stdout is not None and proc.stderr is not None
    readers = [asyncio.ensure_future(_read_capped(proc.stdout, max_output)),
               asyncio.ensure_future(_read_capped(proc.stderr, max_output))]
    timed_out = False
    try:
        await asyncio.wait_for(proc.wait(), timeout_s)
    except TimeoutError:
        timed_out = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
    try:
        (out, out_cut), (err, err_cut) = await asyncio.wait_for(asyncio.gather(*readers), 5.0)
    except TimeoutError:  # a descendant that left the group still holds the pipes
        for reader in readers:
            reader.cancel()
        (out, out_cut), (err, err_cut) = (b"", True), (b"", True)
    return {"exit_code": proc.returncode, "timed_out": timed_out,
            "stdout": out.decode(errors="replace"), "stderr": err.decode(errors="replace"),
            "truncated": out_cut or err_cut,
            "duration_s": round(time.monotonic() - started, 3)}


async def _read_capped(stream: asyncio.StreamReader, limit: int) -> tuple[bytes, bool]:
    kept = bytearray()
    cut = False
    while chunk := await stream.read(65536):
        room = limit - len(kept)
        if room > 0:
            kept += chunk[:room]
        if len(chunk) > room:
            cut = True
    return bytes(kept), cut
