"""Wires the parts together and runs the main loop.

One asyncio event loop does the work: forwarding, health telemetry, maintenance, and the
answers to ThingsBoard. paho's network thread only moves bytes and hands events to this
loop. The controller queue intake runs in a worker thread with its own connection
(controller/intake.py), so the loop never waits for the controller's lock on its queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import platform
import signal
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Coroutine
from types import FrameType
from typing import Any

from teg_gateway import __version__
from teg_gateway.clock import Clock, now_ms
from teg_gateway.cloud import topics
from teg_gateway.cloud.forwarder import Forwarder
from teg_gateway.cloud.limits import SessionLimits, payload_room
from teg_gateway.cloud.provision import device_name, ensure_credentials
from teg_gateway.cloud.session import CloudSession
from teg_gateway.cloud.topics import TELEMETRY as TOPIC_TELEMETRY
from teg_gateway.config import Settings, level_number
from teg_gateway.controller.factory import make_runtime
from teg_gateway.controller.intake import IntakeConfig, IntakePump, IntakeResult
from teg_gateway.controller.queue import QUEUE_FILE
from teg_gateway.controller.runtime import LOG_FILE_NAME as CONTROLLER_LOG_FILE
from teg_gateway.controller.supervisor import Supervisor, controller_state_file
from teg_gateway.datadir import prepare_data_dir
from teg_gateway.local.bus import SERVICE_NAME, LocalBus
from teg_gateway.local.topics import Mapped
from teg_gateway.logs import CloudLogHandler
from teg_gateway.mqttlink import ConnectionLost
from teg_gateway.operations.commands import GatewayControls, register_gateway_rpc
from teg_gateway.operations.controller_rpc import register_controller_rpc
from teg_gateway.operations.engine import CommandChannel, LocalCommand
from teg_gateway.operations.files import FileArea, FileManager
from teg_gateway.operations.logs_rpc import register_logs_rpc
from teg_gateway.operations.ota import SHARED_KEYS as OTA_SHARED_KEYS
from teg_gateway.operations.ota import OtaManager
from teg_gateway.operations.restart import RestartOperation
from teg_gateway.operations.rpc import RpcDispatcher
from teg_gateway.operations.software import SoftwareOperation
from teg_gateway.operations.update import Updates
from teg_gateway.store.db import is_corruption, is_disk_full
from teg_gateway.store.outbox import TELEMETRY
from teg_gateway.store.state import cloud_state, state_dir
from teg_gateway.store.stores import Stores
from teg_gateway.systemd import Notifier, status_line

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FORCED = 3
EXIT_TASK_FAILED = 4
MAINTENANCE_PERIOD_S = 60.0
LAG_PERIOD_S = 0.25
LOG_FLUSH_PERIOD_S = 0.2
ERROR_REPEAT_S = 60.0
# While connected, intake pauses when this many batches wait in the outbox unsent.
BACKLOG_BATCHES = 4


class LagMonitor:
    """Measures how late the event loop wakes up: a busy or blocked loop shows here."""

    def __init__(self) -> None:
        self.max_lag_ms = 0.0

    async def run(self) -> None:
        while True:
            start = time.monotonic()
            await asyncio.sleep(LAG_PERIOD_S)
            lag = (time.monotonic() - start - LAG_PERIOD_S) * 1000
            self.max_lag_ms = max(self.max_lag_ms, lag)

    def take(self) -> float:
        value, self.max_lag_ms = self.max_lag_ms, 0.0
        return value


class Gateway:
    """The daemon: build with settings, then ``await run()``; returns the exit code."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.started_ms = now_ms()
        self._started_monotonic = time.monotonic()  # uptime survives wall-clock jumps
        payload_limit = min(settings.outbox.max_payload_bytes, payload_room(
            settings.thingsboard.max_payload_bytes, TOPIC_TELEMETRY))
        self.stores = Stores(settings.data_dir, payload_limit)
        self.stores.dead_letter_cap_bytes = int(settings.outbox.dead_letters_mb * 1024 * 1024)
        self.intake = IntakePump(
            IntakeConfig(settings.controller_data_dir / QUEUE_FILE, self.stores.outbox_path,
                         self.stores.archive_path, settings.queue.batch_size,
                         payload_limit, self.stores.dead_letter_cap_bytes,
                         int(settings.archive.min_free_mb * 1024 * 1024)),
            settings.queue.poll_interval_ms / 1000.0, on_batch=self._on_intake_batch,
            on_stores=self._on_stores_problem, hold=self._backlogged)
        self.lag = LagMonitor()
        self.cloud_logs = CloudLogHandler(level_number(settings.logging.cloud_level),
                                          settings.logging.cloud_per_minute,
                                          settings.logging.cloud_burst)
        self.shared_attributes: dict[str, Any] = {}
        self.attribute_listeners: list[Callable[[dict[str, Any]], None]] = []
        self.session: CloudSession | None = None
        self.forwarder: Forwarder | None = None
        self.rpc = RpcDispatcher(self._send_rpc_reply)
        self.controller_started_ms: Callable[[], int | None] = lambda: None
        self.supervisor: Supervisor | None = None
        controller_state = controller_state_file(settings)
        runtime = make_runtime(settings, controller_state)
        if runtime is not None:
            self.supervisor = Supervisor(
                runtime, settings.controller, controller_state,
                last_health_check_ms=self._controller_health_check_ms,
                report=self.report_telemetry,
                request_sw_version=self._request_sw_version,
                ask_health=self._ask_controller_health)
            self.controller_started_ms = self.supervisor.started_at_ms
        self.updates = Updates(settings, self.supervisor, self.report_telemetry,
                               state_dir(settings.data_dir) / "ota.json")
        self.ota = OtaManager(settings, self.updates, self._cloud_publish)
        self.software = SoftwareOperation(self.updates,
                                          state_dir(settings.data_dir) / "software.json")
        self.bus_connected = asyncio.Event()
        self.bus: LocalBus | None = None
        if settings.local_mqtt.enabled:
            self.bus = LocalBus(settings.local_mqtt, self._on_local_mapped,
                                [LocalCommand("restart", {}, self._on_restart_command),
                                 *self.software.local_commands()],
                                self._on_service_health)
            self.bus_connected = self.bus.connected
        self.software.channel = CommandChannel(self._bus_publish_retained, self.bus_connected)
        self.restart = RestartOperation(settings.restart,
                                        state_dir(settings.data_dir) / "restart.json",
                                        CommandChannel(self._bus_publish_retained,
                                                       self.bus_connected, Clock()),
                                        self.report_telemetry, Clock())
        register_gateway_rpc(self.rpc, GatewayControls(
            stores=self.stores, rpc_settings=settings.rpc, restart=self.restart,
            bus_publish=self._bus_publish_retained, bus_connected=self.bus_connected,
            status=self.status_values, report=self.report_telemetry,
            request_stop=self.request_stop, wake_forwarder=self._poke_forwarder))
        register_controller_rpc(self.rpc, self.supervisor)
        register_logs_rpc(self.rpc, settings.log_file,
                          settings.controller_logs_dir / CONTROLLER_LOG_FILE)
        self.attribute_listeners.append(self.ota.on_shared)
        self.files = FileManager(
            settings.files, FileArea.of(settings), publish_attributes=self._publish_attributes,
            report=self.report_telemetry, request_shared=self._request_shared,
            restart_controller=self.supervisor.restart_now
            if self.supervisor is not None else None,
            max_payload_bytes=settings.outbox.max_payload_bytes, clock=Clock())
        self.attribute_listeners.append(self.files.on_shared)
        self.rpc.register("init_files", "reset the file-management client attributes "
                          "(FILE_HASHES, FILE_READ_*) and reconcile the managed files again",
                          self._rpc_init_files)
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._session_task: asyncio.Task[Any] | None = None
        self._last_reported: dict[str, float] = {}
        self._published_limits: dict[str, Any] | None = None
        self.records_in = 0
        self._dropped_unreported = 0
        self.exit_code = EXIT_OK
        self.systemd = Notifier.from_environment()

    # -- life cycle -----------------------------------------------------------------------

    async def run(self) -> int:
        settings = self.settings
        prepare_data_dir(settings.data_dir)
        logging.getLogger().addHandler(self.cloud_logs)
        self._install_signals()
        try:
            if not settings.thingsboard.tls:
                log.warning("TLS IS OFF: talking plain MQTT to %s:%d. Use this only for local "
                            "tests; credentials and data travel unencrypted.",
                            settings.thingsboard.host, settings.thingsboard.port)
            self.stores.open()
            for problem in self.stores.take_problems():
                self.stores.outbox.put_telemetry({"gateway_problem": problem})
            # The controller, the local bus and a pending restart do not wait for
            # ThingsBoard: the device keeps working offline and unprovisioned.
            if self.supervisor is not None:
                self._start(self.supervisor.run())
            if self.bus is not None:
                self._start(self.bus.run())
            self._start(self.ota.run())
            self._start(self.software.run())
            self._start(self.files.run())
            await self.restart.resume()
            provisioning = asyncio.ensure_future(ensure_credentials(settings))
            stop_wait = asyncio.ensure_future(self._stopping.wait())
            # Intake runs while provisioning waits for an answer: nothing queues up in the
            # controller's database meanwhile.
            self.intake.start()
            self._start(self._log_flush_loop())
            self._start(self.lag.run())
            # Databases open and intake running: ready, whether ThingsBoard is reachable or not.
            self.systemd.ready(status_line(self.status_values()))
            self._start(self.systemd.run(lambda: status_line(self.status_values())))
            await asyncio.wait({provisioning, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
            if self._stopping.is_set():
                provisioning.cancel()
                await self._shutdown()
                return self.exit_code
            stop_wait.cancel()
            _created, creds = provisioning.result()
            self._connect_cloud(creds)
            self._start(self._health_loop())
            self._start(self._maintenance_loop())
            await self._stopping.wait()
            await self._shutdown()
            return self.exit_code
        finally:
            logging.getLogger().removeHandler(self.cloud_logs)

    def _connect_cloud(self, creds: Any) -> None:
        client_id = device_name(self.settings.thingsboard.device_name)
        self.session = CloudSession(self.settings, creds, client_id, self._on_cloud_message,
                                    cloud_state(self.settings.data_dir))
        self.session.on_connect.append(self._publish_sys_info)
        self.session.subscriptions.extend(self.ota.subscriptions())
        self.session.shared_keys.extend(k for k in self.ota.shared_keys()
                                        if k not in self.session.shared_keys)
        self.session.on_connect.append(self.ota.on_connect)
        self.session.shared_keys += [k for k in self.files.shared_keys()
                                     if k not in self.session.shared_keys]
        self.session.on_connect.append(self.files.on_connect)
        self.session.on_limits.append(self._publish_session_limits)
        outbox = self.settings.outbox
        self.forwarder = Forwarder(self.stores.outbox, self.session,
                                   max_inflight=outbox.max_inflight,
                                   puback_timeout_s=outbox.puback_timeout_s,
                                   max_payload_bytes=outbox.max_payload_bytes,
                                   on_db_error=self._on_db_error)
        self._session_task = self._start(self.session.run())
        self._start(self.forwarder.run())

    def _start(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        task.add_done_callback(self._task_ended)
        self._tasks.append(task)
        return task

    def _task_ended(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled() or self._stopping.is_set():
            return
        exc = task.exception()
        if exc is not None:
            log.critical("a main loop task failed: %r; shutting down so the service manager "
                         "restarts the gateway", exc, exc_info=exc)
            self.exit_code = EXIT_TASK_FAILED
            self.request_stop()

    def request_stop(self) -> None:
        if self._stopping.is_set():
            log.error("second stop request: forcing the exit")
            os._exit(EXIT_FORCED)
        log.info("stop requested; shutting down")
        self._arm_forced_exit()
        self._stopping.set()

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop)

    def _arm_forced_exit(self) -> None:
        timeout = self.settings.shutdown.timeout_s

        def forced(_sig: int, _frame: FrameType | None) -> None:
            log.critical("graceful shutdown took longer than %.0f s: forcing the exit", timeout)
            logging.shutdown()
            os._exit(EXIT_FORCED)

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGALRM, forced)
            signal.setitimer(signal.ITIMER_REAL, timeout)
        # Should the main thread be stuck where Python signal handlers cannot run.
        backstop = threading.Timer(timeout + 5.0, os._exit, (EXIT_FORCED,))
        backstop.daemon = True
        backstop.start()

    async def _shutdown(self) -> None:
        shutdown = self.settings.shutdown
        self.systemd.stopping()
        if self.supervisor is not None:
            try:
                await asyncio.wait_for(self.supervisor.shutdown(),
                                       self.settings.controller.stop_grace_s + 5.0)
            except TimeoutError:
                log.error("shutdown: the controller did not stop in time")
        await self.restart.close()
        await self.ota.close()
        await self.software.close()
        if self.bus is not None:
            await self.bus.stop()
        await self.intake.stop()
        if self.forwarder is not None:
            if await self.forwarder.drain(shutdown.drain_s):
                log.info("shutdown: every publish in flight was acknowledged")
            else:
                log.warning("shutdown: %d publish(es) not acknowledged in %.0f s; their records "
                            "stay in the outbox and are sent after the restart",
                            self.forwarder.inflight, shutdown.drain_s)
        if self.session is not None:
            await self.session.stop()
        if self._session_task is not None:
            await asyncio.wait({self._session_task}, timeout=10.0)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(sqlite3.Error):
            self._flush_cloud_logs()
        self.stores.close()
        log.info("shutdown complete")
        signal.setitimer(signal.ITIMER_REAL, 0)

    # -- intake ---------------------------------------------------------------------------

    def _on_intake_batch(self, result: IntakeResult) -> None:
        """On the loop, after each batch the intake worker moved."""
        self.records_in += result.forwarded
        if result.forwarded and self.forwarder is not None:
            self.forwarder.poke()
        if result.dead:
            log.warning("controller queue: %d malformed row(s) moved to the dead-letter "
                        "table: %s", result.dead, result.dead_detail)
        if result.trimmed:
            self._report_every("archive-space", logging.WARNING,
                               f"free disk below archive.min_free_mb "
                               f"({self.settings.archive.min_free_mb:g} MB): the archive gave "
                               f"up its {result.trimmed} oldest records")
        quota = int(self.settings.outbox.quota_mb * 1024 * 1024)
        try:
            self._dropped_unreported += self.stores.outbox.enforce_quota(quota)
        except sqlite3.Error as exc:
            self._on_db_error(exc, "outbox quota")
            return
        if self._dropped_unreported and self._report_every(
                "quota", logging.WARNING,
                f"outbox over its quota of {self.settings.outbox.quota_mb:g} MB: "
                f"dropped the {self._dropped_unreported} oldest telemetry records "
                "(they stay in the archive)"):
            self._dropped_unreported = 0

    def _on_stores_problem(self, problem: BaseException | None) -> None:
        """On the loop, while the intake worker has its connection closed: a database file
        of ours was deleted or replaced (``problem`` None) or is damaged."""
        try:
            if problem is None:
                self.stores.reopen_replaced()
            else:
                self.stores.recover(problem)
        except sqlite3.Error as again:
            self._report_every("db-recover", logging.ERROR,
                               f"could not reopen the databases: {again}")
            return
        if self.forwarder is not None:
            self.forwarder.outbox = self.stores.outbox
        for text in self.stores.take_problems():
            self.report_telemetry({"gateway_problem": text})

    def _backlogged(self) -> bool:
        if self.session is None or not self.session.connected.is_set():
            return False
        return self.stores.outbox.unsent() > BACKLOG_BATCHES * self.intake.batch_size

    def _on_db_error(self, exc: BaseException, where: str = "outbox") -> None:
        if is_disk_full(exc):
            self._report_every("disk-full", logging.ERROR,
                               f"{where}: the disk is full; records wait in the controller "
                               "queue until there is space")
            return
        self._report_every(f"db-{where}", logging.ERROR, f"{where}: database error: {exc}")
        if is_corruption(exc):
            self.intake.release(lambda: self._on_stores_problem(exc))

    def _report_every(self, key: str, level: int, text: str) -> bool:
        """Log ``text``, but the same kind of problem at most once a minute; True if logged."""
        now = time.monotonic()
        if now - self._last_reported.get(key, -ERROR_REPEAT_S) >= ERROR_REPEAT_S:
            self._last_reported[key] = now
            log.log(level, "%s", text)
            return True
        return False

    # -- periodic work --------------------------------------------------------------------

    async def _log_flush_loop(self) -> None:
        while True:
            await asyncio.sleep(LOG_FLUSH_PERIOD_S)
            try:
                self._flush_cloud_logs()
            except sqlite3.Error as exc:
                self._on_db_error(exc, "gateway log")

    def _flush_cloud_logs(self) -> None:
        bodies = self.cloud_logs.take()
        if bodies:
            self.stores.outbox.put(TELEMETRY, bodies)
            if self.forwarder is not None:
                self.forwarder.poke()

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.health.interval_s)
            try:
                self.stores.outbox.put_telemetry(self.health_values())
                if self.forwarder is not None:
                    self.forwarder.poke()
            except sqlite3.Error as exc:
                self._on_db_error(exc, "health telemetry")

    def _uptime_ms(self) -> int:
        return int((time.monotonic() - self._started_monotonic) * 1000)

    def health_values(self) -> dict[str, Any]:
        """The gateway's health telemetry: keys from telemetry_keys.HEALTH_KEYS (the README
        describes each; a test checks that nothing else is sent)."""
        outbox = self.stores.outbox
        now = now_ms()
        depth = outbox.depth()
        values: dict[str, Any] = {
            "gateway_uptime_ms": self._uptime_ms(),
            "outbox_depth": depth,
            "outbox_oldest_age_ms": outbox.oldest_age_ms() or 0,
            "outbox_bytes": outbox.used_bytes(),
            "archive_bytes": self.stores.archive.used_bytes(),
            "records_accepted": outbox.counter("records_accepted"),
            "records_sent": outbox.counter("records_sent"),
            "records_dropped": outbox.counter("records_dropped"),
            "dead_letters": outbox.counter("dead_letters"),
            "dead_letters_removed": outbox.counter("dead_letters_removed"),
            "reconnects": self.session.reconnects if self.session else 0,
            "rate_limit_disconnects": self.session.rate_limit_disconnects
            if self.session else 0,
            "rate_limited_ms": self.session.pacer.take_waited_ms() if self.session else 0,
            "outbox_eta_s": self._outbox_eta_s(depth),
            "loop_lag_ms": round(self.lag.take(), 1),
            "logs_suppressed": self.cloud_logs.suppressed,
        }
        last_check = self.intake.last_health_check_ms()
        if last_check:
            values["ms_since_last_controller_health_check"] = now - last_check
        if self.supervisor is not None:
            values.update(self.supervisor.health_values())
        return values

    def _outbox_eta_s(self, depth: int) -> int:
        """Seconds until the outbox is empty at the rate the server's limits allow now (or,
        without limits, at the rate seen so far); 0 when empty."""
        if depth == 0 or self.session is None or self.forwarder is None:
            return 0
        fwd = self.forwarder
        points_per_record = fwd.points / fwd.telemetry_records if fwd.telemetry_records else 1.0
        per_publish = (fwd.telemetry_records / fwd.telemetry_publishes
                       if fwd.telemetry_publishes else 1.0)
        rate = self.session.pacer.records_per_s(points_per_record, per_publish)
        if rate is None:
            elapsed_s = time.monotonic() - self._started_monotonic
            rate = fwd.records / elapsed_s if fwd.records and elapsed_s > 0 else None
        return round(depth / rate) if rate else -1

    def _publish_session_limits(self, limits: SessionLimits) -> None:
        """The limits in force, as the client attribute ``session_limits`` (when changed)."""
        described = limits.describe()
        if described != self._published_limits:
            self._published_limits = described
            self._publish_attributes({"session_limits": described})

    async def _maintenance_loop(self) -> None:
        archive = self.settings.archive
        while True:
            try:
                removed = self.stores.archive.enforce_retention(
                    archive.retention_days, int(archive.max_mb * 1024 * 1024))
                if removed:
                    log.info("archive retention removed %d records", removed)
            except sqlite3.Error as exc:
                self._on_db_error(exc, "archive")
            await asyncio.sleep(MAINTENANCE_PERIOD_S)

    # -- ThingsBoard messages -------------------------------------------------------------

    def _on_cloud_message(self, topic: str, payload: bytes) -> None:
        if topic.startswith(topics.RPC_REQUEST):
            if self.rpc is not None:
                self.rpc.handle(topic[len(topics.RPC_REQUEST):], payload)
        elif topic == topics.ATTRIBUTES:
            self._on_attributes(payload, "update")
        elif topic.startswith(topics.ATTRIBUTE_RESPONSE):
            self._on_attributes(payload, "response")
        elif not self.ota.on_message(topic, payload):
            log.debug("message on %s ignored", topic)

    def _on_attributes(self, payload: bytes, kind: str) -> None:
        try:
            value = json.loads(payload)
        except ValueError:
            log.warning("attribute %s is not JSON: %.200r", kind, payload)
            return
        if not isinstance(value, dict):
            log.warning("attribute %s is not a JSON object: %.200r", kind, payload)
            return
        if kind == "response":
            shared = value.get("shared", {})
            changes = shared if isinstance(shared, dict) else {}
        elif "deleted" in value and isinstance(value["deleted"], list):
            changes = {str(k): None for k in value["deleted"]}
        else:
            changes = value
        for key, item in changes.items():
            if item is None:
                self.shared_attributes.pop(key, None)
            else:
                self.shared_attributes[key] = item
        log.debug("shared attributes %s: %s", kind, sorted(changes))
        for listener in self.attribute_listeners:
            try:
                listener(changes)
            except Exception:
                log.exception("attribute handler failed")

    def _send_rpc_reply(self, request_id: str, reply: dict[str, Any]) -> None:
        # Replies go straight to the session: ThingsBoard forgets an RPC after ~10 s, so a
        # reply kept for a later connection would answer nobody.
        if self.session is None:
            return
        fut = self.session.publish(topics.RPC_RESPONSE + request_id,
                                   json.dumps(reply, default=str))

        def delivered(f: asyncio.Future[None]) -> None:
            if not f.cancelled() and f.exception() is not None:
                log.warning("RPC reply %s not delivered: %s", request_id, f.exception())

        fut.add_done_callback(delivered)

    async def _rpc_init_files(self, _params: dict[str, Any]) -> Any:
        return await self.files.init_files()

    # -- glue between the parts ------------------------------------------------------------

    def report_telemetry(self, values: dict[str, Any]) -> None:
        """Gateway telemetry for ThingsBoard, through the outbox."""
        try:
            self.stores.outbox.put_telemetry(values)
        except sqlite3.Error as exc:
            self._on_db_error(exc, "gateway telemetry")
            return
        self._poke_forwarder()

    def _poke_forwarder(self) -> None:
        if self.forwarder is not None:
            self.forwarder.poke()

    def _on_local_mapped(self, mapped: Mapped) -> None:
        try:
            if mapped.telemetry:
                self.stores.outbox.put_telemetry(mapped.telemetry, mapped.ts_ms)
            if mapped.attributes:
                self.stores.outbox.put_attributes(mapped.attributes)
        except sqlite3.Error as exc:
            self._on_db_error(exc, "local bus")
            return
        self._poke_forwarder()

    def _on_restart_command(self, command_id: str, payload: bytes) -> None:
        self.restart.on_command(command_id, payload)

    def _on_service_health(self, name: str, status: str) -> None:
        wanted = self.settings.controller.health_service
        if self.supervisor is not None and name != SERVICE_NAME and name == (wanted or name):
            self.supervisor.note_health(status)

    def _ask_controller_health(self) -> None:
        if self.bus is not None:
            self.bus.request_health_check(self.settings.controller.health_service or None)

    def _bus_publish_retained(self, topic: str, payload: bytes) -> asyncio.Future[None]:
        if self.bus is None:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            fut.set_exception(ConnectionLost("the local broker is disabled"))
            return fut
        return self.bus.publish(topic, payload, retain=True)

    def _controller_health_check_ms(self) -> int:
        return self.intake.last_health_check_ms()

    def _publish_attributes(self, attributes: dict[str, Any]) -> None:
        """Client attributes for ThingsBoard, through the outbox."""
        try:
            self.stores.outbox.put_attributes(attributes)
        except sqlite3.Error as exc:
            self._on_db_error(exc, "client attributes")
            return
        self._poke_forwarder()

    def _request_shared(self, keys: list[str]) -> None:
        if self.session is not None and self.session.connected.is_set():
            self.session.request_shared_attributes(keys)

    def _request_sw_version(self) -> None:
        if self.session is not None and self.session.connected.is_set():
            self.session.request_shared_attributes(list(OTA_SHARED_KEYS))

    def _cloud_publish(self, topic: str, payload: bytes | str) -> asyncio.Future[None]:
        """Publish straight to ThingsBoard (OTA chunk requests); fails when offline."""
        if self.session is None:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            fut.set_exception(ConnectionLost("not connected to ThingsBoard"))
            return fut
        return self.session.publish(topic, payload)

    def status_values(self) -> dict[str, Any]:
        """The RPC ``status`` answer (without the version)."""
        outbox = self.stores.outbox
        session = self.session
        return {
            "uptime_s": round(self._uptime_ms() / 1000, 1),
            "thingsboard": "connected" if session and session.connected.is_set()
            else (session.last_error if session else "not provisioned yet") or "connecting",
            "reconnects": session.reconnects if session else 0,
            "rate_limit_disconnects": session.rate_limit_disconnects if session else 0,
            "session_limits": session.pacer.limits.describe() if session and
            session.ready.is_set() else None,
            "local_broker": "connected" if self.bus_connected.is_set()
            else ("disabled" if self.bus is None else "not connected"),
            "outbox_depth": outbox.depth(),
            "outbox_oldest_age_ms": outbox.oldest_age_ms() or 0,
            "controller": self.supervisor.state if self.supervisor else "not supervised",
            "controller_version": self.supervisor.version if self.supervisor else None,
            "restart_pending": (self.restart.pending() or {}).get("id"),
        }

    def _publish_sys_info(self) -> None:
        info = {
            "gateway_version": __version__,
            "hostname": socket.gethostname(),
            "platform": platform.platform(),
            "machine": platform.machine(),
            "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version,
            "started_ms": self.started_ms,
        }
        try:
            self.stores.outbox.put_attributes({"sys_info": info})
        except sqlite3.Error as exc:
            self._on_db_error(exc, "sys_info")
