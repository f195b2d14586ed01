"""`sonde backtrack` over 24 h of one busy host's data in InfluxDB 1.6.7.

The data has the real catalog's shape (tcp_flow, tcp_srtt_hist, tcp_connect_latency_hist,
process_cpu, block_io, sonde_probe) at the default 10 s interval: a proxy process with
3 backends and 200 client addresses, 20 processes, 2 disks. It is synthetic (written
through the agent's own encoder and V1 sink), as the issue allows. The figure is the
median wall time of the whole `sonde backtrack --json` command over the 24 h.

  .venv/bin/python bench/backtrack_bench.py [--runs 5]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sonde.ingest.config import InfluxDB  # noqa: E402
from sonde.ingest.output.embedded import InfluxServer  # noqa: E402
from sonde.ingest.output.lineproto import Point, encode  # noqa: E402
from sonde.ingest.output.sinks import V1Sink  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
from ab import free_port  # noqa: E402

INTERVAL_S = 10
DAY_S = 86_400


def fill(sink: V1Sink, end_s: int) -> int:
    rnd = random.Random(7)
    host = "busy-1"
    clients = [f"198.18.{i // 250}.{i % 250 + 1}" for i in range(200)]
    backends = [("198.18.10.2", "8080"), ("198.18.11.2", "8080"), ("198.18.12.2", "8080")]
    procs = [(str(1000 + i), f"svc{i}") for i in range(20)]
    n = 0
    batch: list[str] = []
    for t in range(end_s - DAY_S, end_s, INTERVAL_S):
        ts = t * 1_000_000_000
        base = {"host": host}
        pts = []
        for c in rnd.sample(clients, 40):
            tags = base | {"pid": "500", "comm": "nginx", "role": "server", "peer": c, "port": "443"}
            pts.append(Point("tcp_flow", tags, {"tx_bytes": rnd.randint(10_000, 90_000), "rx_bytes": 2000,
                                                "passive_opens": 3, "closes": 3, "rx_segments": 30}, ts))
        for peer, port in backends:
            tags = base | {"pid": "501", "comm": "nginx", "role": "client", "peer": peer, "port": port}
            pts.append(Point("tcp_flow", tags, {"tx_bytes": 40_000, "rx_bytes": 900_000, "active_opens": 40,
                                                "closes": 40, "resets_received": 0, "rx_segments": 700}, ts))
            for le, c in (("127", 200), ("255", 400), ("511", 90), ("1023", 10)):
                pts.append(Point("tcp_srtt_hist", tags | {"le": le}, {"count": c}, ts))
            for le, c in (("255", 30), ("511", 10)):
                pts.append(Point("tcp_connect_latency_hist", tags | {"le": le}, {"count": c}, ts))
        for pid, comm in procs:
            pts.append(Point("process_cpu", base | {"pid": pid, "comm": comm},
                             {"oncpu_us": 200_000, "cpu_pct": 2.0 + rnd.random(), "interval_us": 10_000_000,
                              "voluntary_switches": 100, "involuntary_switches": 5}, ts))
        for disk in ("vda", "vdb"):
            for op in ("read", "write"):
                pts.append(Point("block_io", base | {"disk": disk, "op": op},
                                 {"requests": 100, "bytes": 409_600, "errors": 0}, ts))
        pts.append(Point("sonde_probe", base | {"probe": "tcp_flow"},
                         {"poll_duration_seconds": 0.01, "poll_success": 1, "map_entries": 300,
                          "map_full_drops": 0, "points": len(pts)}, ts))
        batch += [encode(p) for p in pts]
        n += len(pts)
        if len(batch) >= 20_000:
            sink.write(batch)
            batch = []
    if batch:
        sink.write(batch)
    return n


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="sonde-bt-bench-") as tmp:
        server = InfluxServer(Path(tmp) / "influx", free_port(), free_port()).start()
        try:
            server.query('CREATE DATABASE "sonde"')
            sink = V1Sink(InfluxDB(api="v1", url=server.url, database="sonde", timeout_seconds=120))
            end_s = int(time.time()) // INTERVAL_S * INTERVAL_S
            t0 = time.monotonic()
            points = fill(sink, end_s)
            fill_s = time.monotonic() - t0
            sink.close()
            cfg = Path(tmp) / "c.yaml"
            cfg.write_text(f"state_dir: {tmp}/state\ninfluxdb:\n  api: v1\n  url: {server.url}\n  database: sonde\n")
            cmd = [str(REPO / ".venv/bin/sonde"), "backtrack", "-c", str(cfg), "--from", str(end_s - DAY_S),
                   "--to", str(end_s), "--json"]
            times = []
            for _ in range(args.runs):
                t = time.monotonic()
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                times.append(time.monotonic() - t)
            report = json.loads(out)
        finally:
            server.stop()
    result = {
        "name": "backtrack",
        "what": f"sonde backtrack --json over 24 h of one busy host ({points} points, 10 s interval) "
                f"in InfluxDB 1.6.7",
        "command": " ".join([".venv/bin/python", "bench/backtrack_bench.py"] + sys.argv[1:]),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "runs": args.runs,
        "unit": "s",
        "median_s": round(statistics.median(times), 3),
        "runs_s": [round(x, 3) for x in times],
        "points": points,
        "fill_seconds": round(fill_s, 1),
        "talkers_reported": len(report["talkers"]),
        "kernel": os.uname().release,
        "notes": "Includes starting the CLI (Python imports) each run. Target: <= 2 s.",
    }
    (REPO / "bench/results/backtrack.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
