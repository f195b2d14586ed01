"""Probe block_io against the kernel's own counters (/proc/diskstats). First the probe
alone under a deep queue: a direct-I/O loop device is busy for real (its requests go
to the backing file on the real disk), fio keeps 32 requests in flight on it, and every
poll's points are checked against /proc/diskstats read at the same moment. Requests
are 1 MiB: at 4 KiB the queue drains whenever a busy host keeps fio off the CPU for a
millisecond. Then end to end through the agent into InfluxDB (marker infra)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import drain, need, select

from sonde.ingest.errors import ProbeError
from sonde.ingest.runtime import btf


# --- from test_block.py ---------------------------------------------------------


OPS_READ, OPS_WRITE = {"read"}, {"write", "sync_write"}


def sh(*cmd, check=True):
    return subprocess.run(cmd, capture_output=True, text=True, check=check).stdout.strip()


def diskstats(name: str) -> dict[str, int]:
    for line in Path("/proc/diskstats").read_text().splitlines():
        f = line.split()
        if f[2] == name:
            v = [int(x) for x in f[3:]]
            return {"reads": v[0], "read_sectors": v[2], "read_ms": v[3], "writes": v[4], "write_sectors": v[6],
                    "write_ms": v[7], "io_ticks": v[9]}
    raise AssertionError(f"{name} not in /proc/diskstats")


def minus(a: dict, b: dict) -> dict:
    return {k: a[k] - b[k] for k in a}


@pytest.fixture
def block_probe(bpf_ready, tmp_path):
    """block_io loaded on its own, polled by the test; closed at the end."""
    from sonde.bpf.block_io.probe import PROBE
    from conftest import make_config
    from sonde.ingest.runtime.probe import LoadedProbe

    probes = []

    def load():
        p = LoadedProbe.load(PROBE, make_config(tmp_path))
        probes.append(p)
        return p
    yield load
    for p in probes:
        p.close()


@pytest.fixture
def loop(tmp_path):
    """make(size_mb, direct=, partscan=, filled=): a loop device on a sparse (or written
    out) file, detached at the end (its iostats setting restored first: loop devices keep
    it across attachments)."""
    need(Path("/usr/sbin/losetup").exists() or Path("/sbin/losetup").exists(), "losetup (util-linux)")
    if not Path("/dev/loop-control").exists():  # a kernel-matrix guest boots without udev loading it
        sh("modprobe", "loop", check=False)
    made = []

    def make(size_mb=64, direct=False, partscan=False, filled=False):
        img = tmp_path / f"disk{len(made)}.img"
        if filled:  # written out, so reads do real I/O (a hole reads back at once, without any)
            sh("dd", "if=/dev/zero", f"of={img}", "bs=1M", f"count={size_mb}", "oflag=direct")
        else:
            sh("truncate", "-s", f"{size_mb}M", str(img))
        dev = sh("losetup", "-f", "--show", *(["--direct-io=on"] if direct else []), *(["-P"] if partscan else []),
                 str(img))
        made.append(dev)
        return dev
    yield make
    for dev in made:
        Path(f"/sys/block/{os.path.basename(dev)}/queue/iostats").write_text("1")
        sh("losetup", "-d", dev, check=False)


def polled(probe) -> list:
    points, self_point = probe.poll(time.time_ns())
    return points + [self_point]


def block_points(points, disk):
    io = [p for p in points if p.measurement == "block_io" and p.tags["disk"] == disk]
    hists = {}
    for p in points:
        if p.measurement.endswith("_latency_hist") and p.tags["disk"] == disk:
            hists.setdefault(p.measurement.removesuffix("_hist"), []).append(p)
    return io, hists


@pytest.mark.truth
@pytest.mark.hot_path
def test_saturated_disk_every_interval_exact_against_diskstats(block_probe, loop):
    """Issue 14, item 1: fio keeps 32 requests in flight for 60 s on a direct-I/O loop
    device. Every interval has its disk_busy point, each within 3 points of
    /proc/diskstats' io_ticks over the same interval and at least 95 %, and requests,
    bytes and histogram counts agree with diskstats over the run."""
    need(Path("/usr/bin/fio").exists(), "fio")
    probe = block_probe()
    dev = loop(128, direct=True, filled=True)
    disk = os.path.basename(dev)
    probe.poll(time.time_ns())
    base = diskstats(disk)
    # Queue depth 32 in all, from four processes at real-time priority (they mostly
    # sleep in io_getevents), so that a busy host (other tests, a VM) keeping them off
    # the CPU does not let the queue drain.
    need(shutil.which("chrt") is not None, "chrt (util-linux)")
    fio = subprocess.Popen(["chrt", "-f", "10", "fio", "--name=qd32", f"--filename={dev}", "--rw=randrw",
                            "--rwmixread=50", "--bs=1m", "--direct=1", "--ioengine=libaio", "--numjobs=4",
                            "--iodepth=8", "--group_reporting", "--time_based", "--runtime=60", "--output-format=json"],
                           stdout=subprocess.PIPE, text=True)
    everything = []  # every point polled after the baseline, the probe's own included
    intervals = []   # (points, diskstats delta over the same interval, seconds), wholly under load
    try:
        time.sleep(1)  # fio's start-up
        everything += polled(probe)
        prev, prev_t = diskstats(disk), time.monotonic()
        while fio.poll() is None:
            time.sleep(1)
            points = polled(probe)
            now, now_t = diskstats(disk), time.monotonic()
            everything += points
            if fio.poll() is None:
                intervals.append((points, minus(now, prev), now_t - prev_t))
            prev, prev_t = now, now_t
        fio_out = json.loads(fio.stdout.read())
    finally:
        if fio.poll() is None:
            fio.kill()
        fio.wait()
    everything += polled(probe)
    total = minus(diskstats(disk), base)

    assert len(intervals) >= 55, len(intervals)
    utils = []  # (ours, diskstats')
    for points, delta, seconds in intervals:
        busy = [p for p in points if p.measurement == "disk_busy" and p.tags["disk"] == disk]
        assert len(busy) == 1, "disk_busy must be written every interval"
        utils.append((round(busy[0].fields["util_pct"], 1), round(delta["io_ticks"] / (seconds * 1000) * 100, 1)))
        assert [p for p in points if p.measurement == "block_io" and p.tags["disk"] == disk]
    assert not [u for u in utils if u[0] < 95 or abs(u[0] - u[1]) > 3], utils

    # Requests and bytes against diskstats over the whole run (the baseline was read
    # after the first poll, and the last poll came after fio had finished).
    io, hists = block_points(everything, disk)
    got = {"reads": 0, "read_bytes": 0, "writes": 0, "write_bytes": 0, "untimed": 0, "unsplit": 0, "errors": 0}
    for p in io:
        assert p.tags["op"] in OPS_READ | OPS_WRITE, p.tags
        kind = "read" if p.tags["op"] in OPS_READ else "write"
        got[kind + "s"] += p.fields["requests"]
        got[kind + "_bytes"] += p.fields["bytes"]
        for f in ("untimed", "unsplit", "errors"):
            got[f] += p.fields[f]
    # Exact up to completions the kernel never hands to BPF. On this kernel a few
    # block completions in 10^5 reach ftrace (an instance of its own sees every one)
    # but no BPF program, raw or perf-based, and they are not counted as recursion
    # misses either (measured: 2-6 of 400,000 with nothing else attached, up to 4 in
    # 10^4 on a busy host). So: never more than the kernel counted, short by at most
    # the misses the kernel reports plus 1 in 10^3, and bytes short only with requests.
    misses = sum(p.fields["kernel_misses"] for p in everything if p.measurement == "sonde_probe")
    short = {op: total[op + "s"] - got[op + "s"] for op in ("read", "write")}
    assert all(n >= 0 for n in short.values()), (got, total)
    assert sum(short.values()) <= misses + (total["reads"] + total["writes"]) // 1000, (got, total, misses)
    largest = int(Path(f"/sys/block/{disk}/queue/max_sectors_kb").read_text()) * 1024  # fio's 1 MiB is split
    for op in ("read", "write"):
        missing = total[op + "_sectors"] * 512 - got[op + "_bytes"]
        assert (missing > 0) == (short[op] > 0) and missing <= short[op] * largest, (op, missing, short)
    assert total["reads"] >= fio_out["jobs"][0]["read"]["total_ios"] > 1000
    assert got["errors"] == 0

    # Histograms: bucket counts sum exactly to the requests they cover.
    requests = got["reads"] + got["writes"]
    counts = {name: sum(p.fields["count"] for p in pts) for name, pts in hists.items()}
    assert got["untimed"] == 0  # iostats is on for loop devices
    assert counts["block_total_latency"] == requests
    assert counts["block_queue_latency"] == counts["block_device_latency"] == requests - got["unsplit"]
    assert counts["block_device_latency"] > 0


@pytest.mark.truth
@pytest.mark.hot_path
def test_a_poll_that_raises_loses_no_request(block_probe, loop, monkeypatch):
    """A poll that raises after taking its deltas (here: building a histogram point)
    writes nothing, and the next poll writes both intervals: requests and bucket
    counts over the run equal /proc/diskstats exactly."""
    from sonde.ingest.runtime import hist

    probe = block_probe()
    dev = loop()
    disk = os.path.basename(dev)
    probe.poll(time.time_ns())
    base = diskstats(disk)
    sh("dd", "if=/dev/zero", f"of={dev}", "bs=4k", "count=77", "oflag=direct")
    real = hist.points

    def boom(*a, **kw):
        raise RuntimeError("a poll failing after its deltas were taken")
    monkeypatch.setattr(hist, "points", boom)
    points, me = probe.poll(time.time_ns())
    assert me.fields["poll_success"] == 0 and points == []
    monkeypatch.setattr(hist, "points", real)
    sh("dd", "if=/dev/zero", f"of={dev}", "bs=4k", "count=23", "oflag=direct")
    points, me = probe.poll(time.time_ns())
    assert me.fields["poll_success"] == 1
    total = minus(diskstats(disk), base)
    io, hists = block_points(points, disk)
    assert total["writes"] == 100
    assert sum(p.fields["requests"] for p in io) == 100
    assert sum(p.fields["bytes"] for p in io) == total["write_sectors"] * 512 == 100 * 4096
    assert sum(p.fields["count"] for p in hists["block_total_latency"]) == 100


@pytest.mark.hot_path
def test_latency_split_and_buckets_are_consistent(block_probe, loop):
    """queue + device = total per request (so in sums), every sum lies within its buckets'
    bounds, and the total agrees with the kernel's own time-spent counters."""
    need(Path("/usr/bin/fio").exists(), "fio")
    probe = block_probe()
    dev = loop(256, direct=True)
    disk = os.path.basename(dev)
    probe.poll(time.time_ns())
    base = diskstats(disk)
    sh("fio", "--name=qd32", f"--filename={dev}", "--rw=randrw", "--bs=4k", "--direct=1", "--ioengine=libaio",
       "--iodepth=32", "--time_based", "--runtime=5", "--output=/dev/null")
    points, _ = probe.poll(time.time_ns())
    total = minus(diskstats(disk), base)
    _, hists = block_points(points, disk)
    sums = {}
    for p in points:
        if p.measurement.endswith("_latency") and p.tags["disk"] == disk:
            sums[p.measurement] = sums.get(p.measurement, 0) + p.fields["sum_us"]
            bounds = [(int(h.tags["le"]) if h.tags["le"] != "+Inf" else None, h.fields["count"])
                      for h in hists[p.measurement] if h.tags["op"] == p.tags["op"]]
            low = sum(((le + 1) // 2) * c for le, c in bounds if le is not None)
            high = sum((le + 1) * c for le, c in bounds if le is not None)  # exclusive upper bound, in µs
            assert all(le is not None for le, _ in bounds)
            # sum_us is the ns sum // 1000, each value's µs is floor(ns / 1000)
            assert low <= p.fields["sum_us"] <= high, (p.measurement, p.tags["op"], low, p.fields["sum_us"], high)
    # one interval, two ops: each sum_us is an ns sum floored once, so within 2 µs per op
    assert abs(sums["block_queue_latency"] + sums["block_device_latency"] - sums["block_total_latency"]) <= 4
    assert sums["block_device_latency"] > 0
    # The kernel adds (its own completion time - start) to diskstats' ms fields just
    # after our hook runs, so it reads a little higher; ms fields are truncated.
    theirs_us = (total["read_ms"] + total["write_ms"]) * 1000
    assert 0.9 * theirs_us <= sums["block_total_latency"] <= theirs_us + 2000, (sums, theirs_us)


def direct_writes_counted(probe, loop, n: int) -> None:
    """n direct 4 KiB writes to a fresh loop device are n write requests of 4 KiB in the
    probe's points, as in /proc/diskstats."""
    dev = loop(16)
    disk = os.path.basename(dev)
    probe.poll(time.time_ns())
    base = diskstats(disk)
    sh("dd", "if=/dev/zero", f"of={dev}", "bs=4k", f"count={n}", "oflag=direct")
    points, _ = probe.poll(time.time_ns())
    theirs = minus(diskstats(disk), base)
    io, _ = block_points(points, disk)
    writes = [p for p in io if p.tags["op"] in OPS_WRITE]
    assert theirs["writes"] == n
    assert sum(p.fields["requests"] for p in writes) == n
    assert sum(p.fields["bytes"] for p in writes) == n * 4096 == theirs["write_sectors"] * 512


@pytest.mark.truth
@pytest.mark.hot_path
@pytest.mark.kernel_matrix
def test_the_btf_typed_program_is_the_one_attached_here(block_probe, loop):
    """On this kernel the completion program is the BTF-typed one (no probe reads),
    and it counts exactly."""
    from sonde.bpf.block_io.probe import BTF_PROGRAM
    probe = block_probe()
    assert probe.decoder.program == BTF_PROGRAM
    direct_writes_counted(probe, loop, 257)


@pytest.mark.truth
@pytest.mark.hot_path
@pytest.mark.kernel_matrix
def test_where_tp_btf_is_refused_the_plain_program_counts_the_same(block_probe, loop, monkeypatch, caplog):
    """A kernel that refuses the tp_btf program (forced here) gets the plain raw
    tracepoint program, says so in one line, and counts the same."""
    from sonde.bpf.block_io import probe as block_mod
    from sonde.ingest.runtime import btf_tracepoint

    def refuse(*_a, **_k):
        raise btf_tracepoint.BTFTracepointError("the kernel refused it (forced by the test)")
    monkeypatch.setattr(btf_tracepoint, "attach", refuse)
    with caplog.at_level("WARNING", logger="sonde.block_io"):
        probe = block_probe()
    assert probe.decoder.program == block_mod.RAW_PROGRAM
    warned = [r.getMessage() for r in caplog.records if "plain raw tracepoint" in r.getMessage()]
    assert len(warned) == 1 and "\n" not in warned[0]
    direct_writes_counted(probe, loop, 193)


@pytest.mark.truth
@pytest.mark.hot_path
@pytest.mark.kernel_matrix
def test_more_disks_than_array_slots_each_count_exactly(block_probe, loop):
    """Five disks for four per-CPU array slots: on a CPU that completes requests of all
    five, one of them counts in the hash map instead (pigeonhole), and each disk's
    requests and bytes are still exact against /proc/diskstats. Which CPU completes a
    loop device's requests is the kernel's choice (its worker may keep to one CPU per
    device), so the writes are repeated, a few rounds at most, until one disk has."""
    probe = block_probe()
    devs = [loop(8) for _ in range(5)]
    disks = [os.path.basename(d) for d in devs]
    probe.poll(time.time_ns())
    base = {d: diskstats(d) for d in disks}
    expected = [0] * len(devs)
    cpus = sorted(os.sched_getaffinity(0))
    for r in range(8):  # each round from another CPU: where the I/O starts is where it tends to end
        for i, dev in enumerate(devs):
            sh("taskset", "-c", str(cpus[r % len(cpus)]), "dd", "if=/dev/zero", f"of={dev}", "bs=4k",
               f"count={37 + 11 * i}", "oflag=direct")
            expected[i] += 37 + 11 * i
        if any(True for _ in probe.decoder.io.items()):
            break
    in_hash = {k.dev for k, _ in probe.decoder.io.items()}
    assert in_hash, "no disk fell back to the hash map: the test did not reach that path"
    points, _ = probe.poll(time.time_ns())
    for i, disk in enumerate(disks):
        theirs = minus(diskstats(disk), base[disk])
        io, _ = block_points(points, disk)
        writes = [p for p in io if p.tags["op"] in OPS_WRITE]
        assert theirs["writes"] == expected[i]
        assert sum(p.fields["requests"] for p in writes) == theirs["writes"], disk
        assert sum(p.fields["bytes"] for p in writes) == theirs["write_sectors"] * 512, disk


@pytest.mark.hot_path
@pytest.mark.kernel_matrix
def test_a_field_read_that_is_not_in_the_kernels_btf_is_refused_not_read(bpf_ready):
    """The verifier checks a tp_btf program's loads against the kernel's BTF: a u64
    read straddling two u32 members of struct request is refused at load, in one
    line, instead of reading garbage."""
    from bcc import BPF
    from sonde.ingest.runtime import btf_tracepoint

    b = btf.load("/sys")
    flags = b.member("request", "cmd_flags")
    assert b.member("request", "rq_flags").offset == flags.offset + 4
    obj = BPF(text=(f"int tpbtf_bad(u64 *ctx) {{ const u8 *rq = (const u8 *)ctx[0]; "
                    f"return *(const volatile u64 *)(rq + {flags.offset + 2}) == 7; }}").encode())
    try:
        with pytest.raises(btf_tracepoint.BTFTracepointError) as e:
            btf_tracepoint.attach(obj, b"tpbtf_bad", "block_rq_complete", b)
        assert "\n" not in str(e.value) and "refused" in str(e.value) and "struct request" in str(e.value), e.value
    finally:
        obj.cleanup()


@pytest.mark.hot_path
def test_partition_io_counts_to_its_disk(block_probe, loop):
    """A partition's requests count to its whole disk, as the block tracepoints' dev
    does (the kernel accounts them to the partition first)."""
    need(shutil.which("addpart") is not None, "addpart (util-linux)")
    probe = block_probe()
    dev = loop(64, partscan=True)
    disk = os.path.basename(dev)
    # BLKPG adds the partition directly: no partition table parser needed in the kernel
    sh("addpart", dev, "1", "2048", str(64 * 2048 - 4096))
    deadline = time.monotonic() + 5
    while not Path(f"{dev}p1").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    need(Path(f"{dev}p1").exists(), f"partition {dev}p1 did not appear")
    probe.poll(time.time_ns())
    sh("dd", "if=/dev/zero", f"of={dev}p1", "bs=4k", "count=77", "oflag=direct")
    sh("dd", f"if={dev}p1", "of=/dev/null", "bs=16k", "count=9", "iflag=direct")
    points, _ = probe.poll(time.time_ns())
    got = {p.tags["op"]: (p.fields["requests"], p.fields["bytes"]) for p in points
           if p.measurement == "block_io" and p.tags["disk"] == disk}
    assert got == {"sync_write": (77, 77 * 4096), "read": (9, 9 * 16384)}
    assert not [p for p in points if p.tags.get("disk") == f"{disk}p1"]


@pytest.mark.hot_path
def test_requests_the_kernel_does_not_time_are_counted_untimed(block_probe, loop):
    """With iostats off the kernel leaves a request's start stamp from its slot's last
    use; such requests are counted, and kept out of every latency histogram."""
    probe = block_probe()
    dev = loop()
    disk = os.path.basename(dev)
    sh("dd", "if=/dev/zero", f"of={dev}", "bs=4k", "count=50", "oflag=direct")  # stamps in the slots
    Path(f"/sys/block/{disk}/queue/iostats").write_text("0")
    probe.poll(time.time_ns())
    sh("dd", f"if={dev}", "of=/dev/null", "bs=4k", "count=40", "iflag=direct")
    points, _ = probe.poll(time.time_ns())
    io = [p.fields for p in points if p.measurement == "block_io" and p.tags["disk"] == disk]
    assert io == [{"requests": 40, "bytes": 40 * 4096, "errors": 0, "untimed": 40, "unsplit": 0}]
    assert not [p for p in points if "latency" in p.measurement and p.tags["disk"] == disk]


@pytest.mark.hot_path
def test_a_kernel_without_the_hook_is_named_in_one_line():
    from sonde.bpf.block_io.probe import layout
    from test_btf import BLOB

    with pytest.raises(ProbeError) as e:
        layout(btf.BTF.parse(BLOB, "blob"))
    msg = str(e.value)
    assert "\n" not in msg and "block_rq_complete" in msg and "probes.block_io.enabled: false" in msg


@pytest.mark.hot_path
def test_layout_is_read_from_this_kernel():
    from sonde.bpf.block_io.probe import layout

    need(Path("/sys/kernel/btf/vmlinux").exists(), "the kernel has no BTF")
    b = btf.load("/sys")
    d = layout(b)
    assert d["RQ_START"] == b.offsetof("request", "start_time_ns")
    assert d["RQ_SPAN_BASE"] <= d["RQ_CMD_FLAGS"] < d["RQ_SPAN_BASE"] + d["RQ_SPAN_LEN"]
    assert d["REQ_OP_WRITE_"] == 1 and d["REQ_SYNC_"] == 1 << b.enum_value("__REQ_SYNC")


@pytest.mark.hot_path
def test_diskstats_parser_on_a_literal():
    from sonde.bpf.block_io.probe import parse_diskstats

    text = ("   7       0 loop0 120 0 960 13 45 0 360 2 0 31 15 0 0 0 0 4 1\n"
            " 254       0 vda 5 1 40 2 6 0 48 1 1 9 3\n")
    assert parse_diskstats(text) == {"loop0": (120 + 45 + 0 + 4, 31), "vda": (11, 9)}


@pytest.mark.hot_path
def test_partition_is_named_as_its_disk(tmp_path):
    from sonde.bpf.block_io.probe import disk_name

    disk = tmp_path / "devices/block/sdz"
    (disk / "sdz1").mkdir(parents=True)
    (disk / "uevent").write_text("MAJOR=8\nMINOR=0\nDEVNAME=sdz\nDEVTYPE=disk\n")
    (disk / "sdz1/uevent").write_text("MAJOR=8\nMINOR=1\nDEVNAME=sdz1\nDEVTYPE=partition\n")
    (disk / "sdz1/partition").write_text("1\n")
    (tmp_path / "dev/block").mkdir(parents=True)
    (tmp_path / "dev/block/8:0").symlink_to(disk)
    (tmp_path / "dev/block/8:1").symlink_to(disk / "sdz1")
    assert disk_name(tmp_path, 8 << 20 | 1) == disk_name(tmp_path, 8 << 20) == "sdz"
    assert disk_name(tmp_path, 9 << 20 | 3) == "9:3"


# --- from test_infra.py ---------------------------------------------------------


@pytest.fixture
def agent_for(agents):
    return agents


flush = drain


@pytest.fixture
def loopdev(tmp_path, request):
    need(Path("/sbin/losetup").exists() or Path("/usr/sbin/losetup").exists(), "losetup (util-linux)")
    img = tmp_path / "disk.img"
    sh("truncate", "-s", "64M", str(img))
    # direct_io: the loop device writes through to the real disk instead of the page
    # cache, so its requests take real time (for busy-time tests).
    direct = ["--direct-io=on"] if request.node.get_closest_marker("slow_disk") else []
    dev = sh("losetup", "-f", "--show", *direct, str(img))
    yield dev
    sh("losetup", "-d", dev, check=False)


@pytest.mark.infra
def test_block_requests_bytes_and_latency_exact(agent_for, influx, influx_db, loopdev):
    agent = agent_for("block_io", "process_io")
    sh("dd", "if=/dev/zero", f"of={loopdev}", "bs=4k", "count=123", "oflag=direct")
    sh("dd", f"if={loopdev}", "of=/dev/null", "bs=8k", "count=45", "iflag=direct")
    flush(agent)
    disk = os.path.basename(loopdev)
    rows = select(influx, influx_db, f"SELECT sum(requests), sum(bytes), sum(errors) FROM block_io "
                                     f"WHERE disk='{disk}' GROUP BY op")
    got = {r["op"]: (r["sum"], r["sum_1"], r["sum_2"]) for r in rows}
    assert got == {"sync_write": (123, 123 * 4096, 0), "read": (45, 45 * 8192, 0)}
    for kind in ("queue", "device", "total"):
        counts = select(influx, influx_db, f"SELECT sum(count) FROM block_{kind}_latency_hist "
                                           f"WHERE disk='{disk}' GROUP BY op")
        assert {r["op"]: r["sum"] for r in counts} == {"sync_write": 123, "read": 45}
    # process_io has no disk tag: each dd also reads its own binary and libraries from
    # the root disk when they are not cached, so the loop's bytes are a lower bound.
    procs = sorted(r["sum"] for r in select(influx, influx_db,
                                            "SELECT sum(bytes) FROM process_io WHERE comm='dd' GROUP BY pid"))
    assert len(procs) == 2
    for got_bytes, want in zip(procs, sorted([123 * 4096, 45 * 8192])):
        assert want <= got_bytes < want + (1 << 20)


@pytest.mark.truth
@pytest.mark.infra
def test_block_errors_counted_exactly(agent_for, influx, influx_db, tmp_path):
    """17 direct writes that fail with ENOSPC: each is an error completion, all of them
    in block_io.errors, except completions the kernel never handed to the BPF program.
    Those are measured here, not assumed: an ftrace instance and /proc/diskstats see
    every completion, and on a busy host (concurrent direct I/O) about 1 completion in
    1,500-3,500 reached the tracepoint and ftrace but not the raw tracepoint program,
    with no recursion miss counted (measured with a counter at the program's entry).
    So: never more errors than failed writes, and short only by requests diskstats
    completed that the probe did not see."""
    fs = tmp_path / "small"
    fs.mkdir()
    sh("mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(fs))
    dev = None
    try:
        sh("truncate", "-s", "32M", str(fs / "disk.img"))
        dev = sh("losetup", "-f", "--show", str(fs / "disk.img"))
        # fill the tmpfs, so any write to a hole in the backing file fails with ENOSPC
        subprocess.run(["dd", "if=/dev/zero", f"of={fs / 'filler'}", "bs=64k"], capture_output=True)
        agent = agent_for("block_io")
        before = diskstats(os.path.basename(dev))
        failed = 0
        fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
        try:
            import mmap
            buf = mmap.mmap(-1, 4096)
            for i in range(17):
                try:
                    os.pwrite(fd, buf, (1 << 20) * (i + 4))
                except OSError:
                    failed += 1
        finally:
            os.close(fd)
        flush(agent)
        completed = minus(diskstats(os.path.basename(dev)), before)
    finally:
        if dev:
            sh("losetup", "-d", dev, check=False)
        sh("umount", str(fs), check=False)
    assert failed == 17
    assert completed["writes"] == failed
    disk = os.path.basename(dev)
    rows = select(influx, influx_db, f"SELECT sum(errors), sum(requests) FROM block_io WHERE disk='{disk}' GROUP BY op")
    errors = {r["op"]: r["sum"] for r in rows}
    writes = sum(r["sum_1"] for r in rows if r["op"] in OPS_WRITE)
    unseen = completed["writes"] - writes
    assert 0 <= unseen <= 1, (completed, writes)
    assert failed - unseen <= sum(errors.values()) <= failed
    assert set(k for k, v in errors.items() if v) <= {"write", "sync_write"}


@pytest.mark.infra
@pytest.mark.slow_disk
def test_utilisation_matches_diskstats(agent_for, influx, influx_db, loopdev):
    agent = agent_for("block_io")
    disk = os.path.basename(loopdev)

    def io_ticks():
        for line in Path("/proc/diskstats").read_text().splitlines():
            f = line.split()
            if f[2] == disk:
                return int(f[12])
        raise AssertionError(f"{disk} not in /proc/diskstats")

    agent.poll()
    t0, ticks0 = time.monotonic(), io_ticks()
    # bursts of synchronous direct I/O with pauses
    end = time.monotonic() + 3
    while time.monotonic() < end:
        sh("dd", "if=/dev/zero", f"of={loopdev}", "bs=64k", "count=200", "oflag=direct")
        time.sleep(0.05)
    points = agent.poll()
    t1, ticks1 = time.monotonic(), io_ticks()
    ours = [p.fields["util_pct"] for p in points if p.measurement == "disk_busy" and p.tags["disk"] == disk]
    theirs = (ticks1 - ticks0) / ((t1 - t0) * 1000) * 100
    # The kernel's io_ticks rounds each busy stretch up to a jiffy, so the two only
    # agree when the disk is busy a real fraction of the time (about 20 % here).
    assert len(ours) == 1 and theirs > 10
    assert abs(ours[0] - theirs) <= 3, (ours[0], theirs)
