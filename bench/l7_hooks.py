"""What a syscall costs a process that is NOT opted in, with each way the L7 capture
could hook syscalls: the choice behind bpf/l7/ (raw sys_enter/sys_exit, attached only
while something is opted in).

A C loop makes N one-byte read()s of /dev/zero (a syscall the capture wants) and N
getppid()s (one it does not); each arm runs it:

- `no_bpf`: nothing attached;
- `regular_read`: empty programs on syscalls:sys_enter_read and sys_exit_read (what
  per-syscall regular tracepoints cost the read; getppid pays nothing there);
- `raw_empty`: empty programs on raw sys_enter and sys_exit (the floor of the raw
  design: every syscall of every process pays it);
- `l7_idle`: probe l7 loaded with an idle process of ours opted in (so its hooks are
  attached) and the loop not opted in: what every other process pays;
- `l7_detached`: probe l7 loaded with nothing opted in (hooks detached).

Rounds run every arm once in a shuffled order; reported: median ns per syscall per arm
and the added ns over no_bpf with a bootstrap interval (bench/stats.py), and the
kernel's run count and run time of the programs (bpf_stats).

  .venv/bin/python bench/l7_hooks.py [--rounds 7] [--iters 2000000] [--out bench/results/l7_hooks.json]

A microbenchmark: run it on a quiet machine (bench/README.md).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
import stats as bstats  # noqa: E402

LOOP_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1e9 + t.tv_nsec; }
int main(int argc, char **argv) {
  long n = atol(argv[1]);
  int fd = open("/dev/zero", O_RDONLY);
  char c;
  double t0 = now();
  for (long i = 0; i < n; i++) if (read(fd, &c, 1) != 1) return 1;
  double t1 = now();
  for (long i = 0; i < n; i++) getppid();
  double t2 = now();
  printf("%.2f %.2f\n", (t1 - t0) / n, (t2 - t1) / n);
  return 0;
}
"""
EMPTY_REGULAR = ("TRACEPOINT_PROBE(syscalls, sys_enter_read) { return 0; }\n"
                 "TRACEPOINT_PROBE(syscalls, sys_exit_read) { return 0; }\n")
EMPTY_RAW = ("RAW_TRACEPOINT_PROBE(sys_enter) { return 0; }\n"
             "RAW_TRACEPOINT_PROBE(sys_exit) { return 0; }\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=2_000_000)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/l7_hooks.json")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("l7_hooks: must run as root", file=sys.stderr)
        return 1
    from bcc import BPF

    from sonde.ingest import config
    from sonde.ingest.runtime import bpfinfo
    from sonde.ingest.runtime.probe import LoadedProbe, discover

    seed = args.seed if args.seed is not None else secrets.randbelow(2 ** 31)
    rng = random.Random(seed)
    started = dt.datetime.now(dt.timezone.utc)
    stats_fd = bpfinfo.enable_stats()
    idle = subprocess.Popen(["sleep", "3600"])  # the opted-in process of arm l7_idle
    results: dict[str, dict[str, list[float]]] = {}
    bpf: dict[str, list[dict]] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            loop = Path(tmp) / "loop"
            (Path(tmp) / "loop.c").write_text(LOOP_C)
            subprocess.run(["gcc", "-O2", "-o", str(loop), str(Path(tmp) / "loop.c")], check=True)
            state = Path(tmp) / "state"

            def l7(opt_in: bool):
                text = f"state_dir: {state}\nprobes:\n  l7:\n    enabled: true\n"
                text += f"    processes: [sleep]\n" if opt_in else "    ports: [1]\n"
                p = LoadedProbe.load(discover()["l7"], config.parse(text))
                if opt_in and not p.decoder.attached:
                    p.close()
                    raise RuntimeError("l7_idle: the hooks did not attach (no sleep process opted in)")
                return p

            arms = {
                "no_bpf": None,
                "regular_read": lambda: BPF(text=EMPTY_REGULAR),
                "raw_empty": lambda: BPF(text=EMPTY_RAW),
                "l7_idle": lambda: l7(True),
                "l7_detached": lambda: l7(False),
            }
            for name in arms:
                results[name] = {"read_ns": [], "getppid_ns": []}
                bpf[name] = []
            orders = []
            for r in range(args.rounds):
                order = list(arms)
                rng.shuffle(order)
                orders.append(order)
                for name in order:
                    obj = arms[name]() if arms[name] else None
                    try:
                        time.sleep(0.2)
                        before = bpfinfo.all_run_stats()
                        out = subprocess.run([str(loop), str(args.iters)], capture_output=True, text=True,
                                             check=True).stdout.split()
                        after = bpfinfo.all_run_stats()
                    finally:
                        if obj is not None:
                            (obj.close if hasattr(obj, "close") else obj.cleanup)()
                    results[name]["read_ns"].append(float(out[0]))
                    results[name]["getppid_ns"].append(float(out[1]))
                    runs = {}
                    for pid, (pname, cnt, t) in after.items():
                        _, c0, t0 = before.get(pid, (pname, 0, 0))
                        if cnt > c0:
                            runs[pname] = [cnt - c0, t - t0]
                    bpf[name].append(runs)
                    print(f"round {r + 1} {name}: read {out[0]} ns, getppid {out[1]} ns", file=sys.stderr)
    finally:
        idle.kill()
        idle.wait()
        if stats_fd >= 0:
            os.close(stats_fd)

    summary = {}
    for kind in ("read_ns", "getppid_ns"):
        base = results["no_bpf"][kind]
        summary[kind] = {}
        for name in results:
            vals = results[name][kind]
            entry = {"median": round(statistics.median(vals), 2)}
            if name != "no_bpf":
                diffs = [v - b for v, b in zip(vals, base)]
                lo, hi = bstats.bootstrap_median_ci(diffs)
                entry |= {"added": round(statistics.median(diffs), 2), "added_ci95": [round(lo, 2), round(hi, 2)]}
            summary[kind][name] = entry
    result = {
        "name": "l7_hooks",
        "what": ("ns per syscall of a process not opted in (2 x --iters one-byte reads of /dev/zero, then getppid "
                 "calls) with each hook design attached; medians over rounds, added ns over no_bpf with a "
                 "bootstrap interval; BPF runs and run time per arm from bpf_stats"),
        "command": " ".join([".venv/bin/python", "bench/l7_hooks.py", *sys.argv[1:]]),
        "date": started.replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        "runs": args.rounds, "iters": args.iters, "seed": seed, "orders": orders,
        "unit": "ns/syscall", "summary": summary, "raw": results, "bpf_by_arm": bpf,
        "kernel": os.uname().release, "cpus": os.cpu_count(),
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
