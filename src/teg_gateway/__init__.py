"""teg-gateway: edge gateway between a local controller and ThingsBoard."""

__version__ = "0.1.0"

# The day this version was released (UTC). A wall clock earlier than this is certainly
# wrong (a device booted without a real-time clock, before NTP set it): what depends on
# the date (the archive retention) does not trust it.
BUILD_DATE = "2026-12-04"
