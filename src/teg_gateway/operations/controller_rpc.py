"""RPC ``restart_controller``: stop and start the supervised controller now."""

from __future__ import annotations

from typing import Any

from teg_gateway.bounds import ECHO_LIMIT, clip, show
from teg_gateway.controller.runtime import ControllerError
from teg_gateway.controller.supervisor import Supervisor
from teg_gateway.operations.rpc import REPLY_WITHIN_S, RpcDispatcher, RpcError


def register_controller_rpc(dispatcher: RpcDispatcher, supervisor: Supervisor | None,
                            reply_within_s: float = REPLY_WITHIN_S) -> None:
    """Register ``restart_controller`` (optional param ``reason``)."""
    async def restart_controller(params: dict[str, Any]) -> Any:
        if supervisor is None:
            raise RpcError("no controller is supervised (controller.runtime is \"none\")")
        reason = params.get("reason")
        if reason is not None and not isinstance(reason, str):
            raise RpcError(f"param 'reason' must be text, got {show(reason)}")
        if reason is not None:
            reason = clip(reason, ECHO_LIMIT)
        why = f"RPC restart_controller: {reason}" if reason else "RPC restart_controller"
        try:
            return await dispatcher.result_or_progress(
                supervisor.restart_now(why),
                "restart of the controller in progress; telemetry controller_state reports "
                "the result", within_s=reply_within_s)
        except ControllerError as exc:
            raise RpcError(f"controller restart failed: {exc}") from None

    dispatcher.register("restart_controller",
                        "stop and start the controller now (it is supervised, so it would "
                        "come back anyway)", restart_controller, {"reason": "optional text"})

