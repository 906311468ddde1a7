"""RPC ``restart_controller``: stop and start the supervised controller now."""

from __future__ import annotations

import asyncio
from typing import Any

from teg_gateway.controller.runtime import ControllerError
from teg_gateway.controller.supervisor import Supervisor
from teg_gateway.operations.rpc import RpcDispatcher, RpcError

# ThingsBoard forgets an RPC after about 10 s (the dispatcher gives up after 8 s): a
# restart that takes longer (a slow stop, a docker build) goes on and the reply says so.
REPLY_WITHIN_S = 6.0


def register_controller_rpc(dispatcher: RpcDispatcher, supervisor: Supervisor | None,
                            reply_within_s: float = REPLY_WITHIN_S) -> None:
    """Register ``restart_controller`` (optional param ``reason``)."""
    pending: set[asyncio.Task[str]] = set()

    async def restart_controller(params: dict[str, Any]) -> Any:
        if supervisor is None:
            raise RpcError("no controller is supervised (controller.runtime is \"none\")")
        reason = params.get("reason")
        why = f"RPC restart_controller: {reason}" if isinstance(reason, str) and reason \
            else "RPC restart_controller"
        task = asyncio.ensure_future(supervisor.restart_now(why))
        pending.add(task)
        task.add_done_callback(pending.discard)
        done, _ = await asyncio.wait({task}, timeout=reply_within_s)
        if task not in done:
            task.add_done_callback(_consume)
            return ("restart of the controller in progress; telemetry controller_state "
                    "reports the result")
        try:
            return task.result()
        except ControllerError as exc:
            raise RpcError(f"controller restart failed: {exc}") from None

    dispatcher.register("restart_controller",
                        "stop and start the controller now (it is supervised, so it would "
                        "come back anyway)", restart_controller, {"reason": "optional text"})


def _consume(task: asyncio.Task[str]) -> None:
    # The reply is gone already; the supervisor logged and reported what happened.
    if not task.cancelled():
        task.exception()
