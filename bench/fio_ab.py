#!/usr/bin/env python3
"""A/B block I/O overhead: fio random 4k direct reads on a loop device, alternated
without (baseline) and with `sonde run --probe block_io` (agent), compared by medians.

    .venv/bin/python bench/fio_ab.py [--runs 7] [--duration 10] [--probe NAME ...] [--seed N] [--out FILE]

The loop device sits on a 256 MiB file written out first, so its reads come from the
page cache and the device is as fast as this machine allows: the harshest case for
per-request hooks. block_io runs one raw tracepoint program per I/O; add
`--probe process_io` to measure the opt-in per-process hook too. Writes
bench/results/block_io_fio.json (or --out). Needs root.

For the programs' own time per I/O, measured by the kernel (bpf_stats), see
bench/block_io_cost.py.
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ab  # noqa: E402  (the nginx harness: AgentRun, process helpers, pair orders)
import stats as bstats  # noqa: E402  (bench/stats.py: the bootstrap interval)
from sonde.ingest.runtime import bpfinfo  # noqa: E402


def fio_counted(dev: str, seconds: int) -> tuple[float, int]:
    """(IOPS, I/Os completed) of one fio run."""
    out = subprocess.run(["fio", "--name=randread", f"--filename={dev}", "--rw=randread", "--bs=4k", "--direct=1",
                          "--ioengine=psync", "--numjobs=1", "--time_based", f"--runtime={seconds}",
                          "--output-format=json"], capture_output=True, text=True, check=True).stdout
    read = json.loads(out)["jobs"][0]["read"]
    return read["iops"], int(read["total_ios"])


def fio(dev: str, seconds: int) -> float:
    return fio_counted(dev, seconds)[0]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7, help="pairs of runs (baseline and agent, order shuffled)")
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--probe", action="append", default=None)
    ap.add_argument("--seed", type=int, default=None, help="seed of the pair orders (default: drawn)")
    ap.add_argument("--out", type=Path, default=ab.RESULTS_DIR / "block_io_fio.json",
                    help="where to write the result (a smoke run should not overwrite the recorded one)")
    args = ap.parse_args()
    probes = args.probe or ["block_io"]
    sonde = [str(ab.REPO / ".venv/bin/sonde")]
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    orders = ab.pair_orders(args.runs, "random", seed)
    stats_fd = bpfinfo.enable_stats()
    base, agent, cpu, bpf_ns, bpf_runs = [], [], [], [], []
    with tempfile.TemporaryDirectory(prefix="sonde-fio-") as tmp:
        img = Path(tmp) / "disk.img"
        subprocess.run(["dd", "if=/dev/urandom", f"of={img}", "bs=1M", "count=256"], check=True, capture_output=True)
        dev = subprocess.run(["losetup", "-f", "--show", str(img)], capture_output=True, text=True,
                             check=True).stdout.strip()
        try:
            fio(dev, 3)  # warm-up, not recorded
            for i, order in enumerate(orders):
                for arm in order:
                    if arm == "B":
                        base.append(fio(dev, args.duration))
                        ab.log(f"pair {i + 1}/{args.runs} baseline: {base[-1]:.0f} IOPS")
                        continue
                    run = ab.AgentRun(Path(tmp) / f"agent-{i}", sonde, probes, 10.0)
                    try:
                        run.start()
                        t0 = ab.cpu_ticks(run.proc.pid) or 0
                        before = ab.bpf_snapshot()
                        iops, ios = fio_counted(dev, args.duration)
                        after = ab.bpf_snapshot()
                        agent.append(iops)
                        cpu.append(((ab.cpu_ticks(run.proc.pid) or 0) - t0) / ab.CLK_TCK / args.duration * 100)
                    finally:
                        run.stop()
                    runs_, ns_ = (sum(v[i] for v in ab.bpf_delta(before, after).values()) for i in (0, 1))
                    bpf_runs.append(runs_ / ios if ios else None)
                    bpf_ns.append(ns_ / ios if ios else None)
                    ab.log(f"pair {i + 1}/{args.runs} agent:    {agent[-1]:.0f} IOPS; agent CPU {cpu[-1]:.1f} %; "
                           f"BPF {bpf_runs[-1] or 0:.2f} runs {bpf_ns[-1] or 0:.0f} ns per I/O")
        finally:
            subprocess.run(["losetup", "-d", dev], check=False)
            if stats_fd >= 0:
                os.close(stats_fd)
    lossd = bstats.loss(base, agent)
    per_io = [x for x in bpf_ns if x is not None]
    result = {
        "name": "block_io_fio",
        "what": f"fio randread 4k direct, psync, 1 job, on a page-cached loop device, without/with `sonde run` "
                f"({', '.join(probes)}); {args.runs} pairs, each pair's order shuffled (balanced)",
        "command": " ".join([".venv/bin/python", "bench/fio_ab.py"] + sys.argv[1:]),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "runs": args.runs,
        "unit": "IOPS",
        "baseline_median": round(statistics.median(base), 1),
        "agent_median": round(statistics.median(agent), 1),
        "loss_pct": round(lossd["loss_pct"], 2),
        "loss_pct_ci95": [round(x, 2) for x in lossd["loss_pct_ci95"]],
        "pair_ratios": [round(x, 4) for x in lossd["pair_ratios"]],
        "order": "".join(orders),
        "order_seed": seed,
        "baseline_runs": [round(x, 1) for x in base],
        "agent_runs": [round(x, 1) for x in agent],
        "agent_cpu_pct_median": round(statistics.median(cpu), 2),
        "bpf_runs_per_io_median": round(statistics.median([x for x in bpf_runs if x is not None]), 3) if per_io else None,
        "bpf_ns_per_io_median": round(statistics.median(per_io), 1) if per_io else None,
        "probes": probes,
        "kernel": os.uname().release,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
