"""Controller software update (OTA) driven by ThingsBoard: the shared attributes
``sw_title`` and ``sw_version`` (SPEC.md section 6).

Three kinds of release:

- a *package* stored in ThingsBoard (``sw_checksum`` is announced with the version): it
  is downloaded in chunks over MQTT (``v2/sw/request/<id>/chunk/<n>``), streamed to
  ``<data>/ota/<version>.part`` (resumed after a reconnect or a restart);
- a package stored elsewhere (``sw_url``): fetched over https (``download.py``), and
  verified when a checksum comes with it;
- a *git release* (no checksum, ``TEG_CONTROLLER_GIT_PATH`` set): ``sw_version`` is a tag
  or commit, exported by ``versions.export_version``.

What happens then (verify, unpack, switch, health window, rollback) is the update
pipeline in ``update.py``, shared with the local bus's ``software_update``. The version
announced is desired state: it is remembered, and applied as soon as no other update
holds the lane; a version whose update ended (updated or failed) is not tried again until
``sw_version`` changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from teg_gateway.bounds import clip
from teg_gateway.cloud.topics import OTA_ERRORS as ERROR_TOPICS
from teg_gateway.cloud.topics import SW_CHUNK_REQUEST as CHUNK_REQUEST
from teg_gateway.cloud.topics import SW_CHUNK_RESPONSE as CHUNK_RESPONSE
from teg_gateway.cloud.topics import SW_CHUNK_RESPONSE_RE as _CHUNK_TOPIC
from teg_gateway.config import OtaSettings
from teg_gateway.controller.versions import check_version
from teg_gateway.operations.engine import Command, Operation
from teg_gateway.operations.packages import OtaError
from teg_gateway.operations.update import (
    FAILED,
    THINGSBOARD,
    Desired,
    Kind,
    UpdateJob,
    Updates,
)

log = logging.getLogger(__name__)

#: The shared attributes OTA needs, asked for on every connect.
SHARED_KEYS = ("sw_title", "sw_version", "sw_size", "sw_checksum", "sw_checksum_algorithm",
               "sw_url")
FSYNC_EVERY_BYTES = 1024 * 1024
MAX_URL_CHARS = 4096

Publish = Callable[[str, bytes | str], "asyncio.Future[None]"]


class OtaManager(Operation):
    """ThingsBoard's side of controller updates; see the module docstring.

    ``publish(topic, payload)`` publishes to ThingsBoard and returns the PUBACK future;
    ``updates`` is the pipeline (it owns ``<data>/state/ota.json``).
    """

    name = "ota"

    def __init__(self, settings: OtaSettings, updates: Updates, publish: Publish) -> None:
        self.settings = settings
        self.updates = updates
        self._publish = publish
        self._wake = asyncio.Event()
        self._connected = asyncio.Event()
        self._reconnected = asyncio.Event()
        self._pending: tuple[str, int, asyncio.Future[bytes]] | None = None
        updates.fetchers[Kind.PACKAGE] = self._download
        updates.on_free.append(self._wake.set)

    # -- registration ---------------------------------------------------------------------

    def subscriptions(self) -> list[str]:
        return [CHUNK_RESPONSE + "+/chunk/+", *ERROR_TOPICS]

    def shared_keys(self) -> list[str]:
        return list(SHARED_KEYS)

    def on_connect(self) -> None:
        """A (re)connection: a download in progress asks for its chunk again at once."""
        self._connected.set()
        self._reconnected.set()
        self._wake.set()

    def on_shared(self, changes: dict[str, Any]) -> None:
        """Shared attribute changes (an update or a response, deleted keys as None)."""
        if "sw_version" not in changes:
            return
        self.updates.load()
        facts = self.updates.facts
        version = changes.get("sw_version")
        if version is None or version == "":
            log.info("sw_version removed: no controller update wanted")
            facts.desired = None
            self.updates.save_facts()
            return
        try:
            version = check_version(clip(version, 200))
        except ValueError as exc:
            self.updates.report_state(FAILED, sw_error=clip(exc, 1000))
            return
        url = changes.get("sw_url")
        if url and len(str(url)) > MAX_URL_CHARS:
            self.updates.report_state(FAILED, sw_error=f"sw_url is longer than {MAX_URL_CHARS} "
                                                  "characters")
            return
        title = clip(changes.get("sw_title") or version, 200)
        size = changes.get("sw_size")
        size = size if isinstance(size, int) and not isinstance(size, bool) else None
        algorithm = clip(changes.get("sw_checksum_algorithm") or "SHA256", 40)
        if url:
            desired = Desired(version, title, Kind.URL, url=str(url),
                              checksum=clip(changes.get("sw_checksum") or "", 200),
                              algorithm=algorithm, size=size)
            facts.package_info = desired
        elif changes.get("sw_checksum"):
            desired = Desired(version, title, Kind.PACKAGE,
                              checksum=clip(changes["sw_checksum"], 200),
                              algorithm=algorithm, size=size)
            facts.package_info = desired
        elif facts.package_info is not None and facts.package_info.version == version:
            # A partial answer (only title and version) for a package seen before keeps
            # its checksum; otherwise a version without a checksum is a git release.
            desired = facts.package_info
        else:
            desired = Desired(version, title, Kind.GIT)
        old = facts.desired
        if old is not None and old.same_release(desired):
            self.updates.save_facts()
            return
        log.info("controller update wanted: %s %s (%s)", title, version, desired.kind)
        facts.desired, facts.desired_done = desired, False
        if facts.failed_version not in ("", version):
            facts.failed_version = ""  # sw_version changed: a failed one may be retried
        self.updates.save_facts()
        self._wake.set()

    def on_message(self, topic: str, payload: bytes) -> bool:
        """A message from ThingsBoard; True when it was an OTA message."""
        if topic in ERROR_TOPICS:
            text = payload.decode("utf-8", errors="replace")[:500]
            log.error("ThingsBoard reports an OTA error: %s", text)
            if self._pending is not None and not self._pending[2].done():
                self._pending[2].set_exception(OtaError(f"ThingsBoard: {text}"))
            return True
        match = _CHUNK_TOPIC.match(topic)
        if match is None:
            return topic.startswith(CHUNK_RESPONSE)
        pending = self._pending
        if pending is not None and pending[0] == match[1] and pending[1] == int(match[2]) \
                and not pending[2].done():
            pending[2].set_result(payload)
        else:
            log.debug("OTA chunk %s ignored (not the one awaited)", topic)
        return True

    # -- the loop -------------------------------------------------------------------------

    async def run(self) -> None:
        """Resume what the state file says, then apply each version announced; never
        raises (a step that fails reports FAILED)."""
        self.updates.load()
        self.updates.report_current()
        self.updates.resume()
        while True:
            self._wake.clear()
            try:
                await self._step()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("OTA step failed unexpectedly")
                await asyncio.sleep(5.0)
                continue
            await self._wake.wait()

    async def close(self) -> None:
        await self.updates.close()

    async def _step(self) -> None:
        """Start the update of the version announced, when it is due and the lane free
        (an update in progress wakes this up when it ends)."""
        updates = self.updates
        updates.load()
        facts = updates.facts
        desired = facts.desired
        if desired is None or facts.desired_done or updates.lane.holder is not None:
            return
        if updates.active() is not None:
            return
        supervisor = updates.supervisor
        counter = facts.request_counter + 1
        job = UpdateJob(version=desired.version, title=desired.title, kind=desired.kind,
                        url=desired.url, checksum=desired.checksum,
                        algorithm=desired.algorithm, size=desired.size,
                        request_id=str(counter))
        if supervisor is None:
            facts.request_counter = counter
            updates.fail_at_once(f"tb-ota-{counter}", job, THINGSBOARD,
                                 "no controller is supervised ([controller] runtime is "
                                 "none): nothing to update")
            return
        if supervisor.version == desired.version:
            log.info("controller already runs version %s", desired.version)
            facts.desired_done = True
            updates.report_updated(desired.title, desired.version)
            return
        facts.request_counter = counter
        updates.start(f"tb-ota-{counter}", job, THINGSBOARD)

    # -- the chunked download -------------------------------------------------------------

    async def _download(self, cmd: Command[UpdateJob], part: Path) -> bool:
        """Fetch the package chunk by chunk into ``part``; False when another version
        became wanted meanwhile (the download is abandoned)."""
        ota, job = self.settings, cmd.payload
        size = job.size if job.size is not None and job.size >= 0 else None
        if size is not None and size > ota.max_package_bytes:
            raise OtaError(f"package of {size} bytes is larger than [ota] max_package_bytes "
                           f"({ota.max_package_bytes})")
        chunk_size = ota.chunk_size
        part.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            have = os.fstat(fd).st_size
            number = have // chunk_size
            offset = number * chunk_size
            if offset != have:
                os.ftruncate(fd, offset)
            if offset:
                log.info("resuming the download of %s at byte %d (chunk %d)",
                         job.version, offset, number)
                self.updates.mark_restarted(cmd)
            unsynced = 0
            while size is None or offset < size:
                if not self.updates.still_wanted(cmd):
                    log.info("download of %s abandoned: another version is wanted",
                             job.version)
                    return False
                data = await self._fetch_chunk(job.request_id, number, chunk_size)
                if not data:
                    if size is not None and offset < size:
                        raise OtaError(f"the package ended after {offset} of {size} bytes")
                    break
                if offset + len(data) > (size if size is not None else ota.max_package_bytes):
                    raise OtaError("the package is larger than announced" if size is not None
                                   else f"package larger than [ota] max_package_bytes "
                                        f"({ota.max_package_bytes})")
                os.pwrite(fd, data, offset)
                offset += len(data)
                number += 1
                unsynced += len(data)
                if unsynced >= FSYNC_EVERY_BYTES:
                    await asyncio.to_thread(os.fsync, fd)
                    unsynced = 0
                if len(data) < chunk_size:
                    break
            if size is not None and offset != size:
                raise OtaError(f"received {offset} bytes, {size} were announced")
            await asyncio.to_thread(os.fsync, fd)
        finally:
            os.close(fd)
        log.info("package %s downloaded: %d bytes", job.version, offset)
        return True

    async def _fetch_chunk(self, request_id: str, number: int, chunk_size: int) -> bytes:
        """One chunk: ask, wait (ask again after chunk_timeout_s, or at once after a
        reconnect), for as long as it takes."""
        topic = f"{CHUNK_REQUEST}{request_id}/chunk/{number}"
        loop = asyncio.get_running_loop()
        while True:
            future: asyncio.Future[bytes] = loop.create_future()
            self._pending = (request_id, number, future)
            self._reconnected.clear()
            sent = self._publish(topic, str(chunk_size))
            sent.add_done_callback(self._publish_done)
            reconnect: asyncio.Future[Any] = asyncio.ensure_future(self._reconnected.wait())
            waiting: set[asyncio.Future[Any]] = {future, reconnect}
            try:
                await asyncio.wait(waiting,
                                   timeout=self.settings.chunk_timeout_s,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                reconnect.cancel()
                self._pending = None
            if future.done():
                return future.result()  # raises OtaError for an error from ThingsBoard
            future.cancel()
            if not self._reconnected.is_set():
                if sent.done() and sent.exception() is not None:
                    # Not connected: wait for the connection instead of asking in vain.
                    self._connected.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._connected.wait(),
                                               self.settings.chunk_timeout_s)
                else:
                    log.warning("OTA chunk %d not answered in %.0f s: asking again", number,
                                self.settings.chunk_timeout_s)

    @staticmethod
    def _publish_done(fut: asyncio.Future[None]) -> None:
        if not fut.cancelled():
            fut.exception()
