"""Writes teg-gateway-dashboard.json, the fleet dashboard for ThingsBoard CE 3.6 or newer.

Run `python packaging/thingsboard/build_dashboard.py` after changing it; a test checks that
the JSON file is current and that every key it shows is one the gateway sends.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUTPUT = HERE / "teg-gateway-dashboard.json"
DEVICE_PROFILE = "teg-gateway"
# Fixed ids keep the file stable from one build to the next.
NAMESPACE = uuid.UUID("5b0c1f6e-7a4e-4f0e-9a77-0c6f3c1e2d10")
COLORS = ["#2196f3", "#4caf50", "#f44336", "#ffc107", "#607d8b", "#9c27b0", "#795548",
          "#009688", "#e91e63", "#3f51b5", "#ff9800", "#8bc34a", "#00bcd4", "#cddc39"]


def uid(name: str) -> str:
    return str(uuid.uuid5(NAMESPACE, name))


FLEET_ALIAS = uid("alias:fleet")
STATE_ALIAS = uid("alias:state")

AGE_FUNCTION = (
    "if (value === undefined || value === null || value === '') { return ''; }\n"
    "var s = Number(value) / 1000;\n"
    "if (s < 120) { return s.toFixed(0) + ' s'; }\n"
    "if (s < 7200) { return (s / 60).toFixed(1) + ' min'; }\n"
    "if (s < 172800) { return (s / 3600).toFixed(1) + ' h'; }\n"
    "return (s / 86400).toFixed(1) + ' days';")
DATE_FUNCTION = ("return value ? ctx.date.transform(value, 'yyyy-MM-dd HH:mm:ss') : '';")
ACTIVE_FUNCTION = ("return (value === true || value === 'true') ? "
                   "'<span style=\"color:#2e7d32\">online</span>' : "
                   "'<span style=\"color:#c62828\">offline</span>';")
ETA_FUNCTION = ("if (value === undefined || value === null || value === '') { return ''; }\n"
                "var s = Number(value);\n"
                "if (s < 120) { return s.toFixed(0) + ' s'; }\n"
                "if (s < 7200) { return (s / 60).toFixed(1) + ' min'; }\n"
                "return (s / 3600).toFixed(1) + ' h';")


def data_key(name: str, kind: str, label: str, n: int, *, content: str | None = None,
             units: str | None = None) -> dict[str, Any]:
    settings: dict[str, Any] = {"columnWidth": "0px", "useCellStyleFunction": False,
                                "cellStyleFunction": "",
                                "useCellContentFunction": content is not None,
                                "cellContentFunction": content or "",
                                "defaultColumnVisibility": "visible",
                                "columnSelectionToDisplay": "enabled"}
    return {"name": name, "type": kind, "label": label, "color": COLORS[n % len(COLORS)],
            "settings": settings, "_hash": round(0.1 + n / 100, 4), "units": units,
            "decimals": None, "funcBody": None, "usePostProcessing": None,
            "postFuncBody": None}


def timewindow(ms: int) -> dict[str, Any]:
    return {"displayValue": "", "selectedTab": 0,
            "realtime": {"realtimeType": 0, "interval": 1000, "timewindowMs": ms,
                         "quickInterval": "CURRENT_DAY"},
            "history": {"historyType": 0, "interval": 1000, "timewindowMs": ms,
                        "fixedTimewindow": None, "quickInterval": "CURRENT_DAY"},
            "aggregation": {"type": "NONE", "limit": 1000}}


def widget(name: str, fqn: str, kind: str, title: str, alias: str, *,
           keys: list[dict[str, Any]], settings: dict[str, Any],
           actions: dict[str, Any] | None = None, window_ms: int = 86_400_000
           ) -> dict[str, Any]:
    return {
        "id": uid(f"widget:{name}"), "typeFullFqn": fqn, "type": kind,
        "sizeX": 8, "sizeY": 6, "row": 0, "col": 0,
        "config": {
            "datasources": [{"type": "entity", "name": None, "entityAliasId": alias,
                             "filterId": None, "dataKeys": keys}],
            "timewindow": timewindow(window_ms), "useDashboardTimewindow": kind == "timeseries",
            "showTitle": True, "title": title, "backgroundColor": "#ffffff",
            "color": "rgba(0, 0, 0, 0.87)", "padding": "8px", "settings": settings,
            "dropShadow": True, "enableFullscreen": True, "showLegend": kind == "timeseries",
            "actions": actions or {}, "widgetStyle": {}, "titleStyle": {"fontSize": "16px",
                                                                        "fontWeight": 400}},
    }


def fleet_table() -> dict[str, Any]:
    columns = [
        ("active", "attribute", "Connection", ACTIVE_FUNCTION, None),
        ("lastActivityTime", "attribute", "Last activity", DATE_FUNCTION, None),
        ("outbox_depth", "timeseries", "Outbox records", None, None),
        ("outbox_oldest_age_ms", "timeseries", "Oldest pending", AGE_FUNCTION, None),
        ("outbox_eta_s", "timeseries", "Outbox ETA", ETA_FUNCTION, None),
        ("records_sent", "timeseries", "Records sent", None, None),
        ("records_dropped", "timeseries", "Records dropped", None, None),
        ("dead_letters", "timeseries", "Dead letters", None, None),
        ("reconnects", "timeseries", "Reconnects", None, None),
        ("rate_limit_disconnects", "timeseries", "Rate-limit disconnects", None, None),
        ("controller_state", "timeseries", "Controller", None, None),
        ("controller_restarts", "timeseries", "Controller restarts", None, None),
        ("sw_state", "timeseries", "Update state", None, None),
        ("current_sw_version", "timeseries", "Controller version", None, None),
        ("restart_status", "timeseries", "Restart", None, None),
    ]
    keys = [data_key(name, kind, label, n, content=content, units=units)
            for n, (name, kind, label, content, units) in enumerate(columns)]
    row_click = {"rowClick": [{
        "id": uid("action:details"), "name": "Details", "icon": "more_horiz",
        "type": "openDashboardState", "targetDashboardStateId": "gateway",
        "setEntityId": True, "stateEntityParamName": None, "openInSeparateDialog": False,
        "openRightLayout": False}]}
    settings = {"entitiesTitle": "teg-gateway fleet", "enableSearch": True,
                "enableSelectColumnDisplay": True, "enableStickyHeader": True,
                "enableStickyAction": True, "displayEntityName": True,
                "entityNameColumnTitle": "Gateway", "displayEntityLabel": False,
                "displayEntityType": False, "displayPagination": True,
                "defaultPageSize": 20, "defaultSortOrder": "entityName"}
    return widget("fleet", "system.cards.entities_table", "latest", "Gateways", FLEET_ALIAS,
                  keys=keys, settings=settings, actions=row_click)


def value_card(name: str, key: str, label: str, units: str | None = None) -> dict[str, Any]:
    return widget(name, "system.cards.value_card", "latest", label, STATE_ALIAS,
                  keys=[data_key(key, "timeseries", label, 0, units=units)],
                  settings={"layout": "square", "showLabel": True, "label": label,
                   "showIcon": False, "showDate": True})


def details() -> list[dict[str, Any]]:
    chart_keys = [data_key("outbox_depth", "timeseries", "Outbox records", 0),
                  data_key("outbox_eta_s", "timeseries", "Outbox ETA", 1, units="s"),
                  data_key("records_dropped", "timeseries", "Records dropped", 2)]
    chart = widget("outbox-chart", "system.charts.basic_timeseries", "timeseries",
                   "Outbox", STATE_ALIAS, keys=chart_keys,
                   settings={"shadowSize": 4, "fontColor": "#545454", "fontSize": 10,
                    "xaxis": {"showLabels": True, "color": "#545454"},
                    "yaxis": {"showLabels": True, "color": "#545454"},
                    "grid": {"color": "#545454", "tickColor": "#DDDDDD", "verticalLines": True,
                             "horizontalLines": True, "outlineWidth": 1},
                    "stack": False, "tooltipIndividual": False},
                   window_ms=86_400_000)
    log_keys = [data_key("severity", "timeseries", "Severity", 0),
                data_key("message", "timeseries", "Message", 1)]
    log_table = widget("logs", "system.cards.timeseries_table", "timeseries",
                       "Gateway log (WARNING and above)", STATE_ALIAS, keys=log_keys,
                       settings={"showTimestamp": True, "displayPagination": True,
                        "defaultPageSize": 20, "enableSearch": True,
                        "enableStickyHeader": True, "reserveSpaceForHiddenAction": "true"},
                       window_ms=7 * 86_400_000)
    attributes = widget("sys-info", "system.cards.attributes_card", "latest",
                        "Gateway and session", STATE_ALIAS,
                        keys=[data_key("sys_info", "attribute", "System", 0),
                              data_key("session_limits", "attribute", "Session limits", 1)],
                        settings={})
    return [value_card("card-depth", "outbox_depth", "Outbox records"),
            value_card("card-eta", "outbox_eta_s", "Outbox ETA", "s"),
            value_card("card-controller", "controller_state", "Controller"),
            value_card("card-sw", "sw_state", "Update state"),
            chart, log_table, attributes]


def layout(placed: list[tuple[dict[str, Any], int, int, int, int]]) -> dict[str, Any]:
    return {"main": {
        "widgets": {w["id"]: {"sizeX": sx, "sizeY": sy, "row": row, "col": col}
                    for w, sx, sy, row, col in placed},
        "gridSettings": {"backgroundColor": "#eeeeee", "columns": 24, "margin": 10,
                         "outerMargin": True, "backgroundSizeMode": "100%",
                         "autoFillHeight": True, "mobileAutoFillHeight": False,
                         "mobileRowHeight": 70}}}


def dashboard() -> dict[str, Any]:
    table = fleet_table()
    depth, eta, controller, sw, chart, logs, attributes = details()
    widgets = [table, depth, eta, controller, sw, chart, logs, attributes]
    return {
        "title": "teg-gateway fleet",
        "image": None, "mobileHide": False, "mobileOrder": None,
        "configuration": {
            "description": "Every teg-gateway (devices of the device profile "
                           f"'{DEVICE_PROFILE}'): connection, outbox, controller, updates. "
                           "Click a row for one gateway's outbox chart and log.",
            "widgets": {w["id"]: w for w in widgets},
            "states": {
                "default": {"name": "teg-gateway fleet", "root": True,
                            "layouts": layout([(table, 24, 12, 0, 0)])},
                "gateway": {"name": "${entityName}", "root": False,
                            "layouts": layout([(depth, 6, 3, 0, 0), (eta, 6, 3, 0, 6),
                                               (controller, 6, 3, 0, 12), (sw, 6, 3, 0, 18),
                                               (chart, 14, 7, 3, 0),
                                               (attributes, 10, 7, 3, 14),
                                               (logs, 24, 8, 10, 0)])},
            },
            "entityAliases": {
                FLEET_ALIAS: {"id": FLEET_ALIAS, "alias": "teg-gateway devices",
                              "filter": {"type": "deviceType", "resolveMultiple": True,
                                         "deviceType": DEVICE_PROFILE,
                                         "deviceTypes": [DEVICE_PROFILE],
                                         "deviceNameFilter": ""}},
                STATE_ALIAS: {"id": STATE_ALIAS, "alias": "Chosen gateway",
                              "filter": {"type": "stateEntity", "resolveMultiple": False,
                                         "stateEntityParamName": None,
                                         "defaultStateEntity": None}},
            },
            "filters": {},
            "timewindow": timewindow(86_400_000),
            "settings": {"stateControllerId": "entity", "showTitle": True,
                         "showDashboardsSelect": True, "showEntitiesSelect": True,
                         "showDashboardTimewindow": True, "showDashboardExport": True,
                         "toolbarAlwaysOpen": True},
        },
        "name": "teg-gateway fleet",
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    OUTPUT.write_text(render())
    print(f"wrote {OUTPUT}")
