#!/usr/bin/env python3
"""In-kernel cost of block_io per I/O, measured by the kernel itself.

With `kernel.bpf_stats_enabled=1` the kernel counts each BPF program's runs and the
time spent in them (`run_cnt`, `run_time_ns` in /proc/<pid>/fdinfo/<prog fd>). This
loads each probe in turn (block_io, process_io), runs fio on a page-cached loop device (as bench/fio_ab.py does), and
divides each program's time by the I/Os the loop device completed (/proc/diskstats).
It does not include the tracepoint's own dispatch (~20-40 ns for a raw tracepoint
here) nor the agent's polling. An empty raw tracepoint program on block_rq_complete
is measured too: what bpf_stats itself reads for a program that does nothing (its
two clock reads around each run), to subtract; and one that only reads the clock
(bpf_ktime_get_ns, the one helper block_io calls per I/O).

    .venv/bin/python bench/block_io_cost.py [--duration 10] [--iodepth 1] [--probe NAME] [--compare REV]

--compare REV also measures bpf/block_io/block_io.bpf.c as it was at git revision REV (its
programs only; it is compiled as that revision compiled it). Needs root and fio.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
STATS = Path("/proc/sys/kernel/bpf_stats_enabled")


def prog_stats(fd: int) -> tuple[int, int]:
    from sonde.ingest.runtime.bpfinfo import run_stats
    return run_stats(fd)


def completed(dev: str) -> int:
    name = os.path.basename(dev)
    for line in Path("/proc/diskstats").read_text().splitlines():
        f = line.split()
        if f[2] == name:
            return int(f[3]) + int(f[7])
    raise SystemExit(f"{name} not in /proc/diskstats")


def fio(dev: str, seconds: int, iodepth: int) -> None:
    engine = ["--ioengine=psync"] if iodepth == 1 else ["--ioengine=libaio", f"--iodepth={iodepth}"]
    subprocess.run(["fio", "--name=randread", f"--filename={dev}", "--rw=randread", "--bs=4k", "--direct=1",
                    *engine, "--numjobs=1", "--time_based", f"--runtime={seconds}", "--output=/dev/null"],
                   check=True)


def measure(funcs: dict, dev: str, seconds: int, iodepth: int) -> dict:
    before = {name: prog_stats(f.fd) for name, f in funcs.items()}
    ios0 = completed(dev)
    fio(dev, seconds, iodepth)
    ios = completed(dev) - ios0
    out = {"ios": ios, "programs": {}}
    total = 0
    for name, f in funcs.items():
        cnt, ns = (a - b for a, b in zip(prog_stats(f.fd), before[name]))
        total += ns
        out["programs"][name.decode() if isinstance(name, bytes) else name] = {
            "run_cnt": cnt, "run_time_ns": ns, "ns_per_run": round(ns / cnt, 1) if cnt else None,
            "runs_per_io": round(cnt / ios, 3) if ios else None}
    out["ns_per_io"] = round(total / ios, 1) if ios else None
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--iodepth", type=int, default=1)
    ap.add_argument("--probe", action="append", help="probes to measure, each alone (default: block_io, "
                                                     "process_io)")
    ap.add_argument("--compare", help="git revision whose bpf/block_io/block_io.bpf.c to measure too")
    args = ap.parse_args()

    from bcc import BPF

    import importlib

    from sonde.ingest import config
    from sonde.ingest.runtime.probe import LoadedProbe

    cfg = config.parse("state_dir: /tmp/sonde-bench-block-cost\n")
    previous = STATS.read_text().strip()
    STATS.write_text("1")
    results = {}
    try:
        with tempfile.TemporaryDirectory(prefix="sonde-blockcost-") as tmp:
            img = Path(tmp) / "disk.img"
            subprocess.run(["dd", "if=/dev/urandom", f"of={img}", "bs=1M", "count=256"], check=True,
                           capture_output=True)
            dev = subprocess.run(["losetup", "-f", "--show", str(img)], capture_output=True, text=True,
                                 check=True).stdout.strip()
            try:
                fio(dev, 2, args.iodepth)  # warm the page cache
                for name in args.probe or ["block_io", "process_io"]:
                    probe = LoadedProbe.load(importlib.import_module(f"sonde.bpf.{name}.probe").PROBE, cfg)
                    try:
                        results[name] = measure(probe.bpf.funcs, dev, args.duration, args.iodepth)
                    finally:
                        probe.close()
                empty = BPF(text="RAW_TRACEPOINT_PROBE(block_rq_complete) { return 0; }")
                try:
                    results["empty_raw_tracepoint"] = measure(empty.funcs, dev, args.duration, args.iodepth)
                finally:
                    empty.cleanup()
                # one helper call and nothing else: what block_io's clock read costs here
                clock = BPF(text="RAW_TRACEPOINT_PROBE(block_rq_complete) { return bpf_ktime_get_ns() == 7; }")
                try:
                    results["clock_only_raw_tracepoint"] = measure(clock.funcs, dev, args.duration, args.iodepth)
                finally:
                    clock.cleanup()
                if args.compare:
                    src = subprocess.run(["git", "-C", str(REPO), "show", f"{args.compare}:bpf/block_io/block_io.bpf.c"],
                                         capture_output=True, text=True, check=True).stdout
                    old = BPF(text=src, cflags=[f"-I{REPO / 'bpf'}", "-DMAX_ENTRIES=10240"])
                    try:
                        results[f"block_io@{args.compare}"] = measure(old.funcs, dev, args.duration, args.iodepth)
                    finally:
                        old.cleanup()
            finally:
                subprocess.run(["losetup", "-d", dev], check=False)
    finally:
        STATS.write_text(previous)
    print(json.dumps({"what": f"fio randread 4k direct, iodepth {args.iodepth}, {args.duration} s, page-cached "
                              f"loop device; BPF program time per completed I/O (kernel.bpf_stats_enabled)",
                      "kernel": os.uname().release, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
