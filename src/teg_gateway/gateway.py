"""Wires the parts together and runs them under one task group.

One asyncio event loop does the work: forwarding, health telemetry, maintenance, the
answers to ThingsBoard, and paho-mqtt's sockets (mqttlink.py). The controller queue
intake runs in a worker thread with its own connections (controller/intake.py), so the
loop never waits for the controller's lock on its queue.

Where things are:

- controller/feed.py: the intake pump and what flows into the outbox (queue, local bus,
  logs), the archive's retention;
- store/recovery.py: the DB-error policy, the outbox quota, the gateway's own records;
- health.py: health telemetry, ``sys_info``, ``session_limits``, the status answer;
- cloud/routing.py: ThingsBoard topic → handler, the shared-attribute cache, the
  operations' registration;
- operations/: every operation is an :class:`~teg_gateway.operations.engine.Operation`,
  listed once below (:attr:`Gateway.operations`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Coroutine
from typing import Any

from teg_gateway.clock import Clock
from teg_gateway.cloud.forwarder import Forwarder
from teg_gateway.cloud.limits import payload_room
from teg_gateway.cloud.provision import device_name, ensure_credentials
from teg_gateway.cloud.routing import CloudRouter
from teg_gateway.cloud.session import CloudSession
from teg_gateway.cloud.topics import TELEMETRY as TOPIC_TELEMETRY
from teg_gateway.config import Settings, level_number
from teg_gateway.controller.factory import make_runtime
from teg_gateway.controller.feed import Feed
from teg_gateway.controller.intake import IntakeConfig
from teg_gateway.controller.queue import QUEUE_FILE
from teg_gateway.controller.runtime import LOG_FILE_NAME as CONTROLLER_LOG_FILE
from teg_gateway.controller.supervisor import Supervisor, controller_state_file
from teg_gateway.controller.versions import ControllerPlaces
from teg_gateway.datadir import prepare_data_dir
from teg_gateway.health import Health
from teg_gateway.local.bus import SERVICE_NAME, LocalBus
from teg_gateway.logs import CloudLogHandler
from teg_gateway.mqttlink import ConnectionLost
from teg_gateway.operations.commands import GatewayControls, register_gateway_rpc
from teg_gateway.operations.controller_rpc import register_controller_rpc
from teg_gateway.operations.engine import CommandChannel, Operation
from teg_gateway.operations.files import FileArea, FileManager
from teg_gateway.operations.logs_rpc import register_logs_rpc
from teg_gateway.operations.ota import OtaManager
from teg_gateway.operations.restart import RestartOperation
from teg_gateway.operations.software import SoftwareOperation
from teg_gateway.operations.update import Updates
from teg_gateway.stopping import StopControl
from teg_gateway.store.recovery import StoreRecovery
from teg_gateway.store.state import cloud_state, state_dir
from teg_gateway.store.stores import Stores
from teg_gateway.systemd import Notifier, status_line

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_TASK_FAILED = 4
#: How long an operation's task may take to end once cancelled at shutdown.
OPERATION_STOP_S = 5.0


class Gateway:
    """The daemon: build with settings, then ``await run()``; returns the exit code."""

    def __init__(self, settings: Settings, clock: Clock | None = None) -> None:
        self.settings = settings
        self.clock = clock or Clock()
        payload_limit = min(settings.outbox.max_payload_bytes, payload_room(
            settings.thingsboard.max_payload_bytes, TOPIC_TELEMETRY))
        self.stores = Stores(settings.data_dir, payload_limit)
        self.stores.dead_letter_cap_bytes = int(settings.outbox.dead_letters_mb * 1024 * 1024)
        # Built once ThingsBoard credentials exist (see _connect_cloud).
        self.session: CloudSession | None = None
        self.forwarder: Forwarder | None = None

        # What flows into the outbox, and what happens when a database fails.
        self.cloud_logs = CloudLogHandler(level_number(settings.logging.cloud_level),
                                          settings.logging.cloud_per_minute,
                                          settings.logging.cloud_burst)
        self.recovery = StoreRecovery(self.stores, settings.outbox, self.clock,
                                      forwarder=lambda: self.forwarder)
        self.feed = Feed(
            IntakeConfig(settings.controller_data_dir / QUEUE_FILE, self.stores.outbox_path,
                         self.stores.archive_path, settings.queue.batch_size,
                         payload_limit, self.stores.dead_letter_cap_bytes,
                         int(settings.archive.min_free_mb * 1024 * 1024)),
            settings.queue.poll_interval_ms / 1000.0, archive=settings.archive,
            stores=self.stores, recovery=self.recovery, cloud_logs=self.cloud_logs,
            session=lambda: self.session, clock=self.clock)
        self.intake = self.feed.intake
        # A damaged database found outside the intake is recovered once it let go of it.
        self.recovery.use_intake(self.intake)
        report = self.recovery.report_telemetry

        # ThingsBoard's messages: RPC, shared attributes, the operations' topics.
        self.cloud = CloudRouter()
        self.rpc = self.cloud.rpc

        self.supervisor: Supervisor | None = None
        controller_state = controller_state_file(settings)
        runtime = make_runtime(settings, controller_state, self.clock)
        if runtime is not None:
            self.supervisor = Supervisor(
                runtime, settings.controller, controller_state,
                last_health_check_ms=self.intake.last_health_check_ms, report=report,
                request_sw_version=lambda: self.cloud.request_shared(self.ota.shared_keys()),
                ask_health=self._ask_controller_health, clock=self.clock)

        # The operations, in order of registration (closed in reverse order). Their
        # states on the local bus go through ``channel``, whether the bus is up or not.
        self.bus_connected = asyncio.Event()
        channel = CommandChannel(self._bus_publish_retained, self.bus_connected, self.clock)
        self.restart = RestartOperation(settings.restart,
                                        state_dir(settings.data_dir) / "restart.json",
                                        channel, report, self.clock)
        # One update pipeline (ota.json) for ThingsBoard OTA and the local bus.
        self.updates = Updates(settings.ota, settings.controller, ControllerPlaces.of(settings),
                               supervisor=self.supervisor, report=report,
                               state_path=state_dir(settings.data_dir) / "ota.json",
                               download_dir=settings.data_dir / "ota", clock=self.clock)
        self.ota = OtaManager(settings.ota, self.updates, self.cloud.publish)
        self.software = SoftwareOperation(self.updates,
                                          state_dir(settings.data_dir) / "software.json",
                                          channel, clock=self.clock)
        self.files = FileManager(
            settings.files, FileArea.of(settings),
            publish_attributes=self.recovery.publish_attributes, report=report,
            request_shared=self.cloud.request_shared,
            restart_controller=self.supervisor.restart_now
            if self.supervisor is not None else None,
            max_payload_bytes=settings.outbox.max_payload_bytes, clock=self.clock)
        self.operations: list[Operation] = [self.restart, self.ota, self.software, self.files]
        for op in self.operations:
            self.cloud.register(op)

        self.bus: LocalBus | None = None
        if settings.local_mqtt.enabled:
            self.bus = LocalBus(settings.local_mqtt, self.feed.on_local_mapped,
                                [c for op in self.operations for c in op.local_commands()],
                                self._on_service_health, connected=self.bus_connected)

        self.health = Health(
            settings.health, self.clock, stores=self.stores, recovery=self.recovery,
            intake=self.intake, cloud_logs=self.cloud_logs, supervisor=self.supervisor,
            session=lambda: self.session, forwarder=lambda: self.forwarder,
            local_broker=self._local_broker_state,
            restart_pending=lambda: (self.restart.pending() or {}).get("id"))

        register_gateway_rpc(self.rpc, GatewayControls(
            stores=self.stores, rpc_settings=settings.rpc, restart=self.restart,
            bus_publish=self._bus_publish_retained, bus_connected=self.bus_connected,
            status=self.health.status_values, report=report,
            request_stop=self.request_stop, wake_forwarder=self.recovery.poke))
        register_controller_rpc(self.rpc, self.supervisor)
        register_logs_rpc(self.rpc, settings.log_file,
                          settings.controller_logs_dir / CONTROLLER_LOG_FILE)

        self._stopping = StopControl(settings.shutdown.timeout_s)
        self._group: asyncio.TaskGroup | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._operation_tasks: dict[str, asyncio.Task[Any]] = {}
        self._provisioning: asyncio.Task[Any] | None = None
        self._provisioning_error: Exception | None = None
        self._session_task: asyncio.Task[Any] | None = None
        self.exit_code = EXIT_OK
        self.systemd = Notifier.from_environment()

    # -- life cycle -----------------------------------------------------------------------

    async def run(self) -> int:
        settings = self.settings
        prepare_data_dir(settings.data_dir)
        logging.getLogger().addHandler(self.cloud_logs)
        self._stopping.install_signals()
        try:
            if not settings.thingsboard.tls:
                log.warning("TLS IS OFF: talking plain MQTT to %s:%d. Use this only for local "
                            "tests; credentials and data travel unencrypted.",
                            settings.thingsboard.host, settings.thingsboard.port)
            self.stores.open()
            self.recovery.report_open_problems()
            try:
                async with asyncio.TaskGroup() as group:
                    self._group = group
                    self._start_parts()
                    await self._stopping.requested.wait()
                    await self._shutdown()
            except BaseExceptionGroup as failed:
                # The parts never raise into the group (see _guarded): this is the main
                # body's own error, raised as itself for the command line to report.
                if len(failed.exceptions) == 1:
                    raise failed.exceptions[0] from None
                raise
            if self._provisioning_error is not None:
                raise self._provisioning_error
            return self.exit_code
        finally:
            logging.getLogger().removeHandler(self.cloud_logs)

    def _start_parts(self) -> None:
        # The controller, the local bus and the operations do not wait for ThingsBoard:
        # the device keeps working offline and unprovisioned.
        if self.supervisor is not None:
            self._start(self.supervisor.run(), "controller supervisor")
        if self.bus is not None:
            self._start(self.bus.run(), "local bus")
        for op in self.operations:
            self._operation_tasks[op.name] = self._start(op.run(), f"operation {op.name}")
        self._provisioning = self._start(self._connect_cloud(), "provisioning")
        # Intake runs while provisioning waits for an answer: nothing queues up in the
        # controller's database meanwhile.
        self.intake.start()
        self._start(self.feed.log_flush_loop(), "log flush")
        self._start(self.health.lag.run(), "loop lag")
        # Databases open and intake running: ready, whether ThingsBoard is reachable or not.
        self.systemd.ready(status_line(self.health.status_values()))
        self._start(self.systemd.run(lambda: status_line(self.health.status_values())),
                    "systemd watchdog")

    async def _connect_cloud(self) -> None:
        """Credentials (provisioning the device if needed), then the ThingsBoard session,
        the forwarder and what needs them."""
        try:
            _created, creds = await ensure_credentials(self.settings)
        except Exception as exc:
            # Refused credentials or provisioning: stop in order, then run() raises it
            # for the command line to say in one line.
            self._provisioning_error = exc
            if not self._stopping.is_set():
                self.request_stop()
            return
        if self._stopping.is_set():
            return
        client_id = device_name(self.settings.thingsboard.device_name)
        self.session = CloudSession(self.settings.thingsboard, creds, client_id,
                                    self.cloud.route, cloud_state(self.settings.data_dir),
                                    token_path=self.settings.access_token_path,
                                    clock=self.clock)
        self.session.on_connect.append(self.health.publish_sys_info)
        self.cloud.attach(self.session)
        self.session.on_limits.append(self.health.publish_session_limits)
        outbox = self.settings.outbox
        self.forwarder = Forwarder(self.stores.outbox, self.session,
                                   max_inflight=outbox.max_inflight,
                                   puback_timeout_s=outbox.puback_timeout_s,
                                   max_payload_bytes=outbox.max_payload_bytes,
                                   on_db_error=self.recovery.on_db_error,
                                   clock=self.clock)
        self._session_task = self._start(self.session.run(), "ThingsBoard session")
        self._start(self.forwarder.run(), "forwarder")
        self._start(self.health.run(), "health telemetry")
        self._start(self.feed.maintenance_loop(), "archive maintenance")

    def _start(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        assert self._group is not None, "parts start inside run()"
        task = self._group.create_task(self._guarded(coro, name), name=name)
        self._tasks.append(task)
        return task

    async def _guarded(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        """Run a part; when it fails, stop the whole gateway in order (the service manager
        starts it again) instead of letting the task group cancel everything at once."""
        try:
            await coro
        except Exception as exc:
            if self._stopping.is_set():
                log.error("%s failed while the gateway stopped: %r", name, exc)
                return
            log.critical("a main loop task failed (%s): %r; shutting down so the service "
                         "manager restarts the gateway", name, exc, exc_info=exc)
            self.exit_code = EXIT_TASK_FAILED
            self.request_stop()

    def request_stop(self) -> None:
        """Ask for an orderly shutdown (a second request forces the exit)."""
        self._stopping.request()

    async def _shutdown(self) -> None:
        """Stop the parts in this order (the forced-exit timer bounds the whole):

        1. provisioning, if still waiting: nothing new connects;
        2. the controller (stopped or left running, as configured): it stops producing
           records, and intake, still running, moves the last ones it wrote;
        3. the operations, last registered first: ``close()``, then their task is
           cancelled, so no operation acts while the links it uses go away, and their
           last reports are in the outbox before it drains;
        4. the local bus: its last measurements are in the outbox;
        5. intake: its last batch is moved out of the controller's queue;
        6. the forwarder drains: publishes in flight are acknowledged (what is not stays
           in the outbox and is sent after the restart);
        7. the ThingsBoard session closes its connection;
        8. the loops left (health, maintenance, log flush, watchdog) are cancelled, the
           last log records go into the outbox, and the databases are closed.
        """
        shutdown = self.settings.shutdown
        self.systemd.stopping()
        if self._provisioning is not None:
            self._provisioning.cancel()
        if self.supervisor is not None:
            try:
                await asyncio.wait_for(self.supervisor.shutdown(),
                                       self.settings.controller.stop_grace_s + 5.0)
            except TimeoutError:
                log.error("shutdown: the controller did not stop in time")
        for op in reversed(self.operations):
            try:
                await op.close()
            except Exception as exc:
                log.error("shutdown: closing the %s operation failed: %r", op.name, exc)
            task = self._operation_tasks.get(op.name)
            if task is not None:
                task.cancel()
                await asyncio.wait({task}, timeout=OPERATION_STOP_S)
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
            self.feed.flush_cloud_logs()
        self.stores.close()
        log.info("shutdown complete")
        self._stopping.done()

    # -- glue between the parts ------------------------------------------------------------

    def _on_service_health(self, name: str, status: str) -> None:
        wanted = self.settings.controller.health_service
        if self.supervisor is not None and name != SERVICE_NAME and name == (wanted or name):
            self.supervisor.note_health(status)

    def _ask_controller_health(self) -> None:
        if self.bus is not None:
            self.bus.request_health_check(self.settings.controller.health_service or None)

    def _local_broker_state(self) -> str:
        if self.bus_connected.is_set():
            return "connected"
        return "disabled" if self.bus is None else "not connected"

    def _bus_publish_retained(self, topic: str, payload: bytes) -> asyncio.Future[None]:
        if self.bus is None:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            fut.set_exception(ConnectionLost("the local broker is disabled"))
            return fut
        return self.bus.publish(topic, payload, retain=True)
