"""The restart operation, by thin-edge.io's contract (``te/device/main///cmd/restart/<id>``).

A command of the operations engine whose state is on disk before anything is said on the
bus:

1. ``init`` arrives: the command is persisted (atomic write + fsync) as ``executing`` with
   the current boot id, ``executing`` is published retained (QoS 1) and its PUBACK
   awaited, then the reboot command runs (no shell).
2. The reboot command cannot start or exits non-zero, or the device is still up after the
   timeout: ``failed`` with a reason.
3. On every start the gateway resumes a persisted ``executing`` command: another boot id
   means the device restarted (``successful``); the same boot id means only the gateway
   restarted (``failed``). A boot id does not depend on the clock, which on a device
   without a real-time clock can be wrong right after boot.
4. A decided outcome is on disk, reported as telemetry and published until the broker
   acknowledges it, across reconnects and restarts. The operation is free for the next
   command as soon as the outcome is decided: a requester that saw the outcome may send a
   new ``init`` at once.

Unknown fields of the command payload are carried unchanged into later states. Only the
requester clears a command; commands created by the RPC ``reboot`` (ids ``tb-rpc-*``) are
cleared by the gateway once they end, since the gateway is their requester.

State: ``<data>/state/restart.json``, a :class:`CommandRepository` of :class:`RestartJob`.
A file written by an earlier release (``pending``/``finished``/``recent``) is read through
:func:`legacy_state`, so a device upgraded in the middle of a restart resolves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from teg_gateway.bounds import clip
from teg_gateway.clock import Clock
from teg_gateway.config import RestartSettings
from teg_gateway.local.topics import RESTART_CAPABILITY
from teg_gateway.operations.engine import (
    MAX_REASON_CHARS,
    Command,
    CommandChannel,
    CommandRepository,
    LocalCommand,
    Nothing,
    Operation,
    Runner,
    Status,
    encode,
    parse_request,
)

log = logging.getLogger(__name__)

RPC_PREFIX = "tb-rpc-"
OUTPUT_TAIL = 400
# An RPC reboot that has not come back through the local bus by then is forgotten.
REQUEST_TIMEOUT_S = 30.0
# Finished commands remembered, so that a repeated init of one of them is recognised.
RECENT_IDS = 50

SAME_BOOT = "The gateway restarted but the device did not (same boot id)"
NO_BOOT_ID = "Cannot tell whether the device restarted: the boot id cannot be read"
LEGACY_UNKNOWN = "ended under an earlier release of the gateway"

Report = Callable[[dict[str, Any]], None]


@dataclass
class RestartJob:
    """What the gateway keeps about one restart command (never published)."""

    #: The boot id when the reboot command was about to run ("" if it never was).
    boot_id: str = ""
    #: The command's states go to the local bus (False: an RPC reboot without a broker).
    via_bus: bool = True
    started_ms: int = 0
    #: The outcome was sent to ThingsBoard as telemetry.
    reported: bool = False


Repository = CommandRepository[RestartJob, Nothing]


def describe_timeout(seconds: float) -> str:
    """"5 minutes", "90 seconds", "1 minute"."""
    if seconds >= 60 and seconds % 60 == 0:
        minutes = int(seconds // 60)
        return f"{minutes} minute{'s' if minutes != 1 else ''}"
    whole = int(seconds) if float(seconds).is_integer() else seconds
    return f"{whole} second{'s' if whole != 1 else ''}"


def read_boot_id(path: str) -> str:
    """The current boot id; raises OSError when it cannot be read."""
    text = Path(path).read_text().strip()
    if not text:
        raise OSError(f"{path} is empty")
    return text


def wire_message(cmd: Command[RestartJob]) -> dict[str, Any]:
    """The command as published: the requester's fields, ``status`` and (when failed)
    ``reason``; what the gateway keeps about it (:class:`RestartJob`) stays here."""
    return cmd.message(with_payload=False)


def _origin(job: RestartJob) -> str:
    return "local" if job.via_bus else "gateway"


def topic_of(command_id: str) -> str:
    return f"{RESTART_CAPABILITY}/{command_id}"


# -- the layout of earlier releases -------------------------------------------------------


def legacy_state(value: dict[str, Any]) -> dict[str, Any]:
    """``restart.json`` as earlier releases wrote it, in the repository's layout:

    - ``pending``: the command being executed (``phase`` "executing", its ``boot_id``) or
      decided but not moved yet (``phase`` "final");
    - ``finished``: outcomes decided but not yet acknowledged by the broker, by id;
    - ``recent``: ids already handled (their outcomes were delivered).

    What does not have that shape is left for the repository to refuse (it is then
    quarantined as damaged)."""
    rows: dict[str, dict[str, Any]] = {}
    recent = value.get("recent", [])
    for command_id in recent if isinstance(recent, list) else []:
        if isinstance(command_id, str):
            rows[command_id] = {"id": command_id, "status": "failed",
                                "reason": LEGACY_UNKNOWN, "delivered": True}
    finished = value.get("finished", {})
    records = list(finished.values()) if isinstance(finished, dict) else []
    pending = value.get("pending")
    if pending is not None:
        records.append(pending)
    for record in records:
        row = _legacy_row(record)
        rows.pop(str(row.get("id")), None)
        rows[str(row.get("id"))] = row
    return {"facts": {}, "commands": list(rows.values())}


def _legacy_row(record: Any) -> dict[str, Any]:
    if not isinstance(record, dict):
        return {"id": None}
    command = record.get("command")
    command = command if isinstance(command, dict) else {}
    extra = {k: v for k, v in command.items() if k not in ("status", "reason")}
    status = command.get("status")
    if record.get("phase") == "executing":
        status = "executing"
    job = {"boot_id": record.get("boot_id") or "", "via_bus": record.get("via_bus", True),
           "started_ms": record.get("started_ms", 0)}
    return {"id": record.get("id"), "status": status, "reason": command.get("reason", ""),
            "payload": job, "extra": extra,
            "origin": "local" if record.get("via_bus", True) else "gateway"}


# -- the operation ----------------------------------------------------------------------


class RestartOperation(Operation):
    """Serves restart commands from the local bus and from the RPC ``reboot``.

    ``channel`` publishes the states on the local bus (retained, QoS 1, each awaited until
    acknowledged); its ``connected`` event tells whether the bus is up. ``report`` sends
    telemetry to ThingsBoard (through the outbox).
    """

    name = "restart"

    def __init__(self, settings: RestartSettings, state_path: Path, channel: CommandChannel,
                 report: Report, clock: Clock) -> None:
        self.settings = settings
        self.channel = channel
        self.report = report
        self.clock = clock
        self.repo: Repository = CommandRepository(
            state_path, RestartJob, Nothing, clock=clock, keep_finished=RECENT_IDS,
            legacy=legacy_state)
        self.runner = Runner()
        self._loaded = False
        self._resumed = False
        # An RPC reboot on its way through the local bus: (command id, when asked).
        self._requested: tuple[str, float] | None = None

    @property
    def state_path(self) -> Path:
        return self.repo.path

    def local_commands(self) -> list[LocalCommand]:
        return [LocalCommand("restart", {}, self.on_command)]

    # -- persisted state ------------------------------------------------------------------

    def _load(self) -> None:
        """Read ``restart.json`` once, and decide what an earlier run of the gateway left
        executing (by the boot id). A damaged file has been quarantined by then and the
        command it held ended failed: say so, with this operation's reason."""
        if self._loaded:
            return
        self._loaded = True
        self._save(self.repo.load)
        damage = self.repo.damage
        for cmd in self.repo.active():
            self._resolve_after_start(cmd)
        if damage is None:
            return
        reason = clip(f"The gateway's restart state was damaged: {damage.text}",
                      MAX_REASON_CHARS)
        failed = [c for c in (self.repo.get(i) for i in damage.failed) if c is not None]
        for cmd in failed:
            self._save(self.repo.resolve, cmd, Status.FAILED, reason)
            log.error("restart %s failed: %s", cmd.id, reason)
        if not failed:
            log.error("restart: no command under way could be read from the damaged state "
                      "file")
            self.report({"restart_status": "failed", "restart_reason": reason,
                         "restart_id": ""})

    def _save(self, step: Callable[..., object], *args: Any) -> bool:
        """A repository step; False (logged) when the file cannot be written."""
        try:
            step(*args)
            return True
        except OSError as exc:
            log.error("restart: cannot write %s: %s", self.repo.path, exc)
            return False

    def executing(self) -> Command[RestartJob] | None:
        """The command being executed, if any."""
        self._load()
        active = self.repo.active()
        return active[0] if active else None

    def pending(self) -> dict[str, Any] | None:
        """The command being executed, if any: its id, status and what is kept about it."""
        cmd = self.executing()
        if cmd is None:
            return None
        return {"id": cmd.id, "status": cmd.status.value, **encode(cmd.payload)}

    def in_progress(self) -> str | None:
        """The id of the restart being executed, or asked for by an RPC and not yet
        taken up (for at most REQUEST_TIMEOUT_S); None when a restart may begin."""
        cmd = self.executing()
        if cmd is not None:
            return cmd.id
        if self._requested is not None:
            command_id, asked = self._requested
            if self.clock.monotonic() - asked < REQUEST_TIMEOUT_S:
                return command_id
            self._requested = None
        return None

    def request(self, command_id: str) -> None:
        """An RPC asks for restart ``command_id`` (it comes back through the bus, or is
        started with :meth:`start`): until it is taken up, :meth:`in_progress` names it."""
        self._requested = (command_id, self.clock.monotonic())

    # -- entry points ---------------------------------------------------------------------

    def on_command(self, command_id: str, payload: bytes) -> None:
        """A message on ``te/device/main///cmd/restart/<id>`` (only ``init`` is acted on)."""
        request = parse_request(payload)  # None: cleared by the requester, or not JSON
        if request is None or request.get("status") != "init":
            return
        self._load()
        if self.repo.get(command_id) is not None:
            log.info("restart command %s was already handled; ignored", clip(command_id))
            return
        # It came from the bus, so its states go there, even if the message was delivered
        # before the bus marked itself connected (a retained init at connect time).
        extra = {k: v for k, v in request.items() if k != "status"}
        self._begin(command_id, extra, via_bus=True)

    def start(self, command_id: str) -> None:
        """Start a restart without a requester on the bus (RPC ``reboot``)."""
        self._load()
        if self.repo.get(command_id) is not None:
            return  # it came back through the bus after all
        self._begin(command_id, {}, via_bus=self.channel.connected.is_set())

    async def run(self) -> None:
        """At start: resolve what was under way (see :meth:`resume`)."""
        await self.resume()

    async def resume(self) -> None:
        """At start: resolve a restart that was executing when the gateway stopped (see
        :meth:`_load`), and publish every outcome that was decided but not yet
        acknowledged. Runs once."""
        if self._resumed:
            return
        self._resumed = True
        self._load()
        for cmd in self.repo.undelivered():
            self._spawn(self._finish(cmd), cmd)

    def _resolve_after_start(self, cmd: Command[RestartJob]) -> None:
        boot_id = ""
        if cmd.payload.boot_id:
            try:
                boot_id = read_boot_id(self.settings.boot_id_file)
            except OSError as exc:
                log.error("restart %s: cannot read the boot id: %s", cmd.id, exc)
        if boot_id and boot_id != cmd.payload.boot_id:
            log.info("restart %s: the device restarted (new boot id)", cmd.id)
            self._save(self.repo.resolve, cmd, Status.SUCCESSFUL, "")
            return
        reason = SAME_BOOT if boot_id else NO_BOOT_ID
        log.error("restart %s failed: %s", cmd.id, reason)
        self._save(self.repo.resolve, cmd, Status.FAILED, reason)

    # -- the state machine ----------------------------------------------------------------

    def _begin(self, command_id: str, extra: dict[str, Any], via_bus: bool) -> None:
        """Persist the new command (executing, or failed when it cannot run) before
        anything is published, then hand the rest to a task."""
        if self._requested is not None and self._requested[0] == command_id:
            self._requested = None
        job = RestartJob(via_bus=via_bus, started_ms=self.clock.now_ms())
        other = self.executing()
        if other is not None:
            self._fail_at_once(command_id, job, extra,
                               f"Another restart ({other.id}) is in progress", report=False)
            return
        try:
            job.boot_id = read_boot_id(self.settings.boot_id_file)
        except OSError as exc:
            self._fail_at_once(command_id, job, extra,
                               f"Cannot read the boot id from "
                               f"{self.settings.boot_id_file}: {exc}")
            return
        try:
            cmd = self.repo.create(command_id, job, origin=_origin(job), extra=extra)
        except OSError as exc:
            self.repo.commands.pop(command_id, None)
            self._fail_at_once(command_id, job, extra,
                               f"Cannot persist the command in {self.repo.path}: "
                               f"{exc.strerror or exc}")
            return
        self.report({"restart_status": "executing", "restart_reason": "",
                     "restart_id": clip(command_id)})
        self._spawn(self._execute(cmd), cmd)

    def _fail_at_once(self, command_id: str, job: RestartJob, extra: dict[str, Any],
                      reason: str, *, report: bool = True) -> None:
        """A command that never executes: failed, then published (and reported as
        telemetry with ``report``)."""
        job.reported = not report
        log.warning("restart %s %s: %s", clip(command_id), "failed" if report else "refused",
                    reason)
        now = self.clock.now_ms()
        cmd: Command[RestartJob] = Command(
            command_id, Status.FAILED, job, reason=clip(reason, MAX_REASON_CHARS),
            extra=dict(extra), origin=_origin(job), created_ms=now, updated_ms=now)
        if not self._save(self.repo.put, cmd):
            self.repo.commands[command_id] = cmd  # kept in memory: still published
        self._spawn(self._finish(cmd), cmd)

    async def _execute(self, cmd: Command[RestartJob]) -> None:
        if cmd.payload.via_bus and not await self.channel.send(topic_of(cmd.id),
                                                               wire_message(cmd)):
            await self._decide(cmd, "The executing state could not be published on the "
                                    "local broker")
            return
        log.warning("restart %s: running %s", cmd.id, self.settings.command)
        started = self.clock.monotonic()
        reason = await self._run_reboot_command()
        if reason is None:
            # The device is going down; the gateway will be stopped on the way. The
            # timeout counts from the start of the reboot command.
            await self.clock.sleep(max(0.0, self.settings.timeout_s
                                       - (self.clock.monotonic() - started)))
            reason = (f"The device has not restarted within "
                      f"{describe_timeout(self.settings.timeout_s)}")
        await self._decide(cmd, reason)

    async def _run_reboot_command(self) -> str | None:
        """None when the command ran and exited 0, else why the restart failed."""
        argv = self.settings.command
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            return f"The reboot command {argv[0]!r} cannot be started: {exc.strerror or exc}"
        # The timeout runs on the gateway's clock. Stopping the gateway (the device going
        # down) leaves the command alone; only a command that outlives the timeout is killed.
        talk = asyncio.ensure_future(proc.communicate())
        limit = asyncio.ensure_future(self.clock.sleep(self.settings.timeout_s))
        try:
            await asyncio.wait({talk, limit}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            talk.cancel()
            limit.cancel()
            raise
        limit.cancel()
        if not talk.done():
            talk.cancel()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            return (f"The reboot command did not finish within "
                    f"{describe_timeout(self.settings.timeout_s)}")
        output, _ = talk.result()
        if proc.returncode != 0:
            tail = output.decode(errors="replace").strip()[-OUTPUT_TAIL:]
            return (f"The reboot command exited with code {proc.returncode}"
                    + (f": {tail}" if tail else ""))
        return None

    async def _decide(self, cmd: Command[RestartJob], reason: str) -> None:
        log.error("restart %s failed: %s", cmd.id, reason)
        self._save(self.repo.resolve, cmd, Status.FAILED, reason)
        await self._finish(cmd)

    async def _finish(self, cmd: Command[RestartJob]) -> None:
        """Report the outcome, publish it (until the broker acknowledges it), and mark it
        delivered then."""
        if not cmd.payload.reported:
            self.report({"restart_status": cmd.status.value,
                         "restart_reason": clip(cmd.reason, MAX_REASON_CHARS),
                         "restart_id": clip(cmd.id)})
            cmd.payload.reported = True
            self._save(self.repo.put, cmd)
        if cmd.payload.via_bus:
            topic = topic_of(cmd.id)
            await self.channel.deliver(topic, wire_message(cmd))
            if cmd.id.startswith(RPC_PREFIX):
                await self.channel.send(topic, None)  # the gateway is the requester
        self._save(self.repo.delivered, cmd)

    def _spawn(self, coro: Coroutine[Any, Any, None], cmd: Command[RestartJob]) -> None:
        """Run a step of ``cmd`` (one at a time per command); a step that fails without
        deciding ends the command failed."""
        def failed(exc: BaseException) -> None:
            if cmd.final:
                return
            self._save(self.repo.resolve, cmd, Status.FAILED,
                       f"The restart failed unexpectedly: {exc!r}")
            self._spawn(self._finish(cmd), cmd)

        self.runner.spawn(coro, key=cmd.id, on_error=failed)

    async def close(self) -> None:
        await self.runner.close()
