"""The agent's one YAML config, validated by pydantic.

Secrets (InfluxDB password or token) are never in the YAML and never on argv: they
come from an environment variable or from a root-only file named in the config.
"""
from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from sonde.ingest.errors import ConfigError

PASSWORD_ENV = "SONDE_INFLUXDB_PASSWORD"
TOKEN_ENV = "SONDE_INFLUXDB_TOKEN"


class _Strict(BaseModel):
    # Floats are finite (an interval of .inf or .nan is refused here, not by the scheduler).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _nonempty_path(v):
    if isinstance(v, str) and not v.strip():
        raise ValueError("must be a path, not empty")
    return v


def _http_url(v: str) -> str:
    """An http(s) URL with a host and a valid port, or a ValueError saying which part is wrong."""
    if not (v.startswith("http://") or v.startswith("https://")):
        raise ValueError("must start with http:// or https://")
    try:
        parts = urlsplit(v)
        parts.port  # noqa: B018 - raises for a port that is not a number in 0-65535
    except ValueError:
        raise ValueError("has a port that is not a number from 1 to 65535")
    if not parts.hostname:
        raise ValueError("has no host; e.g. http://127.0.0.1:8086")
    if any(c.isspace() for c in v):
        raise ValueError("contains white space")
    return v.rstrip("/")


class Paths(_Strict):
    """Injectable roots, so tests and containers can point the agent elsewhere."""
    proc: Path = Path("/proc")
    tracefs: Path = Path("/sys/kernel/tracing")
    sys: Path = Path("/sys")

    _nonempty = field_validator("proc", "tracefs", "sys", mode="before")(classmethod(lambda cls, v: _nonempty_path(v)))


class InfluxDB(_Strict):
    api: Literal["embedded", "v1", "v2"] = "embedded"
    url: str = "http://127.0.0.1:8086"
    # v1 (InfluxDB 1.x /write)
    database: str = Field("sonde", min_length=1)
    retention_policy: str = ""
    username: str = ""
    password_file: Path | None = None
    # v2 (influxdb-client: InfluxDB 1.8+, 2.x, 3.x, VictoriaMetrics)
    org: str = ""
    bucket: str = "sonde"
    token_file: Path | None = None
    timeout_seconds: float = Field(10.0, gt=0)
    batch_points: int = Field(5000, ge=1, le=100_000)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return _http_url(v)

    @field_validator("database")
    @classmethod
    def _database(cls, v: str) -> str:
        if any(c == '"' or c == "\\" or ord(c) < 32 for c in v):
            raise ValueError("must not contain a double quote, a backslash or a control character")
        return v

    @field_validator("password_file", "token_file", mode="before")
    @classmethod
    def _files(cls, v):
        return _nonempty_path(v)

    def password(self) -> SecretStr | None:
        return _secret(self.password_file, PASSWORD_ENV, "influxdb.password_file")

    def token(self) -> SecretStr | None:
        return _secret(self.token_file, TOKEN_ENV, "influxdb.token_file")


class Embedded(_Strict):
    """The InfluxDB 1.x the agent starts itself when influxdb.api is `embedded`."""
    binary: Path = Path("/usr/bin/influxd")
    http_port: int = Field(8086, gt=0, lt=65536)
    rpc_port: int = Field(8088, gt=0, lt=65536)

    @model_validator(mode="after")
    def _two_ports(self):
        if self.http_port == self.rpc_port:
            raise ValueError(f"http_port and rpc_port are both {self.http_port}; the embedded InfluxDB needs two "
                             f"different ports")
        return self


class Spool(_Strict):
    max_points: int = Field(1_000_000, ge=1)


class ProbeConfig(_Strict):
    # null: the probe's own default (tcp_traffic is off by default: tcp_flow reports
    # the same bytes per process and peer, and both on would pay for every send twice)
    enabled: bool | None = None
    interval_seconds: float | None = Field(None, gt=0)
    map_entries: int = Field(10240, ge=16, le=1_048_576)
    # Top-N processes kept per interval; the rest are summed into pid=other, comm=other.
    max_processes: int = Field(200, ge=1, le=100_000)
    # Top-M peers per process kept per interval (probes with peers); the rest fold into peer=other.
    max_peers: int = Field(20, ge=1, le=100_000)


class L7ProbeConfig(ProbeConfig):
    """probes.l7: which processes the L7 capture opts in. A process matching any
    entry is captured, and so is a process it forks; nothing else pays more than
    the hooks' first check, and with nothing matching the hooks are detached."""
    processes: list[str] = []    # process names (/proc/PID/comm, at most 15 bytes)
    executables: list[str] = []  # absolute paths of executables (/proc/PID/exe)
    ports: list[int] = []        # processes listening on these TCP ports
    cgroups: list[str] = []      # cgroup paths (/proc/PID/cgroup, any hierarchy); a path covers those under it
    tls: bool = True             # libssl uprobes on opted-in processes for HTTPS & co.
    # What captures while a process is opted in: "sockets" (sock_send_length/sock_recv_length,
    # 6.3+: only socket I/O pays), "syscalls" (raw sys_enter/sys_exit: every syscall on the
    # host pays), or "auto" (sockets where the kernel has them).
    hooks: Literal["auto", "sockets", "syscalls"] = "auto"
    # Count HTTP/1.x and Redis connections in the kernel while they go one request at a
    # time (the agent parses the rest: pipelining, bodies, other protocols, TLS).
    in_kernel: bool = True
    # The most of one core the agent spends parsing; past it the kernel drops events
    # (counted in l7_probe.lost_events) rather than the agent slowing the host further.
    cpu_percent: float = Field(25.0, gt=0, le=100)

    @field_validator("processes")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        for name in v:
            if not name or "/" in name or len(name.encode()) > 15:
                raise ValueError(f"{name!r} is not a process name: 1 to 15 bytes, no '/' (as /proc/PID/comm "
                                 f"shows it); use executables for a path")
        return v

    @field_validator("executables")
    @classmethod
    def _exes(cls, v: list[str]) -> list[str]:
        for path in v:
            if not path.startswith("/"):
                raise ValueError(f"{path!r} is not an absolute path; e.g. /usr/sbin/nginx")
        return v

    @field_validator("ports")
    @classmethod
    def _ports(cls, v: list[int]) -> list[int]:
        for port in v:
            if not 0 < port < 65536:
                raise ValueError(f"{port} is not a TCP port (1 to 65535)")
        return v

    @field_validator("cgroups")
    @classmethod
    def _cgroups(cls, v: list[str]) -> list[str]:
        for path in v:
            if not path.startswith("/"):
                raise ValueError(f"{path!r} is not a cgroup path: it starts with / as in /proc/PID/cgroup, "
                                 f"e.g. /docker/<id>")
        return v


# probes.<name> whose section has keys of its own beyond ProbeConfig's
_PROBE_CONFIGS = {"l7": L7ProbeConfig}


class Cardinality(_Strict):
    # Hard cap on series one host creates per window, across all probes. InfluxDB 1.x
    # refuses writes past max-series-per-database (1M by default), shared by the fleet.
    max_series: int = Field(20_000, ge=10)
    window_hours: float = Field(24.0, gt=0)


class Alerts(_Strict):
    enabled: bool = True
    interval_seconds: float = Field(30.0, gt=0)
    # Alertmanager-compatible endpoint (e.g. http://alertmanager:9093/api/v2/alerts); none by default.
    webhook_url: str | None = None
    thresholds: Path | None = None  # default: alerts/thresholds.yaml shipped with Sonde

    @field_validator("webhook_url")
    @classmethod
    def _webhook(cls, v: str | None) -> str | None:
        return None if v is None else _http_url(v)

    @field_validator("thresholds", mode="before")
    @classmethod
    def _thresholds(cls, v):
        return _nonempty_path(v)


class Config(_Strict):
    host: str = Field(default_factory=socket.gethostname, min_length=1)
    interval_seconds: float = Field(10.0, gt=0)
    state_dir: Path = Path("/var/lib/sonde")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # BPF run-time statistics (run count and time per program, in sonde_probe): off by
    # default because the kernel then takes two clock reads around every program run.
    bpf_stats: bool = False
    paths: Paths = Paths()
    influxdb: InfluxDB = InfluxDB()
    embedded: Embedded = Embedded()
    spool: Spool = Spool()
    cardinality: Cardinality = Cardinality()
    alerts: Alerts = Alerts()
    probes: dict[str, ProbeConfig] = {}

    @field_validator("state_dir", mode="before")
    @classmethod
    def _state_dir(cls, v):
        return _nonempty_path(v)

    def probe(self, name: str) -> ProbeConfig:
        return self.probes.get(name, ProbeConfig())

    def interval_for(self, name: str) -> float:
        return self.probe(name).interval_seconds or self.interval_seconds

    @field_validator("probes", mode="wrap")
    @classmethod
    def _probe_sections(cls, v, handler):
        """Sections with keys of their own (probes.l7) are validated by their own model;
        their errors keep their place (probes.l7.ports.0)."""
        if not isinstance(v, dict):
            return handler(v)
        own = {k: x for k, x in v.items() if k in _PROBE_CONFIGS}
        out = handler({k: x for k, x in v.items() if k not in own})
        for name, section in own.items():
            try:
                out[name] = _PROBE_CONFIGS[name].model_validate(section)
            except ValidationError as e:
                raise ValidationError.from_exception_data(e.title, [
                    {"type": err["type"], "loc": (name, *err["loc"]), "input": err["input"],
                     "ctx": err.get("ctx", {})} for err in e.errors()])
        return out


def _secret(path: Path | None, env: str, key: str) -> SecretStr | None:
    if path is not None:
        try:
            secret = path.read_text().strip()
        except OSError as e:
            raise ConfigError(f"{key}: cannot read {path}: {e.strerror}; create it (mode 0600) or unset the key")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{key}: {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                              f"write the secret as plain text")
        if not secret:
            raise ConfigError(f"{key}: {path} is empty; write the secret in it, or unset the key")
        return SecretStr(secret)
    if os.environ.get(env):
        return SecretStr(os.environ[env])
    return None


def _where(loc: tuple) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def _problem(err: dict) -> str:
    where = _where(err["loc"])
    if err["type"] == "extra_forbidden":
        hint = ""
        if err["loc"] and err["loc"][-1] in ("password", "token"):
            hint = f" (secrets come from {err['loc'][-1]}_file or the environment, never the config)"
        return f"{where}: unknown key{hint}"
    got = err.get("input")
    got_s = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
    return f"{where}: {err['msg'].removeprefix('Value error, ')}{got_s}"


def parse(text: str, origin: str = "<config>") -> Config:
    """Parse and validate. Raises ConfigError whose args are one line per problem."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        if isinstance(e, yaml.reader.ReaderError):  # a character YAML does not allow (a NUL, a control byte)
            at = f"character {e.position + 1}: "
            ch = chr(e.character) if isinstance(e.character, int) else str(e.character)
            problem = f"the character U+{ord(ch):04X} is not allowed in YAML text"
        else:
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config {origin}: {at}invalid YAML: {problem}")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {origin}: the top level must be a mapping of keys, not {type(data).__name__}")
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        problems = [f"config {origin}: {_problem(err)}" for err in e.errors()]
        raise ConfigError(*problems)


def load(path: str | Path | None) -> Config:
    if path is None:
        return Config()
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config {p}: no such file; pass an existing file with -c, or omit -c for the embedded default")
    except IsADirectoryError:
        raise ConfigError(f"config {p}: is a directory; pass the YAML file itself with -c")
    except OSError as e:
        raise ConfigError(f"config {p}: cannot read: {e.strerror}; check the path and its permissions")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config {p}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                          f"save it as UTF-8")
    return parse(text, str(p))


def source_name(path: str | Path | None) -> str:
    """How errors name where a config came from."""
    return str(path) if path is not None else "(built-in defaults)"


_STATE_FIX = "set state_dir to a writable directory (default /var/lib/sonde)"


def prepare_state_dir(cfg: Config, where: str) -> None:
    """Create state_dir if needed and prove it is a writable directory, or raise the
    one-line ConfigError that names it (the spool and the embedded InfluxDB live there)."""
    d = cfg.state_dir
    try:
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=d):
            pass
    except FileExistsError:
        raise ConfigError(f"config {where}: state_dir: {d} exists and is not a directory; {_STATE_FIX}")
    except OSError as e:
        raise ConfigError(f"config {where}: state_dir: cannot use {d} ({e.strerror}); {_STATE_FIX}")


def path_problems(cfg: Config, where: str) -> list[str]:
    """The injectable roots that do not look like what they name, one line each."""
    out = []
    if not (cfg.paths.proc / "self/stat").exists():
        out.append(f"config {where}: paths.proc: {cfg.paths.proc} is not a mounted procfs (no self/stat); "
                   f"set it to /proc or unset it")
    if not (cfg.paths.sys / "kernel").is_dir():
        out.append(f"config {where}: paths.sys: {cfg.paths.sys} is not a mounted sysfs (no kernel/); "
                   f"set it to /sys or unset it")
    return out
