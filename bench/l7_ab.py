"""What the L7 capture (probe l7) costs, in the four cases of issue 15.

  .venv/bin/python bench/l7_ab.py --case CASE [--runs 7] [--duration 10] [--out FILE]

Cases (each an alternated A/B of >= 7 pairs, bench/ab.py's harness and
bench/stats.py's bootstrap interval; results in bench/results/l7_<case>.json):

- `nothing`: L7 configured (`probes.l7` on, opting in a port nobody listens on):
  nginx under wrk loses <= 0.5 %; the syscall hooks must be detached (the result
  says whether the kernel ran any l7 syscall program: `bpf_per_request_by_program`);
- `nginx`: nginx opted in (by name), under wrk (not opted in): loss <= 3 %;
- `redis_idle`: a redis-server of ours opted in (by port) and idle, nginx not
  opted in, nginx under wrk: nginx's loss <= 3 %, reported exactly. This is the
  cost every other process pays while something is opted in;
- `redis`: redis-benchmark (not opted in) against redis-server opted in: loss of
  redis-benchmark's requests/s <= 3 %.

The first three run bench/ab.py (nginx, 2 workers, wrk -t2 -c50 on the same 2
cores) with the agent's config carrying the case's `probes.l7` section, and add what
the capture itself reported per agent run (`l7_capture_runs`: events handed over and
lost, from the agent's embedded InfluxDB). `redis` runs its own pairs with the same
helpers. BPF run-time statistics are on: `bpf_per_request_by_program` gives each l7
program's runs and nanoseconds per request.

Run it only on a quiet machine (see bench/README.md): nothing else loading BPF
programs, no tests alongside.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
import ab  # noqa: E402  (bench/ab.py: the harness)
import stats as bstats  # noqa: E402

CASES = ("nothing", "nginx", "redis_idle", "redis")
L7_SECTION: dict = {}          # the probes.l7 section the next agent runs get
CAPTURE_RUNS: list[dict] = []  # per agent run: what l7_probe reported


class L7AgentRun(ab.AgentRun):
    """ab's agent run, with `probes.l7` in its config and what the capture reported
    read back before it stops."""

    def command(self) -> list[str]:
        # ab's start() writes its config (JSON, which is YAML), then asks for the command
        path = self.dir / "sonde.yaml"
        if path.exists():
            cfg = json.loads(path.read_text())
            cfg["probes"] = {"l7": dict(L7_SECTION, enabled=True)}
            path.write_text(json.dumps(cfg, indent=2) + "\n")
        return super().command()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            CAPTURE_RUNS.append(capture_totals(self.http_port))
        super().stop()


def capture_totals(port: int) -> dict:
    """Sums of l7_probe over the run, from the agent's embedded InfluxDB (its last poll
    is not in yet: up to one interval is missing)."""
    q = urllib.parse.urlencode({"db": "sonde", "q": 'SELECT sum("events"), sum("lost_events"), '
                                                    'max("opted_in_processes"), max("hooks_attached") FROM "l7_probe"'})
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/query?{q}", timeout=5) as r:
            res = json.loads(r.read())
        cols, vals = res["results"][0]["series"][0]["columns"], res["results"][0]["series"][0]["values"][0]
        return dict(zip(["events", "lost_events", "opted_in_processes_max", "hooks_attached_max"], vals[1:]))
    except (OSError, ValueError, KeyError, IndexError) as e:
        return {"error": str(e)}


class Redis:
    def __init__(self, root: Path):
        self.port = ab.free_port()
        self.dir = root / "redis"
        self.dir.mkdir()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir), "--daemonize", "no", "--logfile", str(self.dir / "redis.log")],
            stdin=subprocess.DEVNULL)
        for _ in range(100):
            if subprocess.run(["redis-cli", "-p", str(self.port), "PING"], capture_output=True,
                              text=True).stdout.strip() == "PONG":
                return
            time.sleep(0.1)
        raise ab.BenchError("redis-server did not start")

    def stop(self) -> None:
        ab.stop_proc(self.proc, signal.SIGTERM, what="redis-server")


def redis_benchmark(port: int, requests: int) -> float:
    """requests/s of redis-benchmark -t get,set (50 clients, no pipelining), summed."""
    out = subprocess.run(["redis-benchmark", "-p", str(port), "-c", "50", "-n", str(requests), "-t", "get,set",
                          "-q"], capture_output=True, text=True, check=True).stdout
    rates = [float(x) for x in re.findall(r"([0-9.]+) requests per second", out)]
    if len(rates) != 2:
        raise ab.BenchError(f"redis-benchmark output not understood: {out[-500:]}")
    return sum(rates) / len(rates)


def redis_case(args) -> int:
    """redis-benchmark against redis-server, without and with the agent capturing the server."""
    sonde_bin = Path(sys.executable).parent / "sonde"
    sonde = [str(sonde_bin)] if sonde_bin.exists() else [sys.executable, "-m", "sonde.ingest.cli"]
    seed = args.seed if args.seed is not None else secrets.randbelow(2 ** 31)
    orders = ab.pair_orders(args.runs, "random", seed)
    started = dt.datetime.now(dt.timezone.utc)
    tmp = Path(tempfile.mkdtemp(prefix="sonde-l7ab-"))
    base, agent, detail = [], [], []
    redis = None
    try:
        redis = Redis(tmp)
        L7_SECTION.update(ports=[redis.port])
        redis_benchmark(redis.port, args.requests // 4)  # warm-up
        for i, pair in enumerate(orders):
            for arm in pair:
                if arm == "B":
                    rps = redis_benchmark(redis.port, args.requests)
                    base.append(rps)
                    detail.append({"pair": i + 1, "arm": "baseline", "req_s": rps})
                else:
                    run = L7AgentRun(tmp / f"agent-{i + 1}", sonde, ["l7"], args.interval)
                    try:
                        run.start()
                        rps = redis_benchmark(redis.port, args.requests)
                        time.sleep(args.interval + 1)  # one poll after the run, so its capture counts are in
                    finally:
                        run.stop()
                    agent.append(rps)
                    detail.append({"pair": i + 1, "arm": "agent", "req_s": rps, "l7": CAPTURE_RUNS[-1]})
                ab.log(f"pair {i + 1}/{args.runs} {detail[-1]['arm']}: {detail[-1]['req_s']:.0f} req/s")
    finally:
        if redis:
            redis.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    lossd = bstats.loss(base, agent)
    result = {
        "name": args.name, "case": "redis",
        "what": (f"redis-benchmark -c 50 -n {args.requests} -t get,set (not opted in) against redis-server opted in "
                 f"to the L7 capture (probes.l7.ports), requests/s without vs with `sonde run --probe l7`, "
                 f"{args.runs} pairs, arm order shuffled (balanced, seeded {seed}); loss = drop in requests/s"),
        "command": ab.the_command(), "date": started.replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        "runs": args.runs, "unit": "req/s",
        "baseline_median": ab.median_n(base, 1), "agent_median": ab.median_n(agent, 1),
        **lossd, "detail": detail, "agent_source": ab.source_description(),
    }
    out = args.out or ab.RESULTS_DIR / f"{args.name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    ab.log(f"{args.name}: loss {lossd['loss_pct']} % ({lossd['loss_pct_ci95']}); written to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", choices=CASES, required=True)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--duration", type=int, default=10, help="seconds per wrk run (nginx cases)")
    ap.add_argument("--requests", type=int, default=200_000, help="redis-benchmark -n per run (case redis)")
    ap.add_argument("--interval", type=float, default=10, help="agent interval_seconds")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None, help="default bench/results/l7_<case>.json")
    args = ap.parse_args(argv)
    args.name = f"l7_{args.case}"
    if os.geteuid() != 0:
        print("l7_ab: must run as root", file=sys.stderr)
        return 1
    ab.AgentRun = L7AgentRun
    if args.case == "redis":
        for tool in ("redis-server", "redis-benchmark", "redis-cli"):
            if not shutil.which(tool):
                print(f"l7_ab: {tool} not found; scripts/setup.sh installs redis-server and redis-tools",
                      file=sys.stderr)
                return 1
        return redis_case(args)
    redis = None
    tmp = Path(tempfile.mkdtemp(prefix="sonde-l7ab-"))
    try:
        if args.case == "nothing":
            L7_SECTION.update(ports=[ab.free_port()])
            note = "probes.l7 on, opting in a port nobody listens on: the syscall hooks stay detached"
        elif args.case == "nginx":
            L7_SECTION.update(processes=["nginx"])
            note = "probes.l7 opts in nginx (by name; wrk is not opted in)"
        else:
            redis = Redis(tmp)
            L7_SECTION.update(ports=[redis.port])
            note = (f"probes.l7 opts in an idle redis-server (port {redis.port}); nginx and wrk are not opted in: "
                    f"the cost every other process pays while the hooks are attached")
        argv2 = ["--name", args.name, "--probe", "l7", "--runs", str(args.runs), "--duration", str(args.duration),
                 "--interval", str(args.interval), "--notes", note]
        if args.seed is not None:
            argv2 += ["--seed", str(args.seed)]
        if args.out:
            argv2 += ["--out", str(args.out)]
        rc = ab.main(argv2)
    finally:
        if redis:
            redis.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    out = args.out or ab.RESULTS_DIR / f"{args.name}.json"
    if rc == 0 and out.exists():
        result = json.loads(out.read_text())
        result["case"] = args.case
        result["l7_section"] = L7_SECTION
        result["l7_capture_runs"] = CAPTURE_RUNS
        out.write_text(json.dumps(result, indent=2) + "\n")
    return rc


if __name__ == "__main__":
    sys.exit(main())
