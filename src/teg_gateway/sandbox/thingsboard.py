"""A ThingsBoard stand-in: the server side of ThingsBoard's device MQTT API, through a broker.

`FakeThingsBoard` connects to a local broker as an ordinary MQTT client and
plays ThingsBoard's part for one device ("me"): it answers provisioning
requests, records telemetry and client attributes, publishes shared attribute
updates, answers attribute requests, sends server-side RPCs and serves OTA
package chunks (SPEC.md sections 2, 3 and 6).

What a plain broker cannot model: authentication (any user name is accepted,
see `Mosquitto.connected_usernames` to check which one a device used) and
ThingsBoard closing a connection on a bad or oversized payload (the stand-in
counts such payloads in `bad_payloads` / `oversize_payloads` and drops them).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

log = logging.getLogger(__name__)

PROVISION_REQUEST_TOPIC = "/provision/request"
PROVISION_RESPONSE_TOPIC = "/provision/response"
TELEMETRY_TOPIC = "v1/devices/me/telemetry"
ATTRIBUTES_TOPIC = "v1/devices/me/attributes"
ATTRIBUTE_REQUEST_PREFIX = "v1/devices/me/attributes/request/"
ATTRIBUTE_RESPONSE_PREFIX = "v1/devices/me/attributes/response/"
RPC_REQUEST_PREFIX = "v1/devices/me/rpc/request/"
RPC_RESPONSE_PREFIX = "v1/devices/me/rpc/response/"

PROVISION_MODES = ("success", "not_found", "failure", "silent")
PACKAGE_KINDS = ("sw", "fw")
DEFAULT_MAX_PAYLOAD_SIZE = 65536

_CHUNK_REQUEST = re.compile(r"^v2/(sw|fw)/request/([^/]+)/chunk/(\d+)$")
_SUBSCRIPTIONS = (
    PROVISION_REQUEST_TOPIC,
    TELEMETRY_TOPIC,
    ATTRIBUTES_TOPIC,
    ATTRIBUTE_REQUEST_PREFIX + "+",
    RPC_RESPONSE_PREFIX + "+",
    "v2/sw/request/+/chunk/+",
    "v2/fw/request/+/chunk/+",
)
_HASHLIB_ALGORITHMS = {"MD5": "md5", "SHA256": "sha256", "SHA384": "sha384", "SHA512": "sha512"}


class FakeThingsBoard:
    """The server side of ThingsBoard's device MQTT API for one device, over a broker.

    Thread-safe: recorded state is guarded by a lock and read through
    properties that return copies. The plain attributes below configure how it
    answers and may be changed at any time.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        tls_ca: Path | None = None,
        tls_hostname: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.tls_ca = tls_ca
        self.tls_hostname = tls_hostname

        # How to answer provisioning: "success", "not_found", "failure" or "silent".
        self.provision_mode = "success"
        self.access_token = "sandbox-access-token"
        # {"clientId", "userName", "password"}: answer MQTT_BASIC instead of a token.
        self.basic_credentials: dict[str, str] | None = None
        self.ignore_first_provision_requests = 0
        self.expected_provision_key: str | None = None
        self.expected_provision_secret: str | None = None
        # Delay before each OTA chunk answer, to let tests interrupt a download.
        self.chunk_delay_s = 0.0
        # Payloads larger than this are dropped (ThingsBoard would close the connection).
        self.max_payload_size = DEFAULT_MAX_PAYLOAD_SIZE

        self._lock = threading.Lock()
        self._rpc_answered = threading.Condition(self._lock)
        self._ready = threading.Event()
        self._pending_subscribe_mid: int | None = None
        self._timers: list[threading.Timer] = []
        self._rpc_ids = itertools.count(1)
        self._packages: dict[str, bytes] = {}
        self._shared: dict[str, Any] = {}
        self._reset_records()

        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"fake-thingsboard-{uuid.uuid4().hex[:8]}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self._client.reconnect_delay_set(min_delay=1, max_delay=2)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        if tls_ca is not None:
            self._client.tls_set(ca_certs=str(tls_ca))

    def _reset_records(self) -> None:
        self._telemetry: list[dict[str, Any]] = []
        self._receive_times_ms: list[float] = []
        self._publish_count = 0
        self._bad_payloads = 0
        self._oversize_payloads = 0
        self._client_attributes: dict[str, Any] = {}
        self._attribute_publishes: list[dict[str, Any]] = []
        self._attribute_requests: list[dict[str, Any]] = []
        self._provision_requests: list[dict[str, Any]] = []
        self._rpc_responses: dict[int, Any] = {}
        self._chunk_log: list[tuple[str, str, int, int]] = []

    # -- life cycle ----------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        """Connect, subscribe to the device API topics and wait until subscribed."""
        # A TLS connection must be made to the name in the certificate.
        connect_host = self.tls_hostname if self.tls_ca and self.tls_hostname else self.host
        self._client.connect(connect_host, self.port, keepalive=30, clean_start=True)
        self._client.loop_start()
        if not self.wait_ready(timeout):
            self.stop()
            raise RuntimeError(
                f"FakeThingsBoard could not connect and subscribe to "
                f"{connect_host}:{self.port} within {timeout:.0f} s"
            )

    def wait_ready(self, timeout: float = 10.0) -> bool:
        """Wait until connected and subscribed (again, e.g. after a broker restart)."""
        return self._ready.wait(timeout)

    @property
    def connected(self) -> bool:
        """Whether the stand-in is connected and subscribed."""
        return self._ready.is_set()

    def stop(self) -> None:
        """Disconnect and stop the network thread; pending delayed answers are dropped."""
        with self._lock:
            timers, self._timers = self._timers, []
        for timer in timers:
            timer.cancel()
        self._client.disconnect()
        self._client.loop_stop()
        self._ready.clear()

    def __enter__(self) -> FakeThingsBoard:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def clear(self) -> None:
        """Forget everything recorded (telemetry, attributes, requests, RPC answers, counters).

        Shared attributes and packages, which are server configuration, stay.
        """
        with self._lock:
            self._reset_records()

    # -- recorded state ------------------------------------------------------------

    def telemetry(self) -> list[dict[str, Any]]:
        """Every telemetry record received, in order, as `{"ts": int, "values": dict}`."""
        with self._lock:
            return [dict(record) for record in self._telemetry]

    def telemetry_values(self, key: str) -> list[Any]:
        """The values of `key` in the telemetry records that carry it, in order."""
        with self._lock:
            return [r["values"][key] for r in self._telemetry if key in r["values"]]

    def receive_times_ms(self) -> list[float]:
        """Monotonic receive time (ms) of each telemetry record, parallel to `telemetry()`."""
        with self._lock:
            return list(self._receive_times_ms)

    @property
    def publish_count(self) -> int:
        """Number of telemetry publishes received (one may carry many records)."""
        with self._lock:
            return self._publish_count

    @property
    def bad_payloads(self) -> int:
        """Number of messages dropped because their payload was invalid."""
        with self._lock:
            return self._bad_payloads

    @property
    def oversize_payloads(self) -> int:
        """Number of messages dropped because they exceeded `max_payload_size`."""
        with self._lock:
            return self._oversize_payloads

    @property
    def client_attributes(self) -> dict[str, Any]:
        """Client attributes as merged from the device's publishes."""
        with self._lock:
            return dict(self._client_attributes)

    @property
    def attribute_publishes(self) -> list[dict[str, Any]]:
        """Every client attribute publish, in order."""
        with self._lock:
            return list(self._attribute_publishes)

    @property
    def attribute_requests(self) -> list[dict[str, Any]]:
        """Attribute requests as `{"request_id", "clientKeys": [...], "sharedKeys": [...]}`."""
        with self._lock:
            return list(self._attribute_requests)

    @property
    def provision_requests(self) -> list[dict[str, Any]]:
        """Every provisioning request received, in order."""
        with self._lock:
            return list(self._provision_requests)

    @property
    def shared_attributes(self) -> dict[str, Any]:
        """The shared attributes the server holds for the device."""
        with self._lock:
            return dict(self._shared)

    @property
    def rpc_responses(self) -> dict[int, Any]:
        """RPC answers received, by request id."""
        with self._lock:
            return dict(self._rpc_responses)

    @property
    def chunk_requests(self) -> int:
        """Number of OTA chunk requests received."""
        with self._lock:
            return len(self._chunk_log)

    def chunk_history(self) -> list[tuple[str, str, int, int]]:
        """Every chunk request as (kind, request id, chunk number, chunk size)."""
        with self._lock:
            return list(self._chunk_log)

    # -- server actions --------------------------------------------------------------

    def set_shared(self, attributes: Mapping[str, Any]) -> None:
        """Merge `attributes` into the shared attributes and push them to the device."""
        with self._lock:
            self._shared.update(attributes)
        self._publish(ATTRIBUTES_TOPIC, json.dumps(dict(attributes)))

    def delete_shared(self, keys: Iterable[str]) -> None:
        """Delete shared attributes and tell the device with `{"deleted": [...]}`."""
        deleted = list(keys)
        with self._lock:
            for key in deleted:
                self._shared.pop(key, None)
        self._publish(ATTRIBUTES_TOPIC, json.dumps({"deleted": deleted}))

    def rpc_async(self, method: str, params: object = None) -> int:
        """Send a server-side RPC request; returns its id (see `rpc_responses`).

        `params=None` is sent as `{}`, as ThingsBoard does for an RPC without parameters.
        """
        with self._lock:
            request_id = next(self._rpc_ids)
        payload = {"method": method, "params": {} if params is None else params}
        self._publish(f"{RPC_REQUEST_PREFIX}{request_id}", json.dumps(payload))
        return request_id

    def wait_rpc_response(self, request_id: int, timeout: float = 10.0) -> Any:
        """Wait for the answer to RPC `request_id`; TimeoutError when none comes in time."""
        deadline = time.monotonic() + timeout
        with self._rpc_answered:
            while request_id not in self._rpc_responses:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no answer to RPC {request_id} within {timeout:g} s")
                self._rpc_answered.wait(remaining)
            return self._rpc_responses[request_id]

    def rpc(self, method: str, params: object = None, timeout: float = 10.0) -> Any:
        """Send a server-side RPC and return the device's decoded answer."""
        return self.wait_rpc_response(self.rpc_async(method, params), timeout)

    def add_package(self, kind: str, data: bytes) -> None:
        """Store the OTA package served in chunks for `kind` ("sw" or "fw")."""
        if kind not in PACKAGE_KINDS:
            raise ValueError(f"package kind must be one of {PACKAGE_KINDS}, not {kind!r}")
        with self._lock:
            self._packages[kind] = bytes(data)

    def assign_package(
        self,
        kind: str,
        title: str,
        version: str,
        data: bytes,
        *,
        checksum_algorithm: str = "SHA256",
        checksum: str | None = None,
    ) -> None:
        """Store a package and announce it as ThingsBoard does, through shared attributes.

        Sets `<kind>_title`, `_version`, `_size`, `_checksum_algorithm` and
        `_checksum`. The checksum is computed for MD5 and SHA256/384/512; pass
        `checksum` for the other algorithms.
        """
        if checksum is None:
            name = _HASHLIB_ALGORITHMS.get(checksum_algorithm)
            if name is None:
                raise ValueError(f"pass the checksum explicitly for {checksum_algorithm}")
            checksum = hashlib.new(name, data).hexdigest()
        self.add_package(kind, data)
        self.set_shared(
            {
                f"{kind}_title": title,
                f"{kind}_version": version,
                f"{kind}_size": len(data),
                f"{kind}_checksum_algorithm": checksum_algorithm,
                f"{kind}_checksum": checksum,
            }
        )

    # -- waiting -------------------------------------------------------------------

    def wait_for(
        self,
        predicate: Callable[[], bool],
        timeout: float = 10.0,
        interval: float = 0.02,
        message: str | None = None,
    ) -> None:
        """Poll `predicate` until true; AssertionError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(message or f"condition not met within {timeout:g} s")
            time.sleep(interval)

    def wait_for_telemetry(self, count: int, timeout: float = 10.0) -> None:
        """Wait until at least `count` telemetry records have arrived."""

        def enough() -> bool:
            with self._lock:
                return len(self._telemetry) >= count

        try:
            self.wait_for(enough, timeout)
        except AssertionError:
            with self._lock:
                got = len(self._telemetry)
            raise AssertionError(
                f"expected {count} telemetry records within {timeout:g} s, got {got}"
            ) from None

    # -- MQTT callbacks ------------------------------------------------------------

    def _publish(self, topic: str, payload: str | bytes) -> None:
        # Never called with self._lock held: paho takes its own locks and may
        # run callbacks that need ours.
        self._client.publish(topic, payload, qos=1)

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            log.warning("FakeThingsBoard: connection refused: %s", reason_code)
            return
        options = SubscribeOptions(qos=1, noLocal=True)
        _, mid = client.subscribe([(topic, options) for topic in _SUBSCRIPTIONS])
        self._pending_subscribe_mid = mid

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._ready.clear()

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        if mid != self._pending_subscribe_mid:
            return
        if any(code.is_failure for code in reason_codes):
            log.error("FakeThingsBoard: subscription refused: %s", reason_codes)
            return
        self._ready.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            self._handle(message.topic, bytes(message.payload))
        except Exception:
            log.exception("FakeThingsBoard: failed to handle a message on %s", message.topic)

    def _handle(self, topic: str, payload: bytes) -> None:
        if len(payload) > self.max_payload_size:
            log.warning(
                "FakeThingsBoard: dropped a %d byte message on %s (limit %d)",
                len(payload),
                topic,
                self.max_payload_size,
            )
            with self._lock:
                self._oversize_payloads += 1
            return
        if topic == TELEMETRY_TOPIC:
            self._handle_telemetry(payload)
        elif topic == ATTRIBUTES_TOPIC:
            self._handle_client_attributes(payload)
        elif topic == PROVISION_REQUEST_TOPIC:
            self._handle_provision_request(payload)
        elif topic.startswith(ATTRIBUTE_REQUEST_PREFIX):
            self._handle_attribute_request(topic.removeprefix(ATTRIBUTE_REQUEST_PREFIX), payload)
        elif topic.startswith(RPC_RESPONSE_PREFIX):
            self._handle_rpc_response(topic.removeprefix(RPC_RESPONSE_PREFIX), payload)
        elif match := _CHUNK_REQUEST.match(topic):
            kind, request_id, chunk = match.groups()
            self._handle_chunk_request(kind, request_id, int(chunk), payload)

    def _bad_payload(self, topic: str, payload: bytes, why: str) -> None:
        log.warning("FakeThingsBoard: bad payload on %s (%s): %.200r", topic, why, payload)
        with self._lock:
            self._bad_payloads += 1

    def _handle_telemetry(self, payload: bytes) -> None:
        now_ms = int(time.time() * 1000)
        received_ms = time.monotonic() * 1000
        try:
            records = _telemetry_records(json.loads(payload), now_ms)
        except ValueError as error:
            self._bad_payload(TELEMETRY_TOPIC, payload, str(error))
            return
        with self._lock:
            self._publish_count += 1
            self._telemetry.extend(records)
            self._receive_times_ms.extend([received_ms] * len(records))

    def _handle_client_attributes(self, payload: bytes) -> None:
        try:
            attributes = json.loads(payload)
        except ValueError as error:
            self._bad_payload(ATTRIBUTES_TOPIC, payload, str(error))
            return
        if not isinstance(attributes, dict):
            self._bad_payload(ATTRIBUTES_TOPIC, payload, "not a JSON object")
            return
        with self._lock:
            self._attribute_publishes.append(attributes)
            self._client_attributes.update(attributes)

    def _handle_provision_request(self, payload: bytes) -> None:
        try:
            request = json.loads(payload)
        except ValueError as error:
            self._bad_payload(PROVISION_REQUEST_TOPIC, payload, str(error))
            return
        if not isinstance(request, dict):
            self._bad_payload(PROVISION_REQUEST_TOPIC, payload, "not a JSON object")
            return
        with self._lock:
            self._provision_requests.append(request)
            ignored = len(self._provision_requests) <= self.ignore_first_provision_requests
        if ignored or self.provision_mode == "silent":
            return
        self._publish(PROVISION_RESPONSE_TOPIC, json.dumps(self._provision_answer(request)))

    def _provision_answer(self, request: dict[str, Any]) -> dict[str, Any]:
        key_ok = self.expected_provision_key in (None, request.get("provisionDeviceKey"))
        secret_ok = self.expected_provision_secret in (None, request.get("provisionDeviceSecret"))
        if not (key_ok and secret_ok) or self.provision_mode == "not_found":
            return {"status": "NOT_FOUND", "errorMsg": "Provision data was not found!"}
        if self.provision_mode == "failure":
            return {"status": "FAILURE", "errorMsg": "Failed to provision device!"}
        if self.provision_mode != "success":
            raise ValueError(f"unknown provision_mode {self.provision_mode!r}")
        # Credentials the device chose itself win, as in ThingsBoard.
        if request.get("credentialsType") == "MQTT_BASIC":
            basic = {
                "clientId": request.get("clientId"),
                "userName": request.get("username"),
                "password": request.get("password"),
            }
            return _provision_success("MQTT_BASIC", basic)
        if request.get("credentialsType") == "ACCESS_TOKEN" and request.get("token"):
            return _provision_success("ACCESS_TOKEN", request["token"])
        if self.basic_credentials is not None:
            return _provision_success("MQTT_BASIC", dict(self.basic_credentials))
        return _provision_success("ACCESS_TOKEN", self.access_token)

    def _handle_attribute_request(self, request_id: str, payload: bytes) -> None:
        topic = ATTRIBUTE_REQUEST_PREFIX + request_id
        try:
            request = json.loads(payload) if payload.strip() else {}
            if not isinstance(request, dict):
                raise ValueError("not a JSON object")
            client_keys = _key_list(request.get("clientKeys"))
            shared_keys = _key_list(request.get("sharedKeys"))
        except ValueError as error:
            self._bad_payload(topic, payload, str(error))
            return
        answer: dict[str, dict[str, Any]] = {}
        with self._lock:
            self._attribute_requests.append(
                {"request_id": request_id, "clientKeys": client_keys, "sharedKeys": shared_keys}
            )
            client = _pick(self._client_attributes, client_keys)
            shared = _pick(self._shared, shared_keys)
        if client:
            answer["client"] = client
        if shared:
            answer["shared"] = shared
        self._publish(ATTRIBUTE_RESPONSE_PREFIX + request_id, json.dumps(answer))

    def _handle_rpc_response(self, request_id: str, payload: bytes) -> None:
        topic = RPC_RESPONSE_PREFIX + request_id
        try:
            number = int(request_id)
        except ValueError:
            self._bad_payload(topic, payload, "request id is not a number")
            return
        try:
            answer: Any = json.loads(payload)
        except ValueError as error:
            # ThingsBoard would pass the text on; keep it so a test can see it.
            self._bad_payload(topic, payload, str(error))
            answer = payload.decode("utf-8", errors="replace")
        with self._rpc_answered:
            self._rpc_responses[number] = answer
            self._rpc_answered.notify_all()

    def _handle_chunk_request(self, kind: str, request_id: str, chunk: int, payload: bytes) -> None:
        error_topic = f"v2/{kind}/error"
        text = payload.decode("ascii", errors="replace").strip()
        size = int(text) if text.isdigit() else 0
        with self._lock:
            self._chunk_log.append((kind, request_id, chunk, size))
            package = self._packages.get(kind)
        if size <= 0:
            self._publish(error_topic, f"Invalid chunk size: {text!r}")
            return
        if package is None:
            self._publish(error_topic, f"No {kind} package assigned to the device")
            return
        data = package[chunk * size : (chunk + 1) * size]
        topic = f"v2/{kind}/response/{request_id}/chunk/{chunk}"
        delay = self.chunk_delay_s
        if delay <= 0:
            self._publish(topic, data)
            return
        timer = threading.Timer(delay, self._publish, args=(topic, data))
        timer.daemon = True
        with self._lock:
            self._timers = [t for t in self._timers if t.is_alive()]
            self._timers.append(timer)
        timer.start()


def _telemetry_records(document: Any, now_ms: int) -> list[dict[str, Any]]:
    """The records of a telemetry payload in any of its three forms; ValueError if invalid."""
    items = document if isinstance(document, list) else [document]
    records = []
    for item in items:
        if not isinstance(item, dict):
            raise ValueError("a telemetry record must be a JSON object")
        if "ts" in item and "values" in item:
            ts, values = item["ts"], item["values"]
            if isinstance(ts, bool) or not isinstance(ts, int):
                raise ValueError(f"ts must be an integer of milliseconds, not {ts!r}")
            if not isinstance(values, dict):
                raise ValueError("values must be a JSON object")
            records.append({"ts": ts, "values": values})
        else:
            records.append({"ts": now_ms, "values": item})
    return records


def _provision_success(credentials_type: str, value: Any) -> dict[str, Any]:
    return {"status": "SUCCESS", "credentialsType": credentials_type, "credentialsValue": value}


def _pick(attributes: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    return {key: attributes[key] for key in keys if key in attributes}


def _key_list(keys: Any) -> list[str]:
    """Keys of an attribute request: a comma-separated string (or a list); None is none."""
    if keys is None:
        return []
    if isinstance(keys, str):
        return [key.strip() for key in keys.split(",") if key.strip()]
    if isinstance(keys, list) and all(isinstance(key, str) for key in keys):
        return list(keys)
    raise ValueError(f"attribute keys must be a comma-separated string, not {keys!r}")
