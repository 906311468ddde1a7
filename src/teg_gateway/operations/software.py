"""thin-edge.io software management of the controller over the local bus.

Two operations of the main device, announced retained with ``{"types":
["teg-controller"]}``:

- ``te/device/main///cmd/software_list/<id>``: ``init`` → ``executing`` → ``successful``
  with ``currentSoftwareList: [{"type": "teg-controller", "modules": [{"name", "version"},
  ...]}]``: the running version first, then the versions kept on disk (newest first).
- ``te/device/main///cmd/software_update/<id>``: ``init`` with ``updateList: [{"type":
  "teg-controller", "modules": [{"name", "version", "url"?, "action": "install" |
  "remove"}]}]`` → ``executing`` → ``successful`` | ``failed`` with a ``reason``.
  Removals come first (the running version cannot be removed); then at most one version
  is installed through the same pipeline as ThingsBoard OTA (``update.py``): downloaded
  from ``url`` (https, or plain http to a loopback address, where thin-edge.io's
  file-transfer service lives; no url for a version already on disk), unpacked, switched
  to, watched for its health signal, rolled back when it fails.

One update at a time, across ThingsBoard and the local bus: a ``software_update`` that
arrives while another update runs is refused at once (``failed``, the reason names the
update in progress); a ThingsBoard announcement waits for the local update to end.

Every state is saved in ``<data>/state/software.json`` before it is published (retained,
QoS 1, awaited); a command under way when the gateway stopped is resumed at the next
start. Unknown fields of a request are carried into every state; only the requester
clears a command.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from teg_gateway.bounds import clip
from teg_gateway.clock import Clock
from teg_gateway.controller.runtime import ControllerError
from teg_gateway.controller.versions import check_version
from teg_gateway.local.topics import command_topic
from teg_gateway.operations.engine import (
    Command,
    CommandChannel,
    CommandRepository,
    LocalCommand,
    Nothing,
    Operation,
    PayloadError,
    Runner,
    Status,
    decode,
    parse_request,
)
from teg_gateway.operations.packages import OtaError
from teg_gateway.operations.update import LOCAL, Kind, UpdateJob, Updates

log = logging.getLogger(__name__)

SOFTWARE_TYPE = "teg-controller"
CAPABILITY = {"types": [SOFTWARE_TYPE]}
LIST = "software_list"
UPDATE = "software_update"
INSTALL = "install"
REMOVE = "remove"
#: More modules than this in one request are refused.
MAX_MODULES = 20
MAX_URL_CHARS = 4096
#: Prefix of the update jobs (in ota.json) started by a local software_update.
JOB_PREFIX = "te-"


@dataclass(frozen=True)
class Module:
    """One module of a ``software_update`` request (its other fields stay in the
    request, which is carried along as it came)."""

    name: str = ""
    version: str = ""
    url: str = ""
    action: str = INSTALL


def parse_update_list(request: dict[str, Any]) -> list[Module]:
    """The modules of a ``software_update`` request; PayloadError saying what is wrong."""
    groups = request.get("updateList")
    if not isinstance(groups, list) or not groups:
        raise PayloadError("updateList must be a non-empty list")
    modules: list[Module] = []
    for group in groups:
        if not isinstance(group, dict):
            raise PayloadError("an entry of updateList is not an object")
        kind = group.get("type")
        if kind != SOFTWARE_TYPE:
            raise PayloadError(f"software type {clip(repr(kind), 100)} is not managed here "
                               f"(only {SOFTWARE_TYPE})")
        items = group.get("modules")
        if not isinstance(items, list):
            raise PayloadError("modules must be a list")
        for item in items:
            module, _unknown = decode(Module, item, "module")
            if module.action not in (INSTALL, REMOVE):
                raise PayloadError(f"action {clip(repr(module.action), 50)} is not "
                                   f"{INSTALL} or {REMOVE}")
            if len(module.url) > MAX_URL_CHARS or len(module.name) > 200:
                raise PayloadError(f"module {clip(repr(module.name), 100)}: its name or url "
                                   "is too long")
            try:
                check_version(module.version)
            except ValueError as exc:
                raise PayloadError(f"module {clip(repr(module.name), 100)}: {exc}") from None
            modules.append(module)
    if not modules:
        raise PayloadError("updateList names no module")
    if len(modules) > MAX_MODULES:
        raise PayloadError(f"more than {MAX_MODULES} modules in one request")
    if sum(1 for m in modules if m.action == INSTALL) > 1:
        raise PayloadError(f"only one {SOFTWARE_TYPE} version can be installed at a time")
    return modules


class SoftwareOperation(Operation):
    """``software_list`` and ``software_update`` of the controller (module docstring).

    ``channel`` publishes command states on the local bus (set once the bus exists;
    without it, states are saved only).
    """

    name = "software"

    def __init__(self, updates: Updates, state_path: Path,
                 channel: CommandChannel | None = None, *, clock: Clock | None = None) -> None:
        self.updates = updates
        self.channel = channel
        self.repo: CommandRepository[Nothing, Nothing] = CommandRepository(
            state_path, Nothing, Nothing, clock=clock)
        self.runner = Runner()
        self._loaded = False
        #: commands that were under way when the gateway started
        self._resumed: set[str] = set()

    def local_commands(self) -> list[LocalCommand]:
        return [LocalCommand(LIST, dict(CAPABILITY), self.on_list),
                LocalCommand(UPDATE, dict(CAPABILITY), self.on_update)]

    # -- state ----------------------------------------------------------------------------

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        self.updates.load()
        damage = self.repo.load()
        if damage is not None:
            for key in damage.failed:
                log.error("local command %s failed: %s", key, damage.text)

    async def run(self) -> None:
        """Resume the commands under way, and publish outcomes not yet published."""
        self._load()
        self.updates.resume()
        for cmd in self.repo.active():
            self._resumed.add(cmd.id)
            self._spawn(cmd)
        for cmd in self.repo.undelivered():
            self.runner.spawn(self._send(cmd))

    async def close(self) -> None:
        await self.runner.close()

    # -- requests -------------------------------------------------------------------------

    def on_list(self, command_id: str, payload: bytes) -> None:
        self._on_request(LIST, command_id, payload)

    def on_update(self, command_id: str, payload: bytes) -> None:
        self._on_request(UPDATE, command_id, payload)

    def _on_request(self, operation: str, command_id: str, payload: bytes) -> None:
        self._load()
        key = f"{operation}/{command_id}"
        old = self.repo.get(key)
        if not payload:
            # The requester cleared the command: its id may be used again.
            if old is not None and old.final:
                del self.repo.commands[key]
                self.repo.save()
            return
        request = parse_request(payload)
        if request is None:
            return
        status = request.get("status")
        if status == Status.EXECUTING.value and old is None and self.repo.damage is not None:
            # A command under way whose state was lost with the damaged file (its last
            # state comes back retained from the broker): it ends failed, with the reason.
            extra = {k: v for k, v in request.items() if k not in ("status", "reason")}
            cmd = self.repo.create(key, Nothing(), extra=extra)
            self.repo.resolve(cmd, Status.FAILED, "the gateway's state for this command was "
                              f"damaged: {self.repo.damage.text}")
            self.runner.spawn(self._send(cmd))
            return
        if status != Status.INIT.value:
            return  # our own states coming back, or another agent's
        if old is not None:
            if old.final:  # the outcome did not replace the request: say it again
                self.runner.spawn(self._send(old))
            return
        extra = {k: v for k, v in request.items() if k not in ("status", "reason")}
        cmd = self.repo.create(key, Nothing(), extra=extra)
        if operation == UPDATE:
            refusal = self._refusal(cmd)
            if refusal is not None:
                self.repo.resolve(cmd, Status.FAILED, refusal)
                log.warning("software_update %s refused: %s", command_id, refusal)
                self.runner.spawn(self._send(cmd))
                return
        self._spawn(cmd)

    def _refusal(self, cmd: Command[Nothing]) -> str | None:
        """Why the update cannot begin now, or None once it holds the lane."""
        try:
            parse_update_list(cmd.extra)
        except PayloadError as exc:
            return str(exc)
        lane = self.updates.lane
        if not lane.take(self._job_id(cmd)):
            return ("another controller update is in progress: "
                    f"{self.updates.describe(lane.holder)}")
        return None

    def _spawn(self, cmd: Command[Nothing]) -> None:
        work = self._list(cmd) if cmd.id.startswith(LIST + "/") else self._update(cmd)

        def crashed(exc: BaseException) -> None:
            if not cmd.final:
                self.repo.resolve(cmd, Status.FAILED, f"unexpected failure: "
                                  f"{type(exc).__name__}: {clip(exc, 500)}")
                self.runner.spawn(self._send(cmd))

        self.runner.spawn(work, key=cmd.id, on_error=crashed)

    @staticmethod
    def _job_id(cmd: Command[Nothing]) -> str:
        return JOB_PREFIX + cmd.id.split("/", 1)[1]

    # -- software_list --------------------------------------------------------------------

    async def _list(self, cmd: Command[Nothing]) -> None:
        await self._send(cmd)
        cmd.extra["currentSoftwareList"] = self.software_list()
        self.repo.resolve(cmd, Status.SUCCESSFUL)
        await self._send(cmd)

    def software_list(self) -> list[dict[str, Any]]:
        """The running version first, then the versions kept on disk."""
        updates = self.updates
        facts = updates.facts
        running = updates.supervisor.version if updates.supervisor is not None else None
        running = running or facts.current_version or None
        versions = updates.versions_on_disk()
        ordered = ([running] if running else []) + [v for v in versions if v != running]

        def title(version: str) -> str:
            found = facts.titles.get(version)
            if not found and version == facts.current_version:
                found = facts.current_title
            return found or SOFTWARE_TYPE

        return [{"type": SOFTWARE_TYPE,
                 "modules": [{"name": title(v), "version": v} for v in ordered]}]

    # -- software_update ------------------------------------------------------------------

    async def _update(self, cmd: Command[Nothing]) -> None:
        job_id = self._job_id(cmd)
        lane = self.updates.lane
        try:
            if not lane.take(job_id):  # resumed while another update holds it
                raise OtaError("another controller update is in progress: "
                               f"{self.updates.describe(lane.holder)}")
            await self._send(cmd)
            await self._apply(cmd, job_id, parse_update_list(cmd.extra))
        except (OtaError, ControllerError, PayloadError, ValueError) as exc:
            self.repo.resolve(cmd, Status.FAILED, clip(exc, 1000))
            log.error("software_update %s failed: %s", cmd.id.split("/", 1)[1], exc)
        else:
            self.repo.resolve(cmd, Status.SUCCESSFUL)
        finally:
            self.updates.release(job_id)
        await self._send(cmd)

    async def _apply(self, cmd: Command[Nothing], job_id: str, modules: list[Module]) -> None:
        updates = self.updates
        supervisor = updates.supervisor
        job = updates.repo.get(job_id)
        if job is not None and (cmd.id not in self._resumed or
                                job.created_ms < cmd.created_ms):
            job = None  # an earlier command with the same id (cleared, then sent again)
        if job is None and cmd.id in self._resumed and updates.repo.damage is not None and \
                any(m.action == INSTALL for m in modules):
            raise OtaError("the OTA state was damaged and this update was lost with it: "
                           f"{updates.repo.damage.text}")
        if job is None:
            if supervisor is None:
                raise OtaError("no controller is supervised ([controller] runtime is none)")
            for module in modules:
                if module.action == REMOVE:
                    await self._remove(module.version)
            installs = [m for m in modules if m.action == INSTALL]
            if not installs:
                return
            module = installs[0]
            version, title = module.version, clip(module.name or SOFTWARE_TYPE, 200)
            if supervisor.version == version:
                log.info("software_update: version %s already runs", version)
                updates.report_updated(title, version)
                return
            if module.url:
                plan = UpdateJob(version, title, Kind.URL, url=module.url, loopback_http=True)
            elif updates.places.version_dir(version).is_dir():
                plan = UpdateJob(version, title, Kind.DISK)
            else:
                raise OtaError(f"version {version} is not on disk and the module has no url")
            if updates.start(job_id, plan, LOCAL) is None:
                raise OtaError("another controller update is in progress: "
                               f"{updates.describe(updates.lane.holder)}")
        done = await updates.outcome(job_id)
        if done.status is Status.FAILED:
            raise OtaError(done.reason)

    async def _remove(self, version: str) -> None:
        updates = self.updates
        supervisor = updates.supervisor
        if supervisor is not None and supervisor.version == version:
            raise OtaError(f"version {version} is running and cannot be removed (install "
                           "another version first)")
        if not updates.places.version_dir(version).is_dir():
            log.info("software_update: version %s is not on disk; nothing to remove", version)
            return
        log.info("software_update: removing controller version %s", version)
        await updates.remove_version(version)
        updates.save_facts()

    # -- publishing -----------------------------------------------------------------------

    async def _send(self, cmd: Command[Nothing]) -> None:
        """Publish the state of ``cmd`` (saved before) and wait for the broker."""
        if self.channel is None:
            return
        operation, command_id = cmd.id.split("/", 1)
        topic = f"{command_topic(operation)}/{command_id}"
        if await self.channel.send(topic, cmd.message()) and cmd.final:
            self.repo.delivered(cmd)
