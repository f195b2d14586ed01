"""Grafana provisioning files: the InfluxDB (InfluxQL) datasource, and a dashboard
provider that loads the generated JSON into a `Sonde` folder."""
from __future__ import annotations

from pathlib import Path

import yaml

from .house import DATASOURCE, DEFAULT_POLL_S, duration, min_interval_ms


def datasource(url: str, database: str, poll_s: float = DEFAULT_POLL_S) -> dict:
    # timeInterval: the datasource's lower limit for $__interval, for panels made by hand
    return {"apiVersion": 1, "datasources": [{
        "name": "Sonde InfluxDB", "uid": DATASOURCE["uid"], "type": "influxdb", "access": "proxy",
        "url": url, "jsonData": {"dbName": database, "httpMode": "POST", "version": "InfluxQL",
                                 "timeInterval": duration(min_interval_ms(poll_s))},
        "isDefault": True, "editable": False}]}


def provider(dashboards_dir: str) -> dict:
    return {"apiVersion": 1, "providers": [{
        "name": "sonde", "folder": "Sonde", "type": "file", "disableDeletion": False,
        "updateIntervalSeconds": 60, "allowUiUpdates": False, "options": {"path": dashboards_dir}}]}


def write(root: Path, dashboards_dir: str, url: str, database: str, poll_s: float = DEFAULT_POLL_S) -> list[Path]:
    (root / "datasources").mkdir(parents=True, exist_ok=True)
    (root / "dashboards").mkdir(parents=True, exist_ok=True)
    ds = root / "datasources/sonde.yaml"
    ds.write_text(yaml.safe_dump(datasource(url, database, poll_s), sort_keys=False))
    dp = root / "dashboards/sonde.yaml"
    dp.write_text(yaml.safe_dump(provider(dashboards_dir), sort_keys=False))
    return [ds, dp]
