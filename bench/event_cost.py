"""Per-event and per-connection cost of Sonde's socket hooks, measured without wrk's noise.

Two C loops, compiled into a temp dir:
- sendrecv (bench/src/pingpong.c): N one-byte send+recv pairs on one loopback TCP
  connection, two socket events per iteration: what a probe costs per request;
- connect (below): N loopback connections, each connect + accept + one byte each way +
  close (the server first, as nginx does with `Connection: close`): what a probe costs
  per connection.

Arms: no BPF; an empty program on sock:sock_send_length/sock_recv_length (the kernel's
own cost of a regular tracepoint, for reference); an empty raw tracepoint program on the
same; and each probe named by --probe (default `tcp`; any probe discover() lists). Each
round runs every arm once, in an order shuffled per round from a recorded seed, so no arm
always runs in the same slot. BPF run-time statistics are on throughout: the kernel's
runs and run time of every program on the machine per event are reported beside the
wall-clock figures. Reported: median ns per iteration per arm; the added ns per event
(sendrecv: half the per-round difference from no_bpf) and per connection, each with a
95 % bootstrap interval of the median over rounds (bench/stats.py).

  .venv/bin/python bench/event_cost.py [--rounds 7] [--iters 200000] [--conns 10000] [--probe tcp] [--out FILE]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import secrets
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(1, str(REPO))
import stats as bstats  # noqa: E402  (bench/stats.py)

EMPTY_TP = ("TRACEPOINT_PROBE(sock, sock_send_length) { return 0; }\n"
            "TRACEPOINT_PROBE(sock, sock_recv_length) { return 0; }\n")
EMPTY_RAW = ("RAW_TRACEPOINT_PROBE(sock_send_length) { return 0; }\n"
             "RAW_TRACEPOINT_PROBE(sock_recv_length) { return 0; }\n")

CONNLOOP_C = r"""
/* N loopback TCP connections one after another: connect, accept, one byte each way,
 * the server closes first (its side goes to TIME_WAIT, so client ports stay free),
 * the client reads EOF and closes. Prints ns per connection. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
  int n = atoi(argv[1]);
  int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
  setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(0x7f000001)};
  socklen_t al = sizeof a;
  if (bind(l, (void *)&a, sizeof a) || listen(l, 128) || getsockname(l, (void *)&a, &al)) { perror("listen"); return 1; }
  char buf[64] = {0};
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (int i = 0; i < n; i++) {
    int c = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(c, (void *)&a, sizeof a)) { perror("connect"); return 1; }
    int s = accept(l, 0, 0);
    if (s < 0) { perror("accept"); return 1; }
    if (send(c, buf, 1, 0) != 1 || recv(s, buf, 1, 0) != 1 || send(s, buf, 1, 0) != 1 || recv(c, buf, 1, 0) != 1) {
      perror("send/recv"); return 1;
    }
    close(s);
    recv(c, buf, 1, 0);
    close(c);
  }
  clock_gettime(CLOCK_MONOTONIC, &t1);
  printf("%.1f ns/conn\n", ((t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec)) / n);
  return 0;
}
"""


def bpf_snapshot() -> dict[int, tuple[str, int, int]]:
    from sonde.ingest.runtime import bpfinfo
    return bpfinfo.all_run_stats()


def bpf_delta(before: dict, after: dict) -> dict[str, list[int]]:
    """Runs and run time per program name between two snapshots, per program id (a
    program loaded in between counts from 0; one unloaded in between is left out)."""
    out: dict[str, list[int]] = {}
    for pid, (name, cnt, t) in after.items():
        _, c0, t0 = before.get(pid, (name, 0, 0))
        if cnt > c0 or t > t0:
            d = out.setdefault(name or f"id{pid}", [0, 0])
            d[0] += max(cnt - c0, 0)
            d[1] += max(t - t0, 0)
    return out


def total(progs: dict[str, list[float]]) -> tuple[float, float]:
    return sum(v[0] for v in progs.values()), sum(v[1] for v in progs.values())


def summarise(res: dict[str, list[float]], base: str, agent: str, per: float, digits: int = 1) -> dict:
    """Medians, added cost per unit (per-round difference from `base` / per) with its
    bootstrap interval, and the agent arm's share of the loop's time with its interval."""
    med = {k: round(statistics.median(v), digits) for k, v in res.items()}
    added, added_ci = {}, {}
    for k, v in res.items():
        if k == base:
            continue
        diffs = [(x - b) / per for x, b in zip(v, res[base])]  # paired within each round
        added[k] = round(statistics.median(diffs), digits)
        lo, hi = bstats.bootstrap_median_ci(diffs)
        added_ci[k] = [round(lo, digits), round(hi, digits)]
    shares = [(x - b) / x * 100 for x, b in zip(res[agent], res[base])]
    lo, hi = bstats.bootstrap_median_ci(shares)
    return {"medians": med, "added": added, "added_ci95": added_ci,
            "loss_pct": round(statistics.median(shares), 2), "loss_pct_ci95": [round(lo, 2), round(hi, 2)],
            "pair_ratios": [round(x / b, 5) for x, b in zip(res[agent], res[base])]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=200_000, help="send+recv pairs per sendrecv execution")
    ap.add_argument("--conns", type=int, default=10_000, help="connections per connect execution")
    ap.add_argument("--reps", type=int, default=5, help="executions per arm per round; their median counts")
    ap.add_argument("--probe", action="append", default=None, metavar="NAME",
                    help="a probe to measure (repeatable; default: tcp); the first is the result's agent arm")
    ap.add_argument("--seed", type=int, default=None, help="seed of the per-round arm order (default: drawn)")
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/event_cost.json")
    args = ap.parse_args()
    if args.rounds < 1 or args.iters < 1 or args.conns < 1 or args.reps < 1:
        ap.error("--rounds, --iters, --conns and --reps must be at least 1")
    if os.geteuid() != 0:
        print("event_cost: must run as root (it loads BPF programs)", file=sys.stderr)
        return 1

    from bcc import BPF

    from sonde.ingest.runtime import bpfinfo

    from sonde.ingest import config
    from sonde.ingest.runtime.probe import LoadedProbe, discover

    probes = args.probe or ["tcp"]
    known = discover()
    unknown = [p for p in probes if p not in known]
    if unknown:
        ap.error(f"unknown probe(s) {', '.join(unknown)}; discover() lists: {', '.join(sorted(known))}")
    seed = args.seed if args.seed is not None else secrets.randbelow(2 ** 31)
    rng = random.Random(seed)
    cfg = config.parse("state_dir: /tmp/sonde-bench-event-cost\n")
    tracefs = cfg.paths.tracefs

    class Raw:
        def __init__(self, text: str):
            self.bpf = BPF(text=text)

        def poll(self) -> None:
            pass

        def close(self) -> None:
            self.bpf.cleanup()

    class Probe:
        def __init__(self, name: str):
            self.p = LoadedProbe.load(known[name], cfg)

        def poll(self) -> None:  # as the agent would between requests: keeps the maps in steady state
            import time
            self.p.poll(time.time_ns())

        def close(self) -> None:
            self.p.close()

    arms: dict = {"no_bpf": None}
    if (tracefs / "events/sock/sock_send_length").is_dir():
        arms["empty_tracepoint"] = lambda: Raw(EMPTY_TP)
        arms["empty_raw_tracepoint"] = lambda: Raw(EMPTY_RAW)
    for name in probes:
        arms[name] = (lambda n: lambda: Probe(n))(name)
    agent = probes[0]

    stats_fd = bpfinfo.enable_stats()
    if stats_fd < 0:
        print("event_cost: the kernel refused BPF_ENABLE_STATS; bpf_* figures will be 0", file=sys.stderr)
    sendrecv: dict[str, list[float]] = {k: [] for k in arms}
    connect: dict[str, list[float]] = {k: [] for k in arms}
    bpf_ev: dict[str, list[dict[str, list[float]]]] = {k: [] for k in arms}  # per round: name -> [runs, ns]
    bpf_conn: dict[str, list[dict[str, list[float]]]] = {k: [] for k in arms}
    orders: list[list[str]] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            pingpong, connloop = Path(tmp) / "pingpong", Path(tmp) / "connloop"
            (Path(tmp) / "connloop.c").write_text(CONNLOOP_C)
            subprocess.run(["gcc", "-O2", "-o", str(pingpong), str(REPO / "bench/src/pingpong.c")], check=True)
            subprocess.run(["gcc", "-O2", "-o", str(connloop), str(Path(tmp) / "connloop.c")], check=True)

            def run(exe: Path, n: int, obj) -> tuple[float, dict[str, list[float]]]:
                """Median ns per iteration over --reps executions, and BPF [runs, ns] per
                iteration per program name."""
                vals, per_prog = [], {}
                for _ in range(args.reps):
                    before = bpf_snapshot()
                    out = subprocess.run([str(exe), str(n)], capture_output=True, text=True, check=True).stdout
                    for name, (r, t) in bpf_delta(before, bpf_snapshot()).items():
                        d = per_prog.setdefault(name, [0, 0])
                        d[0] += r / (n * args.reps)
                        d[1] += t / (n * args.reps)
                    vals.append(float(out.split()[0]))
                    if obj:
                        obj.poll()
                return statistics.median(vals), per_prog

            for rnd in range(args.rounds):
                names = list(arms)
                rng.shuffle(names)
                orders.append(names)
                for name in names:
                    make = arms[name]
                    obj = make() if make else None
                    try:
                        v, progs = run(pingpong, args.iters, obj)
                        sendrecv[name].append(v)
                        # two socket events per iteration
                        bpf_ev[name].append({k: [r / 2, t / 2] for k, (r, t) in progs.items()})
                        v, progs = run(connloop, args.conns, obj)
                        connect[name].append(v)
                        bpf_conn[name].append(progs)
                    finally:
                        if obj:
                            obj.close()
                    print(f"round {rnd + 1}/{args.rounds} {name}: {sendrecv[name][-1]:.1f} ns/iteration, "
                          f"{connect[name][-1]:.1f} ns/connection; BPF {total(bpf_ev[name][-1])[1]:.1f} ns/event, "
                          f"{total(bpf_conn[name][-1])[1]:.1f} ns/connection", file=sys.stderr, flush=True)
    finally:
        if stats_fd >= 0:
            os.close(stats_fd)

    ev = summarise(sendrecv, "no_bpf", agent, per=2)
    cn = summarise(connect, "no_bpf", agent, per=1)

    def bpf_median(d: dict[str, list[dict]], digits: int) -> tuple[dict, dict, dict]:
        """Per arm: median over rounds of the total runs and ns per unit, and per program name."""
        runs = {k: round(statistics.median(total(x)[0] for x in v), 4) for k, v in d.items()}
        ns = {k: round(statistics.median(total(x)[1] for x in v), digits) for k, v in d.items()}
        by_prog = {k: {name: [round(statistics.median(x.get(name, [0, 0])[0] for x in v), 4),
                              round(statistics.median(x.get(name, [0, 0])[1] for x in v), digits)]
                       for name in sorted({n for x in v for n in x})} for k, v in d.items()}
        return runs, ns, by_prog

    ev_runs, ev_ns, ev_prog = bpf_median(bpf_ev, 1)
    cn_runs, cn_ns, cn_prog = bpf_median(bpf_conn, 1)
    result = {
        "name": "event_cost",
        "what": (f"ns per loopback TCP send+recv pair (2 socket events) with each hook set attached "
                 f"(agent arm: {agent}); per-connection figures in per_connection"),
        "command": " ".join([".venv/bin/python", "bench/event_cost.py"] + sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "runs": args.rounds,
        "unit": "ns/iteration",
        "baseline_median": ev["medians"]["no_bpf"],
        "agent_median": ev["medians"][agent],
        "agent_arm": agent,
        "loss_pct": ev["loss_pct"],
        "loss_pct_ci95": ev["loss_pct_ci95"],
        "pair_ratios": ev["pair_ratios"],
        "medians": ev["medians"],
        "added_ns_per_event": ev["added"],
        "added_ns_per_event_ci95": ev["added_ci95"],
        "bpf_runs_per_event": ev_runs,
        "bpf_ns_per_event": ev_ns,
        "bpf_by_program_per_event": ev_prog,
        "rounds": {k: [round(x, 1) for x in v] for k, v in sendrecv.items()},
        "order": orders,
        "order_seed": seed,
        "per_connection": {
            "unit": "ns/connection",
            "what": "connect + accept + one byte each way + close (server first), one after another",
            "conns_per_execution": args.conns,
            "medians": cn["medians"],
            "added_ns_per_connection": cn["added"],
            "added_ns_per_connection_ci95": cn["added_ci95"],
            "loss_pct": cn["loss_pct"],
            "loss_pct_ci95": cn["loss_pct_ci95"],
            "pair_ratios": cn["pair_ratios"],
            "bpf_runs_per_connection": cn_runs,
            "bpf_ns_per_connection": cn_ns,
            "bpf_by_program_per_connection": cn_prog,
            "rounds": {k: [round(x, 1) for x in v] for k, v in connect.items()},
        },
        "iters": args.iters,
        "reps": args.reps,
        "probes": probes,
        "kernel": os.uname().release,
        "ci_method": "percentile bootstrap of the median over rounds (10000 resamples, seed 12, nearest rank, 95 %)",
        "notes": (f"loss_pct here is the share of a send+recv pair's time (per_connection: of a connection's) "
                  f"spent because of {agent}'s programs, median over rounds of (arm - no_bpf) / arm, paired within "
                  f"each round. bpf_* are the kernel's run_cnt/run_time_ns over every BPF program on the machine "
                  f"during each arm's executions (statistics on throughout), per socket event or per connection; "
                  f"no_bpf should show 0, and any other tool's programs show up in every arm. empty_tracepoint is "
                  f"the floor for a probe on a regular tracepoint: the kernel fills a record for each event "
                  f"before the program runs; a raw tracepoint skips that. The probes' per-poll work is outside "
                  f"the timed loops (each arm polls between executions)."),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
