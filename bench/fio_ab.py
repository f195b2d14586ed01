#!/usr/bin/env python3
"""A/B block I/O overhead: fio random 4k direct reads on a loop device, alternated
without (baseline) and with `sonde run --probe block_io` (agent), compared by medians.

    .venv/bin/python bench/fio_ab.py [--runs 5] [--duration 10] [--probe NAME ...] [--out FILE]

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
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ab  # noqa: E402  (the nginx harness: AgentRun, process helpers)


def fio(dev: str, seconds: int) -> float:
    out = subprocess.run(["fio", "--name=randread", f"--filename={dev}", "--rw=randread", "--bs=4k", "--direct=1",
                          "--ioengine=psync", "--numjobs=1", "--time_based", f"--runtime={seconds}",
                          "--output-format=json"], capture_output=True, text=True, check=True).stdout
    return json.loads(out)["jobs"][0]["read"]["iops"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--probe", action="append", default=None)
    ap.add_argument("--out", type=Path, default=ab.RESULTS_DIR / "block_io_fio.json",
                    help="where to write the result (a smoke run should not overwrite the recorded one)")
    args = ap.parse_args()
    probes = args.probe or ["block_io"]
    sonde = [str(ab.REPO / ".venv/bin/sonde")]
    base, agent, cpu = [], [], []
    with tempfile.TemporaryDirectory(prefix="sonde-fio-") as tmp:
        img = Path(tmp) / "disk.img"
        subprocess.run(["dd", "if=/dev/urandom", f"of={img}", "bs=1M", "count=256"], check=True, capture_output=True)
        dev = subprocess.run(["losetup", "-f", "--show", str(img)], capture_output=True, text=True,
                             check=True).stdout.strip()
        try:
            fio(dev, 3)  # warm-up, not recorded
            for i in range(args.runs):
                base.append(fio(dev, args.duration))
                ab.log(f"run {i + 1}/{args.runs} baseline: {base[-1]:.0f} IOPS")
                run = ab.AgentRun(Path(tmp) / f"agent-{i}", sonde, probes, 10.0)
                try:
                    run.start()
                    t0 = ab.cpu_ticks(run.proc.pid) or 0
                    agent.append(fio(dev, args.duration))
                    cpu.append(((ab.cpu_ticks(run.proc.pid) or 0) - t0) / ab.CLK_TCK / args.duration * 100)
                finally:
                    run.stop()
                ab.log(f"run {i + 1}/{args.runs} agent:    {agent[-1]:.0f} IOPS; agent CPU {cpu[-1]:.1f} %")
        finally:
            subprocess.run(["losetup", "-d", dev], check=False)
    bm, am = statistics.median(base), statistics.median(agent)
    result = {
        "name": "block_io_fio",
        "what": f"fio randread 4k direct, psync, 1 job, on a page-cached loop device, without/with `sonde run` "
                f"({', '.join(probes)})",
        "command": " ".join([".venv/bin/python", "bench/fio_ab.py"] + sys.argv[1:]),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "runs": args.runs,
        "unit": "IOPS",
        "baseline_median": round(bm, 1),
        "agent_median": round(am, 1),
        "loss_pct": round((bm - am) / bm * 100, 2),
        "baseline_runs": [round(x, 1) for x in base],
        "agent_runs": [round(x, 1) for x in agent],
        "agent_cpu_pct_median": round(statistics.median(cpu), 2),
        "probes": probes,
        "kernel": os.uname().release,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
