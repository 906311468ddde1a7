"""The names the gateway sends to ThingsBoard: one list, used by the code, the README test
and the fleet dashboard test (packaging/thingsboard/)."""

from __future__ import annotations

# Health telemetry, every health.interval_s (health.Health.health_values; the README's table).
HEALTH_KEYS: tuple[str, ...] = (
    "ms_since_last_controller_health_check",
    "ms_since_controller_startup",
    "gateway_uptime_ms",
    "outbox_depth",
    "outbox_oldest_age_ms",
    "outbox_bytes",
    "outbox_eta_s",
    "archive_bytes",
    "records_accepted",
    "records_sent",
    "records_dropped",
    "dead_letters",
    "dead_letters_removed",
    "reconnects",
    "rate_limited_ms",
    "rate_limit_disconnects",
    "loop_lag_ms",
    "logs_suppressed",
)

# Telemetry sent when something happens (state changes, operations, logs).
EVENT_KEYS: tuple[str, ...] = (
    "controller_state", "controller_restarts", "controller_version", "controller_last_exit",
    "controller_consecutive_failures", "controller_restart_reason", "controller_error",
    "controller_restart_delay_s", "controller_healthy",
    "sw_state", "sw_error", "current_sw_title", "current_sw_version",
    "restart_status", "restart_reason", "restart_id",
    "severity", "message",
    "gateway_problem", "rpc_result", "files_error",
)

# Client attributes the gateway publishes.
CLIENT_ATTRIBUTES: tuple[str, ...] = ("sys_info", "session_limits", "FILE_HASHES")

# Attributes ThingsBoard itself keeps for every device (server scope), which a dashboard
# may show next to the gateway's own keys.
THINGSBOARD_SERVER_ATTRIBUTES: tuple[str, ...] = (
    "active", "lastActivityTime", "lastConnectTime", "lastDisconnectTime")

# Shared attributes the gateway reads (set in ThingsBoard).
SHARED_ATTRIBUTES: tuple[str, ...] = ("sw_title", "sw_version", "FILES")
