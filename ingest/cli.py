"""`sonde`: the thin command line. Each command parses, calls into ingest/, and turns
SondeError into one line on stderr with a non-zero exit; never a traceback."""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from sonde.ingest.runtime import catalog
from sonde.ingest import config as config_mod
from sonde.ingest.errors import SondeError

EXIT_USAGE = 2
EXIT_PROBLEM = 1


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}; see {self.prog.split()[0]} --help\n")


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", metavar="FILE",
                   help="YAML config (default: built-in defaults, which start the embedded InfluxDB)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sonde", description="Sonde: eBPF observability agent writing to InfluxDB.")
    parser.add_argument("--debug", action="store_true", help="log at debug level and show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="load the probes and write points until stopped")
    _add_config(run)
    run.add_argument("--probe", action="append", metavar="NAME", help="run only this probe (repeatable)")
    check = sub.add_parser("check", help="validate config, sink reachability and credentials, and probe hooks")
    _add_config(check)
    check.add_argument("--secret-file", metavar="FILE",
                       help="check with this password (v1) or token (v2) file instead of the one the config "
                            "names, e.g. a new secret before it replaces the old")
    dash = sub.add_parser("dashboards", help="write the Grafana dashboards (JSON) and provisioning files")
    dash.add_argument("--out", metavar="DIR", help="directory to write the JSON and provisioning files into")
    dash.add_argument("--readme", metavar="FILE", help="regenerate the dashboard list in this README")
    dash.add_argument("--datasource-url", default="http://127.0.0.1:8086",
                      help="InfluxDB URL for the provisioned datasource (default %(default)s)")
    dash.add_argument("--database", default="sonde", help="InfluxDB database (default %(default)s)")
    dash.add_argument("--dashboards-path", metavar="DIR",
                      help="where Grafana will find the JSON, for the provider file (default: --out)")
    dash.add_argument("--interval", metavar="SECONDS",
                      help="the agents' poll interval (their interval_seconds; default: the config's default): "
                           "each panel's minimum interval holds whole polls")
    for name, helptext in (("backtrack", "report what happened in a past window, from stored metrics"),
                           ("topology", "the process <-> endpoint graph of a past window, as JSON or SVG")):
        bt = sub.add_parser(name, help=helptext)
        _add_config(bt)
        bt.add_argument("--at", metavar="TIME", help="end of the window: ISO 8601 (UTC if no zone) or epoch seconds")
        bt.add_argument("--window", default="10m", metavar="DUR", help="window length, e.g. 90s, 10m, 1h (default 10m)")
        bt.add_argument("--from", dest="start", metavar="TIME", help="window start (instead of --at/--window)")
        bt.add_argument("--to", dest="end", metavar="TIME", help="window end (with --from)")
        bt.add_argument("--host", help="only this host")
        bt.add_argument("--process", help="only this process: its name (comm) or its pid")
        bt.add_argument("--peer", help="only this peer address")
        bt.add_argument("--json", action="store_true", help="JSON for tools")
        bt.add_argument("--svg", metavar="FILE", help="write the topology as SVG")
        bt.add_argument("--png", metavar="DIR", help="plot the key series, the window shaded, as PNGs in DIR")
    al = sub.add_parser("alerts", help="write Grafana alerting provisioning for the alert rules")
    al.add_argument("--out", metavar="DIR", help="directory to write alerting/sonde.yaml into")
    al.add_argument("--readme", metavar="FILE", help="regenerate the rule list in this README")
    cat = sub.add_parser("catalog", help="print the metric catalog")
    cat.add_argument("--markdown", action="store_true", help="as docs/metrics.md")
    prof = sub.add_parser("profile", help="sample a process's stacks and write flame graphs (SVG, speedscope, folded)")
    who = prof.add_mutually_exclusive_group(required=True)
    who.add_argument("--pid", type=int, help="the process to profile")
    who.add_argument("--process", metavar="NAME", help="every process with this name (comm, executable or argv[0])")
    prof.add_argument("--seconds", type=float, required=True, help="how long to sample")
    prof.add_argument("--hz", type=int, default=99, help="samples per second per CPU (default %(default)s)")
    prof.add_argument("--off-cpu", action="store_true", help="also time spent off the CPU (blocked), by stack")
    prof.add_argument("--out", metavar="DIR", required=True, help="directory for the flame graphs and notes")
    return parser


def _setup_logging(level: str, debug: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else getattr(logging, level.upper()),
                        format="%(asctime)s sonde %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("apscheduler", "urllib3", "influxdb_client"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_run(args) -> int:
    from sonde.ingest.runtime.agent import Agent
    from sonde.ingest.runtime.identity import name_this_process

    name_this_process()  # before any thread starts: the alert rules leave the agent's own sockets out
    cfg = config_mod.load(args.config)
    _preflight(cfg, config_mod.source_name(args.config))
    _setup_logging(cfg.log_level, args.debug)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    agent = Agent(cfg, only=args.probe).start()
    try:
        agent.run_forever(stop)
    finally:
        agent.stop()
    return 0


def thresholds_problem(cfg, where: str) -> str | None:
    """A thresholds file (alerts.thresholds) the alert rules cannot be built from."""
    import yaml

    from sonde.ingest import plugins

    path = cfg.alerts.thresholds
    if path is None or not cfg.alerts.enabled:
        return None
    fix = "fix it, or set alerts.thresholds: null for the shipped rules"
    try:
        if not isinstance(yaml.safe_load(path.read_text()), dict):
            raise ValueError("the top level must be a mapping of rule names")
        plugins.load("alert_rules").load(path)
    except OSError as e:
        return f"config {where}: alerts.thresholds: cannot read {path} ({e.strerror}); {fix}"
    except UnicodeDecodeError:
        return f"config {where}: alerts.thresholds: {path} is not UTF-8 text; {fix}"
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        return f"config {where}: alerts.thresholds: {path} is not valid YAML{at}; {fix}"
    except KeyError as e:
        return f"config {where}: alerts.thresholds: {path} has no rule or key {e}; {fix}"
    except (TypeError, ValueError, AttributeError) as e:
        return f"config {where}: alerts.thresholds: {path}: {str(e).splitlines()[0]}; {fix}"
    return None


def _preflight(cfg, where: str) -> None:
    """What `sonde run` needs from the config before anything starts, each as the
    one-line error naming the key: a usable state_dir, real proc and sys roots, a
    thresholds file the rules can be built from, a readable secret file."""
    config_mod.prepare_state_dir(cfg, where)
    problems = config_mod.path_problems(cfg, where)
    problems += filter(None, [thresholds_problem(cfg, where)])
    if problems:
        raise SondeError(problems[0])
    if cfg.influxdb.api == "v1":  # a secret file named but unreadable is refused now, not at the first write
        cfg.influxdb.password()
    elif cfg.influxdb.api == "v2":
        cfg.influxdb.token()


def check_problems(cfg, where: str = "(built-in defaults)") -> list[str]:
    """Every problem `sonde check` finds, one line each."""
    from sonde.ingest.runtime.agent import effective_sink_config
    from sonde.ingest.runtime.probe import discover, kernel_problems
    from sonde.ingest.runtime.probe import enabled as probe_enabled
    from sonde.ingest.output.sinks import make_sink

    problems = []
    try:
        config_mod.prepare_state_dir(cfg, where)
    except SondeError as e:
        problems += e.args
    problems += config_mod.path_problems(cfg, where)
    problems += filter(None, [thresholds_problem(cfg, where)])
    if os.geteuid() != 0:
        problems.append("agent: not running as root; loading BPF programs needs root (CAP_BPF, CAP_PERFMON)")
    try:
        import bcc  # noqa: F401
    except ImportError:
        problems.append("bcc: not importable; install python3-bpfcc and use a --system-site-packages venv")
    specs = discover()
    for name in sorted(set(cfg.probes) - set(specs)):
        problems.append(f"config: probes.{name} names no probe; known probes: {', '.join(specs)}")
    if not (cfg.paths.tracefs / "events").is_dir():
        problems.append(f"tracefs: not mounted at {cfg.paths.tracefs}; run: mount -t tracefs tracefs {cfg.paths.tracefs}")
    else:
        for name, spec in specs.items():
            if probe_enabled(spec, cfg):
                problems += kernel_problems(spec, cfg.paths.tracefs, cfg.paths.sys)
    if cfg.influxdb.api == "embedded":
        if not cfg.embedded.binary.exists():
            problems.append(f"embedded: {cfg.embedded.binary} not found; install Debian's influxdb package")
    else:
        try:  # a secret file that cannot be used is named whether or not the server answers
            cfg.influxdb.password() if cfg.influxdb.api == "v1" else cfg.influxdb.token()
        except SondeError as e:
            return problems + list(e.args)
        sink = make_sink(effective_sink_config(cfg))
        try:
            problems += sink.check()
        finally:
            sink.close()
    return problems


def cmd_check(args) -> int:
    try:
        cfg = config_mod.load(args.config)
    except SondeError as e:
        for line in e.args:
            print(line, file=sys.stderr)
        return EXIT_PROBLEM
    if args.secret_file:
        key = "token_file" if cfg.influxdb.api == "v2" else "password_file"
        cfg = cfg.model_copy(update={"influxdb": cfg.influxdb.model_copy(update={key: Path(args.secret_file)})})
    problems = check_problems(cfg, config_mod.source_name(args.config))
    for line in problems:
        print(line, file=sys.stderr)
    if not problems:
        print(f"ok: config valid, {cfg.influxdb.api} sink reachable, all probe hooks present")
    return EXIT_PROBLEM if problems else 0


def _readme_only(args, command: str, update) -> bool:
    """Handle --readme; return whether there is --out work left to do."""
    if args.readme:
        try:
            update(Path(args.readme))
        except OSError as e:
            raise SondeError(f"{command}: --readme {args.readme}: cannot update it ({e.strerror}); "
                             f"give the README.md to regenerate")
        except (ValueError, UnicodeDecodeError) as e:
            raise SondeError(f"{command}: --readme {args.readme}: {str(e).splitlines()[0]}")
    if not args.out and not args.readme:
        raise SondeError(f"{command}: give --out DIR (and/or --readme FILE)")
    return bool(args.out)


def cmd_dashboards(args) -> int:
    from sonde.ingest import plugins

    house, provisioning = plugins.load("dashboards"), plugins.load("provisioning")

    if not _readme_only(args, "dashboards", house.update_readme):
        return 0
    poll_s = house.DEFAULT_POLL_S
    if args.interval is not None:
        try:
            poll_s = float(args.interval)
        except ValueError:
            poll_s = float("nan")
        if not 0.001 <= poll_s <= 86400:
            raise SondeError(f"dashboards: --interval {args.interval!r} is not a poll interval in seconds "
                             f"(0.001 to 86400)")
    out = Path(args.out)
    try:
        written = house.write_all(out, poll_s)
        written += provisioning.write(out / "provisioning", args.dashboards_path or str(out.resolve()),
                                      args.datasource_url, args.database)
    except OSError as e:
        raise SondeError(f"dashboards: cannot write to {out}: {e.strerror}")
    for path in written:
        print(path)
    return 0


def cmd_alerts(args) -> int:
    import yaml

    from sonde.ingest import plugins

    rules = plugins.load("alert_rules")

    if not _readme_only(args, "alerts", rules.update_readme):
        return 0
    path = Path(args.out) / "alerting" / "sonde.yaml"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(rules.grafana_provisioning(), sort_keys=False, allow_unicode=True))
    except OSError as e:
        raise SondeError(f"alerts: cannot write {path}: {e.strerror}")
    print(path)
    return 0


def _time_ms(value: str, what: str) -> int:
    import datetime as dt

    try:
        return int(float(value) * 1000)
    except ValueError:
        pass
    try:
        t = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise SondeError(f"{what}: {value!r} is not a time; use ISO 8601 (2026-11-25T08:00:00Z) or epoch seconds")
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return int(t.timestamp() * 1000)


def _duration_ms(value: str) -> int:
    import re

    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?", value.strip())
    if not m:
        raise SondeError(f"--window: {value!r} is not a duration; use e.g. 90s, 10m, 1h")
    return int(float(m.group(1)) * {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}[m.group(2) or "s"])


def _window(args):
    import time

    from sonde.ingest.analysis.backtrack import Window

    if args.start:
        start = _time_ms(args.start, "--from")
        end = _time_ms(args.end, "--to") if args.end else int(time.time() * 1000)
    else:
        end = _time_ms(args.at, "--at") if args.at else int(time.time() * 1000)
        start = end - _duration_ms(args.window)
    if end <= start:
        raise SondeError("the window is empty: --to must be after --from")
    return Window(start, end, args.host, args.process, args.peer)


def _embedded_for_query(cfg):
    """The embedded InfluxDB for a backtrack: the agent's, if it answers; else one
    started on the agent's data directory, on free loopback ports, for this query only
    (the caller stops it). None when the config names an external server."""
    import socket
    import urllib.request

    from sonde.ingest.runtime.agent import start_embedded

    if cfg.influxdb.api != "embedded":
        return None
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{cfg.embedded.http_port}/ping", timeout=2) as r:
            if r.status == 204:
                return None
    except OSError:
        pass
    root = cfg.state_dir / "influxdb"
    if not (root / "meta").is_dir():
        raise SondeError(f"no stored metrics under {root}: the agent has not run with this config "
                         f"(start it with sonde run and the same config)")
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    print(f"sonde: the agent is not running; reading {root} with the embedded InfluxDB, started for this query",
          file=sys.stderr)
    return start_embedded(cfg.model_copy(update={"embedded": cfg.embedded.model_copy(
        update={"http_port": ports[0], "rpc_port": ports[1]})}))


def cmd_backtrack(args) -> int:
    from rich.progress import Progress, SpinnerColumn, TextColumn

    from sonde.ingest.analysis import backtrack, render
    from sonde.ingest.runtime.agent import effective_sink_config
    from sonde.ingest.output.sinks import make_sink

    cfg = config_mod.load(args.config)
    w = _window(args)
    server = _embedded_for_query(cfg)
    sink = None
    try:
        sink_cfg = effective_sink_config(cfg)
        sink = make_sink(sink_cfg.model_copy(update={"url": server.url}) if server else sink_cfg)
        with Progress(SpinnerColumn(), TextColumn("querying {task.description}"), transient=True,
                      console=_stderr_console()) as progress:
            task = progress.add_task("InfluxDB")
            bt = backtrack.Backtrack(sink.query, lambda step: progress.update(task, description=step))
            report = bt.report(w)
            if args.png:
                progress.update(task, description="plots")
                for path in render.plot(bt, w, args.png, report):
                    print(f"wrote {path}", file=sys.stderr)
    except RuntimeError as e:
        raise SondeError(f"backtrack: InfluxDB refused a query: {str(e).splitlines()[0]}")
    finally:
        if sink:
            sink.close()
        if server:
            server.stop()
    topo = backtrack.topology(report)
    if args.svg:
        try:
            Path(args.svg).write_text(render.topology_svg(topo))
        except OSError as e:
            raise SondeError(f"--svg: cannot write {args.svg}: {e.strerror}")
    if args.command == "topology":
        sys.stdout.write(json.dumps(topo, indent=2) + "\n" if args.json or not args.svg else "")
    else:
        sys.stdout.write(backtrack.as_json(report) + "\n" if args.json else backtrack.text(report))
    return 0


def _stderr_console():
    from rich.console import Console
    return Console(stderr=True)


def cmd_profile(args) -> int:
    from sonde.ingest.analysis import profiling

    res = profiling.profile(pid=args.pid, process=args.process, seconds=args.seconds, hz=args.hz,
                            off_cpu=args.off_cpu, out=Path(args.out),
                            status=lambda line: print(line, file=sys.stderr, flush=True))
    for line in res.notes:
        print(f"note: {line}", file=sys.stderr)
    for path in res.files:
        print(path)
    return 0


def cmd_catalog(args) -> int:
    if args.markdown:
        sys.stdout.write(catalog.render_markdown())
    else:
        for m in catalog.MEASUREMENTS.values():
            print(f"{m.name}\t{m.kind}\ttags={','.join(sorted(m.tag_names))}\tfields={','.join(f.name for f in m.fields)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"run": cmd_run, "check": cmd_check, "catalog": cmd_catalog,
                "dashboards": cmd_dashboards, "alerts": cmd_alerts, "backtrack": cmd_backtrack,
                "topology": cmd_backtrack, "profile": cmd_profile}[args.command](args)
    except SondeError as e:
        for line in e.args:
            print(f"sonde: error: {line}", file=sys.stderr)
        return EXIT_PROBLEM
    except KeyboardInterrupt:
        return 130
    except OSError as e:  # a file or directory the command line or config named
        if args.debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"sonde: error: {where}{e.strerror or e}; check that path and its permissions", file=sys.stderr)
        return EXIT_PROBLEM
    except Exception as e:  # a bug: still one line unless asked for the traceback
        if args.debug:
            raise
        print(f"sonde: internal error: {type(e).__name__}: {e}; rerun with --debug for a traceback", file=sys.stderr)
        return EXIT_PROBLEM


if __name__ == "__main__":
    sys.exit(main())
