#!/usr/bin/env python3
"""A/B cost of the CPU profiler on nginx under wrk, with the arms a few seconds apart.

    .venv/bin/python bench/profile_ab.py --name profile_host_49hz --mode host --hz 49
    .venv/bin/python bench/profile_ab.py --name profile_nginx_99hz --mode process --hz 99

`ab.py` starts and stops a whole agent per arm, so its arms are ~20 s apart and this
machine's drift between them (baselines from 110k to 131k req/s in one run) is ten
times the 1-2 % bars. The profiler's cost is its perf event and the program it runs
per sample, so here the program is loaded once, by the agent's own code
(`LoadedProbe.load`), and the arms differ only in whether its CPU-clock event is
attached: `--pairs` pairs of `--window`-second wrk runs, arm order shuffled per pair
(balanced, seeded), attach/detach between runs. The rest of what it costs is counted
where it runs:

- `--mode host`: the agent's continuous profiling, every CPU at `--hz` (49), no
  filter; while the event is attached the probe is polled every `--interval` (10) s of
  attached time, in this process as the agent would (reading, clearing, symbolising
  the top stacks). That poll's CPU is measured (`poll_cpu_pct_of_machine`) and is
  inside the agent arm's windows. Two polls before the pairs fill the symbol caches
  (`warmup_poll_cpu_s`: the first poll reads every busy binary's symbols once), so the
  pairs measure an agent that has been running.
- `--mode process`: `sonde profile --process nginx` at `--hz` (99): the filter holds
  nginx's pids; the stacks are taken every second into a session as `sonde profile`
  does (symbolising is at the end, after the run, outside every window).

Result: bench/results/<name>.json with the keys every bench result has, the loss from
the arms' medians and the 95 % bootstrap interval of the median per-pair ratio, the
samples taken, and the program's run count and time per sample (bpf_stats).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
import ab  # noqa: E402  (nginx, wrk and the machine's counters, shared with ab.py)
import stats as bstats  # noqa: E402

from sonde.bpf.profile.probe import PROBE, StackSampler, Symbolizer  # noqa: E402
from sonde.ingest import config as config_mod  # noqa: E402
from sonde.ingest.analysis import profiling  # noqa: E402
from sonde.ingest.runtime import bpfinfo  # noqa: E402
from sonde.ingest.runtime.probe import LoadedProbe  # noqa: E402


class Toggle:
    """The profile probe loaded once; its CPU-clock event attached only in agent arms."""

    def __init__(self, mode: str, hz: int, interval: float, nginx_pids: list[int]):
        from bcc import PerfSWConfig, PerfType
        self._ev = dict(ev_type=PerfType.SOFTWARE, ev_config=PerfSWConfig.CPU_CLOCK)
        self.mode, self.hz, self.interval = mode, hz, interval
        self.poll_cpu_s = 0.0
        self.polls = 0
        self.attached_s = 0.0
        if mode == "host":
            cfg = config_mod.Config(probes={"profile": config_mod.ProbeConfig(enabled=True)})
            spec = dataclasses.replace(PROBE, cpu_clock={"on_cpu_sample": hz})
            self.loaded = LoadedProbe.load(spec, cfg)
            self.sampler = None
        else:
            cfg = config_mod.Config(probes={"profile": config_mod.ProbeConfig(enabled=True)})
            spec = dataclasses.replace(PROBE, hooks=(), cpu_clock={"on_cpu_sample": hz}, decoder=None,
                                       cflags=lambda _sys: ["-DSONDE_FILTER"])
            self.loaded = LoadedProbe.load(spec, cfg)
            self.sampler = StackSampler(self.loaded.bpf)
            self.sampler.set_filter(nginx_pids)
            self.session = profiling._Session(Path("/proc"), Symbolizer(Path("/proc")))
        self.loaded.bpf.detach_perf_event(**self._ev)  # LoadedProbe.load attached it
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.samples = 0
        self._due = 0.0

    def _work(self) -> None:
        """What runs beside the attached event: the agent's poll (host) or sonde
        profile's once-a-second take (process), timed in this thread's CPU."""
        every = self.interval if self.mode == "host" else profiling.POLL_SECONDS
        last = time.monotonic()
        while not self._stop.wait(0.05):
            now = time.monotonic()
            self._due += now - last   # attached time since the last poll, across agent runs
            last = now
            if self._due < every:
                continue
            self._due = 0.0
            c0 = time.thread_time()
            if self.mode == "host":
                points, _ = self.loaded.poll(time.time_ns())
                self.samples += sum(int(p.fields.get("samples", 0)) for p in points
                                    if p.measurement == "profile_samples")
            else:
                taken = self.sampler.take()
                self.session.add(taken.on_cpu, self.session.on, lambda r: r.count)
                self.samples += sum(r.count for r in taken.on_cpu)
            self.poll_cpu_s += time.thread_time() - c0
            self.polls += 1

    def warm(self, polls: int = 2, seconds: float = 3.0) -> float:
        """Host mode: attach and poll a few times before the pairs, not recorded. The first
        polls read every busy binary's symbols and the kernel's (seconds of CPU once, in
        an agent that then runs for days); the pairs measure the steady state. Returns
        the CPU those polls took."""
        if self.mode != "host":
            return 0.0
        self.loaded.bpf.attach_perf_event(fn_name=b"on_cpu_sample", sample_freq=self.hz, cpu=-1, **self._ev)
        c0 = time.thread_time()
        try:
            for _ in range(polls):
                time.sleep(seconds)
                self.loaded.poll(time.time_ns())
        finally:
            self.loaded.bpf.detach_perf_event(**self._ev)
        return time.thread_time() - c0

    def attach(self) -> None:
        self.loaded.bpf.attach_perf_event(fn_name=b"on_cpu_sample", sample_freq=self.hz, cpu=-1, **self._ev)
        self._t0 = time.monotonic()
        self._stop.clear()
        self._thread = threading.Thread(target=self._work, daemon=True)
        self._thread.start()

    def detach(self) -> None:
        self.loaded.bpf.detach_perf_event(**self._ev)
        self.attached_s += time.monotonic() - self._t0
        self._stop.set()
        self._thread.join()

    def close(self) -> None:
        self.loaded.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("--mode", choices=("host", "process"), required=True)
    ap.add_argument("--hz", type=int, default=49)
    ap.add_argument("--pairs", type=int, default=40)
    ap.add_argument("--window", type=float, default=3.0, help="seconds of wrk per run (default 3)")
    ap.add_argument("--interval", type=float, default=10.0, help="host mode: poll every N s attached (default 10)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 30)
    orders = ab.pair_orders(args.pairs, "random", seed)
    out = args.out or (ab.RESULTS_DIR / f"{args.name}.json")
    stats_fd = bpfinfo.enable_stats()
    tmp = Path(tempfile.mkdtemp(prefix="sonde-profile-ab-"))
    nginx = ab.Nginx(tmp).start()
    toggle = None
    runs = {"baseline": [], "agent": []}
    bpf_runs = bpf_ns = 0
    try:
        workers = ab.children_of(nginx.proc.pid)
        toggle = Toggle(args.mode, args.hz, args.interval, [nginx.proc.pid, *workers])
        wrk = ["wrk", "-t2", "-c50", f"-d{args.window:g}s", nginx.url]
        # warm-up, not recorded: under load, the symbol caches filled as in an agent that has run a while
        busy = subprocess.Popen(["wrk", "-t2", "-c50", "-d8s", nginx.url], stdout=subprocess.DEVNULL)
        try:
            warm_cpu = toggle.warm()
        finally:
            busy.wait()
        ab.run_wrk(wrk, args.window)
        for i, order in enumerate(orders):
            for arm in order:
                name = "agent" if arm == "A" else "baseline"
                if arm == "A":
                    toggle.attach()
                try:
                    rps, st, _ = ab.run_wrk(wrk, args.window, nginx_pid=nginx.proc.pid, bpf=stats_fd >= 0)
                finally:
                    if arm == "A":
                        toggle.detach()
                runs[name].append(rps)
                if arm == "A" and "bpf" in st:
                    mine = {k: v for k, v in st["bpf"]["by_program"].items() if "on_cpu_sample" in k}
                    bpf_runs += sum(v[0] for v in mine.values())
                    bpf_ns += sum(v[1] for v in mine.values())
                ab.log(f"pair {i + 1}/{len(orders)} {name:8s}: {rps:9.0f} req/s, "
                       f"busy {st['system']['busy_cpu_pct']} %, other {st['system']['other_cpu_pct']} %")
    finally:
        if toggle:
            toggle.close()
        nginx.stop()
    res = bstats.loss(runs["baseline"], runs["agent"])
    pair_loss = (1 - res["pair_ratio_median"]) * 100
    ncpu = len(ab.os.sched_getaffinity(0))
    result = {
        "name": args.name,
        "command": ab.the_command(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "runs": args.pairs,
        "unit": "req/s",
        "mode": f"profile_{args.mode}",
        "what": (f"nginx (2 workers) saturated by wrk -t2 -c50 on the same {ncpu} cores, {args.window:g} s per run; "
                 f"{'continuous host-wide profiling (the agent probe, polled every %g s attached)' % args.interval if args.mode == 'host' else 'sonde profile --process nginx (filter on its pids, stacks taken every second)'}"
                 f" at {args.hz} Hz: the program loaded once, its CPU-clock event attached in agent runs only; "
                 f"{args.pairs} pairs, arm order shuffled (balanced, seeded); loss = drop in req/s"),
        "baseline_median": round(ab.statistics.median(runs["baseline"]), 2),
        "agent_median": round(ab.statistics.median(runs["agent"]), 2),
        "loss_pct": round(res["loss_pct"], 2),
        "loss_pct_ci95": [round(x, 2) for x in res["loss_pct_ci95"]],
        "pair_median_loss_pct": round(pair_loss, 2),
        "pair_ratios": [round(x, 5) for x in res["pair_ratios"]],
        "order": "".join(orders),
        "order_seed": seed,
        "baseline_runs": runs["baseline"],
        "agent_runs": runs["agent"],
        "samples": toggle.samples,
        "attached_seconds": round(toggle.attached_s, 2),
        "samples_per_second": round(toggle.samples / toggle.attached_s, 1) if toggle.attached_s else None,
        "bpf_runs_per_sample": round(bpf_runs / toggle.samples, 3) if toggle.samples else None,
        "bpf_ns_per_run": round(bpf_ns / bpf_runs, 1) if bpf_runs else None,
        "polls": toggle.polls,
        "warmup_poll_cpu_s": round(warm_cpu, 3),
        "poll_cpu_pct_of_machine": round(toggle.poll_cpu_s / toggle.attached_s / ncpu * 100, 3)
        if toggle.attached_s else None,
        "agent_source": ab.source_description(),
        "rusage_self_cpu_s": round(resource.getrusage(resource.RUSAGE_SELF).ru_utime, 2),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    ab.log(f"loss {result['loss_pct']} % (95 % interval {result['loss_pct_ci95']}), "
           f"{result['samples_per_second']} samples/s, {result['bpf_ns_per_run']} ns per program run; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
