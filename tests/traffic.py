"""Traffic endpoints run as child processes with a chosen comm, so the kernel
attributes their bytes to a pid and a name the test knows.

  traffic.py recv PORTFILE COMM          accept connections, read to EOF, print total per connection
  traffic.py send HOST PORT COMM N [CHUNK]   connect, send exactly N bytes, close
  traffic.py burst HOST PORT COMM        connect; for each line N on stdin send N bytes, answer "ok"
"""
import ctypes
import socket
import sys

PR_SET_NAME = 15


def set_comm(name: bytes) -> None:
    ctypes.CDLL(None).prctl(PR_SET_NAME, ctypes.c_char_p(name[:15]), 0, 0, 0)


def comm_arg(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def recv(portfile: str, comm: bytes, count: int = 1) -> None:
    set_comm(comm)
    host = "::1" if portfile.endswith(".v6") else "127.0.0.1"
    srv = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    srv.bind((host, 0))
    srv.listen(16)
    with open(portfile + ".tmp", "w") as f:
        f.write(str(srv.getsockname()[1]))
    import os
    os.rename(portfile + ".tmp", portfile)
    for _ in range(count):
        conn, _ = srv.accept()
        total = 0
        while True:
            data = conn.recv(1 << 16)
            if not data:
                break
            total += len(data)
        conn.close()
        print(total, flush=True)


def send(host: str, port: int, comm: bytes, n: int, chunk: int) -> None:
    set_comm(comm)
    s = socket.create_connection((host, port))
    payload = b"s" * chunk
    left = n
    while left:
        k = min(left, chunk)
        s.sendall(payload[:k])
        left -= k
    s.close()


def burst(host: str, port: int, comm: bytes) -> None:
    set_comm(comm)
    s = socket.create_connection((host, port))
    for line in sys.stdin:
        n = int(line)
        s.sendall(b"b" * n)
        print("ok", flush=True)
    s.close()


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "recv":
        recv(sys.argv[2], comm_arg(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else 1)
    elif cmd == "send":
        send(sys.argv[2], int(sys.argv[3]), comm_arg(sys.argv[4]), int(sys.argv[5]),
             int(sys.argv[6]) if len(sys.argv) > 6 else 65536)
    elif cmd == "burst":
        burst(sys.argv[2], int(sys.argv[3]), comm_arg(sys.argv[4]))
