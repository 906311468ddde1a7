"""The operations engine: every operation is a persisted command (thin-edge.io's shape).

A command goes ``init`` → ``executing`` → ``successful`` | ``failed`` (with a reason). Its
state is a :class:`Command`: an enum status, a reason, the operation's own typed payload
(a dataclass) and the fields nobody here knows, carried along unchanged.

- :class:`CommandRepository` keeps one operation's commands, and the few facts the
  operation remembers between commands (a typed dataclass too), in one file under
  ``<data>/state``: written atomically (temp file, fsync, rename, fsync of the directory)
  before anything is said about the step. A file that cannot be read is moved aside as
  ``<name>.corrupt-<time>`` and reported; the commands that can still be read from it
  (one per line) come back, and those that were under way end ``failed`` with the reason.
- :class:`Runner` runs the operations' work as tasks: at start it hands every command
  that was under way back to its operation, a failure inside a step ends that command
  ``failed`` instead of the gateway, and at shutdown it cancels them in one place.
- :class:`Operation` is how an operation registers with the gateway: the ThingsBoard
  topics it subscribes to, the shared attributes it wants, its handlers, and the local
  bus commands (``te/device/main///cmd/<name>/<id>``) it serves. ``gateway.py`` only
  lists operations; it never wires one by hand.

docs/architecture.md shows how a new operation is added.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import json
import logging
import types
import typing
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from teg_gateway.bounds import clip
from teg_gateway.clock import Clock
from teg_gateway.fsutil import atomic_write
from teg_gateway.local.topics import command_topic
from teg_gateway.mqttlink import ConnectionLost
from teg_gateway.operations.rpc import Method
from teg_gateway.store.state import load_state, quarantine

log = logging.getLogger(__name__)

FORMAT = 1
#: Finished commands kept (newest last) so that a repeated ``init`` is recognised.
KEEP_FINISHED = 50
MAX_REASON_CHARS = 1000


class Status(enum.StrEnum):
    INIT = "init"
    EXECUTING = "executing"
    SUCCESSFUL = "successful"
    FAILED = "failed"

    @property
    def final(self) -> bool:
        return self in (Status.SUCCESSFUL, Status.FAILED)


class PayloadError(ValueError):
    """A command or its payload does not have the fields and types it must have."""


@dataclass(frozen=True)
class Nothing:
    """The payload of an operation whose commands carry no fields of their own."""


P = TypeVar("P")
F = TypeVar("F")


@dataclass
class Command(Generic[P]):
    """One command of one operation. ``extra`` holds the fields of the request that this
    gateway does not know; they go back unchanged with every state published."""

    id: str
    status: Status
    payload: P
    reason: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    #: Where the command came from and where its states go: "local" (the te/ bus),
    #: "thingsboard" or "gateway".
    origin: str = "local"
    created_ms: int = 0
    updated_ms: int = 0
    #: The final state reached its requester (published and acknowledged).
    delivered: bool = False

    @property
    def final(self) -> bool:
        return self.status.final

    def message(self, with_payload: bool = True) -> dict[str, Any]:
        """The command in thin-edge.io's form: unknown fields, the payload's fields
        (unless the payload is what the gateway keeps for itself: ``with_payload``
        False), ``status`` and (when failed) ``reason``."""
        body = {**self.extra, **(encode(self.payload) if with_payload else {}),
                "status": self.status.value}
        if self.status is Status.FAILED:
            body["reason"] = self.reason
        else:
            body.pop("reason", None)
        return body


# -- typed payloads ---------------------------------------------------------------------


def encode(value: Any) -> Any:
    """A payload dataclass (or anything inside one) as plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): encode(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [encode(v) for v in value]
    return value


def decode(cls: type[P], data: Any, what: str = "payload") -> tuple[P, dict[str, Any]]:
    """Build dataclass ``cls`` from the JSON object ``data``; returns it and the fields
    ``cls`` does not know. Raises PayloadError naming the first field that is missing or
    of the wrong type."""
    if not isinstance(data, dict):
        raise PayloadError(f"{what} is not a JSON object")
    hints = typing.get_type_hints(cls)
    known: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in data:
            known[f.name] = _convert(hints[f.name], data[f.name], f"{what}.{f.name}")
        elif f.default is dataclasses.MISSING and \
                f.default_factory is dataclasses.MISSING:
            raise PayloadError(f"{what} has no {f.name!r}")
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = {k: v for k, v in data.items() if k not in names}
    return cls(**known), unknown


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(hint):
            try:
                return _convert(option, value, where)
            except PayloadError as exc:
                errors.append(str(exc))
        raise PayloadError(errors[0] if len(errors) == 1 else f"{where} has the wrong type")
    if hint is Any:
        return value
    if hint is type(None):
        if value is None:
            return None
        raise PayloadError(f"{where} must be null")
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise PayloadError(f"{where} must be a list")
        args = typing.get_args(hint)
        item = args[0] if args else Any
        items = [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise PayloadError(f"{where} must be an object")
        args = typing.get_args(hint)
        item = args[1] if len(args) == 2 else Any
        return {str(k): _convert(item, v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except ValueError:
            raise PayloadError(f"{where} is not one of "
                               f"{', '.join(str(m.value) for m in hint)}") from None
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        built, _unknown = decode(hint, value, where)
        return built
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise PayloadError(f"{where} must be a number")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise PayloadError(f"{where} must be a whole number")
    if hint in (str, bool):
        if isinstance(value, hint):
            return value
        raise PayloadError(f"{where} must be {'a string' if hint is str else 'true or false'}")
    if hint is dict:
        if isinstance(value, dict):
            return value
        raise PayloadError(f"{where} must be an object")
    raise TypeError(f"{where}: payload type {hint!r} is not supported")


# -- the repository ---------------------------------------------------------------------


@dataclass(frozen=True)
class Damage:
    """A state file that could not be read: what happened and which commands (under
    way at the time) were resolved as failed because of it."""

    text: str
    quarantined: Path | None
    failed: tuple[str, ...]


class CommandRepository(Generic[P, F]):
    """One operation's commands and facts, in ``path`` (see the module docstring).

    Build it, then :meth:`load` once at start. Every change goes through :meth:`save`
    (or :meth:`put`), which writes the whole file atomically before returning.
    ``legacy(value)`` converts a file written by an earlier release (no ``format``
    field) into this layout (``{"facts": {...}, "commands": [...]}``).
    """

    def __init__(self, path: Path, payload_type: type[P], facts_type: type[F], *,
                 clock: Clock | None = None, keep_finished: int = KEEP_FINISHED,
                 legacy: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
        self.path = path
        self.legacy = legacy
        self.payload_type = payload_type
        self.facts_type = facts_type
        self.clock = clock or Clock()
        self.keep_finished = keep_finished
        self.commands: dict[str, Command[P]] = {}
        self.facts: F = facts_type()
        self.damage: Damage | None = None

    # -- reading ----------------------------------------------------------------------

    def load(self) -> Damage | None:
        """Read the file. When it is damaged: quarantine it, keep what can be read, end
        the commands that were under way as failed (saved at once) and return the
        :class:`Damage` (also kept in ``self.damage``) for the operation to report."""
        self.commands, self.facts = {}, self.facts_type()
        loaded = load_state(self.path)
        if loaded.damage is None:
            try:
                self._read(loaded.value)
                return None
            except PayloadError as exc:
                try:
                    raw = self.path.read_bytes()
                except OSError:
                    raw = json.dumps(loaded.value).encode()
                loaded = quarantine(self.path, raw, f"does not hold valid commands ({exc})")
        self._salvage(loaded.raw)
        reason = clip(f"the gateway's state for this operation was damaged: {loaded.damage}",
                      MAX_REASON_CHARS)
        failed = []
        for cmd in self.commands.values():
            if not cmd.final:
                self._set(cmd, Status.FAILED, reason)
                failed.append(cmd.id)
        self.damage = Damage(str(loaded.damage), loaded.quarantined, tuple(failed))
        self.save()
        return self.damage

    def _read(self, value: dict[str, Any]) -> None:
        if "format" not in value and value and self.legacy is not None:
            # Written by an earlier release of the gateway: converted once, not damaged.
            value = self.legacy(value)
        facts = value.get("facts", {})
        self.facts, _unknown = decode(self.facts_type, facts, "facts")
        commands = value.get("commands", [])
        if not isinstance(commands, list):
            raise PayloadError("commands is not a list")
        for item in commands:
            cmd = self._command(item)
            self.commands[cmd.id] = cmd

    def _command(self, item: Any) -> Command[P]:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            raise PayloadError("a command without an id")
        payload, _unknown = decode(self.payload_type, item.get("payload", {}),
                                   f"command {item['id']!r}")
        try:
            status = Status(str(item.get("status")))
        except ValueError:
            raise PayloadError(f"command {item['id']!r} has no valid status") from None
        extra = item.get("extra", {})
        return Command(
            id=item["id"], status=status, payload=payload, reason=str(item.get("reason", "")),
            extra=extra if isinstance(extra, dict) else {},
            origin=str(item.get("origin", "local")),
            created_ms=_int(item.get("created_ms")), updated_ms=_int(item.get("updated_ms")),
            delivered=bool(item.get("delivered", False)))

    def _salvage(self, raw: bytes) -> None:
        """What a damaged file still holds: every line that reads as a command on its
        own, and the facts line if it is whole."""
        for line in raw.decode("utf-8", errors="replace").splitlines():
            text = line.strip().rstrip(",")
            if text.startswith('"facts"'):
                text = "{" + text + "}"
            if not text.startswith("{"):
                continue
            try:
                item = json.loads(text)
            except (ValueError, RecursionError):
                continue
            if not isinstance(item, dict):
                continue
            if "facts" in item and len(item) == 1:
                with contextlib.suppress(PayloadError):
                    self.facts, _unknown = decode(self.facts_type, item["facts"], "facts")
                continue
            try:
                cmd = self._command(item)
            except PayloadError:
                continue
            self.commands[cmd.id] = cmd

    # -- writing ----------------------------------------------------------------------

    def save(self) -> None:
        """Write everything (atomic, fsync'd). One line per command, so that a damaged
        file still gives back the commands on its undamaged lines."""
        finished = [c for c in self.commands.values() if c.final and c.delivered]
        for old in finished[:max(0, len(finished) - self.keep_finished)]:
            del self.commands[old.id]
        lines = [f'{{"format": {FORMAT},',
                 json.dumps({"facts": encode(self.facts)}, sort_keys=True)[1:-1] + ",",
                 '"commands": [']
        rows = [json.dumps(self._row(c), sort_keys=True) for c in self.commands.values()]
        lines.append(",\n".join(rows))
        lines.append("]}")
        atomic_write(self.path, ("\n".join(lines) + "\n").encode())

    @staticmethod
    def _row(cmd: Command[P]) -> dict[str, Any]:
        return {"id": cmd.id, "status": cmd.status.value, "reason": cmd.reason,
                "payload": encode(cmd.payload), "extra": cmd.extra, "origin": cmd.origin,
                "created_ms": cmd.created_ms, "updated_ms": cmd.updated_ms,
                "delivered": cmd.delivered}

    # -- commands ---------------------------------------------------------------------

    def get(self, command_id: str) -> Command[P] | None:
        return self.commands.get(command_id)

    def active(self) -> list[Command[P]]:
        """Commands not yet final, oldest first."""
        return [c for c in self.commands.values() if not c.final]

    def undelivered(self) -> list[Command[P]]:
        """Final commands whose outcome has not reached the requester yet."""
        return [c for c in self.commands.values() if c.final and not c.delivered]

    def create(self, command_id: str, payload: P, *, origin: str = "local",
               extra: dict[str, Any] | None = None,
               status: Status = Status.EXECUTING) -> Command[P]:
        """A new command, saved; a finished command with the same id is replaced."""
        now = self.clock.now_ms()
        cmd = Command(id=command_id, status=status, payload=payload, extra=dict(extra or {}),
                      origin=origin, created_ms=now, updated_ms=now)
        self.commands.pop(command_id, None)
        self.commands[command_id] = cmd
        self.save()
        return cmd

    def put(self, cmd: Command[P]) -> None:
        """Save ``cmd`` after its payload changed."""
        cmd.updated_ms = self.clock.now_ms()
        self.commands[cmd.id] = cmd
        self.save()

    def resolve(self, cmd: Command[P], status: Status, reason: str = "") -> None:
        """Set the outcome (or a new status) of ``cmd`` and save it."""
        self._set(cmd, status, reason)
        self.save()

    def _set(self, cmd: Command[P], status: Status, reason: str) -> None:
        cmd.status = status
        cmd.reason = clip(reason, MAX_REASON_CHARS) if status is Status.FAILED else ""
        cmd.delivered = False
        cmd.updated_ms = self.clock.now_ms()
        self.commands[cmd.id] = cmd

    def delivered(self, cmd: Command[P]) -> None:
        """The outcome of ``cmd`` reached its requester: it is kept only to recognise a
        repeated request."""
        cmd.delivered = True
        self.save()

    def set_facts(self, facts: F) -> None:
        self.facts = facts
        self.save()


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


# -- registration ---------------------------------------------------------------------


@dataclass(frozen=True)
class LocalCommand:
    """A command an operation serves on the local bus: ``te/device/main///cmd/<name>``
    is published retained with ``capability``; ``handle(id, payload)`` gets every
    message on ``.../cmd/<name>/<id>`` (an empty payload: the requester cleared it)."""

    name: str
    capability: dict[str, Any]
    handle: Callable[[str, bytes], None]


class Operation:
    """How an operation registers with the gateway. Override what the operation uses;
    the defaults do nothing.

    - ``subscriptions()``: ThingsBoard topics (beyond RPC and attributes) it needs;
    - ``shared_keys()``: shared attributes asked for on every connect;
    - ``on_connect()``: a (re)connection to ThingsBoard;
    - ``on_shared(changes)``: shared attribute changes (deleted keys as None);
    - ``on_message(topic, payload)``: a message on one of its subscriptions;
    - ``local_commands()``: the te/ commands it serves;
    - ``rpc_methods()``: the ThingsBoard RPC methods it answers;
    - ``run()``: its background work, started once under the gateway's task group;
    - ``close()``: called at shutdown, in reverse order of registration.
    """

    name = "operation"

    def subscriptions(self) -> list[str]:
        return []

    def shared_keys(self) -> list[str]:
        return []

    def on_connect(self) -> None:
        return None

    def on_shared(self, changes: dict[str, Any]) -> None:
        return None

    def on_message(self, topic: str, payload: bytes) -> bool:
        return False

    def local_commands(self) -> list[LocalCommand]:
        return []

    def rpc_methods(self) -> list[Method]:
        return []

    async def run(self) -> None:
        return None

    async def close(self) -> None:
        return None


# -- the runner -------------------------------------------------------------------------


class Runner:
    """Runs command work as tasks: one place that catches what a step did not expect
    (the command ends failed, the gateway goes on) and cancels everything at shutdown."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._keys: dict[str, asyncio.Task[Any]] = {}

    def spawn(self, coro: Coroutine[Any, Any, Any], *, key: str | None = None,
              on_error: Callable[[BaseException], None] | None = None) -> bool:
        """Run ``coro``; with ``key``, only when no task with that key is running (False
        then, and ``coro`` is closed). ``on_error`` gets an exception the task raised."""
        if key is not None and key in self._keys and not self._keys[key].done():
            coro.close()
            return False
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        if key is not None:
            self._keys[key] = task

        def ended(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if key is not None and self._keys.get(key) is t:
                del self._keys[key]
            if t.cancelled():
                return
            exc = t.exception()
            if exc is None:
                return
            log.error("operation step failed: %r", exc, exc_info=exc)
            if on_error is not None:
                try:
                    on_error(exc)
                except Exception:
                    log.exception("recording the failed step failed")

        task.add_done_callback(ended)
        return True

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Lane:
    """One thing at a time across operations (a controller update from ThingsBoard or
    from the local bus): who holds it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.holder: str | None = None

    def take(self, holder: str) -> bool:
        if self.holder is not None and self.holder != holder:
            return False
        self.holder = holder
        return True

    def release(self, holder: str) -> None:
        if self.holder == holder:
            self.holder = None


# -- the local bus side ----------------------------------------------------------------

#: How long a command state is retried on the local bus before the attempt is given up
#: (it is tried again at the next start while it is not delivered).
PUBLISH_PATIENCE_S = 60.0

BusPublish = Callable[[str, bytes], "asyncio.Future[None]"]


class CommandChannel:
    """Publishes command states on the local bus: retained, QoS 1, each one awaited
    until the broker acknowledges it, across reconnects."""

    def __init__(self, publish: BusPublish, connected: asyncio.Event,
                 clock: Clock | None = None) -> None:
        self._publish = publish
        self.connected = connected
        self.clock = clock or Clock()

    async def send(self, topic: str, message: dict[str, Any] | None,
                   patience_s: float = PUBLISH_PATIENCE_S) -> bool:
        """True once the broker acknowledged; False after ``patience_s`` without.
        ``None`` clears the topic."""
        payload = b"" if message is None else json.dumps(message).encode()
        deadline = self.clock.monotonic() + patience_s
        while self.clock.monotonic() < deadline:
            remaining = deadline - self.clock.monotonic()
            try:
                await asyncio.wait_for(self.connected.wait(), remaining)
                await asyncio.wait_for(self._publish(topic, payload), 10.0)
                return True
            except (ConnectionLost, TimeoutError):
                await self.clock.sleep(0.2)
        return False

    async def deliver(self, topic: str, message: dict[str, Any] | None) -> None:
        """:meth:`send` until the broker acknowledges (a final state must arrive)."""
        while not await self.send(topic, message):
            log.warning("local bus: %s not published yet; trying again", topic)


def parse_request(payload: bytes) -> dict[str, Any] | None:
    """A local command message as a JSON object; None for a cleared command (empty
    payload) or one that is not a JSON object (logged)."""
    if not payload:
        return None
    try:
        value = json.loads(payload)
    except (ValueError, RecursionError):
        log.warning("local command is not JSON; ignored: %.200r", payload)
        return None
    if not isinstance(value, dict):
        log.warning("local command is not a JSON object; ignored: %.200r", payload)
        return None
    return value


# -- a te/ command served the thin-edge.io way -------------------------------------------


class CommandFailed(Exception):
    """Raised by :meth:`CommandOperation.execute`: the command ends ``failed`` with this
    message as its reason."""


class CommandOperation(Operation, Generic[P]):
    """The whole life of a local bus command, for an operation to fill in.

    Subclass it, set ``name`` (the te/ command: ``te/device/main///cmd/<name>/<id>``),
    ``capability`` (published retained on ``.../cmd/<name>``) and ``payload_type`` (a
    dataclass whose fields all have defaults: the typed view of a request), and implement
    :meth:`execute`. The base class

    - acts on ``init`` only, once per command id (the operation's own states coming back
      from the broker, and a repeated ``init``, are ignored; a command the requester
      cleared may have its id used again);
    - decodes the request into ``payload_type`` (a field of the wrong type: ``failed``,
      with a reason naming it); every field of the request is carried unchanged into each
      state (the payload itself is not published);
    - saves ``executing`` before publishing it, runs :meth:`execute`, saves and publishes
      ``successful`` (with the fields :meth:`execute` returned) or ``failed`` (the message
      of :class:`CommandFailed`, or of any other exception, as the reason);
    - publishes each final state until the broker acknowledges it, then marks it
      delivered;
    - at start (:meth:`run`) hands every command left ``executing`` to :meth:`resume`
      (by default :meth:`execute` again) and publishes outcomes not yet delivered.

    ``on_state(cmd)`` is called after every state is saved (to report telemetry, say).
    """

    capability: ClassVar[dict[str, Any]] = {}
    payload_type: type[P]

    def __init__(self, state_path: Path, channel: CommandChannel, *,
                 clock: Clock | None = None, keep_finished: int = KEEP_FINISHED) -> None:
        self.channel = channel
        self.clock = clock or Clock()
        self.repo: CommandRepository[P, Nothing] = CommandRepository(
            state_path, self.payload_type, Nothing, clock=self.clock,
            keep_finished=keep_finished)
        self.runner = Runner()
        self._loaded = False

    async def execute(self, cmd: Command[P]) -> dict[str, Any] | None:
        """Do the work of ``cmd``; the fields returned go into its ``successful`` state.
        Raise :class:`CommandFailed` (or anything) to end it ``failed``."""
        raise NotImplementedError

    async def resume(self, cmd: Command[P]) -> dict[str, Any] | None:
        """``cmd`` was executing when the gateway stopped; by default it runs again."""
        return await self.execute(cmd)

    def on_state(self, cmd: Command[P]) -> None:
        return None

    # -- registration --------------------------------------------------------------------

    def local_commands(self) -> list[LocalCommand]:
        return [LocalCommand(self.name, dict(self.capability), self.on_command)]

    async def run(self) -> None:
        self.load()
        for cmd in self.repo.active():
            self._spawn(cmd, self._work(cmd, resumed=True))
        for cmd in self.repo.undelivered():
            self._spawn(cmd, self._deliver(cmd))

    async def close(self) -> None:
        await self.runner.close()

    def load(self) -> None:
        """Read the repository once (a retained ``init`` may come before :meth:`run`)."""
        if not self._loaded:
            self._loaded = True
            if self.repo.load() is not None:
                for cmd in self.repo.commands.values():
                    if not cmd.delivered:
                        self._state(cmd)

    # -- the life of a command -----------------------------------------------------------

    def on_command(self, command_id: str, payload: bytes) -> None:
        """Every message on ``.../cmd/<name>/<id>``."""
        self.load()
        known = self.repo.get(command_id)
        if not payload:
            if known is not None and known.final:
                del self.repo.commands[command_id]  # cleared: the id may come again
                self.repo.save()
            return
        request = parse_request(payload)
        if request is None or request.get("status") != Status.INIT.value or known is not None:
            return
        fields = {k: v for k, v in request.items() if k not in ("status", "reason")}
        try:
            typed, _unknown = decode(self.payload_type, fields, self.name)
        except PayloadError as exc:
            cmd = self.repo.create(command_id, self.payload_type(), extra=fields,
                                   status=Status.FAILED)
            self.repo.resolve(cmd, Status.FAILED, str(exc))
            self._state(cmd)
            self._spawn(cmd, self._deliver(cmd))
            return
        cmd = self.repo.create(command_id, typed, extra=fields)
        self._state(cmd)
        self._spawn(cmd, self._work(cmd, resumed=False))

    async def _work(self, cmd: Command[P], resumed: bool) -> None:
        if not resumed and not await self.channel.send(self.topic(cmd), cmd.message(False)):
            self._end(cmd, Status.FAILED, "the executing state could not be published on "
                                          "the local broker")
        else:
            try:
                result = await (self.resume(cmd) if resumed else self.execute(cmd))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not isinstance(exc, CommandFailed):
                    log.error("%s %s failed unexpectedly: %r", self.name, cmd.id, exc,
                              exc_info=exc)
                self._end(cmd, Status.FAILED, str(exc) or type(exc).__name__)
            else:
                cmd.extra.update(result or {})
                self._end(cmd, Status.SUCCESSFUL)
        await self._deliver(cmd)

    def _end(self, cmd: Command[P], status: Status, reason: str = "") -> None:
        self.repo.resolve(cmd, status, reason)
        self._state(cmd)

    async def _deliver(self, cmd: Command[P]) -> None:
        await self.channel.deliver(self.topic(cmd), cmd.message(False))
        self.repo.delivered(cmd)

    def topic(self, cmd: Command[P]) -> str:
        return f"{command_topic(self.name)}/{cmd.id}"

    def _state(self, cmd: Command[P]) -> None:
        try:
            self.on_state(cmd)
        except Exception:
            log.exception("%s %s: reporting its state failed", self.name, cmd.id)

    def _spawn(self, cmd: Command[P], work: Coroutine[Any, Any, None]) -> None:
        def crashed(exc: BaseException) -> None:
            if not cmd.final:
                self._end(cmd, Status.FAILED, f"unexpected failure: {exc!r}")
                self.runner.spawn(self._deliver(cmd))

        self.runner.spawn(work, key=cmd.id, on_error=crashed)
