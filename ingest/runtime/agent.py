"""The agent: probes polled by APScheduler jobs, points spooled, spool drained to the sink.

Alert rules and anomaly marks run on the agent's schedule too, but live in
ingest/analysis/: the agent reaches them through the `analysis` entry point
(ingest/plugins.py), never by importing upward."""
from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections import defaultdict

from sonde.ingest.runtime import catalog
from sonde.ingest.runtime.cardinality import SeriesBudget
from sonde.ingest.runtime.memory import release_compiler_pages
from sonde.ingest import plugins
from sonde.ingest.config import Config
from sonde.ingest.output.delivery import Deliverer
from sonde.ingest.output.embedded import InfluxServer
from sonde.ingest.errors import SondeError
from sonde.ingest.output.lineproto import Point, encode
from sonde.ingest.runtime.bpfinfo import enable_stats
from sonde.ingest.runtime.probe import LoadedProbe, discover, ensure_tracefs, require_hooks
from sonde.ingest.runtime.probe import enabled as probe_enabled
from sonde.ingest.output.sinks import make_sink
from sonde.ingest.output.spool import Spool

log = logging.getLogger("sonde.agent")


def start_embedded(config: Config) -> InfluxServer:
    """Start the embedded InfluxDB and make sure the database exists."""
    server = InfluxServer(config.state_dir / "influxdb", config.embedded.http_port, config.embedded.rpc_port,
                          binary=config.embedded.binary).start()
    res = server.query(f'CREATE DATABASE "{config.influxdb.database}"')
    err = res.get("results", [{}])[0].get("error")
    if err:
        server.stop()
        raise SondeError(f"embedded InfluxDB: cannot create database {config.influxdb.database!r}: {err}")
    return server


def effective_sink_config(config: Config):
    if config.influxdb.api == "embedded":
        return config.influxdb.model_copy(update={"api": "v1", "url": f"http://127.0.0.1:{config.embedded.http_port}"})
    return config.influxdb


class Agent:
    def __init__(self, config: Config, *, only: list[str] | None = None, max_backoff: float = 30.0):
        self.config = config
        self.embedded: InfluxServer | None = None
        self.probes: dict[str, LoadedProbe] = {}
        self._stats_fd: int | None = None
        self._only = only
        self._max_backoff = max_backoff
        self._poll_lock = threading.Lock()
        self.spool = Spool(config.state_dir / "spool.sqlite", config.spool.max_points)
        self.sink = None
        self.deliverer: Deliverer | None = None
        self._spool_dropped = 0
        self._held: list[str] = []  # lines a failed spool write left in memory, oldest first
        self._analysis = None
        self.budget = SeriesBudget(config.cardinality.max_series, config.cardinality.window_hours * 3600)

    # --- lifecycle ---------------------------------------------------------------------

    def start(self, deliver: bool = True) -> "Agent":
        """Start the store (if embedded), the sink and the probes; `deliver=False`
        leaves points in the spool until `deliverer.start()`."""
        try:
            if self.config.influxdb.api == "embedded":
                self.embedded = start_embedded(self.config)
            sink_cfg = effective_sink_config(self.config)
            self.sink = make_sink(sink_cfg)
            self.deliverer = Deliverer(self.spool, self.sink, sink_cfg.batch_points, max_backoff=self._max_backoff)
            self.load_probes()
            if deliver:
                self.deliverer.start()
        except BaseException:
            self.stop()
            raise
        return self

    def load_probes(self) -> None:
        ensure_tracefs(self.config.paths.tracefs)
        specs = discover()
        unknown = set(self.config.probes) - set(specs)
        if unknown:
            raise SondeError(f"config: probes.{sorted(unknown)[0]} names no probe; known probes: {', '.join(specs)}")
        unknown = set(self._only or ()) - set(specs)
        if unknown:
            raise SondeError(f"--probe {sorted(unknown)[0]} names no probe; known probes: {', '.join(specs)}")
        chosen = [spec for name, spec in specs.items()
                  if (name in self._only if self._only is not None else probe_enabled(spec, self.config))]
        # Every hook is checked before anything loads: a missing one is one line, not a half-started agent.
        for spec in chosen:
            require_hooks(spec, self.config.paths.tracefs, self.config.paths.sys)
        if self.config.bpf_stats and self._stats_fd is None:
            fd = enable_stats()
            if fd < 0:
                raise SondeError("bpf_stats: the kernel refused BPF_ENABLE_STATS (needs 5.8+ and CAP_SYS_ADMIN); "
                                 "set bpf_stats: false")
            self._stats_fd = fd
        for spec in chosen:
            started = time.monotonic()
            self.probes[spec.name] = LoadedProbe.load(spec, self.config, self.budget)
            log.info("probe %s loaded in %.2f s", spec.name, time.monotonic() - started)
        if chosen:
            released = release_compiler_pages()
            log.debug("asked the kernel to page out %.0f MB of compiler code after loading", released / 2**20)

    def stop(self) -> None:
        if self.deliverer:
            self.deliverer.stop()
        for p in self.probes.values():
            p.close()
        self.probes.clear()
        if self._stats_fd is not None:
            os.close(self._stats_fd)
            self._stats_fd = None
        if self.sink:
            self.sink.close()
        if self.embedded:
            self.embedded.stop()
        self.spool.close()

    # --- work --------------------------------------------------------------------------

    def poll(self, names: list[str] | None = None) -> list[Point]:
        """Poll probes (all, or those named), spool their points and the agent's own."""
        with self._poll_lock:
            ts = time.time_ns()
            points: list[Point] = []
            for name in names or list(self.probes):
                new, self_point = self.probes[name].poll(ts)
                points.extend(new)
                points.append(self_point)
            points.append(self._spool_point(ts))
            self._spool([encode(p) for p in points])
            return points

    def _spool(self, lines: list[str]) -> None:
        """Append to the spool. A failed write (a full disk, an I/O error) keeps the lines
        in memory, in order, and the next write takes them first: a poll's deltas are
        already committed when its points are spooled, so nothing else has them. What is
        held stays within the spool's own bound, the oldest dropped and counted."""
        lines = self._held + lines
        try:
            self._spool_dropped += self.spool.put(lines)
        except (sqlite3.Error, OSError) as e:
            over = max(0, len(lines) - self.spool.max_points)
            self._held, self._spool_dropped = lines[over:], self._spool_dropped + over
            log.error("spool %s: write failed (%s); %d points held in memory until a write succeeds",
                      self.spool.path, e, len(self._held))
        else:
            if self._held:
                log.warning("spool %s: written again; the %d points held in memory are in it",
                            self.spool.path, len(self._held))
            self._held = []
        if self.deliverer:
            self.deliverer.wake.set()

    def _spool_point(self, ts: int) -> Point:
        written, rejected, errors = self.deliverer.take_counts() if self.deliverer else (0, 0, 0)
        dropped, self._spool_dropped = self._spool_dropped, 0
        p = Point("sonde_spool", {"host": self.config.host}, {
            "queued_points": len(self.spool) + len(self._held),
            "dropped_points": dropped,
            "written_points": written,
            "rejected_points": rejected,
            "write_errors": errors,
        }, ts)
        catalog.validate_point(p.measurement, p.tags, p.fields)
        return p

    def analysis(self):
        """The alert rules and anomaly marks (ingest/analysis/scheduled.py), built on first use."""
        if self._analysis is None:
            self._analysis = plugins.load("analysis")(self)
        return self._analysis

    def evaluate_alerts(self, now_ms: int | None = None) -> list[Point]:
        """Run every alert rule and the anomaly marks now; spool what they found."""
        points = self.analysis().evaluate(now_ms or int(time.time() * 1000))
        for p in points:
            catalog.validate_point(p.measurement, p.tags, p.fields)
        with self._poll_lock:
            self._spool([encode(p) for p in points])
        return points

    def run_forever(self, stop: threading.Event) -> None:
        """One APScheduler job per distinct poll interval, until `stop` is set."""
        from apscheduler.schedulers.background import BackgroundScheduler

        groups: dict[float, list[str]] = defaultdict(list)
        for name in self.probes:
            groups[self.config.interval_for(name)].append(name)
        if not groups:
            groups[self.config.interval_seconds] = []
        sched = BackgroundScheduler(job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None})
        for interval, names in groups.items():
            sched.add_job(self.poll, "interval", seconds=interval, args=[names or None],
                          id=f"poll-{interval}s", name=f"poll {','.join(names) or 'agent'} every {interval:g} s")
        if self.config.alerts.enabled:
            sched.add_job(self.evaluate_alerts, "interval", seconds=self.config.alerts.interval_seconds,
                          id="alerts", name="alert rules")
        sched.start()
        log.info("polling %s; writing to %s", ", ".join(f"{', '.join(n)} every {i:g} s" for i, n in groups.items()),
                 effective_sink_config(self.config).url)
        try:
            stop.wait()
        finally:
            sched.shutdown(wait=True)
            self.poll()  # the last interval, so a clean stop loses nothing
