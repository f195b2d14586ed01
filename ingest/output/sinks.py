"""Where points go: one small interface, two implementations.

- `V1Sink`: line protocol to `/write` (InfluxDB 1.x, and 1.8+/3.x compatibility APIs).
- `V2Sink`: the v2 write API through influxdb-client (InfluxDB 1.8+, 2.x, 3.x,
  VictoriaMetrics' `/api/v2/write`).

A sink raises SinkError: transient ones (unreachable, 5xx, unauthorised, missing
database) are retried by the deliverer and the points stay spooled; permanent ones
(the server parsed and refused the points) drop the batch and count it.
Credentials travel in headers only, never in URLs, so no proxy or access log sees them.
"""
from __future__ import annotations

import base64
import re
from typing import Protocol

import urllib3

from sonde.ingest.config import InfluxDB
from sonde.ingest.errors import SinkError

_TIMEOUT_HINT = "check influxdb.url and that the server is running"


class Sink(Protocol):
    def write(self, lines: list[str]) -> None: ...
    def check(self) -> list[str]: ...
    def close(self) -> None: ...


def _status_error(url: str, status: int, body: str, what: str) -> SinkError:
    body = " ".join(body.split())[:200]
    if status in (401, 403):
        return SinkError(f"InfluxDB at {url} refused the credentials (HTTP {status}); "
                         f"check influxdb.username and the password/token file or environment", transient=True)
    if status == 404:
        return SinkError(f"InfluxDB at {url}: {what} not found (HTTP 404: {body}); create it, or fix influxdb.database/bucket",
                         transient=True)
    if status == 400:
        return SinkError(f"InfluxDB at {url} rejected points (HTTP 400: {body})", transient=False)
    if status == 413:
        return SinkError(f"InfluxDB at {url}: batch too large (HTTP 413); lower influxdb.batch_points", transient=False)
    return SinkError(f"InfluxDB at {url} answered HTTP {status}: {body}", transient=True)


def rejected_count(err: SinkError, batch: int) -> int:
    """How many points a 400 dropped: InfluxDB 1.x says `dropped=N` on a partial write."""
    m = re.search(r"dropped=(\d+)", str(err))
    return int(m.group(1)) if m else batch


class _Http:
    def __init__(self, cfg: InfluxDB):
        self.cfg = cfg
        self.http = urllib3.PoolManager(
            timeout=urllib3.Timeout(total=cfg.timeout_seconds), retries=False, maxsize=2)

    def request(self, method: str, path: str, *, body=None, headers=None):
        url = self.cfg.url + path
        try:
            return self.http.request(method, url, body=body, headers=headers or {})
        except urllib3.exceptions.HTTPError as e:
            reason = getattr(e, "reason", None) or e
            raise SinkError(f"InfluxDB at {self.cfg.url} is unreachable ({_short(reason)}); {_TIMEOUT_HINT}",
                            transient=True) from None

    def close(self) -> None:
        self.http.clear()


def _short(reason) -> str:
    s = str(reason)
    for marker in ("Connection refused", "timed out", "Name or service not known", "No route to host"):
        if marker in s:
            return marker.lower()
    return s.split(": ", 1)[-1][:120]


class V1Sink(_Http):
    def _headers(self) -> dict:
        h = {}
        pw = self.cfg.password()
        if self.cfg.username or pw:
            cred = f"{self.cfg.username}:{pw.get_secret_value() if pw else ''}".encode()
            h["Authorization"] = "Basic " + base64.b64encode(cred).decode()
        return h

    def _query_string(self, extra: dict) -> str:
        from urllib.parse import urlencode
        return "?" + urlencode(extra)

    def write(self, lines: list[str]) -> None:
        params = {"db": self.cfg.database, "precision": "ns"}
        if self.cfg.retention_policy:
            params["rp"] = self.cfg.retention_policy
        headers = self._headers() | {"Content-Type": "text/plain; charset=utf-8"}
        r = self.request("POST", "/write" + self._query_string(params),
                         body="\n".join(lines).encode("utf-8"), headers=headers)
        if r.status != 204:
            raise _status_error(self.cfg.url, r.status, r.data.decode("utf-8", "replace"),
                                f"database {self.cfg.database!r}")

    def query(self, q: str, db: str | None = None) -> dict:
        params = {"q": q, "epoch": "ns"}
        if db or self.cfg.database:
            params["db"] = db or self.cfg.database
        r = self.request("POST", "/query" + self._query_string(params), headers=self._headers())
        if r.status != 200:
            raise _status_error(self.cfg.url, r.status, r.data.decode("utf-8", "replace"), "query endpoint")
        return r.json()

    def check(self) -> list[str]:
        try:
            r = self.request("GET", "/ping")
            if r.status != 204:
                return [f"influxdb: {self.cfg.url}/ping answered HTTP {r.status}; is this an InfluxDB 1.x server?"]
            res = self.query("SHOW DATABASES")
        except SinkError as e:
            return [f"influxdb: {e}"]
        err = res.get("results", [{}])[0].get("error")
        if err:
            return [f"influxdb: {self.cfg.url}: {err}"]
        series = res["results"][0].get("series", [])
        names = {v[0] for s in series for v in s.get("values", [])}
        if self.cfg.database not in names:
            return [f"influxdb: database {self.cfg.database!r} does not exist on {self.cfg.url}; "
                    f"create it with: CREATE DATABASE \"{self.cfg.database}\""]
        return []


class V2Sink:
    """Writes through influxdb-client's synchronous write API.

    Retries are the deliverer's job (tenacity), so the client's own are off.
    """

    def __init__(self, cfg: InfluxDB):
        from influxdb_client import InfluxDBClient
        from influxdb_client.client.write_api import SYNCHRONOUS

        self.cfg = cfg
        token = cfg.token()
        self.client = InfluxDBClient(url=cfg.url, token=token.get_secret_value() if token else "",
                                     org=cfg.org or "-", timeout=int(cfg.timeout_seconds * 1000),
                                     retries=False, enable_gzip=False)
        self.api = self.client.write_api(write_options=SYNCHRONOUS)

    def write(self, lines: list[str]) -> None:
        from influxdb_client.rest import ApiException

        try:
            self.api.write(bucket=self.cfg.bucket, org=self.cfg.org or "-", record=lines, write_precision="ns")
        except ApiException as e:
            raise _status_error(self.cfg.url, e.status or 0, (e.body or e.reason or "").strip()
                                if isinstance(e.body or "", str) else str(e.reason),
                                f"bucket {self.cfg.bucket!r}") from None
        except urllib3.exceptions.HTTPError as e:
            reason = getattr(e, "reason", None) or e
            raise SinkError(f"InfluxDB at {self.cfg.url} is unreachable ({_short(reason)}); {_TIMEOUT_HINT}",
                            transient=True) from None

    def check(self) -> list[str]:
        # An empty write exercises reachability, the token and the bucket, and stores nothing.
        http = _Http(self.cfg)
        token = self.cfg.token()
        headers = {"Authorization": f"Token {token.get_secret_value()}"} if token else {}
        from urllib.parse import urlencode
        q = urlencode({"org": self.cfg.org or "-", "bucket": self.cfg.bucket, "precision": "ns"})
        try:
            r = http.request("POST", "/api/v2/write?" + q, body=b"", headers=headers)
            if r.status not in (200, 204):
                raise _status_error(self.cfg.url, r.status, r.data.decode("utf-8", "replace"),
                                    f"bucket {self.cfg.bucket!r}")
        except SinkError as e:
            return [f"influxdb: {e}"]
        finally:
            http.close()
        return []

    def query(self, q: str) -> dict:
        """InfluxQL through /query (InfluxDB 1.8+, 2.x with a DBRP mapping, 3.x), token auth."""
        from urllib.parse import urlencode
        token = self.cfg.token()
        headers = {"Authorization": f"Token {token.get_secret_value()}"} if token else {}
        http = _Http(self.cfg)
        try:
            r = http.request("POST", "/query?" + urlencode({"q": q, "db": self.cfg.bucket, "epoch": "ns"}),
                             headers=headers)
        finally:
            http.close()
        if r.status != 200:
            raise _status_error(self.cfg.url, r.status, r.data.decode("utf-8", "replace"), "query endpoint")
        return r.json()

    def close(self) -> None:
        self.client.close()


def make_sink(cfg: InfluxDB) -> Sink:
    return V2Sink(cfg) if cfg.api == "v2" else V1Sink(cfg)
