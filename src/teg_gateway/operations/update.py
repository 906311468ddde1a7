"""The controller update pipeline, shared by ThingsBoard OTA (``ota.py``) and the local
bus's ``software_update`` (``software.py``).

An update is a :class:`~teg_gateway.operations.engine.Command` whose payload is an
:class:`UpdateJob`, kept in ``<data>/state/ota.json`` with the facts the updates remember
(:class:`UpdateFacts`: the version ThingsBoard wants, the version running, the last
failed one, the chunk request counter). Every step is saved *before* it is taken and
before anything is reported, so a restart or a power cut at any point resumes or
resolves it:

``downloading`` → ``downloaded`` → ``verified`` → ``switching`` → successful
and on any failure failed (after ``rolling_back`` once the switch was made).

fetch (chunks, a URL, a git export, or nothing for a version already on disk) → verify
the checksum → unpack into ``<data>/controller/versions/<version>/`` → switch the
supervisor → the new version must give a health signal within ``[ota] health_timeout_s``
and must not crash-loop → else switch back to the previous version.

One update at a time: every update holds the :class:`~teg_gateway.operations.engine.Lane`
``controller update`` from its start to its end. ThingsBoard sees every update through
the telemetry ``sw_state`` (and ``current_sw_title`` / ``current_sw_version``), whoever
started it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import shutil
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from teg_gateway.bounds import clip
from teg_gateway.clock import Clock
from teg_gateway.config import ControllerSettings, OtaSettings, Settings
from teg_gateway.controller.runtime import ControllerError, describe_exit
from teg_gateway.controller.supervisor import RUNNING, Supervisor
from teg_gateway.controller.versions import ControllerPlaces, export_from_git
from teg_gateway.fsutil import fsync_dir
from teg_gateway.operations.download import DownloadError, UrlDownload, check_url, tls_context
from teg_gateway.operations.engine import (
    Command,
    CommandRepository,
    Damage,
    Lane,
    Runner,
    Status,
)
from teg_gateway.operations.packages import (
    UNPACK_FACTOR,
    OtaError,
    file_checksum_matches,
    new_hasher,
    remove_tree,
    unpack_package,
)

log = logging.getLogger(__name__)

# sw_state values (the wire contract with ThingsBoard)
DOWNLOADING = "DOWNLOADING"
DOWNLOADED = "DOWNLOADED"
VERIFIED = "VERIFIED"
UPDATING = "UPDATING"
UPDATED = "UPDATED"
FAILED = "FAILED"

#: A new version that fails this many times after the switch is crash-looping.
CRASH_LIMIT = 3
#: Where updates come from (``Command.origin``).
THINGSBOARD = "thingsboard"
LOCAL = "local"

Report = Callable[[dict[str, Any]], None]


class Kind(enum.StrEnum):
    """Where the new version comes from."""

    PACKAGE = "package"  # stored in ThingsBoard, fetched in chunks over MQTT
    URL = "url"          # fetched over https (or http on loopback for the local bus)
    GIT = "git"          # exported from the controller's git repository
    DISK = "disk"        # already unpacked in the versions directory


class Step(enum.StrEnum):
    """The step an update is in; saved before the step is taken."""

    DOWNLOADING = "downloading"
    DOWNLOADED = "downloaded"
    VERIFIED = "verified"
    SWITCHING = "switching"
    ROLLING_BACK = "rolling_back"


@dataclass
class Release:
    """A controller version and where it comes from."""

    version: str
    title: str = ""
    kind: Kind = Kind.GIT
    url: str = ""
    checksum: str = ""
    algorithm: str = "SHA256"
    size: int | None = None

    def same_release(self, other: Release) -> bool:
        return (self.version, self.kind, self.checksum, self.url) == (
            other.version, other.kind, other.checksum, other.url)


@dataclass
class Desired(Release):
    """A version ThingsBoard announced (shared attributes ``sw_*``)."""


@dataclass
class UpdateJob(Release):
    """One update: what is installed, from where, and how far it got."""

    kind: Kind = Kind.PACKAGE
    step: Step = Step.DOWNLOADING
    #: the chunk request id (ThingsBoard packages): fresh for every update
    request_id: str = ""
    #: gateway restarts during the switch (a second one rolls back)
    resumes: int = 0
    #: the download went on from a partial file after a restart or a reconnect
    restarted: bool = False
    #: a resumed download failed its checksum and was fetched again from the start
    refetched: bool = False
    #: the version that ran before the switch: the rollback target
    previous: str = ""
    #: why it is rolling back
    error: str = ""
    #: plain http to a loopback address is allowed (the local bus's file transfer)
    loopback_http: bool = False


@dataclass
class UpdateFacts:
    """What the updates remember between commands."""

    #: the version ThingsBoard announces, and whether an update for it has concluded
    desired: Desired | None = None
    desired_done: bool = False
    current_title: str = ""
    current_version: str = ""
    failed_version: str = ""
    #: the last package announcement (a later partial answer keeps its checksum)
    package_info: Desired | None = None
    request_counter: int = 0
    #: titles of the versions installed, by version (for software_list)
    titles: dict[str, str] = field(default_factory=dict)


# -- the file written by earlier releases ------------------------------------------------

_LEGACY_ACTIVE = {"downloading", "downloaded", "verified", "switching", "rolling_back"}
_JOB_FIELDS = ("version", "title", "kind", "url", "checksum", "algorithm", "size",
               "request_id", "resumes", "restarted", "refetched", "previous", "error")
_DESIRED_FIELDS = ("version", "title", "kind", "url", "checksum", "algorithm", "size")


def _legacy_desired(value: Any) -> dict[str, Any] | None:
    if not isinstance(value, dict) or not isinstance(value.get("version"), str):
        return None
    found = {k: value[k] for k in _DESIRED_FIELDS if value.get(k) is not None}
    if not isinstance(found.get("size"), int) or isinstance(found.get("size"), bool):
        found.pop("size", None)
    return found


def legacy_ota_state(old: dict[str, Any]) -> dict[str, Any]:
    """``ota.json`` as earlier releases wrote it (``phase``, ``job``, ``desired``,
    ``current``, ``failed_version``, ``package_info``, ``request_counter``) in the
    repository's layout, so an update under way when the gateway was upgraded resumes."""
    phase = old.get("phase")
    current = old.get("current") if isinstance(old.get("current"), dict) else {}
    assert isinstance(current, dict)
    desired = _legacy_desired(old.get("desired"))
    failed = old.get("failed_version") if isinstance(old.get("failed_version"), str) else ""
    done = bool(desired) and phase in ("updated", "failed") and \
        desired is not None and desired["version"] in (current.get("version"), failed)
    counter = old.get("request_counter")
    facts: dict[str, Any] = {
        "desired": desired, "desired_done": done,
        "current_title": str(current.get("title") or ""),
        "current_version": str(current.get("version") or ""),
        "failed_version": failed or "",
        "package_info": _legacy_desired(old.get("package_info")),
        "request_counter": counter if isinstance(counter, int) else 0,
    }
    commands = []
    job = old.get("job")
    if phase in _LEGACY_ACTIVE and isinstance(job, dict) and \
            isinstance(job.get("version"), str):
        payload = {k: job[k] for k in _JOB_FIELDS if job.get(k) is not None}
        payload["request_id"] = str(payload.get("request_id", ""))
        payload["previous"] = str(payload.get("previous") or "")
        if not isinstance(payload.get("size"), int) or isinstance(payload.get("size"), bool):
            payload.pop("size", None)
        payload["step"] = phase
        commands.append({"id": f"tb-ota-{payload['request_id'] or 'legacy'}",
                         "status": "executing", "payload": payload,
                         "origin": THINGSBOARD})
    return {"facts": facts, "commands": commands}


# -- the pipeline ---------------------------------------------------------------------------

#: Fetches a job's package into the part file; False when the update is no longer
#: wanted (abandoned).
Fetch = Callable[[Command[UpdateJob], Path], Awaitable[bool]]


class _Refetch(Exception):
    """A resumed download did not verify: fetch it once more from the start."""


class _Superseded(Exception):
    """Another version became wanted during the download."""


class Updates:
    """Runs controller updates, one at a time (see the module docstring).

    Build it, :meth:`load` and :meth:`resume` once at start (``OtaManager.run`` does),
    then :meth:`start` jobs. ``report(values)`` sends telemetry to ThingsBoard;
    ``fetchers[Kind.PACKAGE]`` is set by the ThingsBoard side (chunks over MQTT).
    """

    def __init__(self, ota: OtaSettings, controller: ControllerSettings,
                 places: ControllerPlaces, *, supervisor: Supervisor | None, report: Report,
                 state_path: Path, download_dir: Path, clock: Clock | None = None,
                 poll_s: float = 0.1) -> None:
        self.ota = ota
        self.controller = controller
        self.places = places
        self.supervisor = supervisor
        self._report_cb = report
        self.clock = clock or Clock()
        self.repo: CommandRepository[UpdateJob, UpdateFacts] = CommandRepository(
            state_path, UpdateJob, UpdateFacts, clock=self.clock, legacy=legacy_ota_state)
        self.lane = Lane("controller update")
        self.runner = Runner()
        self.poll_s = poll_s
        self.download_dir = download_dir
        self.fetchers: dict[Kind, Fetch] = {Kind.URL: self._download_url}
        #: called with every update that ended (after it was saved and reported)
        self.on_finished: list[Callable[[Command[UpdateJob]], None]] = []
        #: called whenever the lane becomes free
        self.on_free: list[Callable[[], None]] = []
        self._resumed = False
        self._waiters: dict[str, list[asyncio.Future[Command[UpdateJob]]]] = {}
        self.loaded = False

    @classmethod
    def of(cls, settings: Settings, supervisor: Supervisor | None, report: Report,
           state_path: Path, *, clock: Clock | None = None) -> Updates:
        """Built from the whole settings (the sections it reads)."""
        return cls(settings.ota, settings.controller, ControllerPlaces.of(settings),
                   supervisor=supervisor, report=report, state_path=state_path,
                   download_dir=settings.data_dir / "ota", clock=clock)

    # -- state --------------------------------------------------------------------------

    @property
    def facts(self) -> UpdateFacts:
        return self.repo.facts

    def load(self) -> Damage | None:
        """Read ``ota.json`` (once). A damaged file has been quarantined; the update it
        held ended failed, which is reported to ThingsBoard with the reason."""
        if self.loaded:
            return None
        self.loaded = True
        damage = self.repo.load()
        if damage is not None:
            error = clip("the OTA state was damaged and the update in progress (if any) is "
                         f"abandoned: {damage.text}", 1000)
            failed = [c for c in map(self.repo.get, damage.failed) if c is not None]
            for cmd in failed:
                cmd.reason = error
                self.repo.put(cmd)
            self.discard_partials()
            self.report_state(FAILED, sw_error=error)
            for cmd in failed:
                self.repo.delivered(cmd)
        return damage

    def save_facts(self) -> None:
        self.repo.save()

    def active(self) -> Command[UpdateJob] | None:
        found = self.repo.active()
        return found[0] if found else None

    def describe(self, holder: str | None) -> str:
        """An update in progress, as a reason can name it."""
        cmd = self.repo.get(holder) if holder else None
        local = holder is not None and holder.startswith("te-")
        source = f"software_update {holder[3:]} on the local bus" if holder and local \
            else "from ThingsBoard"
        if cmd is None or cmd.final:
            return f"the {source}" if local else f"the update {holder}"
        return f"the update to version {cmd.payload.version} ({source})"

    def release(self, holder: str) -> None:
        """``holder`` is done with the lane: tell who waits for it."""
        if self.lane.holder != holder:
            return
        self.lane.release(holder)
        for callback in self.on_free:
            try:
                callback()
            except Exception:
                log.exception("a lane listener failed")

    def resume(self) -> None:
        """Carry on with every update that was under way when the gateway stopped
        (once; later calls do nothing)."""
        self.load()
        if self._resumed:
            return
        self._resumed = True
        for cmd in self.repo.active():
            if self.lane.take(cmd.id):
                self._spawn(cmd)
            else:  # two under way (cannot happen in one file): the later one gives way
                self._finish(cmd, "another update was in progress", None, report=True)

    def start(self, command_id: str, job: UpdateJob, origin: str,
              extra: dict[str, Any] | None = None) -> Command[UpdateJob] | None:
        """Begin an update; None when another update holds the lane."""
        if not self.lane.take(command_id):
            return None
        self.discard_partials()
        cmd = self.repo.create(command_id, job, origin=origin, extra=extra)
        self._spawn(cmd)
        return cmd

    def fail_at_once(self, command_id: str, job: UpdateJob, origin: str, error: str) -> None:
        """An update that cannot even begin (no controller supervised)."""
        cmd = self.repo.create(command_id, job, origin=origin)
        self._finish(cmd, error, None)

    def outcome(self, command_id: str) -> asyncio.Future[Command[UpdateJob]]:
        """Resolves with the update once it has ended."""
        fut: asyncio.Future[Command[UpdateJob]] = asyncio.get_running_loop().create_future()
        cmd = self.repo.get(command_id)
        if cmd is not None and cmd.final:
            fut.set_result(cmd)
        else:
            self._waiters.setdefault(command_id, []).append(fut)
        return fut

    def still_wanted(self, cmd: Command[UpdateJob]) -> bool:
        """A ThingsBoard update is abandoned when another version is announced."""
        if cmd.origin != THINGSBOARD:
            return True
        desired = self.facts.desired
        return desired is not None and desired.same_release(cmd.payload)

    def _spawn(self, cmd: Command[UpdateJob]) -> None:
        def crashed(exc: BaseException) -> None:
            if not cmd.final:
                self._finish(cmd, f"unexpected failure: {type(exc).__name__}: "
                                  f"{clip(exc, 500)}", None)

        self.runner.spawn(self._execute(cmd), key=cmd.id, on_error=crashed)

    async def close(self) -> None:
        await self.runner.close()

    # -- the steps ------------------------------------------------------------------------

    async def _execute(self, cmd: Command[UpdateJob]) -> None:
        if self.supervisor is None:
            self._finish(cmd, "no controller is supervised ([controller] runtime is none): "
                              "nothing to update", None)
            return
        if cmd.payload.step in (Step.SWITCHING, Step.ROLLING_BACK):
            await self._resume_switch(cmd)
            return
        try:
            await self._prepare(cmd)
        except _Superseded:
            log.info("update to %s abandoned: another version is wanted", cmd.payload.version)
            self._finish(cmd, "abandoned: another version was announced", None, report=False)
            return
        except (OtaError, ControllerError) as exc:
            self._finish(cmd, clip(exc, 1000), None)
            return
        except Exception as exc:
            # Whatever else goes wrong before the switch ends this update, with the reason:
            # retrying the same step for ever would leave the device stuck.
            log.exception("controller update to %s: unexpected failure", cmd.payload.version)
            self._finish(cmd, f"unexpected failure: {type(exc).__name__}: {clip(exc, 500)}",
                         None)
            return
        await self._switch(cmd)

    def _step(self, cmd: Command[UpdateJob], step: Step, state: str | None = None,
              **changes: Any) -> None:
        """Save the next step, then say so."""
        cmd.payload = replace(cmd.payload, step=step, **changes)
        self.repo.put(cmd)
        if state is not None:
            self.report_state(state)

    async def _prepare(self, cmd: Command[UpdateJob]) -> None:
        """Take the update to the point of the switch: fetched, verified, unpacked."""
        job = cmd.payload
        if job.kind is Kind.DISK:
            if not self.places.version_dir(job.version).is_dir():
                raise OtaError(f"version {job.version} is not on disk")
            return
        if job.kind is Kind.GIT:
            if job.step is Step.DOWNLOADING:
                self.report_state(DOWNLOADING)
                await self._export(job.version)
                self._step(cmd, Step.DOWNLOADED, DOWNLOADED)
            if cmd.payload.step is Step.DOWNLOADED:
                self._step(cmd, Step.VERIFIED, VERIFIED)
            return
        part = self.part_path(job.version)
        while True:
            if cmd.payload.step is Step.DOWNLOADING:
                self.report_state(DOWNLOADING)
                fetch = self.fetchers.get(cmd.payload.kind)
                if fetch is None:
                    raise OtaError(f"no way to fetch a {cmd.payload.kind} package here")
                if not await fetch(cmd, part):
                    raise _Superseded
                self._step(cmd, Step.DOWNLOADED, DOWNLOADED)
            if cmd.payload.step is Step.DOWNLOADED:
                try:
                    await self._verify(cmd, part)
                except _Refetch:
                    self._step(cmd, Step.DOWNLOADING, restarted=False, refetched=True)
                    continue
                self._step(cmd, Step.VERIFIED, VERIFIED)
            break
        await self._unpack(cmd.payload, part)

    def part_path(self, version: str) -> Path:
        return self.download_dir / f"{version}.part"

    def discard_partials(self) -> None:
        if self.download_dir.is_dir():
            for path in self.download_dir.glob("*.part"):
                path.unlink(missing_ok=True)

    def mark_restarted(self, cmd: Command[UpdateJob]) -> None:
        """The download goes on from a partial file."""
        if not cmd.payload.restarted:
            cmd.payload = replace(cmd.payload, restarted=True)
            self.repo.put(cmd)

    async def _export(self, version: str) -> None:
        if not self.places.git_repo:
            raise OtaError(f"version {version} comes without a package (no sw_checksum) and "
                           "no controller git repository is configured "
                           "(TEG_CONTROLLER_GIT_PATH)")
        await export_from_git(self.places, version)

    async def _download_url(self, cmd: Command[UpdateJob], part: Path) -> bool:
        """Fetch the package from its URL into ``part``; False when superseded."""
        ota, job = self.ota, cmd.payload
        what = "sw_url" if cmd.origin == THINGSBOARD else "url"
        try:
            check_url(job.url, ota.allow_http, job.loopback_http, what)
            download = UrlDownload(
                job.url, part, size=job.size if job.size is not None and job.size >= 0
                else None, max_bytes=ota.max_package_bytes,
                context=tls_context(ota.url_ca_cert), timeout_s=ota.chunk_timeout_s,
                superseded=lambda: not self.still_wanted(cmd), allow_http=ota.allow_http,
                loopback_http=job.loopback_http)
            if part.exists() and part.stat().st_size:
                self.mark_restarted(cmd)
            done = await download.run()
        except (DownloadError, ssl.SSLError, OSError) as exc:
            part.unlink(missing_ok=True)
            raise OtaError(str(exc)) from None
        if done:
            log.info("package %s downloaded from %s: %d bytes", job.version, job.url,
                     part.stat().st_size)
        return done

    async def _verify(self, cmd: Command[UpdateJob], part: Path) -> None:
        job = cmd.payload
        algorithm = (job.algorithm or "SHA256").upper()
        expected = job.checksum
        if not expected and job.kind is Kind.URL:
            log.warning("package %s from %s comes without a checksum: its integrity rests "
                        "on %s alone", job.version, job.url,
                        "TLS" if job.url.startswith("https:") else "the loopback transfer")
            return
        new_hasher(algorithm)  # an unknown algorithm fails before hashing
        ok, actual = await asyncio.to_thread(file_checksum_matches, part, algorithm, expected)
        if ok:
            log.info("package %s verified (%s)", job.version, algorithm)
            return
        part.unlink(missing_ok=True)
        if job.restarted and not job.refetched:
            log.warning("resumed download of %s does not verify: fetching it again from "
                        "the start", job.version)
            raise _Refetch
        raise OtaError(f"checksum mismatch: {algorithm} of the downloaded package is "
                       f"{actual}, ThingsBoard announced {clip(expected)}")

    async def _unpack(self, job: UpdateJob, part: Path) -> None:
        dest = self.places.version_dir(job.version)
        if not part.exists():
            if dest.is_dir():
                return  # unpacked before a restart; the package was already removed
            raise OtaError("the downloaded package is missing")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{job.version}.unpack-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        limit = self.ota.max_package_bytes * UNPACK_FACTOR
        try:
            await asyncio.to_thread(unpack_package, part, tmp, limit)
            await asyncio.to_thread(remove_tree, dest)
            os.replace(tmp, dest)
            fsync_dir(dest.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        part.unlink(missing_ok=True)
        log.info("package %s unpacked into %s", job.version, dest)

    async def _switch(self, cmd: Command[UpdateJob]) -> None:
        sup = self.supervisor
        assert sup is not None
        self._step(cmd, Step.SWITCHING, UPDATING, previous=sup.version or "")
        version = cmd.payload.version
        with contextlib.suppress(OSError):
            os.utime(self.places.version_dir(version))
        baseline = sup.consecutive_failures
        try:
            await sup.switch_version(version)
        except ControllerError as exc:
            await self._roll_back(cmd, f"version {version} could not be started: {exc}")
            return
        await self._confirm(cmd, baseline)

    async def _resume_switch(self, cmd: Command[UpdateJob]) -> None:
        """The gateway stopped (or lost power) during a switch or a rollback."""
        sup = self.supervisor
        job = cmd.payload
        if job.step is Step.ROLLING_BACK or sup is None:
            await self._roll_back(cmd, job.error or "the update was interrupted")
            return
        self._step(cmd, Step.SWITCHING, resumes=job.resumes + 1)
        if cmd.payload.resumes > 1:
            await self._roll_back(cmd, "the gateway restarted twice before version "
                                       f"{job.version} proved healthy")
            return
        log.warning("the gateway restarted during the switch to %s: waiting for its health "
                    "signal again", job.version)
        self.report_state(UPDATING)
        baseline = sup.consecutive_failures
        if sup.version != job.version:
            try:
                await sup.switch_version(job.version)
            except ControllerError as exc:
                await self._roll_back(cmd, f"version {job.version} could not be started: "
                                           f"{exc}")
                return
        await self._confirm(cmd, baseline)

    async def _confirm(self, cmd: Command[UpdateJob], baseline: int) -> None:
        problem = await self._watch_health(baseline)
        if problem is not None:
            await self._roll_back(cmd, problem)
            return
        job = cmd.payload
        facts = self.facts
        facts.current_title, facts.current_version = job.title, job.version
        facts.titles[job.version] = job.title
        log.info("controller updated to %s %s", job.title, job.version)
        # Old versions go first, so UPDATED means the device is in its final state.
        try:
            await self.prune(keep={job.version, job.previous})
        except Exception:
            log.exception("removing old controller versions failed")
        self._conclude(cmd, Status.SUCCESSFUL, "")
        self.report_state(UPDATED, current_sw_title=job.title, current_sw_version=job.version)
        self._delivered(cmd)

    async def _watch_health(self, baseline: int) -> str | None:
        """None when the new version gave a health signal within health_timeout_s and
        still runs ``settle`` seconds later; else why not."""
        sup = self.supervisor
        assert sup is not None
        timeout = self.ota.health_timeout_s
        settle = min(self.controller.healthy_after_s, timeout)
        deadline = self.clock.monotonic() + timeout
        healthy_since: float | None = None
        failures_at_health = 0
        while True:
            baseline = min(baseline, sup.consecutive_failures)
            failures = sup.consecutive_failures - baseline
            now = self.clock.monotonic()
            if failures >= CRASH_LIMIT:
                return (f"the new version crashed {failures} times "
                        f"(last: {describe_exit(sup.runtime.last_exit())})")
            if healthy_since is None:
                if now >= deadline:
                    if failures:
                        return (f"the new version crashed {failures} time(s) and gave no "
                                f"health signal within {timeout:g} s")
                    return f"the new version gave no health signal within {timeout:g} s"
                if await sup.wait_healthy(min(self.poll_s, deadline - now)) and \
                        sup.state == RUNNING:
                    healthy_since = self.clock.monotonic()
                    failures_at_health = failures
            elif failures > failures_at_health:
                healthy_since = None  # crashed after its health signal: needs a new one
            elif now - healthy_since >= settle and sup.state == RUNNING:
                return None
            else:
                await self.clock.sleep(self.poll_s)

    async def _roll_back(self, cmd: Command[UpdateJob], reason: str) -> None:
        job = cmd.payload
        previous = job.previous
        self._step(cmd, Step.ROLLING_BACK, error=reason)
        log.error("controller version %s failed: %s", job.version, reason)
        if not previous:
            self._finish(cmd, f"{reason}; no previous version to roll back to", None)
            return
        sup = self.supervisor
        assert sup is not None
        if sup.version != previous or sup.state != RUNNING:
            try:
                await sup.switch_version(previous)
            except ControllerError as exc:
                log.error("rollback to %s: start failed (%s); the supervisor keeps trying",
                          previous, exc)
        self._finish(cmd, f"{reason}; rolled back to version {previous}", previous)

    def _finish(self, cmd: Command[UpdateJob], error: str, rolled_back_to: str | None,
                report: bool = True) -> None:
        """The update failed: saved, then reported, then handed to the listeners."""
        job = cmd.payload
        facts = self.facts
        if report:
            facts.failed_version = job.version
        if rolled_back_to is not None and facts.current_version != rolled_back_to:
            facts.current_title = facts.titles.get(rolled_back_to) or facts.current_title \
                or rolled_back_to
            facts.current_version = rolled_back_to
        self.discard_partials()
        self._conclude(cmd, Status.FAILED, error)
        log.error("controller update to %s failed: %s", job.version, error)
        if report:
            self.report_state(FAILED, sw_error=error)
        self._delivered(cmd)

    def _conclude(self, cmd: Command[UpdateJob], status: Status, reason: str) -> None:
        facts = self.facts
        desired = facts.desired
        if cmd.origin == THINGSBOARD and desired is not None and \
                desired.same_release(cmd.payload):
            facts.desired_done = True
        self.repo.resolve(cmd, status, reason)  # saves the facts too
        self.release(cmd.id)

    def _delivered(self, cmd: Command[UpdateJob]) -> None:
        """The outcome went to ThingsBoard (through the outbox): tell who waits."""
        self.repo.delivered(cmd)
        for fut in self._waiters.pop(cmd.id, []):
            if not fut.done():
                fut.set_result(cmd)
        for listener in self.on_finished:
            try:
                listener(cmd)
            except Exception:
                log.exception("an update listener failed")

    async def prune(self, keep: set[str]) -> None:
        """Keep ``keep_versions`` version directories (the newest by last switch), never
        the running one or the rollback target; the runtime frees what it kept for the
        others (docker: their images)."""
        base = self.places.versions_dir
        try:
            dirs = [p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")]
        except OSError:
            return
        dirs.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        kept = [p for p in dirs if p.name in keep]
        others = [p for p in dirs if p.name not in keep]
        room = max(0, self.ota.keep_versions - len(kept))
        for old in others[room:]:
            log.info("removing old controller version %s", old.name)
            await self.remove_version(old.name)

    async def remove_version(self, version: str) -> None:
        """Delete a version's directory and what the runtime kept for it."""
        await asyncio.to_thread(remove_tree, self.places.version_dir(version))
        self.facts.titles.pop(version, None)
        if self.supervisor is not None:
            await self.supervisor.runtime.remove_version(version)

    def versions_on_disk(self) -> list[str]:
        """The version directories, newest (last switched to) first."""
        try:
            dirs = [p for p in self.places.versions_dir.iterdir()
                    if p.is_dir() and not p.name.startswith(".")]
        except OSError:
            return []
        dirs.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        return [p.name for p in dirs]

    # -- reporting ------------------------------------------------------------------------

    def report_current(self) -> None:
        facts = self.facts
        if facts.current_version:
            self._send({"current_sw_title": facts.current_title,
                        "current_sw_version": facts.current_version})
        elif self.supervisor is not None and self.supervisor.version:
            self._send({"current_sw_version": self.supervisor.version})

    def report_updated(self, title: str, version: str) -> None:
        """The version wanted already runs."""
        self.facts.current_title, self.facts.current_version = title, version
        self.facts.titles[version] = title
        self.repo.save()
        self.report_state(UPDATED, current_sw_title=title, current_sw_version=version)

    def report_state(self, state: str, **extra: Any) -> None:
        self._send({"sw_state": state, **extra})

    def _send(self, values: dict[str, Any]) -> None:
        try:
            self._report_cb(values)
        except Exception:
            log.exception("OTA state could not be reported")
