"""Probe specs and the runtime that loads, polls and decodes them.

A probe is a folder, bpf/<name>/: `<name>.bpf.c` (bcc C), `probe.py`, which defines
`PROBE = Probe(...)` (its hooks and how each map becomes catalog points), and
`metrics.py` (its catalog entries). The runtime finds probes by that layout, so adding
one edits nothing central.

Regular decoding is declared (`CounterMap`, in decode.py); the runtime turns cumulative kernel
counters into per-interval deltas, adds process tags, folds processes past the
top-N limit into `other` (totals stay exact), and reclaims entries of exited
processes after their last delta is written, so maps stay bounded.

A poll is one interval (`delta.interval()`): read rows, decode them with a pure
function of rows and previous state (decode.py), and commit the new state once the
whole poll has succeeded. If it raises, nothing is committed and the deletions it
planned are not made, so the next poll counts the same events again and the
interval is not lost. A point that breaks the catalog contract
(undeclared, or another probe's measurement) is dropped alone, logged, and makes
`poll_success` 0.
"""
from __future__ import annotations

import ctypes
import importlib
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import sonde.bpf as bpf_pkg

from sonde.ingest.runtime import catalog
from sonde.ingest.config import Config
from sonde.ingest.errors import CatalogError, ProbeError, SondeError
from sonde.ingest.output.lineproto import Point, printable_name
from sonde.ingest.runtime.bpfinfo import recursion_misses, run_stats
from sonde.ingest.runtime.cardinality import SeriesBudget
from sonde.ingest.runtime.decode import Context, CounterMap
from sonde.ingest.runtime.delta import defer, interval
from sonde.ingest.runtime.procfs import Procfs

log = logging.getLogger("sonde.probe")
BPF_DIR = Path(bpf_pkg.__file__).parent
DROPS_MAP = "sonde_drops"  # optional per-probe PERCPU_ARRAY[1]: events lost to a full map


@dataclass(frozen=True)
class Probe:
    name: str
    hooks: tuple[str, ...]         # "category:event" tracepoints that must exist
    maps: tuple[CounterMap, ...] = ()
    # Hooks the probe can run without: hook -> the metrics lost when it is missing.
    # The C wraps each in `#ifndef SONDE_NO_<category>_<event>`.
    optional_hooks: dict[str, str] = field(default_factory=dict)
    # Whether `sonde run` loads it when the config does not say (probes.<name>.enabled).
    default_enabled: bool = True
    # BPF functions run by a per-CPU software clock: function name -> frequency in Hz.
    cpu_clock: dict[str, int] = field(default_factory=dict)

    doc: str = ""
    # For maps whose decoding is genuinely special: a class taking the LoadedProbe,
    # whose poll(ts_ns) returns (points, live map entries): it reads rows, decodes them
    # with a pure function of rows and its previous state (the golden files run it),
    # and commits the new state with delta.defer, so only a poll that succeeds does.
    decoder: type | None = None
    # Tracepoint fields the probe reads: "category:event" -> field names. Checked
    # against the running kernel's tracefs format before compiling.
    fields: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Fields whose presence selects a variant: each present one is passed to the C
    # as -DSONDE_F_<event>_<field> (e.g. tcp_send_reset's `reason`, 6.10+).
    variant_fields: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Kernel features beyond tracepoints (BTF members, a cgroup2 mount): sys root ->
    # one-line problems, empty when the kernel has everything.
    requires: object = None
    # More -D flags computed at load time from the kernel (e.g. BTF offsets): sys root -> flags.
    cflags: object = None
    # False for a probe that only reads counters the kernel keeps (/proc, netlink):
    # no bpf/<name>.bpf.c, nothing compiled, `LoadedProbe.bpf` is None.
    kernel: bool = True


_OWN: dict[str, frozenset[str]] = {}


def own_measurements(name: str) -> frozenset[str]:
    """The measurements probe `name` declares in bpf/<name>/metrics.py: all it may emit."""
    if not _OWN:
        _OWN.update({probe: frozenset(m.name for m in ms) for probe, ms in catalog.probe_measurements().items()})
    return _OWN.get(name, frozenset())


def probe_dir(name: str) -> Path:
    return BPF_DIR / name


def discover(bpf_dir: Path | None = None, package: str = "sonde.bpf") -> dict[str, Probe]:
    """Every probe: a folder bpf/<name>/ whose probe.py defines PROBE, with
    <name>.bpf.c beside it when the probe has a kernel program (a probe that only reads
    the kernel's own counters has none). Folders without probe.py (shared code) are
    not probes."""
    root = bpf_dir or BPF_DIR
    found = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))):
        name = folder.name
        c_file = folder / f"{name}.bpf.c"
        if not (folder / "probe.py").exists():
            if c_file.exists():
                raise ProbeError(f"probe {name}: {c_file} has no probe.py beside it")
            continue
        mod = importlib.import_module(f"{package}.{name}.probe")
        spec = getattr(mod, "PROBE", None)
        if not isinstance(spec, Probe) or spec.name != name:
            raise ProbeError(f"probe {name}: bpf/{name}/probe.py must define PROBE = Probe(name={name!r}, ...)")
        if spec.kernel != c_file.exists():
            raise ProbeError(f"probe {name}: Probe(kernel={spec.kernel}) but bpf/{name}/{name}.bpf.c "
                             f"{'is missing' if spec.kernel else 'exists'}")
        found[name] = spec
    return found


def enabled(spec: Probe, config: Config) -> bool:
    setting = config.probe(spec.name).enabled
    return spec.default_enabled if setting is None else setting


def missing_hooks(spec: Probe, tracefs: Path, hooks=None) -> list[str]:
    events = Path(tracefs) / "events"
    return [h for h in (spec.hooks if hooks is None else hooks) if not (events / h.replace(":", "/")).is_dir()]


def tracepoint_fields(tracefs: Path, hook: str) -> set[str]:
    """Field names of a tracepoint, from the running kernel's tracefs format."""
    fmt = Path(tracefs) / "events" / hook.replace(":", "/") / "format"
    try:
        text = fmt.read_text()
    except OSError:
        return set()
    return set(re.findall(r"field:[^;]*?\b(\w+)(?:\[\d*\])?;", text))


def kernel_problems(spec: Probe, tracefs: Path, sys_root: Path | None = None) -> list[str]:
    """Everything this kernel lacks for the probe, one line each: tracepoints, the
    tracepoint fields it reads, and features it declares (`Probe.requires`)."""
    problems = [f"probe {spec.name}: tracepoint {h} is missing from this kernel "
                f"(no {tracefs}/events/{h.replace(':', '/')}); disable it with probes.{spec.name}.enabled: false"
                for h in missing_hooks(spec, tracefs)]
    for hook, names in spec.fields.items():
        if missing_hooks(spec, tracefs, [hook]):
            continue
        have = tracepoint_fields(tracefs, hook)
        problems += [f"probe {spec.name}: tracepoint {hook} has no field {n} on this kernel "
                     f"({os.uname().release}); disable it with probes.{spec.name}.enabled: false"
                     for n in names if n not in have]
    if spec.requires is not None and sys_root is not None:
        problems += [f"probe {spec.name}: {p}; disable it with probes.{spec.name}.enabled: false"
                     for p in spec.requires(Path(sys_root))]
    return problems


def require_hooks(spec: Probe, tracefs: Path, sys_root: Path | None = None) -> None:
    """Raise the one-line error for the first thing this kernel lacks for the probe."""
    problems = kernel_problems(spec, tracefs, sys_root)
    if problems:
        raise ProbeError(problems[0])


def variant_cflags(spec: Probe, tracefs: Path) -> list[str]:
    flags = []
    for hook, names in spec.variant_fields.items():
        have = tracepoint_fields(tracefs, hook)
        event = hook.split(":", 1)[1]
        flags += [f"-DSONDE_F_{event}_{n}" for n in names if n in have]
    return flags


def ensure_tracefs(tracefs: Path) -> None:
    """Mount tracefs where it is expected but absent (root only); bcc attaches through it."""
    if (tracefs / "events").is_dir():
        return
    if os.geteuid() == 0 and tracefs.is_dir():
        os.system(f"mount -t tracefs tracefs {tracefs} >/dev/null 2>&1")
    if not (tracefs / "events").is_dir():
        raise ProbeError(f"tracefs is not mounted at {tracefs}; run: mount -t tracefs tracefs {tracefs}")


def _malloc_trim() -> None:
    # LLVM frees its heap after a compile; hand it back so the agent's RSS stays small.
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _sum_members(leaf, members: list[str]) -> list[int]:
    """Sum value members across CPUs for per-CPU maps (bcc returns an array of leaves)."""
    if hasattr(leaf, "__len__") and not hasattr(leaf, "_fields_"):
        return [sum(getattr(cpu_leaf, m) for cpu_leaf in leaf) for m in members]
    return [getattr(leaf, m) for m in members]


def _kernel_comm(leaf, member: str) -> bytes:
    leaves = leaf if (hasattr(leaf, "__len__") and not hasattr(leaf, "_fields_")) else [leaf]
    for cpu_leaf in leaves:
        raw = bytes(getattr(cpu_leaf, member))
        raw = raw.split(b"\0", 1)[0]
        if raw:
            return raw
    return b""


class LoadedProbe:
    """A loaded BPF object plus the state its polls need (previous reads, budget)."""

    def __init__(self, spec: Probe, config: Config, bpf_obj, budget: SeriesBudget | None = None,
                 missing_optional: tuple[str, ...] = ()):
        self.spec = spec
        self.missing_optional = missing_optional
        self.config = config
        self.bpf = bpf_obj
        self.procfs = Procfs(config.paths.proc)
        self.settings = config.probe(spec.name)
        self.budget = budget or SeriesBudget(config.cardinality.max_series, config.cardinality.window_hours * 3600)
        self._prev: dict[str, dict] = {m.map: {} for m in spec.maps}  # counter map -> tgid -> values read
        self._prev_drops = 0
        self._prev_misses = 0
        self._refused_logged: set[str] = set()
        self.decoder = spec.decoder(self) if spec.decoder else None

    @classmethod
    def load(cls, spec: Probe, config: Config, budget: SeriesBudget | None = None) -> "LoadedProbe":
        require_hooks(spec, config.paths.tracefs, config.paths.sys)
        if not spec.kernel:
            return cls(spec, config, None, budget)
        try:
            from bcc import BPF
        except ImportError:
            raise ProbeError("bcc is not importable; install Debian's python3-bpfcc and use a venv "
                             "made with --system-site-packages (scripts/setup.sh does both)")
        cflags = [f"-DMAX_ENTRIES={config.probe(spec.name).map_entries}", f"-I{BPF_DIR}"]
        cflags += variant_cflags(spec, config.paths.tracefs)
        if spec.cflags is not None:
            try:
                cflags += spec.cflags(config.paths.sys)
            except ProbeError:
                raise
            except SondeError as e:
                raise ProbeError(f"probe {spec.name}: {e}")
        optional_missing = tuple(missing_hooks(spec, config.paths.tracefs, spec.optional_hooks))
        for hook in optional_missing:
            log.warning("probe %s: tracepoint %s is missing from this kernel; %s not reported",
                        spec.name, hook, spec.optional_hooks[hook])
            cflags.append("-DSONDE_NO_" + hook.replace(":", "_"))
        src = probe_dir(spec.name) / f"{spec.name}.bpf.c"
        try:
            obj = BPF(src_file=str(src).encode(), cflags=cflags)
        except Exception as e:  # bcc raises bare Exception for compile and attach failures
            raise ProbeError(f"probe {spec.name}: bcc could not load {src.name}: {str(e).splitlines()[0]}; "
                             f"check kernel headers under /lib/modules/{os.uname().release}/build")
        try:
            if spec.cpu_clock:
                from bcc import PerfSWConfig, PerfType
                for fn, hz in spec.cpu_clock.items():
                    obj.attach_perf_event(ev_type=PerfType.SOFTWARE, ev_config=PerfSWConfig.CPU_CLOCK,
                                          fn_name=fn.encode(), sample_freq=hz, cpu=-1)
        except Exception as e:
            obj.cleanup()
            raise ProbeError(f"probe {spec.name}: cannot attach the CPU clock event ({str(e).splitlines()[0]}); "
                             f"this kernel must allow perf software events for BPF")
        _malloc_trim()
        try:
            return cls(spec, config, obj, budget, optional_missing)
        except (RuntimeError, OSError) as e:  # a decoder that attaches more (cgroup programs)
            obj.cleanup()
            raise ProbeError(f"probe {spec.name}: {e}")

    def table(self, name: str):
        return self.bpf.get_table(name.encode())

    def close(self) -> None:
        if self.decoder is not None and hasattr(self.decoder, "close"):
            self.decoder.close()
        if self.bpf is not None:
            self.bpf.cleanup()

    # --- polling -----------------------------------------------------------------------

    def poll(self, ts_ns: int) -> tuple[list[Point], Point]:
        """Read every map once: (catalog points, the probe's own sonde_probe point).

        The deltas taken commit only when the points are returned; a poll that raises
        leaves them for the next poll, which then covers both intervals."""
        started = time.perf_counter()
        points: list[Point] = []
        entries = 0
        ok = 1
        try:
            with interval():
                if self.decoder:
                    points, entries = self.decoder.poll(ts_ns)
                for m in self.spec.maps:
                    new, n = self._poll_counter_map(m, ts_ns)
                    points.extend(new)
                    entries += n
        except Exception:
            ok = 0
            points = []
            log.exception("probe %s: poll failed; its counts are taken again at the next poll", self.spec.name)
        points, refused = self._declared(points)
        if refused:
            ok = 0
        drops = self._drops_delta()
        misses = self._misses_delta()
        stats = self._stats_delta() if self.config.bpf_stats else None
        self_point = Point("sonde_probe", {"host": self.config.host, "probe": self.spec.name}, {
            "poll_duration_seconds": time.perf_counter() - started,
            "poll_success": ok,
            "map_entries": entries,
            "map_full_drops": drops,
            "points": len(points),
            "hooks_missing": len(self.missing_optional),
            "kernel_misses": misses,
        }, ts_ns)
        if stats is not None:
            self_point.fields["bpf_run_count"], self_point.fields["bpf_run_time_ns"] = stats
        return points, self_point

    def _declared(self, points: list[Point]) -> tuple[list[Point], int]:
        """The points the catalog allows this probe (its own metrics.py, declared tags,
        fields and types); the others are dropped one by one and logged once each."""
        own = own_measurements(self.spec.name)
        kept, refused = [], 0
        for p in points:
            try:
                if p.measurement not in own:
                    raise CatalogError(f"measurement {p.measurement!r} is not declared in bpf/{self.spec.name}/metrics.py")
                catalog.validate_point(p.measurement, p.tags, p.fields)
            except CatalogError as e:
                refused += 1
                if str(e) not in self._refused_logged:
                    self._refused_logged.add(str(e))
                    log.error("probe %s: point dropped: %s", self.spec.name, e)
                continue
            kept.append(p)
        return kept, refused

    def _stats_delta(self) -> tuple[int, int]:
        if self.bpf is None:
            return 0, 0
        cnt = ns = 0
        for fn in self.bpf.funcs.values():
            c, t = run_stats(fn.fd)
            cnt, ns = cnt + c, ns + t
        prev = getattr(self, "_prev_stats", None)
        self._prev_stats = (cnt, ns)
        if prev is None:
            return 0, 0  # counted since statistics were enabled: the first interval starts now
        return max(cnt - prev[0], 0), max(ns - prev[1], 0)

    def _misses_delta(self) -> int:
        if self.bpf is None:
            return 0
        total = sum(recursion_misses(fn.fd) for fn in self.bpf.funcs.values())
        delta, self._prev_misses = total - self._prev_misses, total
        return max(delta, 0)

    def _drops_delta(self) -> int:
        if self.bpf is None:
            return 0
        try:
            table = self.table(DROPS_MAP)
        except KeyError:
            return 0
        total = sum(int(v) for leaf in table.values() for v in (leaf if hasattr(leaf, "__len__") else [leaf]))
        delta, self._prev_drops = total - self._prev_drops, total
        return max(delta, 0)

    def read_process_map(self, table) -> tuple[list[tuple[int, object]], set[int]]:
        """(tgid, value) for every entry of a hash map keyed by tgid, and the tgids that
        have exited. Death is confirmed first and the dead entries are read again
        after, so their values are final: an exited process cannot add to them."""
        from sonde.ingest.runtime.bpfmap import read_all

        raw = [(int(k), v) for k, v in read_all(table)]  # u32 keys come back as ints
        dead = {tgid for tgid, _ in raw if not self.procfs.alive(tgid)}
        rows = []
        for tgid, v in raw:
            if tgid in dead:
                try:
                    v = table[table.Key(tgid)]
                except KeyError:
                    continue
            rows.append((tgid, v))
        return rows, dead

    @staticmethod
    def reclaim(table, tgids) -> None:
        """Delete exited processes' entries once the poll that took their last delta
        has handed its points over (at once outside a poll)."""
        LoadedProbe.delete_later(table, [table.Key(tgid) for tgid in tgids])

    @staticmethod
    def delete_later(table, keys) -> None:
        """Delete these entries once the open poll has handed its points over."""
        keys = list(keys)

        def delete():
            for key in keys:
                try:
                    del table[key]
                except KeyError:
                    pass
        defer(delete)

    def process_name(self, tgid: int, kernel_comm: bytes, exited: bool = False) -> str:
        """/proc's name while the process lives, else the comm the kernel recorded."""
        name = None if exited else self.procfs.comm(tgid)
        return printable_name(name if name is not None else kernel_comm)

    def context(self, ts_ns: int) -> Context:
        """What this probe's decode needs besides its rows and state."""
        return Context(self.config.host, ts_ns, self.settings.max_processes,
                       getattr(self.settings, "max_peers", 20), self.budget)

    def _poll_counter_map(self, m: CounterMap, ts_ns: int) -> tuple[list[Point], int]:
        """Read (kernel, /proc) -> `m.decode` (pure) -> commit once the poll succeeds."""
        table = self.table(m.map)
        members = list(m.fields.values())
        prev = self._prev[m.map]
        read = []  # (ctypes key, tgid, values, leaf)
        for key, leaf in table.items():
            tgid = int(getattr(key, m.tgid) if m.tgid else key.value)
            read.append((key, tgid, tuple(_sum_members(leaf, members)), leaf))

        # Exited processes: confirm death first, then read their final values, then
        # delete. A process dead before the re-read cannot add to its entry.
        dead = [(key, tgid) for key, tgid, _, _ in read if not self.procfs.alive(tgid)]
        final = {}
        for key, tgid in dead:
            try:
                leaf = table[key]
            except KeyError:
                continue
            final[tgid] = (tuple(_sum_members(leaf, members)), leaf)

        rows = []  # (tgid, name, values, exited): named only when its counters moved
        for key, tgid, values, leaf in read:
            exited = tgid in final
            if exited:
                values, leaf = final[tgid]
            name = self.process_name(tgid, _kernel_comm(leaf, m.comm), exited) if values != prev.get(tgid) else ""
            rows.append((tgid, name, values, exited))
        points, new = m.decode(rows, prev, self.context(ts_ns))
        defer(lambda: self._prev.__setitem__(m.map, new))
        self.delete_later(table, [key for key, _ in dead])
        return points, len(read) - len(dead)
