"""Anomaly marks: a robust deviation score of the latest window against the windows
before it, for the series an operator looks at first (bytes to each peer, srtt p99,
CPU per process, disk latency p99). Marks are `sonde_anomaly` points; dashboards show
them as annotations and backtrack ranks them.

score = (value - median(baseline)) / (1.4826 * MAD(baseline)), with the spread floored
at 5% of the median (and a tiny absolute floor) so a perfectly flat baseline does not
turn any change into an infinite score.
"""
from __future__ import annotations

import json
import logging
import math
import statistics
from dataclasses import dataclass

from sonde.ingest.output.lineproto import Point
from sonde.ingest.analysis.queries import Query, expand, run_batch

log = logging.getLogger("sonde.anomaly")


@dataclass(frozen=True)
class Series:
    metric: str
    query: Query   # select "... as value", grouped by the labels, time_bucket True
    # a window without points: zero for volumes (a flow that stopped is the news),
    # no sample for gauges and latencies
    missing_is_zero: bool = False


SERIES = (
    Series("bytes_to_peer", Query("tcp_flow", ("sum(tx_bytes) + sum(rx_bytes) as value",), (("role", "client"),),
                                  ("host", "comm", "peer")), missing_is_zero=True),
    Series("srtt_p99", Query("tcp_srtt", ("max(p99_us) as value",), (), ("host", "comm", "peer"))),
    # CPU of every process of that name over the window, in % of one core: summed over pids and
    # polls (a mean over them would halve two busy workers and skip the polls a process idled)
    Series("process_cpu", Query("process_cpu", ("sum(oncpu_us) / ($__interval_ms * 10) as value",), (),
                                ("host", "comm"))),
    Series("disk_latency_p99", Query("block_total_latency", ("max(p99_us) as value",), (), ("host", "disk"))),
)


def robust_score(value: float, baseline: list[float]) -> float:
    med = statistics.median(baseline)
    mad = statistics.median(abs(x - med) for x in baseline)
    spread = max(1.4826 * mad, 0.05 * abs(med), 1e-9)
    return (value - med) / spread


class Marker:
    def __init__(self, query, host: str, threshold: float, window_s: float, baseline_windows: int):
        self.query = query
        self.host = host
        self.threshold = threshold
        self.window_s = window_s
        self.baseline_windows = baseline_windows

    def mark(self, now_ms: int) -> list[Point]:
        w_ms = int(self.window_s * 1000)
        start = now_ms - w_ms * (self.baseline_windows + 1)
        points, texts = [], []
        for s in SERIES:
            # windows end just before now: [now - w, now) is the latest
            text = expand(s.query.influxql(), start_ms=start, end_ms=now_ms - 1, interval_s=self.window_s)
            # windows aligned to now, not to the epoch, so the last one is exactly the latest window
            texts.append(text.replace(f"GROUP BY time({w_ms}ms)", f"GROUP BY time({w_ms}ms, {now_ms % w_ms}ms)"))
        for s, res in zip(SERIES, run_batch(self.query, texts)):
            if "error" in res:  # one broken series must not stop the others
                log.error("anomaly marks of %s failed: %s", s.metric, res["error"])
                continue
            for series in res.get("series", []):
                col = series["columns"].index("value")
                vals = [(row[0], row[col]) for row in series["values"]]
                vals = [(t, float(v) if v is not None else 0.0) for t, v in vals
                        if t >= start * 1_000_000 and (v is not None or s.missing_is_zero)]
                if len(vals) < 3:
                    continue
                *base, (t_last, latest) = vals
                base = [v for _, v in base][-self.baseline_windows:]
                score = robust_score(latest, base)
                if math.isfinite(score) and abs(score) >= self.threshold:
                    labels = series.get("tags", {})
                    med = statistics.median(base)
                    what = ", ".join(f"{k}={v}" for k, v in sorted(labels.items()) if k != "host")
                    points.append(Point("sonde_anomaly", {
                        "host": self.host, "metric": s.metric, "direction": "high" if score > 0 else "low"}, {
                        "score": round(score, 2), "value": latest, "baseline_median": med,
                        "labels": json.dumps(labels, sort_keys=True),
                        "text": f"{s.metric} {'above' if score > 0 else 'below'} baseline ({what}): "
                                f"{latest:g} against a median of {med:g}, score {score:.1f}"}, now_ms * 1_000_000))
        return points
