"""Every ThingsBoard MQTT topic the gateway uses: the device API, in one place.

Prefixes end with ``/``; the request id (and, for package chunks, ``/chunk/<n>``) follows.
RPC goes both ways on the same two prefixes: the server asks on ``RPC_REQUEST`` and the
device answers on ``RPC_RESPONSE`` (server-side RPC); the device asks on ``RPC_REQUEST``
and the server answers on ``RPC_RESPONSE`` (client-side RPC, e.g. ``getSessionLimits``).
"""

from __future__ import annotations

import re

TELEMETRY = "v1/devices/me/telemetry"
#: Client attributes are published here; shared attribute updates arrive here.
ATTRIBUTES = "v1/devices/me/attributes"
ATTRIBUTE_REQUEST = "v1/devices/me/attributes/request/"
ATTRIBUTE_RESPONSE = "v1/devices/me/attributes/response/"
RPC_REQUEST = "v1/devices/me/rpc/request/"
RPC_RESPONSE = "v1/devices/me/rpc/response/"

#: Software package chunks: ``v2/sw/request/<id>/chunk/<n>`` (the payload is the chunk
#: size), answered on ``v2/sw/response/<id>/chunk/<n>``.
SW_CHUNK_REQUEST = "v2/sw/request/"
SW_CHUNK_RESPONSE = "v2/sw/response/"
SW_CHUNK_RESPONSE_RE = re.compile(r"^v2/sw/response/([^/]+)/chunk/(\d+)$")
FW_ERROR = "v2/fw/error"
SW_ERROR = "v2/sw/error"
OTA_ERRORS = (FW_ERROR, SW_ERROR)

#: Device provisioning, on a connection made with the user name ``provision``.
PROVISION_REQUEST = "/provision/request"
PROVISION_RESPONSE = "/provision/response"

#: What a device session subscribes to on every connect, before the operations' own.
SESSION_SUBSCRIPTIONS = (RPC_REQUEST + "+", RPC_RESPONSE + "+", ATTRIBUTES,
                         ATTRIBUTE_RESPONSE + "+")

