"""teg-gateway: edge gateway between a local controller and ThingsBoard."""

__version__ = "0.1.0"
