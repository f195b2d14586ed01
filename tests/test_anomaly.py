"""Anomaly marks: the robust score on literal numbers, and a real flow whose volume
jumps gets a mark that the dashboards' marks table shows."""
import json
import time

import pytest

from conftest import Child, make_config, wait_for_file, wait_until
from sonde.dashboards import house
from sonde.ingest.runtime.agent import Agent
from sonde.ingest.analysis.anomaly import robust_score
from sonde.ingest.analysis.queries import expand

pytestmark = [pytest.mark.dashboards]


def test_robust_score_on_literals():
    base = [100.0, 102.0, 98.0, 101.0, 99.0]
    assert robust_score(100.0, base) == 0.0
    assert robust_score(200.0, base) > 10          # doubled: far outside
    assert robust_score(50.0, base) < -4           # halved
    assert abs(robust_score(103.0, base)) < 4      # jitter: not a mark
    # a flat baseline does not make every change infinite: the spread floors at 5% of the median
    assert robust_score(110.0, [100.0] * 5) == pytest.approx(2.0)


def test_volume_jump_is_marked_and_shown(bpf_ready, influx, influx_db, tmp_path):
    thresholds = tmp_path / "t.yaml"
    from sonde.alerts import rules
    text = rules.THRESHOLDS.read_text().replace("  window: 60\n  baseline_windows: 10\n",
                                                "  window: 2\n  baseline_windows: 5\n")
    thresholds.write_text(text)
    cfg = make_config(tmp_path, f"alerts:\n  thresholds: {thresholds}\n", api="v1", url=influx.url,
                      database=influx_db)
    agent = Agent(cfg, only=["tcp"], max_backoff=0.5).start()
    portfile = tmp_path / "port"
    rx = Child("recv", str(portfile), "anom-rx")
    sender = None
    try:
        port = int(wait_for_file(portfile))
        sender = Child("burst", "127.0.0.1", port, "anom-tx", stdin=True)
        start_ms = int(time.time() * 1000)

        def send(n):
            sender.proc.stdin.write(f"{n}\n")
            sender.proc.stdin.flush()
            assert sender.proc.stdout.readline().strip() == "ok"
        for _ in range(12):  # six steady 2 s windows of 100 kB
            send(50_000)
            agent.poll()
            time.sleep(1)
        send(5_000_000)
        agent.poll()
        wait_until(lambda: len(agent.spool) == 0, what="spool drained")
        points = agent.evaluate_alerts()
        wait_until(lambda: len(agent.spool) == 0, what="spool drained")
    finally:
        if sender:
            sender.kill()
        rx.kill()
        agent.stop()
    marks = [p for p in points if p.measurement == "sonde_anomaly" and p.tags["metric"] == "bytes_to_peer"
             and json.loads(p.fields["labels"]).get("comm") == "anom-tx"]
    assert len(marks) == 1 and marks[0].tags["direction"] == "high" and marks[0].fields["score"] > 4
    assert marks[0].fields["baseline_median"] == pytest.approx(100_000, rel=0.5)
    # the marks table every dashboard carries shows it
    q = [t["query"] for t in house.render(house.load_all()["network"])["panels"][-1]["targets"]][0]
    res = influx.query(expand(q, start_ms=start_ms, end_ms=int(time.time() * 1000) + 1000, interval_s=1,
                              variables={"host": cfg.host}), db=influx_db)["results"][0]
    texts = [row[1] for s in res.get("series", []) for row in s["values"]]
    assert any("anom-tx" in t and "above baseline" in t for t in texts), texts
