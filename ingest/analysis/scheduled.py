"""The analysis the agent runs on its own schedule: alert rules and anomaly marks.

The runtime reaches this through the `analysis` entry point (ingest/plugins.py), so
it never imports analysis code itself.
"""
from __future__ import annotations

import logging

import yaml

from sonde.ingest import plugins
from sonde.ingest.analysis.alerting import Evaluator
from sonde.ingest.analysis.anomaly import Marker
from sonde.ingest.output.lineproto import Point

log = logging.getLogger("sonde.agent")


class AgentAnalysis:
    """Built lazily on the agent's first evaluation: its sink must be up to query."""

    def __init__(self, agent):
        rules = plugins.load("alert_rules")
        cfg = agent.config
        self.evaluator = Evaluator(rules.load(cfg.alerts.thresholds) if cfg.alerts.thresholds else rules.load(),
                                   agent.sink.query, cfg.host, cfg.alerts.webhook_url,
                                   state_path=cfg.state_dir / "alerts.json", interval_s=cfg.alerts.interval_seconds)
        a = yaml.safe_load((cfg.alerts.thresholds or rules.THRESHOLDS).read_text()).get("anomaly", {})
        self.marker = Marker(agent.sink.query, cfg.host, a.get("threshold", 4.0), a.get("window", 60),
                             a.get("baseline_windows", 10))

    def evaluate(self, now_ms: int) -> list[Point]:
        """Every alert rule and the anomaly marks at `now_ms`."""
        points = self.evaluator.evaluate(now_ms)
        try:
            points += self.marker.mark(now_ms)
        except Exception as e:
            log.error("anomaly marks failed: %s", e)
        for p in points:
            if p.measurement == "sonde_alert":
                log.warning("alert %s %s: %s", p.tags["rule"], p.tags["state"], p.fields["summary"])
        return points
