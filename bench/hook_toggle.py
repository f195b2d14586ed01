#!/usr/bin/env python3
"""A probe's kernel hooks on nginx under wrk, with the arms one second apart: attached
or not.

    .venv/bin/python bench/hook_toggle.py --what tcp [--pairs 300] [--window 1] [--out FILE]
    .venv/bin/python bench/hook_toggle.py --what tcp-empty
    .venv/bin/python bench/hook_toggle.py --what l7-redis --keepalive
    .venv/bin/python bench/hook_toggle.py --what l7-nginx --keepalive
    .venv/bin/python bench/hook_toggle.py --what syscalls-empty --keepalive
    .venv/bin/python bench/hook_toggle.py --what sockets-empty --keepalive
    .venv/bin/python bench/hook_toggle.py --what cgroup-skb-http --keepalive

`resident_ab.py` stops the agent's process in baseline windows but leaves its BPF
programs attached, so its A/B difference is the agent's user-space work, and the
programs are counted from bpf_stats' run time, which leaves out the kernel's dispatch
of each run. Here the probe is loaded once, by the agent's own code
(`LoadedProbe.load`), and the arms differ only in whether its hooks are attached:

- nginx (2 workers) and one wrk run (-t2 -c50; by default `Connection: close`, so
  nginx closes every connection after its response; `--keepalive` keeps them) last
  the whole benchmark;
- `--pairs` pairs of `--window`-second windows, arm order shuffled per pair (balanced,
  seeded); each window's requests from nginx's stub_status counter;
- agent (A): the hooks attached, and the probe polled every `--interval` (10) s of
  attached time in this process as the agent would (its CPU is measured); baseline
  (B): detached.

What is toggled (`--what`):
- `tcp`: the tcp probe's four cgroup programs (sock_ops, connect4/6, sock_release),
  which run ~20 times per connection;
- `tcp-empty`: the least any design that counts closes from the kernel's final
  counters needs: a sock_ops program that only turns the state callback on for each
  connection (so it runs at every state change), and empty connect and release
  programs: the floor of the hooks themselves;
- `l7-redis`: the l7 probe with an idle redis-server opted in (by name) and nginx
  and wrk not: its capture hooks (`--hooks`, as `probes.l7.hooks`: by default the
  socket tracepoints sock_send_length/sock_recv_length plus inet_sock_set_state,
  which only socket I/O and TCP state changes run; `syscalls`: raw
  sys_enter/sys_exit, which every syscall on the host runs), which let a process
  that is not opted in go at their first test;
- `l7-nginx`: the l7 probe with nginx opted in (by name), wrk not: nginx's keep-alive
  requests counted in the kernel (probes.l7.in_kernel). Each attach starts from an
  empty connection map, as the agent's does;
- `syscalls-empty`: empty programs on raw sys_enter/sys_exit: the floor of any
  capture on syscall tracepoints;
- `sockets-empty`: empty programs on the three socket tracepoints: the floor of the
  socket capture;
- `cgroup-skb-http`: a design study (bench/src/cgroup_skb_http.c), not the probe:
  nginx's requests counted from cgroup_skb ingress/egress programs attached to a
  cgroup of nginx's own (nginx is started in it), which only its packets run.

bpf_stats are off in the pairs and on in a pass of attached windows after them: the
programs' runs and time per request. Result: bench/results/<what>_toggle.json (or
--out). Needs root, nginx and wrk (and redis-server for l7-redis).
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
import ab  # noqa: E402
import stats as bstats  # noqa: E402

from sonde.ingest.runtime import bpfinfo  # noqa: E402

EMPTY = rb"""
int empty_sockops(struct bpf_sock_ops *s)
{
    if (s->op == BPF_SOCK_OPS_TCP_CONNECT_CB || s->op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
        bpf_sock_ops_cb_flags_set(s, s->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
    return 1;
}
int empty_connect4(struct bpf_sock_addr *ctx) { return 1; }
int empty_connect6(struct bpf_sock_addr *ctx) { return 1; }
int empty_release(struct bpf_sock *sk) { return 1; }
"""


HOOKS = {
    "tcp": "the tcp probe loaded once, its four cgroup programs",
    "tcp-empty": "the least cgroup programs a close-counting design needs (sock_ops turning the state callback "
                 "on, empty connect and release)",
    "l7-redis": "the l7 probe loaded once with an idle redis-server opted in (nginx and wrk not), its capture "
                "hooks",
    "l7-nginx": "the l7 probe loaded once with nginx opted in (wrk not), its capture hooks (requests counted in "
                "the kernel)",
    "syscalls-empty": "empty programs on the raw sys_enter/sys_exit tracepoints",
    "sockets-empty": "empty programs on the sock_send_length, sock_recv_length and inet_sock_set_state raw "
                     "tracepoints",
    "cgroup-skb-http": "a design study (bench/src/cgroup_skb_http.c): cgroup_skb ingress and egress programs on "
                       "nginx's own cgroup counting its requests (socket storage, 16 payload bytes, a per-CPU "
                       "aggregate)",
}


SKB_SRC = BENCH_DIR / "src/cgroup_skb_http.c"


class Cgroup:
    """A cgroup v2 of the benchmark's own (nginx starts in it), removed at the end."""

    def __init__(self):
        from sonde.bpf.tcp.probe import cgroup2_root
        self.path = Path(cgroup2_root("/sys")) / f"sonde-bench-{os.getpid()}"
        self.path.mkdir()

    def close(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


class Redis:
    """An idle redis-server of the benchmark's own, to be opted in."""

    def __init__(self, root: Path):
        self.port = ab.free_port()
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(root), "--daemonize", "no",
                                      "--logfile", str(root / "redis.log")], stdin=subprocess.DEVNULL)
        time.sleep(1)

    def stop(self) -> None:
        ab.stop_proc(self.proc, signal.SIGTERM, timeout=10, what="redis-server")


class Programs:
    """A probe's hooks attached in agent windows only."""

    def __init__(self, what: str, interval: float, hooks: str = "auto", cgroup: Cgroup | None = None,
                 src: Path | None = None):
        from bcc import BPF, BPFAttachType
        self.loaded = None
        self.on = True  # LoadedProbe.load attaches; the empty programs are attached below
        self.raw: list[tuple[str, str]] = []  # raw tracepoints (l7) instead of cgroup programs
        if what in ("syscalls-empty", "sockets-empty"):
            self.bpf = BPF(text=b"int empty_enter(void *ctx) { return 0; }\nint empty_exit(void *ctx) { return 0; }\n"
                                b"int empty_state(void *ctx) { return 0; }")
            self.raw = [("sys_enter", "empty_enter"), ("sys_exit", "empty_exit")] if what == "syscalls-empty" else \
                [("sock_send_length", "empty_enter"), ("sock_recv_length", "empty_exit"),
                 ("inet_sock_set_state", "empty_state")]
            for tp, fn in self.raw:
                self.bpf.attach_raw_tracepoint(tp=tp.encode(), fn_name=fn.encode())
            self.progs = [(self.bpf.funcs[fn.encode()], None, None) for _, fn in self.raw]
        elif what in ("l7-redis", "l7-nginx"):
            from sonde.bpf.l7.probe import PROBE
            from sonde.ingest import config as config_mod
            from sonde.ingest.runtime.probe import LoadedProbe
            name = "redis-server" if what == "l7-redis" else "nginx"
            cfg = config_mod.Config.model_validate({"probes": {"l7": {
                "enabled": True, "processes": [name], "hooks": hooks}}})
            self.loaded = LoadedProbe.load(PROBE, cfg)
            self.bpf = self.loaded.bpf
            if not self.loaded.decoder.opted:
                raise ab.BenchError(f"l7 opted no {name} in")
            self.raw = list(self.loaded.decoder.hooks)
            self.progs = [(self.bpf.funcs[fn.encode()], None, None) for _, fn in self.raw]
        elif what == "cgroup-skb-http":
            self.bpf = BPF(src_file=str(src or SKB_SRC).encode())
            self.cgroup_fd = os.open(cgroup.path, os.O_RDONLY)
            self.progs = []
            for fn, atype in (("http_ingress", BPFAttachType.CGROUP_INET_INGRESS),
                              ("http_egress", BPFAttachType.CGROUP_INET_EGRESS)):
                f = self.bpf.load_func(fn.encode(), BPF.CGROUP_SKB)
                self.progs.append((f, self.cgroup_fd, atype))
                BPF.attach_func(f, self.cgroup_fd, atype, 2)
        elif what == "tcp-empty":
            self.bpf = BPF(text=EMPTY)
            from sonde.bpf.tcp.probe import cgroup2_root
            self.cgroup_fd = os.open(cgroup2_root("/sys"), os.O_RDONLY)
            self.progs = []
            for fn, ptype, atype in (("empty_sockops", BPF.SOCK_OPS, BPFAttachType.CGROUP_SOCK_OPS),
                                     ("empty_connect4", BPF.CGROUP_SOCK_ADDR, BPFAttachType.CGROUP_INET4_CONNECT),
                                     ("empty_connect6", BPF.CGROUP_SOCK_ADDR, BPFAttachType.CGROUP_INET6_CONNECT),
                                     ("empty_release", BPF.CGROUP_SOCK, BPFAttachType.CGROUP_INET_SOCK_RELEASE)):
                f = self.bpf.load_func(fn.encode(), ptype) if ptype == BPF.SOCK_OPS else \
                    self.bpf.load_func(fn.encode(), ptype, attach_type=atype)
                self.progs.append((f, self.cgroup_fd, atype))
                BPF.attach_func(f, self.cgroup_fd, atype, 2)
        else:
            from sonde.bpf.tcp.probe import PROBE
            from sonde.ingest import config as config_mod
            from sonde.ingest.runtime.probe import LoadedProbe
            cfg = config_mod.Config(probes={"tcp": config_mod.ProbeConfig(enabled=True)})
            self.loaded = LoadedProbe.load(PROBE, cfg)
            self.bpf = self.loaded.bpf
            self.progs = list(self.loaded.decoder._attached)
        self.poller = ab.AttachedPoller(self.loaded, interval)
        self.detach()

    def attach(self) -> None:
        from bcc import BPF
        self.on = True
        if self.loaded is not None and self.raw:
            self.loaded.decoder.kconns.clear()  # as the decoder does at each attach
        for tp, fn in self.raw:
            self.bpf.attach_raw_tracepoint(tp=tp.encode(), fn_name=fn.encode())
        for f, cg, atype in self.progs if not self.raw else ():
            BPF.attach_func(f, cg, atype, 2)  # BPF_F_ALLOW_MULTI, as the probe does
        self.poller.start()

    def detach(self) -> None:
        from bcc import BPF
        if not self.on:
            return
        self.on = False
        for tp, _ in self.raw:
            if tp.encode() in self.bpf.raw_tracepoint_fds:
                self.bpf.detach_raw_tracepoint(tp=tp.encode())
        for f, cg, atype in self.progs if not self.raw else ():
            BPF.detach_func(f, cg, atype)
        self.poller.stop()

    def prog_stats(self) -> tuple[int, int]:
        runs = [bpfinfo.run_stats(f.fd) for f, _, _ in self.progs]
        return sum(r for r, _ in runs), sum(n for _, n in runs)

    def close(self) -> None:
        if self.loaded is not None:
            for tp, fn in self.raw:  # as the decoder left them: it detaches them itself
                if tp.encode() not in self.bpf.raw_tracepoint_fds:
                    self.bpf.attach_raw_tracepoint(tp=tp.encode(), fn_name=fn.encode())
            self.loaded.close()
        else:
            self.bpf.cleanup()
            if getattr(self, "cgroup_fd", None) is not None:
                os.close(self.cgroup_fd)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=300)
    ap.add_argument("--window", type=float, default=1.0)
    ap.add_argument("--interval", type=float, default=10.0, help="poll every N s attached (default 10)")
    ap.add_argument("--stats-windows", type=int, default=10)
    ap.add_argument("--keepalive", action="store_true", help="keep-alive connections instead of one per request")
    ap.add_argument("--what", choices=tuple(HOOKS), default="tcp")
    ap.add_argument("--hooks", choices=("auto", "sockets", "syscalls"), default="auto",
                    help="l7-redis, l7-nginx: probes.l7.hooks (auto: the socket tracepoints where the kernel has them)")
    ap.add_argument("--src", type=Path, default=None,
                    help=f"cgroup-skb-http: the programs' source (default {SKB_SRC.relative_to(BENCH_DIR.parent)})")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    args.out = args.out or ab.RESULTS_DIR / f"{args.what.replace('-', '_')}_toggle.json"
    seed = args.seed if args.seed is not None else secrets.randbelow(2 ** 31)
    orders = ab.pair_orders(args.pairs, "random", seed)
    tmp = Path(tempfile.mkdtemp(prefix="sonde-tcp-toggle-"))
    cgroup = Cgroup() if args.what == "cgroup-skb-http" else None
    nginx = ab.Nginx(tmp, cgroup=cgroup.path if cgroup else None).start()
    progs = wrk = redis = None
    try:
        if args.what == "l7-redis":
            redis = Redis(tmp)
        progs = Programs(args.what, args.interval, args.hooks, cgroup, args.src)
        seconds = int(args.window * (2 * args.pairs + args.stats_windows) * 1.5 + 60)
        wrk = subprocess.Popen(["wrk", "-t2", "-c50", *([] if args.keepalive else ["-H", "Connection: close"]),
                                f"-d{seconds}s", nginx.url], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(3)

        def check() -> None:
            if wrk.poll() is not None:
                raise ab.BenchError(f"wrk exited early ({wrk.returncode})")

        # less our own stub_status read
        win = ab.ToggleWindows(nginx.requests, args.window, progs, check, own=1)
        rps, cpu_req = win.rate, win.cpu
        ab.run_toggled(orders, progs, win, args.stats_windows)
    finally:
        ab.stop_proc(wrk, signal.SIGTERM, timeout=5, what="wrk")
        if progs:
            progs.close()
        if redis:
            redis.stop()
        nginx.stop()
        if cgroup:
            cgroup.close()
    res = bstats.loss(rps["baseline"], rps["agent"])
    cpu = bstats.loss(cpu_req["baseline"], cpu_req["agent"], higher_is_better=False)
    per = "request" if args.keepalive else "connection"
    result = {
        "name": args.out.stem,
        "command": ab.the_command(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "runs": args.pairs,
        "unit": "req/s",
        "mode": "toggle" + ("" if args.keepalive else "_short_conns"),
        "what": (f"nginx (2 workers) saturated by one wrk -t2 -c50 run{'' if args.keepalive else ' with Connection: close (a new TCP connection per request)'} "
                 "for the whole benchmark; " + HOOKS[args.what] +
                 f" attached (and the probe polled every {args.interval:g} s attached) in agent windows only; "
                 f"{args.pairs} pairs of {args.window:g} s windows, arm order shuffled (balanced, seeded); requests "
                 "per window from nginx stub_status; loss = 1 - the median of per-pair req/s ratios"),
        "cpu_per_request_increase_pct": cpu["loss_pct"],
        "cpu_per_request_increase_pct_ci95": cpu["loss_pct_ci95"],
        **ab.toggle_record(res, orders, seed, rps),
        **ab.toggle_costs(win, progs.poller, per, args.stats_windows),
    }
    ab.write_result(args.out, result)
    ab.log(f"loss {result['loss_pct']} % {result['loss_pct_ci95']}, BPF {result[f'bpf_ns_per_{per}']} ns and "
           f"{result[f'bpf_runs_per_{per}']} runs per {per}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
