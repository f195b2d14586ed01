"""Poll cost of tcp_flow at N live flows (default 10k), with real connections.

One child process listens on N loopback ports; another connects once to each and
sends a few bytes, and both keep every connection open. That gives the client N
flows (role=client, one per remote port) and the server N (role=server, one per
listening port), each with srtt/connect-latency histograms. The probe runs in
this process; the figure is the median wall time of its poll (read + decode).

  .venv/bin/python bench/poll_flows.py [--flows 10000] [--polls 7]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CHILD = textwrap.dedent("""
    import os, resource, socket, sys, time
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    mode, n = sys.argv[1], int(sys.argv[2])
    socks = []
    if mode == "server":
        for _ in range(n):
            s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(4); socks.append(s)
        print(" ".join(str(s.getsockname()[1]) for s in socks), flush=True)
        conns = []
        for s in socks:
            c, _ = s.accept(); s.close(); c.recv(16); c.sendall(b"ok"); conns.append(c)
        print("ready", flush=True)
    else:
        ports = sys.stdin.readline().split()
        for p in ports:
            c = socket.create_connection(("127.0.0.1", int(p))); c.sendall(b"hello"); socks.append(c)
        for c in socks:
            c.recv(2)
        print("ready", flush=True)
    sys.stdin.read() if mode == "client" else time.sleep(3600)
""")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--flows", type=int, default=10_000)
    ap.add_argument("--polls", type=int, default=7)
    ap.add_argument("--out", default=str(REPO / "bench/results/l4_poll_10k.json"))
    args = ap.parse_args()

    from ingest import config
    from ingest.probe import LoadedProbe, discover

    cfg = config.parse(f"state_dir: /tmp/sonde-bench-poll\ncardinality:\n  max_series: 10000000\n"
                       f"probes:\n  tcp_flow:\n    map_entries: {4 * args.flows}\n"
                       f"    max_processes: 100000\n    max_peers: 100000\n")
    probe = LoadedProbe.load(discover()["tcp_flow"], cfg)
    server = client = None
    try:
        probe.poll(time.time_ns())
        server = subprocess.Popen([sys.executable, "-c", CHILD, "server", str(args.flows)],
                                  stdout=subprocess.PIPE, text=True)
        ports = server.stdout.readline()
        client = subprocess.Popen([sys.executable, "-c", CHILD, "client", str(args.flows)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        client.stdin.write(ports)
        client.stdin.flush()
        assert client.stdout.readline().strip() == "ready"
        assert server.stdout.readline().strip() == "ready"
        times, points, entries = [], [], []
        for i in range(args.polls):
            t = time.perf_counter()
            pts, self_point = probe.poll(time.time_ns())
            times.append(time.perf_counter() - t)
            points.append(len(pts))
            entries.append(self_point.fields["map_entries"])
            assert self_point.fields["poll_success"] == 1
        flows = len([k for k, _ in probe.table("tcp_flow").items()])
    finally:
        for p in (client, server):
            if p:
                p.kill()
                p.wait()
        probe.close()
    result = {
        "name": "l4_poll_10k",
        "what": f"tcp_flow poll (read + decode) with {flows} live flows from real loopback connections",
        "command": " ".join([".venv/bin/python", "bench/poll_flows.py"] + sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "runs": args.polls,
        "unit": "s",
        "live_flows": flows,
        "map_entries": entries[-1],
        "first_poll_s": round(times[0], 4),
        "median_s": round(statistics.median(times[1:]), 4),
        "polls_s": [round(t, 4) for t in times],
        "points_per_poll": points,
        "kernel": os.uname().release,
        "notes": "The first poll after the connections opened writes every flow and histogram; later polls "
                 "read the same maps and write only what changed.",
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
