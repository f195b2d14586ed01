"""block_io: block I/O per disk and class, the latency split, and utilisation.

What runs, and when:
- per I/O: one raw tracepoint program at `block_rq_complete` (per completion: a
  request the driver completes in parts runs it once per part). It reads the
  request's own timestamps, op, size and device at offsets from this kernel's BTF and
  adds to one per-CPU entry per (device, op class): a slot of a per-CPU array for
  the first disks each CPU sees (found without a call), a per-CPU hash entry for a
  disk whose slot another holds. Nothing is followed across hooks and no
  per-request state is kept. The program is BTF-typed (tp_btf, 5.5+), so it
  reads those fields with plain loads the verifier checks against the kernel's BTF;
  where the kernel refuses that, the same program runs as a plain raw tracepoint,
  with two bpf_probe_read_kernel calls more per I/O (~150 ns here), and the agent
  logs why.
- per poll: one read of those per-CPU entries and one of /proc/diskstats.
Bytes per process need a hook where the request is submitted: that is the separate
probe `process_io`, off by default.

Measurements:
- `block_io`: requests, bytes and errors per whole disk and op class (read, write,
  sync_write, flush, discard, other: the classes blk_fill_rwbs prints), at
  completion. Bytes count every completion, partial ones too, as iostats does.
- `block_{queue,device,total}_latency` (+ `_hist`): start -> issue, issue -> complete
  and start -> complete. Start and issue are the kernel's own stamps
  (`start_time_ns`, set where it starts accounting the request, and
  `io_start_time_ns`, set when it hands it to the driver), which it takes from one
  cached clock read per plug (a batch submitted without sleeping): what iostat's
  await is computed from. A request the kernel did not stamp at start (iostats off,
  the flush machinery's own requests) is in no histogram (field `untimed`); one not
  stamped at issue (no blk-stat user on the queue: writeback throttling, io.latency,
  io.cost) is in the total histogram only (field `unsplit`).
- `disk_busy`: the kernel's io_ticks from /proc/diskstats per whole disk, written
  every interval for every disk that has done I/O, idle intervals included.

Disks are named from /sys/dev/block/<major>:<minor> under the configured sys root
(a partition counts to its disk). Kernel floor: raw tracepoints and BTF in sysfs
(5.2+ with CONFIG_DEBUG_INFO_BTF); the tracepoint's prototype, struct members and
flag values are looked up by name in the kernel's BTF, and a kernel that lacks one
is named in a one-line error.
"""
from __future__ import annotations

import logging
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from sonde.ingest.runtime import btf, btf_tracepoint

from sonde.ingest.runtime import hist
from sonde.ingest.runtime import keys
from sonde.ingest.runtime.decode import Context
from sonde.ingest.runtime.delta import defer, since
from sonde.ingest.errors import ProbeError
from sonde.ingest.output.lineproto import Point, printable_name
from sonde.ingest.runtime.probe import Probe

log = logging.getLogger("sonde.block_io")

TRACEPOINT = "block_rq_complete"
BTF_PROGRAM = b"tpbtf_block_rq_complete"
RAW_PROGRAM = b"raw_block_rq_complete"

OPS_CLASSES = {0: "read", 1: "write", 2: "sync_write", 3: "flush", 4: "discard", 5: "other"}  # OP_* in the C
OPS = keys.StaticMap(OPS_CLASSES, "other")
KINDS = ("block_queue_latency", "block_device_latency", "block_total_latency")  # LAT_* order in the C
COUNTERS = ("requests", "bytes", "errors", "untimed", "unsplit")
SLOTS = hist.SLOTS
# struct io_t in the C: 5 counters, 3 sums, 3 x SLOTS histogram slots, all u64
IO_VALUES = struct.Struct(f"<{len(COUNTERS) + 3 + 3 * SLOTS}Q")
# Before the flags became an enum (6.x), RQF_IO_STAT was `1 << 13` in every kernel.
RQF_IO_STAT_DEFINE = 13


split_dev = keys.majorminor  # block_io's key is the kernel's internal dev_t


def disk_name(sys_root: Path, dev: int) -> str:
    """The whole disk's name for a disk or partition dev_t (sda for sda1), from sysfs."""
    major, minor = split_dev(dev)
    node = Path(sys_root) / f"dev/block/{major}:{minor}"
    if (node / "partition").exists():
        node = node.resolve().parent
    try:
        for line in (node / "uevent").read_text().splitlines():
            if line.startswith("DEVNAME="):
                return printable_name(line.split("=", 1)[1])
    except OSError:
        pass
    return f"{major}:{minor}"


# --- what the kernel must have, looked up by name in its BTF --------------------------

def need_btf(fn, *args, probe: str = "block_io"):
    """fn(*args) on the kernel's BTF, its BTFError turned into the probe's one line."""
    try:
        return fn(*args)
    except btf.BTFError as e:
        source, _, what = str(e).partition(": ")
        raise ProbeError(f"probe {probe}: {what} (per {source}); disable it with probes.{probe}.enabled: false")


def layout(b: btf.BTF) -> dict[str, int]:
    """The -D values block_io.bpf.c needs, from this kernel's BTF. Raises a one-line
    ProbeError naming the first thing the kernel lacks."""
    args = need_btf(b.raw_tracepoint_args, "block_rq_complete")
    if len(args) != 3 or args[0] != "struct request *":
        raise ProbeError(f"probe block_io: raw tracepoint block_rq_complete passes ({', '.join(args)}), "
                         f"not (struct request *, status, nr_bytes); disable it with probes.block_io.enabled: false")
    d = {"BLOCK_IO_LAYOUT": 1, "RQC_ARG_RQ": 0, "RQC_ARG_ERROR": 1, "RQC_ARG_NR_BYTES": 2}

    def member(struct_name: str, path: str, size: int) -> int:
        m = need_btf(b.member, struct_name, path)
        if m.size != size:
            raise ProbeError(f"probe block_io: {struct_name}.{path} is {m.size} bytes in this kernel, "
                             f"not {size}; disable it with probes.block_io.enabled: false")
        return m.offset

    rq = {"RQ_CMD_FLAGS": member("request", "cmd_flags", 4), "RQ_RQ_FLAGS": member("request", "rq_flags", 4),
          "RQ_DATA_LEN": member("request", "__data_len", 4), "RQ_START": member("request", "start_time_ns", 8),
          "RQ_IO_START": member("request", "io_start_time_ns", 8)}
    sizes = {"RQ_CMD_FLAGS": 4, "RQ_RQ_FLAGS": 4, "RQ_DATA_LEN": 4, "RQ_START": 8, "RQ_IO_START": 8}
    part = need_btf(b.member, "request", "part")
    if b.spell(part.type_id) == "struct block_device *":  # 5.10's is a struct hd_struct: disk only
        rq["RQ_PART"], sizes["RQ_PART"] = part.offset, 8
        d["BD_DEV"] = member("block_device", "bd_dev", 4)
    if b.has_member("request", "rq_disk"):  # before 5.19 the request names its disk
        rq["RQ_DISK"], sizes["RQ_DISK"] = member("request", "rq_disk", 8), 8
    else:
        rq["RQ_Q"], sizes["RQ_Q"] = member("request", "q", 8), 8
        d["Q_DISK"] = member("request_queue", "disk", 8)
    d |= rq
    d["RQ_SPAN_BASE"] = min(rq.values())
    d["RQ_SPAN_LEN"] = max(off + sizes[k] for k, off in rq.items()) - d["RQ_SPAN_BASE"]
    if d["RQ_SPAN_LEN"] > 256:
        raise ProbeError(f"probe block_io: struct request's fields span {d['RQ_SPAN_LEN']} bytes in this kernel "
                         f"(at most 256 are read at once); disable it with probes.block_io.enabled: false")
    d["GD_MAJOR"] = member("gendisk", "major", 4)
    d["GD_FIRST_MINOR"] = member("gendisk", "first_minor", 4)

    # op and flag values (trailing _ keeps them clear of the kernel headers' own macros)
    for op in ("READ", "WRITE", "FLUSH", "DISCARD", "SECURE_ERASE"):
        d[f"REQ_OP_{op}_"] = need_btf(b.enum_value, f"REQ_OP_{op}")
    op_bits = need_btf(b.enum_value, "__REQ_FAILFAST_DEV")  # the first flag bit, just past the op
    d["REQ_OP_MASK_"] = (1 << op_bits) - 1
    d["REQ_SYNC_"] = 1 << need_btf(b.enum_value, "__REQ_SYNC")
    rqf = b.enum_value("__RQF_IO_STAT") if b.has_enum_value("__RQF_IO_STAT") else RQF_IO_STAT_DEFINE
    d["RQF_IO_STAT_"] = 1 << rqf
    return d


def kernel_btf(sys_root, probe: str = "block_io") -> btf.BTF:
    try:
        return btf.load(sys_root)
    except btf.BTFError as e:
        raise ProbeError(f"probe {probe}: {e}; disable it with probes.{probe}.enabled: false")


def kernel_cflags(sys_root) -> list[str]:
    """The -D flags of this kernel's layout, passed to the compile by the runtime."""
    return [f"-D{k}={v}" for k, v in layout(kernel_btf(sys_root)).items()]


# --- /proc/diskstats -------------------------------------------------------------------

def parse_diskstats(text: str) -> dict[str, tuple[int, int]]:
    """name -> (requests completed of every kind, io_ticks in ms) from /proc/diskstats."""
    out = {}
    for line in text.splitlines():
        f = line.split()
        if len(f) < 14:
            continue
        ios = int(f[3]) + int(f[7]) + (int(f[14]) if len(f) > 14 else 0) + (int(f[18]) if len(f) > 18 else 0)
        out[f[2]] = (ios, int(f[12]))
    return out


@dataclass(frozen=True)
class State:
    io: dict          # (dev, op) -> the counters of block_io's entry at the last read
    diskstats: dict   # /proc/diskstats at the last read: name -> (requests, io_ticks ms)
    at_ns: int        # when it was read (monotonic)


def decode(rows: list, disks: dict[int, str], diskstats: dict, whole: set[str] | None, at_ns: int,
           state: State, ctx: Context) -> tuple[list[Point], State]:
    """Pure: rows (dev, op, summed values of struct io_t) of `block_io`, the disks'
    names by dev_t, /proc/diskstats as parsed, the whole disks (/sys/block; None: every
    disk in diskstats) and when diskstats was read -> points and the next state."""
    io = dict(state.io)
    # per (whole disk, op): a disk's partitions are separate entries in the kernel
    per_disk: dict[tuple[str, int], list[int]] = {}
    for dev, op, values in rows:
        values = tuple(values)
        d = since(state.io.get((dev, op)), values)
        io[(dev, op)] = values
        if any(d):
            acc = per_disk.setdefault((disks.get(dev) or "%d:%d" % keys.majorminor(dev), op), [0] * len(d))
            for i, x in enumerate(d):
                acc[i] += x
    points: list[Point] = []
    for (disk, op), d in sorted(per_disk.items()):
        tags = {"host": ctx.host, "disk": disk, "op": OPS(op)}
        points.append(Point("block_io", tags, dict(zip(COUNTERS, d)), ctx.ts))
        sums, slots = d[len(COUNTERS):len(COUNTERS) + 3], d[len(COUNTERS) + 3:]
        for kind, name in enumerate(KINDS):
            buckets = {s: c for s, c in enumerate(slots[kind * SLOTS:(kind + 1) * SLOTS]) if c}
            if buckets:
                points += hist.points(name, tags, buckets, sums[kind] // 1000, ctx.ts)
    points += disk_busy(diskstats, whole, at_ns, state, ctx)
    return points, State(io, diskstats, at_ns)


def disk_busy(stats: dict, whole: set[str] | None, at_ns: int, state: State, ctx: Context) -> list[Point]:
    """Every whole disk that has done I/O, every interval, from the kernel's io_ticks."""
    interval_ns = at_ns - state.at_ns
    prev = state.diskstats
    whole = set(stats) if whole is None else whole
    points = []
    for name, (ios, ticks) in sorted(stats.items()):
        if name not in whole or name not in prev or not (ios or ticks) or interval_ns <= 0:
            continue
        busy_ms = max(ticks - prev[name][1], 0)
        points.append(Point("disk_busy", {"host": ctx.host, "disk": printable_name(name)}, {
            "busy_us": busy_ms * 1000, "util_pct": min(100.0, busy_ms * 1e6 / interval_ns * 100),
            "interval_us": interval_ns // 1000}, ctx.ts))
    return points


class BlockDecoder:
    def __init__(self, probe):
        self.probe = probe
        self.sys_root = Path(probe.config.paths.sys)
        self.proc_root = Path(probe.config.paths.proc)
        self.io = probe.table("block_io")
        self.fast = probe.table("block_io_fast")
        self.names: dict[int, str] = {}
        self.state = State({}, self._diskstats(), time.monotonic_ns())
        self.program: bytes | None = None
        self.attach()

    def attach(self) -> None:
        """Attach the completion program: BTF-typed where the kernel takes it, else the
        plain raw tracepoint (the program that loaded first is kept for reattaching)."""
        bpf = self.probe.bpf
        if self.program == BTF_PROGRAM:
            btf_tracepoint.reattach(bpf, BTF_PROGRAM, TRACEPOINT)
            return
        if self.program is None:
            try:
                btf_tracepoint.attach(bpf, BTF_PROGRAM, TRACEPOINT, kernel_btf(self.sys_root))
                self.program = BTF_PROGRAM
                return
            except btf_tracepoint.BTFTracepointError as e:
                log.warning("probe block_io: %s; counting through a plain raw tracepoint instead "
                            "(two more kernel reads per I/O)", e)
        bpf.attach_raw_tracepoint(tp=TRACEPOINT.encode(), fn_name=RAW_PROGRAM)
        self.program = RAW_PROGRAM

    def detach(self) -> None:
        self.probe.bpf.detach_raw_tracepoint(tp=TRACEPOINT.encode())

    def disk(self, dev: int) -> str:
        if dev not in self.names:
            name = disk_name(self.sys_root, dev)
            if name != "%d:%d" % split_dev(dev):  # not found (yet): look again next time
                self.names[dev] = name
            return name
        return self.names[dev]

    def _diskstats(self) -> dict[str, tuple[int, int]]:
        try:
            return parse_diskstats((self.proc_root / "diskstats").read_text())
        except OSError:
            return {}

    def rows(self) -> list[tuple[int, int, tuple]]:
        """(dev, op, values summed over CPUs) from both maps: a (dev, op) counts in a
        CPU's array slot or, where another dev holds that slot, in the hash."""
        acc: dict[tuple[int, int], list[int]] = {}

        def add(dev: int, op: int, raw: bytes) -> None:
            values = IO_VALUES.unpack(raw)
            a = acc.setdefault((dev, op), [0] * len(values))
            for j, x in enumerate(values):
                a[j] += x
        for k, per_cpu in self.io.items():
            for leaf in per_cpu:
                add(k.dev, k.op, bytes(leaf))
        for k, per_cpu in self.fast.items():
            for leaf in per_cpu:
                if leaf.used:
                    add(leaf.dev, k.value % len(OPS_CLASSES), bytes(leaf.io))
        return [(dev, op, tuple(v)) for (dev, op), v in acc.items()]

    def poll(self, ts: int) -> tuple[list[Point], int]:
        rows = self.rows()
        disks = {dev: self.disk(dev) for dev in {dev for dev, _, _ in rows}}
        at_ns, stats = time.monotonic_ns(), self._diskstats()
        try:
            whole = set(os.listdir(self.sys_root / "block"))
        except OSError:
            whole = None
        points, new = decode(rows, disks, stats, whole, at_ns, self.state, self.probe.context(ts))
        defer(lambda: setattr(self, "state", new))
        return points, len(rows)


PROBE = Probe(
    name="block_io",
    doc=__doc__,
    hooks=("block:block_rq_complete",),
    cflags=kernel_cflags,
    decoder=BlockDecoder,
)
