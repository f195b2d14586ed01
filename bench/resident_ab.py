#!/usr/bin/env python3
"""A/B cost of a resident agent on nginx under wrk, with the arms seconds apart.

    .venv/bin/python bench/resident_ab.py --name always_on_resident --probe tcp --probe cpu --probe block_io --probe oom
    .venv/bin/python bench/resident_ab.py --name l7_nothing_opted_resident --probe l7 \
        --config '{"probes": {"l7": {"enabled": true, "processes": ["no-such-process"]}}}'

`ab.py` starts a whole agent per agent run (compiling its probes takes seconds), so
its arms are ~20 s apart, and this machine drifts more than that: one `ab.py` run saw
baselines from 110k to 131k req/s, ten times a 1 % bar. Here one `sonde run` is
started once and the arms alternate every `--window` seconds:

- agent (A): the agent and its embedded influxd running (SIGCONT);
- baseline (B): both stopped (SIGSTOP): their threads never run.

With `--continuous`, wrk runs once for the whole benchmark and each run is a window
of it, its requests read from nginx's own counter (stub_status): no wrk start and no
new connections between arms. The programs' statistics (bpf_stats) cost two clock
reads per program run, which production does not pay (they are off by default), so
they are off in the A/B runs and on in a pass of agent runs after them (`--stats
after`, the default).

Both arms have the agent's BPF programs attached (a stopped process keeps them), so the
A/B difference is what the agent and influxd do in user space (polls, delivery,
wakeups, their cache footprint). What the programs cost is counted exactly instead:
bpf_stats' run time per request, over the agent runs, as a share of the machine's busy
CPU time per request (`bpf_cost_pct`). `total_loss_pct` = the A/B loss + that share.
Two things this leaves out, both said in the result: a regular tracepoint's record
filling and the dispatch of each run are not in run_time_ns (nothing per request
here when `bpf_runs_per_request` is ~0), and polls missed while stopped run as soon
as the agent continues, so agent runs hold more polls than a steady agent would (the
A/B loss errs high).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import secrets
import signal
import statistics
import sys
import tempfile
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
import ab  # noqa: E402
import stats as bstats  # noqa: E402

from sonde.ingest.runtime import bpfinfo  # noqa: E402


def signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        os.kill(pid, sig)


class Windows:
    """One wrk run for the whole benchmark, cut into windows: each window's requests from
    nginx's own counter (stub_status), its busy CPU from /proc/stat, the agent's and
    influxd's CPU from /proc/PID/stat and the agent's programs' runs from bpf_stats.
    Consecutive windows share wrk's connections and threads, so what differs between
    arms is the agent, not a new wrk's start."""

    def __init__(self, nginx, cmd: list[str], pids: dict[str, int | None], held: set[int] | None):
        self.nginx, self.cmd, self.held = nginx, cmd, held
        self.pids = {k: v for k, v in pids.items() if v}
        self.proc = None
        self.bpf = False

    def start(self) -> None:
        import subprocess
        import time
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(2)  # connections open, threads running

    def _snap(self):
        import time
        bpf = ab.bpf_snapshot() if self.bpf else {}
        return (time.monotonic(), self.nginx.requests(), ab.system_ticks(),
                {k: ab.cpu_ticks(p) for k, p in self.pids.items()}, bpf)

    def window(self, seconds: float, bpf: bool = False) -> tuple[float, dict]:
        import time
        if self.proc.poll() is not None:
            raise ab.BenchError(f"wrk exited early ({self.proc.returncode})")
        self.bpf = bpf
        t0, r0, s0, p0, b0 = self._snap()
        time.sleep(seconds)
        t1, r1, s1, p1, b1 = self._snap()
        wall, requests = t1 - t0, r1 - r0 - 1  # less our own stub_status read
        busy_s = (s1["busy"] - s0["busy"]) / ab.CLK_TCK
        st: dict = {k: {"cpu_pct": None if p0[k] is None or p1[k] is None
                        else round((p1[k] - p0[k]) / ab.CLK_TCK / wall * 100, 2)} for k in self.pids}
        st["window"] = {"wall_s": round(wall, 3), "requests": requests,
                        "cpu_us_per_request": round(busy_s / requests * 1e6, 3) if requests else None}
        st["system"] = {"other_cpu_pct": None}
        if bpf:
            st["bpf"] = {"snap": (b0, b1)}
        return requests / wall, st

    def stop(self) -> None:
        import signal as sig
        ab.stop_proc(self.proc, sig.SIGTERM, timeout=5, what="wrk")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("--probe", action="append", default=[], metavar="NAME")
    ap.add_argument("--config", default="{}", help="more agent config, as JSON (merged at the top level)")
    ap.add_argument("--pairs", type=int, default=40)
    ap.add_argument("--window", type=float, default=3.0, help="seconds of wrk per run (default 3)")
    ap.add_argument("--interval", type=float, default=10.0, help="agent interval_seconds (default 10)")
    ap.add_argument("--close", action="store_true", help="a new connection per request")
    ap.add_argument("--continuous", action="store_true",
                    help="one wrk run for the whole benchmark; each window's requests from nginx's stub_status "
                         "counter (no wrk start or connection setup between windows)")
    ap.add_argument("--rate", type=float, default=None, metavar="R",
                    help="with --continuous: pace wrk at R requests/s (below saturation) and compare the machine's "
                         "busy CPU time per request instead of req/s")
    ap.add_argument("--stats", choices=("after", "during"), default="after",
                    help="bpf_stats on only for a pass of agent runs after the pairs (default: the A/B runs "
                         "without the statistics' own ~2 clock reads per program run), or during the pairs")
    ap.add_argument("--stats-runs", type=int, default=10, help="agent runs in the statistics pass (default 10)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.rate is not None and (args.rate <= 0 or not args.continuous):
        ap.error("--rate needs --continuous and a positive rate")
    extra = json.loads(args.config)
    seed = args.seed if args.seed is not None else secrets.randbelow(2 ** 31)
    orders = ab.pair_orders(args.pairs, "random", seed)
    out = args.out or (ab.RESULTS_DIR / f"{args.name}.json")
    stats_fd = bpfinfo.enable_stats() if args.stats == "during" else -1
    sonde_bin = Path(sys.executable).parent / "sonde"
    sonde = [str(sonde_bin)] if sonde_bin.exists() else [sys.executable, "-m", "sonde.ingest.cli"]
    tmp = Path(tempfile.mkdtemp(prefix="sonde-resident-ab-"))
    nginx = ab.Nginx(tmp).start()
    run = ab.AgentRun(tmp / "agent", sonde, args.probe, args.interval, extra=extra)
    runs = {"baseline": [], "agent": []}
    cpu_req = {"baseline": [], "agent": []}
    agent_cpu, influxd_cpu, bpf_runs_req, bpf_ns_req = [], [], [], []
    stopped = False
    windows = None
    try:
        run.start()
        procs = [run.proc.pid] + ([run.influxd_pid] if run.influxd_pid else [])
        held = ab.held_prog_ids(run.proc.pid)  # the agent's programs: others' (tests, tools) are not its cost
        wrk = ["wrk", "-t2", "-c50", *(["-H", "Connection: close"] if args.close else []),
               f"-d{args.window:g}s", nginx.url]
        ab.run_wrk(wrk, args.window)  # warm-up, not recorded
        if args.continuous:
            long_wrk = wrk[:-2] + [f"-d{int(args.window * 2 * len(orders) * 1.5 + 60)}s", nginx.url]
            if args.rate:
                lua = tmp / "rate.lua"
                lua.write_text(ab.RATE_LUA.format(period=2 / args.rate))  # wrk -t2
                long_wrk[1:1] = ["-s", str(lua)]
            windows = Windows(nginx, long_wrk, {"agent": run.proc.pid, "influxd": run.influxd_pid}, held)
            windows.start()
        def measure(name: str, record: bool = True) -> None:
            if args.continuous:
                rps, st = windows.window(args.window, bpf=stats_fd >= 0)
            else:
                rps, st, _ = ab.run_wrk(wrk, args.window, {"agent": run.proc.pid, "influxd": run.influxd_pid},
                                        nginx_pid=nginx.proc.pid, bpf=stats_fd >= 0)
            if record:
                runs[name].append(rps)
                cpu_req[name].append(st["window"]["cpu_us_per_request"])
                if name == "agent":
                    agent_cpu.append(st.get("agent", {}).get("cpu_pct") or 0.0)
                    influxd_cpu.append(st.get("influxd", {}).get("cpu_pct") or 0.0)
            if name == "agent" and "bpf" in st and st["window"]["requests"]:
                before, after = st["bpf"]["snap"]
                mine = ab.bpf_delta({k: v for k, v in before.items() if k in held},
                                    {k: v for k, v in after.items() if k in held})
                bpf_runs_req.append(sum(v[0] for v in mine.values()) / st["window"]["requests"])
                bpf_ns_req.append(sum(v[1] for v in mine.values()) / st["window"]["requests"])
            ab.log(f"{name:8s}: {rps:9.0f} req/s, {st['window']['cpu_us_per_request']} CPU µs/req"
                   + ("" if record else " (statistics pass)"))

        for i, order in enumerate(orders):
            for arm in order:
                name = "agent" if arm == "A" else "baseline"
                if arm == "B" and not stopped:
                    signal_all(procs, signal.SIGSTOP)
                    stopped = True
                elif arm == "A" and stopped:
                    signal_all(procs, signal.SIGCONT)
                    stopped = False
                ab.log(f"pair {i + 1}/{len(orders)}")
                measure(name)
        if args.stats == "after":
            if stopped:
                signal_all(procs, signal.SIGCONT)
                stopped = False
            stats_fd = bpfinfo.enable_stats()
            for _ in range(args.stats_runs if stats_fd >= 0 else 0):
                measure("agent", record=False)
        if run.proc.poll() is not None:
            raise ab.BenchError(f"the agent exited during the runs: {ab.tail(run.stderr_path, 20)}")
    finally:
        if args.continuous and windows is not None:
            windows.stop()
        if stopped and run.proc and run.proc.poll() is None:
            signal_all([p for p in [run.proc.pid, run.influxd_pid] if p], signal.SIGCONT)
        loaded = run.loaded_probes() if run.proc else []
        problems = run.log_problems() if run.stderr_path.exists() else []
        run.stop()
        nginx.stop()
    cpu = bstats.loss(cpu_req["baseline"], cpu_req["agent"], higher_is_better=False)
    res = cpu if args.rate else bstats.loss(runs["baseline"], runs["agent"])
    achieved = {arm: round(statistics.median(v), 1) for arm, v in runs.items()}
    pair_loss = ((res["pair_ratio_median"] - 1) if args.rate else (1 - res["pair_ratio_median"])) * 100
    # continuous windows: the paired estimator (its interval is loss_pct_ci95); else the arms' medians
    loss_pct = pair_loss if args.continuous else res["loss_pct"]
    ns_med = statistics.median(bpf_ns_req) if bpf_ns_req else None
    cpu_med = statistics.median(cpu_req["agent"])
    bpf_pct = ns_med / (cpu_med * 1000) * 100 if ns_med is not None else None
    result = {
        "name": args.name,
        "command": ab.the_command(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "runs": args.pairs,
        "unit": "cpu_us/request" if args.rate else "req/s",
        "mode": "resident" + ("_close" if args.close else "") + ("_fixed_rate" if args.rate else ""),
        **({"target_rate": args.rate, "achieved_rate_median": achieved} if args.rate else {}),
        "what": (f"nginx (2 workers) {'driven at a fixed %g req/s (wrk paced by a Lua delay())' % args.rate if args.rate else 'saturated'} by wrk -t2 -c50 on the same cores "
                 f"({'a new connection per request' if args.close else 'keep-alive'}), {args.window:g} s per run"
                 f"{' (windows of one continuous wrk run, requests from nginx stub_status)' if args.continuous else ''}; "
                 f"one `sonde run` ({', '.join(loaded) or 'no probe'}), running in agent runs and stopped "
                 f"(SIGSTOP, with its influxd) in baseline runs, its BPF programs attached in both; "
                 f"{args.pairs} pairs, arm order shuffled (balanced, seeded); loss_pct = A/B "
                 f"{'increase in the busy CPU time per request (/proc/stat)' if args.rate else 'drop in req/s'}, "
                 f"bpf_cost_pct = the programs' run time per request over the busy CPU per request, "
                 f"total_loss_pct = their sum"),
        "window_s": args.window,
        "bpf_stats": (f"off in the A/B runs; on for {args.stats_runs} agent runs after them, where "
                      f"bpf_*_per_request come from" if args.stats == "after" else "on in every run"),
        "continuous": args.continuous,
        "ratio_of_totals_loss_pct": round((sum(cpu_req["agent"]) / sum(cpu_req["baseline"]) - 1) * 100 if args.rate
                                          else (1 - sum(runs["agent"]) / sum(runs["baseline"])) * 100, 2),
        "baseline_median": round(statistics.median((cpu_req if args.rate else runs)["baseline"]), 3),
        "agent_median": round(statistics.median((cpu_req if args.rate else runs)["agent"]), 3),
        "loss_pct": round(loss_pct, 2),
        "arms_median_loss_pct": round(res["loss_pct"], 2),
        "loss_pct_ci95": [round(x, 2) for x in res["loss_pct_ci95"]],
        "pair_median_loss_pct": round(pair_loss, 2),
        "cpu_per_request_increase_pct": round(cpu["loss_pct"], 2),
        "cpu_per_request_increase_pct_ci95": [round(x, 2) for x in cpu["loss_pct_ci95"]],
        "bpf_runs_per_request": round(statistics.median(bpf_runs_req), 4) if bpf_runs_req else None,
        "bpf_ns_per_request": round(ns_med, 2) if ns_med is not None else None,
        "bpf_cost_pct": round(bpf_pct, 3) if bpf_pct is not None else None,
        "total_loss_pct": round(loss_pct + (bpf_pct or 0), 2),
        "total_loss_pct_ci95_hi": round(res["loss_pct_ci95"][1] + (bpf_pct or 0), 2),
        "agent_cpu_pct_median": round(statistics.median(agent_cpu), 2) if agent_cpu else None,
        "influxd_cpu_pct_median": round(statistics.median(influxd_cpu), 2) if influxd_cpu else None,
        "agent_cpu_pct_mean": round(statistics.mean(agent_cpu), 3) if agent_cpu else None,
        "influxd_cpu_pct_mean": round(statistics.mean(influxd_cpu), 3) if influxd_cpu else None,
        "pair_ratios": [round(x, 5) for x in res["pair_ratios"]],
        "order": "".join(orders),
        "order_seed": seed,
        "baseline_runs": runs["baseline"],
        "agent_runs": runs["agent"],
        "probes_loaded": loaded,
        "agent_log_problems": problems[:20],
        "agent_source": ab.source_description(),
        "warnings": ["a regular tracepoint's record filling and each run's dispatch are not in bpf_ns_per_request",
                     "polls missed while the agent was stopped run when it continues: agent runs hold more polls "
                     "than a steady agent would"],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    ab.log(f"A/B loss {result['loss_pct']} % {result['loss_pct_ci95']}, BPF {result['bpf_cost_pct']} %, "
           f"total {result['total_loss_pct']} %; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
