"""The fleet dashboard and the README's health table show only keys the gateway sends: the
list is the code's own (teg_gateway.telemetry_keys), checked against a real gateway."""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from conftest import GatewayFactory, needs_mosquitto
from teg_gateway.sandbox.thingsboard import FakeThingsBoard
from teg_gateway.telemetry_keys import (
    CLIENT_ATTRIBUTES,
    EVENT_KEYS,
    HEALTH_KEYS,
    SHARED_ATTRIBUTES,
    THINGSBOARD_SERVER_ATTRIBUTES,
)
from test_forwarding import wait_connected, wait_until

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "packaging" / "thingsboard" / "teg-gateway-dashboard.json"
BUILDER = ROOT / "packaging" / "thingsboard" / "build_dashboard.py"
README = ROOT / "README.md"


def load() -> dict[str, Any]:
    value = json.loads(DASHBOARD.read_text())
    assert isinstance(value, dict)
    return value


def data_keys(dashboard: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(widget title, key type, key name) of every data key of every widget."""
    for item in dashboard["configuration"]["widgets"].values():
        for source in item["config"]["datasources"]:
            for key in source["dataKeys"]:
                yield item["config"]["title"], key["type"], key["name"]


def test_every_key_of_the_dashboard_is_one_the_gateway_sends() -> None:
    telemetry = set(HEALTH_KEYS) | set(EVENT_KEYS)
    attributes = set(CLIENT_ATTRIBUTES) | set(THINGSBOARD_SERVER_ATTRIBUTES) | set(
        SHARED_ATTRIBUTES)
    seen = set()
    for title, kind, name in data_keys(load()):
        seen.add(name)
        if kind == "timeseries":
            assert name in telemetry, f"{title}: telemetry {name!r} is not sent by the gateway"
        elif kind == "attribute":
            assert name in attributes, f"{title}: attribute {name!r} is not known"
        else:
            assert kind == "entityField", (title, kind, name)
    # What the fleet view is for.
    assert {"active", "lastActivityTime", "outbox_depth", "outbox_oldest_age_ms",
            "outbox_eta_s", "records_sent", "records_dropped", "dead_letters",
            "controller_state", "controller_restarts", "sw_state", "current_sw_version",
            "restart_status", "severity", "message"} <= seen


def test_the_dashboard_is_consistent_and_current() -> None:
    dashboard = load()
    config = dashboard["configuration"]
    for key in ("entityAliases", "widgets", "states"):
        assert config[key], key
    aliases = config["entityAliases"]
    fleet = [a for a in aliases.values() if a["filter"]["type"] == "deviceType"]
    assert len(fleet) == 1 and fleet[0]["filter"]["deviceTypes"] == ["teg-gateway"]
    states = config["states"]
    assert [name for name, state in states.items() if state["root"]] == ["default"]
    placed = set()
    for state in states.values():
        for layout in state["layouts"].values():
            assert set(layout["widgets"]) <= set(config["widgets"])
            placed |= set(layout["widgets"])
    assert placed == set(config["widgets"]), "every widget is placed in a state"
    for widget in config["widgets"].values():
        assert widget["typeFullFqn"].startswith("system.")
        for source in widget["config"]["datasources"]:
            assert source["entityAliasId"] in aliases
        for actions in widget["config"]["actions"].values():
            for action in actions:
                assert action["targetDashboardStateId"] in states
    # The file is what the builder makes.
    spec = importlib.util.spec_from_file_location("build_dashboard", BUILDER)
    assert spec is not None and spec.loader is not None
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    assert DASHBOARD.read_text() == builder.render(), (
        "regenerate with: python packaging/thingsboard/build_dashboard.py")


def test_the_readme_health_table_lists_exactly_the_health_keys() -> None:
    text = README.read_text()
    start = text.index("Health telemetry every")
    table = text[start:text.index("\n\n", text.index("| key |", start))]
    documented = set()
    for line in table.splitlines()[3:]:
        documented |= set(re.findall(r"`([a-z_]+)`", line.split(" | ")[0]))
    assert documented == set(HEALTH_KEYS)


@needs_mosquitto
def test_the_gateway_sends_only_listed_health_keys(
        make_gateway: GatewayFactory, thingsboard: FakeThingsBoard) -> None:
    gateway = make_gateway()
    gateway.start()
    wait_connected(thingsboard, gateway)

    def health() -> list[dict[str, Any]]:
        return [r["values"] for r in thingsboard.telemetry() if "outbox_depth" in r["values"]]

    wait_until(lambda: len(health()) >= 2, "two health reports", gateway)
    for values in health():
        assert set(values) <= set(HEALTH_KEYS), set(values) - set(HEALTH_KEYS)
