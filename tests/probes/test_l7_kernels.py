"""Probe l7 on each kernel of the matrix (marker kernel_matrix: also inside QEMU on
Debian's 6.1 and 6.12, so nothing but the kernel, bcc and python3): a server of the
test's own, opted in by its port, answers a keep-alive client; the requests, the 5xx
and the statuses the probe counts at the server equal what the server itself sent.
`auto` picks the socket tracepoints where the kernel has them (6.3+) and raw
sys_enter/sys_exit elsewhere; `syscalls` forces the latter everywhere. One request
at a time, each is counted in the kernel (in_kernel), or by the agent's parser."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port, make_config, wait_until

pytestmark = [pytest.mark.l7, pytest.mark.kernel_matrix]

REQUESTS = 300
SERVER = r"""
import socket, sys
port, every = int(sys.argv[1]), int(sys.argv[2])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", port)); s.listen(4)
print("ready", flush=True)
c, _ = s.accept()
buf, n, errors = b"", 0, 0
while True:
    data = c.recv(65536)
    if not data:
        break
    buf += data
    while b"\r\n\r\n" in buf:
        _, buf = buf.split(b"\r\n\r\n", 1)
        n += 1
        status = b"500 Internal Server Error" if n % every == 0 else b"200 OK"
        errors += n % every == 0
        c.sendall(b"HTTP/1.1 " + status + b"\r\nContent-Length: 2\r\n\r\nok")
print(n, errors, flush=True)
"""
CLIENT = r"""
import socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
c = socket.create_connection(("127.0.0.1", port))
for i in range(n):
    c.sendall(b"GET /%d HTTP/1.1\r\nHost: sonde\r\n\r\n" % i)
    got = b""
    while not got.endswith(b"ok"):
        got += c.recv(4096)
c.close()
"""


@pytest.mark.parametrize("hooks,in_kernel", [("auto", True), ("syscalls", True), ("auto", False)])
def test_server_counts_equal_its_own(bpf_ready, tmp_path, hooks, in_kernel):
    from sonde.ingest.runtime.probe import LoadedProbe, discover

    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port), "7"], stdout=subprocess.PIPE, text=True)
    probe = None
    try:
        assert server.stdout.readline().strip() == "ready"
        cfg = make_config(tmp_path, f"probes:\n  l7:\n    enabled: true\n    cpu_percent: 100\n"
                                    f"    hooks: {hooks}\n    in_kernel: {str(in_kernel).lower()}\n    ports: [{port}]\n")
        probe = LoadedProbe.load(discover()["l7"], cfg)
        dec = probe.decoder
        assert server.pid in dec.opted, "the listening server is not opted in"
        want = ("sys_enter" if hooks == "syscalls" or not Path("/sys/kernel/tracing/events/sock/sock_send_length").is_dir()
                else "sock_send_length")
        assert dec.hooks[0][0] == want
        subprocess.run([sys.executable, "-c", CLIENT, str(port), str(REQUESTS)], check=True, timeout=60)
        served, errors = map(int, server.communicate(timeout=30)[0].split())
        assert (served, errors) == (REQUESTS, REQUESTS // 7)
        seen: dict[str, int] = {}
        in_kernel_seen = [0]

        def polled() -> bool:
            for p in probe.poll(time.time_ns())[0]:
                if p.measurement == "l7_probe":
                    in_kernel_seen[0] += p.fields["kernel_exchanges"]
                if p.measurement == "l7_requests" and p.tags["pid"] == str(server.pid):
                    assert (p.tags["role"], p.tags["protocol"], p.tags["op"]) == ("server", "http", "GET"), p.tags
                    for k in ("requests", "errors", "status_2xx", "status_5xx"):
                        seen[k] = seen.get(k, 0) + int(p.fields.get(k, 0))
            return seen.get("requests", 0) >= REQUESTS

        wait_until(polled, what=f"{REQUESTS} requests counted at the server", timeout=30)
        polled()  # nothing more comes
        assert seen == {"requests": REQUESTS, "errors": REQUESTS // 7, "status_2xx": REQUESTS - REQUESTS // 7,
                        "status_5xx": REQUESTS // 7}, seen
        assert in_kernel_seen[0] == (REQUESTS if in_kernel else 0)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        if probe is not None:
            probe.close()
