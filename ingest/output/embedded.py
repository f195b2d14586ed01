"""The embedded default store: Debian's InfluxDB 1.x, started on loopback with a
config and data dir of Sonde's own. The tests start theirs through the same class."""
from __future__ import annotations

import base64
import json
import logging
import os
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from sonde.ingest.errors import SondeError

log = logging.getLogger("sonde.embedded")

_CONF = """\
reporting-disabled = true
bind-address = "127.0.0.1:{rpc_port}"

[meta]
  dir = "{root}/meta"
  logging-enabled = false

[data]
  dir = "{root}/data"
  wal-dir = "{root}/wal"
  query-log-enabled = false
  wal-fsync-delay = "100ms"

[monitor]
  store-enabled = false

[http]
  enabled = true
  bind-address = "127.0.0.1:{http_port}"
  auth-enabled = {auth}
  log-enabled = false
  pprof-enabled = false

[logging]
  level = "warn"

[continuous_queries]
  log-enabled = false
"""


class InfluxServer:
    def __init__(self, root: Path, http_port: int, rpc_port: int, *, binary: Path = Path("/usr/bin/influxd"),
                 auth: bool = False):
        self.root = Path(root)
        self.http_port = http_port
        self.rpc_port = rpc_port
        self.binary = Path(binary)
        self.auth = auth
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 30.0) -> "InfluxServer":
        if not self.binary.exists():
            raise SondeError(f"embedded InfluxDB: {self.binary} not found; install Debian's influxdb package "
                             f"(scripts/setup.sh does) or set influxdb.api to v1/v2 with a server url")
        self.root.mkdir(parents=True, exist_ok=True)
        conf = self.root / "influxdb.conf"
        conf.write_text(_CONF.format(root=self.root, http_port=self.http_port, rpc_port=self.rpc_port,
                                     auth="true" if self.auth else "false"))
        logf = open(self.root / "influxd.log", "ab")
        self.proc = subprocess.Popen([str(self.binary), "-config", str(conf)], stdout=logf, stderr=logf,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        logf.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = (self.root / "influxd.log").read_text(errors="replace").strip().splitlines()[-1:]
                raise SondeError(f"embedded InfluxDB exited at start (port {self.http_port} in use?): "
                                 f"{tail[0] if tail else 'no output'}")
            try:
                with urllib.request.urlopen(self.url + "/ping", timeout=1) as r:
                    if r.status == 204:
                        return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.1)
        self.stop()
        raise SondeError(f"embedded InfluxDB did not answer on {self.url} within {timeout:.0f} s; see {self.root}/influxd.log")

    def query(self, q: str, db: str | None = None, auth: tuple[str, str] | None = None) -> dict:
        params = {"q": q, "epoch": "ns"}
        if db:
            params["db"] = db
        req = urllib.request.Request(self.url + "/query", data=urllib.parse.urlencode(params).encode(), method="POST")
        if auth:
            req.add_header("Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
