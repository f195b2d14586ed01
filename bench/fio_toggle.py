#!/usr/bin/env python3
"""block_io's cost on fio, with the arms one second apart: the program attached or not.

    .venv/bin/python bench/fio_toggle.py [--pairs 300] [--window 1] [--seed N] [--out FILE]

`fio_ab.py` starts a whole agent per arm and compares 10 s fio runs ~20 s apart; on
this machine single pairs then differ by ±5 %, five times the 1 % bar. What block_io
costs fio is its program on block_rq_complete (one run per I/O) and its poll, so here
the probe is loaded once, by the agent's own code (`LoadedProbe.load`), and the arms
differ only in whether that program is attached:

- one fio run (4k random direct reads, psync, one job, on a page-cached loop device,
  as fio_ab.py) lasts the whole benchmark;
- `--pairs` pairs of `--window`-second windows, arm order shuffled per pair
  (balanced, seeded); each window's I/Os are the loop device's completed I/Os from
  /proc/diskstats (the kernel's own count);
- agent (A): the raw tracepoint attached, and the probe polled every `--interval`
  (10) s of attached time in this process as the agent would (its CPU is measured:
  `poll_cpu_pct_of_machine`); baseline (B): detached.

bpf_stats are off in the pairs (their two clock reads per run are not the program's
cost in production, where they are off by default) and on in a pass of attached
windows after them, which gives the program's runs and time per I/O.

Result: bench/results/block_io_toggle.json (or --out). Needs root and fio.
"""
from __future__ import annotations

import argparse
import datetime as dt
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
import ab  # noqa: E402
from block_io_cost import completed  # noqa: E402  (I/Os the device completed, /proc/diskstats)
import stats as bstats  # noqa: E402

from sonde.bpf.block_io.probe import PROBE  # noqa: E402
from sonde.ingest import config as config_mod  # noqa: E402
from sonde.ingest.runtime import bpfinfo  # noqa: E402
from sonde.ingest.runtime.probe import LoadedProbe  # noqa: E402



class EmptyToggle:
    """An empty BTF-typed program on the same tracepoint, toggled the same way: what
    the hook's dispatch alone costs fio (`--empty`)."""

    def __init__(self, interval: float):
        from bcc import BPF
        from sonde.ingest.runtime import btf, btf_tracepoint
        self.bpf = BPF(text=b"int tpbtf_empty(u64 *ctx) { return 0; }")
        btf_tracepoint.attach(self.bpf, b"tpbtf_empty", "block_rq_complete", btf.load("/sys"))
        self.bpf.detach_raw_tracepoint(tp=b"block_rq_complete")
        self.poller = ab.AttachedPoller(None, interval)

    def attach(self) -> None:
        from sonde.ingest.runtime import btf_tracepoint
        btf_tracepoint.reattach(self.bpf, b"tpbtf_empty", "block_rq_complete")
        self.poller.start()

    def detach(self) -> None:
        self.bpf.detach_raw_tracepoint(tp=b"block_rq_complete")
        self.poller.stop()

    def prog_stats(self) -> tuple[int, int]:
        return bpfinfo.run_stats(self.bpf.funcs[b"tpbtf_empty"].fd)

    def close(self) -> None:
        self.bpf.cleanup()


class Toggle:
    """block_io loaded once; its program attached in agent windows only, polled every
    `interval` seconds of attached time."""

    def __init__(self, interval: float):
        cfg = config_mod.Config(probes={"block_io": config_mod.ProbeConfig(enabled=True)})
        self.loaded = LoadedProbe.load(PROBE, cfg)
        self.loaded.decoder.detach()  # LoadedProbe.load attached it
        self.poller = ab.AttachedPoller(self.loaded, interval)

    def attach(self) -> None:
        self.loaded.decoder.attach()
        self.poller.start()

    def detach(self) -> None:
        self.loaded.decoder.detach()
        self.poller.stop()

    def prog_stats(self) -> tuple[int, int]:
        return bpfinfo.run_stats(self.loaded.bpf.funcs[self.loaded.decoder.program].fd)

    def close(self) -> None:
        self.loaded.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=300)
    ap.add_argument("--window", type=float, default=1.0)
    ap.add_argument("--interval", type=float, default=10.0, help="poll every N s attached (default 10)")
    ap.add_argument("--stats-windows", type=int, default=10)
    ap.add_argument("--empty", action="store_true",
                    help="toggle an empty BTF-typed program instead of block_io (the hook's own cost)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--out", type=Path, default=ab.RESULTS_DIR / "block_io_toggle.json")
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else secrets.randbelow(2 ** 31)
    orders = ab.pair_orders(args.pairs, "random", seed)
    tmp = Path(tempfile.mkdtemp(prefix="sonde-fio-toggle-"))
    img = tmp / "disk.img"
    subprocess.run(["dd", "if=/dev/urandom", f"of={img}", "bs=1M", "count=256"], check=True, capture_output=True)
    dev = subprocess.run(["losetup", "-f", "--show", str(img)], capture_output=True, text=True,
                         check=True).stdout.strip()
    toggle = fio = None
    try:
        subprocess.run(["dd", f"if={dev}", "of=/dev/null", "bs=1M"], check=True, capture_output=True)
        toggle = EmptyToggle(args.interval) if args.empty else Toggle(args.interval)
        seconds = int(args.window * (2 * args.pairs + args.stats_windows) * 1.5 + 60)
        fio = subprocess.Popen(["fio", "--name=randread", f"--filename={dev}", "--rw=randread", "--bs=4k",
                                "--direct=1", "--ioengine=psync", "--numjobs=1", "--time_based",
                                f"--runtime={seconds}", "--output=/dev/null"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)
        time.sleep(3)

        def check() -> None:
            if fio.poll() is not None:
                raise ab.BenchError(f"fio exited early ({fio.returncode})")

        win = ab.ToggleWindows(lambda: completed(dev), args.window, toggle, check)
        iops, cpu_io = win.rate, win.cpu
        ab.run_toggled(orders, toggle, win, args.stats_windows)
    finally:
        ab.stop_proc(fio, what="fio")
        if toggle:
            toggle.close()
        subprocess.run(["losetup", "-d", dev], check=False)
        img.unlink(missing_ok=True)
    res = bstats.loss(iops["baseline"], iops["agent"])
    cpu = bstats.loss(cpu_io["baseline"], cpu_io["agent"], higher_is_better=False)
    result = {
        "name": args.out.stem,
        "command": ab.the_command(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "runs": args.pairs,
        "unit": "IOPS",
        "mode": "toggle",
        "what": ("fio randread 4k direct, psync, 1 job, on a page-cached loop device, one run for the whole "
                 "benchmark; " + ("an empty BTF-typed program on block_rq_complete" if args.empty else
                                  "block_io loaded once, its program") + " attached (and the probe polled every "
                 f"{args.interval:g} s attached) in agent windows only; {args.pairs} pairs of {args.window:g} s "
                 f"windows, arm order shuffled (balanced, seeded); I/Os per window from /proc/diskstats; "
                 f"loss = 1 - the median of per-pair IOPS ratios"),
        "cpu_per_io_increase_pct": cpu["loss_pct"],
        "cpu_per_io_increase_pct_ci95": cpu["loss_pct_ci95"],
        **ab.toggle_record(res, orders, seed, iops),
        **ab.toggle_costs(win, toggle.poller, "io", args.stats_windows),
        "program": "tpbtf_empty" if args.empty else toggle.loaded.decoder.program.decode(),
    }
    ab.write_result(args.out, result)
    ab.log(f"loss {result['loss_pct']} % {result['loss_pct_ci95']}, BPF {result['bpf_ns_per_io']} ns per I/O; "
           f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
