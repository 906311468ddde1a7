"""The restart operation, by thin-edge.io's contract (``te/device/main///cmd/restart/<id>``).

A state machine whose state is on disk before anything is said on the bus:

1. ``init`` arrives: the command is persisted (atomic write + fsync) with the current
   boot id, ``executing`` is published retained (QoS 1) and its PUBACK awaited, then the
   reboot command runs (no shell).
2. The reboot command cannot start or exits non-zero, or the device is still up after the
   timeout: ``failed`` with a reason.
3. On every start the gateway resumes a persisted ``executing`` command: another boot id
   means the device restarted (``successful``); the same boot id means only the gateway
   restarted (``failed``). A boot id does not depend on the clock, which on a device
   without a real-time clock can be wrong right after boot.
4. A decided outcome moves from ``pending`` to ``finished`` (on disk) and is published
   until the broker acknowledges it, across reconnects and restarts. The operation is
   free for the next command as soon as the outcome is decided: a requester that saw the
   outcome may send a new ``init`` at once.

Unknown fields of the command payload are carried unchanged into later states. Only the
requester clears a command; commands created by the RPC ``reboot`` (ids ``tb-rpc-*``) are
cleared by the gateway once they end, since the gateway is their requester.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from teg_gateway.bounds import clip
from teg_gateway.clock import now_ms
from teg_gateway.config import RestartSettings
from teg_gateway.local.topics import RESTART_CAPABILITY
from teg_gateway.mqttlink import ConnectionLost
from teg_gateway.store.state import Loaded, load_state, store_state

log = logging.getLogger(__name__)

RPC_PREFIX = "tb-rpc-"
RECENT_IDS = 50
PUBLISH_PATIENCE_S = 60.0
OUTPUT_TAIL = 400
# An RPC reboot that has not come back through the local bus by then is forgotten.
REQUEST_TIMEOUT_S = 30.0

Publisher = Callable[[str, bytes], "asyncio.Future[None]"]


def describe_timeout(seconds: float) -> str:
    """"5 minutes", "90 seconds", "1 minute"."""
    if seconds >= 60 and seconds % 60 == 0:
        minutes = int(seconds // 60)
        return f"{minutes} minute{'s' if minutes != 1 else ''}"
    whole = int(seconds) if float(seconds).is_integer() else seconds
    return f"{whole} second{'s' if whole != 1 else ''}"


_PENDING_ID = re.compile(r'"pending"\s*:\s*\{.*?"id"\s*:\s*"([A-Za-z0-9._:@+-]{1,200})"',
                         re.DOTALL)


def recover_pending_id(raw: bytes) -> str | None:
    """The id of the pending command in what is left of a damaged state file, if it can
    be found (the file is written with sorted keys: ``pending`` then its ``id``)."""
    match = _PENDING_ID.search(raw.decode("utf-8", errors="replace"))
    return match[1] if match else None


def read_boot_id(path: str) -> str:
    """The current boot id; raises OSError when it cannot be read."""
    text = Path(path).read_text().strip()
    if not text:
        raise OSError(f"{path} is empty")
    return text


class RestartOperation:
    """Serves restart commands from the local bus and from the RPC ``reboot``.

    ``bus_publish(topic, payload)`` publishes retained QoS 1 on the local bus and returns
    the PUBACK future (failing with ConnectionLost when the bus is down);
    ``bus_connected`` tells whether publishing can work now; ``report`` sends telemetry to
    ThingsBoard (through the outbox).
    """

    def __init__(self, settings: RestartSettings, state_path: Path,
                 bus_publish: Publisher, bus_connected: asyncio.Event,
                 report: Callable[[dict[str, Any]], None]) -> None:
        self.settings = settings
        self.state_path = state_path
        self.bus_publish = bus_publish
        self.bus_connected = bus_connected
        self.report = report
        self._tasks: set[asyncio.Task[None]] = set()
        self._busy = False
        self._finishing: set[str] = set()
        # An RPC reboot on its way through the local bus: (command id, when asked).
        self._requested: tuple[str, float] | None = None

    # -- persisted state ------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        loaded = load_state(self.state_path)
        if loaded.damage is None:
            return loaded.value
        return self._state_damaged(loaded)

    def _save(self, state: dict[str, Any]) -> None:
        store_state(self.state_path, state)

    def _state_damaged(self, loaded: Loaded) -> dict[str, Any]:
        """``restart.json`` was damaged (and moved aside): the command it held is
        resolved as failed; its outcome is published when its id can be recovered from
        what is left of the file, and reported as telemetry in any case."""
        reason = clip(f"The gateway's restart state was damaged: {loaded.damage}", 1000)
        command_id = recover_pending_id(loaded.raw)
        self.report({"restart_status": "failed", "restart_reason": reason,
                     "restart_id": command_id or ""})
        state: dict[str, Any] = {}
        if command_id is None:
            log.error("restart: no pending command could be recovered from the damaged "
                      "state file")
            return state
        record = {"id": command_id, "topic": f"{RESTART_CAPABILITY}/{command_id}",
                  "command": {"status": "failed", "reason": reason}, "phase": "final",
                  "via_bus": True}
        self._finished(state)[command_id] = record
        self._remember(state, command_id)
        self._save(state)
        log.error("restart %s failed: %s", command_id, reason)
        self._spawn(self._finish(record, reported=True))
        return state

    def pending(self) -> dict[str, Any] | None:
        """The command being executed, if any."""
        pending = self._state().get("pending")
        return pending if isinstance(pending, dict) else None

    def in_progress(self) -> str | None:
        """The id of the restart being executed, or asked for by an RPC and not yet
        taken up (for at most REQUEST_TIMEOUT_S); None when a restart may begin."""
        pending = self.pending()
        if pending is not None:
            return str(pending.get("id"))
        if self._requested is not None:
            command_id, asked = self._requested
            if time.monotonic() - asked < REQUEST_TIMEOUT_S:
                return command_id
            self._requested = None
        return None

    def request(self, command_id: str) -> None:
        """An RPC asks for restart ``command_id`` (it comes back through the bus, or is
        started with :meth:`start`): until it is taken up, :meth:`in_progress` names it."""
        self._requested = (command_id, time.monotonic())

    @staticmethod
    def _finished(state: dict[str, Any]) -> dict[str, Any]:
        """Outcomes decided but not yet acknowledged by the broker, by command id."""
        finished = state.get("finished")
        if not isinstance(finished, dict):
            finished = state["finished"] = {}
        return finished

    def _remember(self, state: dict[str, Any], command_id: str) -> None:
        recent = [i for i in state.get("recent", []) if i != command_id]
        state["recent"] = [*recent, command_id][-RECENT_IDS:]

    # -- entry points ---------------------------------------------------------------------

    def on_command(self, command_id: str, payload: bytes) -> None:
        """A message on ``te/device/main///cmd/restart/<id>`` (only ``init`` is acted on)."""
        if not payload:
            return  # the requester cleared the command
        try:
            command = json.loads(payload)
        except (ValueError, RecursionError):
            log.warning("restart command %s is not JSON; ignored", clip(command_id))
            return
        if not isinstance(command, dict) or command.get("status") != "init":
            return
        state = self._state()
        if command_id in state.get("recent", []):
            log.info("restart command %s was already handled; ignored", command_id)
            return
        # It came from the bus, so its states go there, even if the message was delivered
        # before the bus marked itself connected (a retained init at connect time).
        self._spawn(self._execute(command_id, command, via_bus=True))

    def start(self, command_id: str) -> None:
        """Start a restart without a requester on the bus (RPC ``reboot``)."""
        self._spawn(self._execute(command_id, {"status": "init"},
                                  via_bus=self.bus_connected.is_set()))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def resume(self) -> None:
        """At start: resolve a restart that was executing when the gateway stopped, and
        publish an outcome that was decided but not yet acknowledged."""
        state = self._state()
        pending = state.get("pending")
        if not isinstance(pending, dict):
            for record in list(self._finished(state).values()):
                self._spawn(self._finish(record))
            return
        command = dict(pending.get("command", {}))
        if pending.get("phase") == "executing":
            try:
                boot_id = read_boot_id(self.settings.boot_id_file)
            except OSError as exc:
                boot_id = ""
                log.error("restart %s: cannot read the boot id: %s", pending.get("id"), exc)
            if boot_id and boot_id != pending.get("boot_id"):
                command["status"] = "successful"
                command.pop("reason", None)
                log.info("restart %s: the device restarted (new boot id)", pending.get("id"))
            else:
                command["status"] = "failed"
                command["reason"] = ("The gateway restarted but the device did not (same boot "
                                     "id)" if boot_id else "Cannot tell whether the device "
                                     "restarted: the boot id cannot be read")
                log.error("restart %s failed: %s", pending.get("id"), command["reason"])
        pending["phase"] = "final"
        pending["command"] = command
        state.pop("pending", None)
        self._finished(state)[str(pending.get("id"))] = pending
        self._save(state)
        for record in list(self._finished(state).values()):
            self._spawn(self._finish(record))

    # -- the state machine ----------------------------------------------------------------

    async def _execute(self, command_id: str, command: dict[str, Any], via_bus: bool) -> None:
        topic = f"{RESTART_CAPABILITY}/{command_id}"
        if self._requested is not None and self._requested[0] == command_id:
            self._requested = None
        state = self._state()
        if self._busy or isinstance(state.get("pending"), dict):
            other = (state.get("pending") or {}).get("id", "another command")
            refused = {**command, "status": "failed",
                       "reason": f"Another restart ({other}) is in progress"}
            log.warning("restart %s refused: %s", command_id, refused["reason"])
            self._remember(state, command_id)
            self._save(state)
            if via_bus and await self._publish(topic, refused) \
                    and command_id.startswith(RPC_PREFIX):
                await self._publish(topic, None)  # the gateway is the requester
            return
        self._busy = True
        self._remember(state, command_id)
        try:
            boot_id = read_boot_id(self.settings.boot_id_file)
        except OSError as exc:
            await self._fail_now(command_id, command, state, via_bus,
                                 f"Cannot read the boot id from "
                                 f"{self.settings.boot_id_file}: {exc}")
            return
        command = {**command, "status": "executing"}
        pending = {"id": command_id, "topic": topic, "command": command, "boot_id": boot_id,
                   "phase": "executing", "started_ms": now_ms(),
                   "via_bus": via_bus}
        state["pending"] = pending
        self._save(state)
        self.report({"restart_status": "executing", "restart_reason": "",
                     "restart_id": clip(command_id)})
        if pending["via_bus"] and not await self._publish(topic, command):
            await self._decide(pending, "failed", "The executing state could not be published "
                                                  "on the local broker")
            return
        log.warning("restart %s: running %s", command_id, self.settings.command)
        started = time.monotonic()
        reason = await self._run_reboot_command()
        if reason is None:
            # The device is going down; the gateway will be stopped on the way. The
            # timeout counts from the start of the reboot command.
            await asyncio.sleep(max(0.0, self.settings.timeout_s
                                    - (time.monotonic() - started)))
            reason = (f"The device has not restarted within "
                      f"{describe_timeout(self.settings.timeout_s)}")
        await self._decide(pending, "failed", reason)

    async def _run_reboot_command(self) -> str | None:
        """None when the command ran and exited 0, else why the restart failed."""
        argv = self.settings.command
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            return f"The reboot command {argv[0]!r} cannot be started: {exc.strerror or exc}"
        try:
            output, _ = await asyncio.wait_for(proc.communicate(), self.settings.timeout_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            return (f"The reboot command did not finish within "
                    f"{describe_timeout(self.settings.timeout_s)}")
        if proc.returncode != 0:
            tail = output.decode(errors="replace").strip()[-OUTPUT_TAIL:]
            return (f"The reboot command exited with code {proc.returncode}"
                    + (f": {tail}" if tail else ""))
        return None

    async def _fail_now(self, command_id: str, command: dict[str, Any],
                        state: dict[str, Any], via_bus: bool, reason: str) -> None:
        pending = {"id": command_id, "topic": f"{RESTART_CAPABILITY}/{command_id}",
                   "command": command, "phase": "executing", "boot_id": "",
                   "via_bus": via_bus}
        state["pending"] = pending
        self._save(state)
        await self._decide(pending, "failed", reason)

    async def _decide(self, pending: dict[str, Any], status: str, reason: str) -> None:
        command = {**pending["command"], "status": status}
        if status == "failed":
            command["reason"] = reason
            log.error("restart %s failed: %s", pending["id"], reason)
        record = {**pending, "command": command, "phase": "final"}
        state = self._state()
        state.pop("pending", None)
        self._finished(state)[str(record["id"])] = record
        self._save(state)
        self._busy = False
        await self._finish(record)

    async def _finish(self, record: dict[str, Any], reported: bool = False) -> None:
        """Report the outcome, publish it (until the broker acknowledges it), and forget
        the command then."""
        command_id = str(record.get("id"))
        if command_id in self._finishing:
            return  # already on its way
        self._finishing.add(command_id)
        try:
            await self._finish_once(record, reported)
        finally:
            self._finishing.discard(command_id)

    async def _finish_once(self, record: dict[str, Any], reported: bool) -> None:
        command = record["command"]
        command_id = str(record.get("id"))
        if not reported:
            self.report({"restart_status": command.get("status"),
                         "restart_reason": clip(command.get("reason", ""), 1000),
                         "restart_id": clip(command_id)})
        topic = record.get("topic") or f"{RESTART_CAPABILITY}/{command_id}"
        if record.get("via_bus", True):
            while not await self._publish(topic, command):
                log.warning("restart %s: outcome not published yet; trying again",
                            command_id)
            if command_id.startswith(RPC_PREFIX):
                await self._publish(topic, None)
        state = self._state()
        self._finished(state).pop(command_id, None)
        if not state["finished"]:
            del state["finished"]
        self._save(state)

    async def _publish(self, topic: str, command: dict[str, Any] | None) -> bool:
        """Publish retained with QoS 1 and wait for the PUBACK, across reconnects, for up
        to a minute. ``None`` clears the topic."""
        payload = b"" if command is None else json.dumps(command).encode()
        deadline = time.monotonic() + PUBLISH_PATIENCE_S
        while time.monotonic() < deadline:
            remaining = deadline - time.monotonic()
            try:
                await asyncio.wait_for(self.bus_connected.wait(), remaining)
                await asyncio.wait_for(self.bus_publish(topic, payload), 10.0)
                return True
            except (ConnectionLost, TimeoutError):
                await asyncio.sleep(0.2)
        return False

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
