"""Traffic endpoints run as child processes with a chosen comm, so the kernel
attributes their bytes to a pid and a name the test knows. Servers write their
port to PORTFILE once listening.

  recv PORTFILE COMM [COUNT] [BIND]      accept COUNT connections, read each to EOF, print bytes
  send HOST PORT COMM N [CHUNK]          connect, send exactly N bytes, close
  burst HOST PORT COMM                   connect; per stdin line N send N bytes, answer "ok" once acked
  accept PORTFILE COMM COUNT MODE BIND   accept COUNT connections; MODE eof: read to EOF and
                                         close; rst: read one byte, close with SO_LINGER {1,0};
                                         close: close at once (TIME_WAIT stays on this side)
  connects HOST PORT COMM K [MODE]       K connects; MODE close: close at once; byte: send one
                                         byte, wait for the peer's close or reset; eof: wait for
                                         the peer's close, then close. Prints counts.
  echo PORTFILE COMM BIND                echo one connection's bytes until EOF
  pingpong HOST PORT COMM N              N one-byte round trips; prints the median RTT in us
  messages HOST PORT COMM N SIZE GAP_MS  N writes of SIZE bytes with TCP_NODELAY, GAP_MS apart
  httpd PORTFILE COMM BIND RESET_EVERY BODY  a one-thread HTTP/1.0 server on port 8080: BODY-byte answers; every
                                         RESET_EVERY-th request (0: never) is closed with a reset
  udpflood HOST PORT COMM SECONDS        UDP datagrams as fast as possible (keeps a qdisc full;
                                         TCP cannot, its small-queue limit stops it)
  fromeach HOST PORT COMM FIRST COUNT    one connection, one byte, from each of COUNT source addresses from FIRST
  duplexd PORTFILE COMM BIND N MODE      one connection: read N bytes, send N back; MODE close:
                                         wait for EOF, close; abort: read N/2, let the rest queue
                                         0.3 s, print the bytes received in order (read + FIONREAD)
                                         and close with a reset
  duplex HOST PORT COMM N PARTS          send N bytes in PARTS parts, after each one but the last
                                         answer "ok" and wait for a stdin line; read N back, close;
                                         prints the bytes it sent (stops at a reset)
"""
import ctypes
import os
import socket
import statistics
import struct
import sys
import time

PR_SET_NAME = 15


def set_comm(name: bytes) -> None:
    ctypes.CDLL(None).prctl(PR_SET_NAME, ctypes.c_char_p(name[:15]), 0, 0, 0)


def arg_bytes(s: str) -> bytes:
    return os.fsencode(s)


def family_of(host: str):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def listen(portfile: str, bind: str, port: int = 0) -> socket.socket:
    srv = socket.socket(family_of(bind))
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((bind, port))
    srv.listen(1024)
    with open(portfile + ".tmp", "w") as f:
        f.write(str(srv.getsockname()[1]))
    os.rename(portfile + ".tmp", portfile)
    return srv


def read_to_eof(conn) -> int:
    total = 0
    while True:
        try:
            data = conn.recv(1 << 16)
        except ConnectionResetError:
            break
        if not data:
            break
        total += len(data)
    return total


def recv(portfile, count=1, bind=None):
    if bind is None:
        bind = "::1" if portfile.endswith(".v6") else "127.0.0.1"
    srv = listen(portfile, bind)
    for _ in range(count):
        conn, _ = srv.accept()
        total = read_to_eof(conn)
        conn.close()
        print(total, flush=True)


def send(host, port, n, chunk):
    s = socket.create_connection((host, port))
    payload = b"s" * chunk
    left = n
    while left:
        k = min(left, chunk)
        s.sendall(payload[:k])
        left -= k
    s.close()


def acked(s) -> None:
    """Wait until the peer has acknowledged everything sent (the send queue, SIOCOUTQ, is empty)."""
    import fcntl
    import termios
    while struct.unpack("i", fcntl.ioctl(s.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]:
        time.sleep(0.001)


def burst(host, port):
    s = socket.create_connection((host, port))
    for line in sys.stdin:
        s.sendall(b"b" * int(line))
        acked(s)
        print("ok", flush=True)
    s.close()


def accept(portfile, count, bind, mode):
    srv = listen(portfile, bind)
    for _ in range(count):
        conn, _ = srv.accept()
        if mode == "rst":
            conn.recv(1)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif mode == "close":
            pass
        elif mode == "pong":  # one byte each way, then the client closes first
            conn.recv(1)
            conn.sendall(b"y")
            read_to_eof(conn)
        else:
            read_to_eof(conn)
        conn.close()
    print("done", flush=True)


def connects(host, port, k, mode):
    ok = refused = reset = 0
    for _ in range(k):
        s = socket.socket(family_of(host))
        try:
            s.connect((host, port))
            ok += 1
            if mode == "eof":
                read_to_eof(s)
            elif mode == "byte":
                s.sendall(b"x")
                try:
                    if s.recv(1) == b"":
                        pass
                except ConnectionResetError:
                    reset += 1
        except ConnectionRefusedError:
            refused += 1
        finally:
            s.close()
    print(f"ok={ok} refused={refused} reset={reset}", flush=True)


def echo(portfile, bind):
    srv = listen(portfile, bind)
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        data = conn.recv(4096)
        if not data:
            break
        conn.sendall(data)
    conn.close()


def pingpong(host, port, n):
    s = socket.create_connection((host, port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rtts = []
    for _ in range(n):
        t = time.perf_counter()
        s.sendall(b"p")
        assert s.recv(1) == b"p"
        rtts.append((time.perf_counter() - t) * 1e6)
    s.close()
    print(int(statistics.median(rtts)), flush=True)


def messages(host, port, n, size, gap_ms):
    s = socket.create_connection((host, port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for _ in range(n):
        s.sendall(b"m" * size)
        time.sleep(gap_ms / 1000)
    s.shutdown(socket.SHUT_WR)
    read_to_eof(s)
    s.close()


def httpd(portfile, bind, reset_every, body):
    srv = listen(portfile, bind, 8080)
    answer = b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % body + b"x" * body
    n = 0
    while True:
        conn, _ = srv.accept()
        n += 1
        try:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
            if reset_every and n % reset_every == 0:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                conn.sendall(answer)
        except OSError:
            pass
        conn.close()


def udpflood(host, port, seconds):
    s = socket.socket(family_of(host), socket.SOCK_DGRAM)
    payload = b"u" * 1200
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(64):
            try:
                s.sendto(payload, (host, port))
            except OSError:  # ENOBUFS when the qdisc is full: that is the point
                pass


def fromeach(host, port, first, count):
    """One connection from each of COUNT source addresses FIRST, FIRST+1, ... (IPv4,
    already on an interface), one byte each, closed at once."""
    import ipaddress
    base = ipaddress.IPv4Address(first)
    for i in range(count):
        s = socket.socket()
        s.bind((str(base + i), 0))
        s.connect((host, port))
        s.sendall(b"x")
        s.close()
    print("done", flush=True)


def duplexd(portfile, bind, n, mode):
    import fcntl
    import termios
    srv = listen(portfile, bind)
    conn, _ = srv.accept()
    if mode == "abort":
        got = 0
        while got < n // 2:
            got += len(conn.recv(min(1 << 16, n // 2 - got)))
        time.sleep(0.3)
        queued = struct.unpack("i", fcntl.ioctl(conn.fileno(), termios.FIONREAD, b"\0" * 4))[0]
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()
        print(got + queued, flush=True)
        return
    got = 0
    while got < n:
        data = conn.recv(1 << 16)
        if not data:
            break
        got += len(data)
    conn.sendall(b"d" * n)
    read_to_eof(conn)
    conn.close()
    print(got, flush=True)


def duplex(host, port, n, parts):
    s = socket.create_connection((host, port))
    sent = 0
    sizes = [n // parts] * (parts - 1) + [n - (n // parts) * (parts - 1)]
    try:
        for i, size in enumerate(sizes):
            payload = b"c" * size
            view = memoryview(payload)
            while view:
                k = s.send(view)
                sent += k
                view = view[k:]
            if i < parts - 1:
                print("ok", flush=True)
                sys.stdin.readline()
        got = 0
        while got < n:
            data = s.recv(1 << 16)
            if not data:
                break
            got += len(data)
    except (ConnectionResetError, BrokenPipeError):
        pass
    s.close()
    print(sent, flush=True)


if __name__ == "__main__":
    a = sys.argv[1:]
    cmd = a[0]
    set_comm(arg_bytes(a[2] if cmd in ("recv", "accept", "echo", "httpd", "duplexd") else a[3]))
    if cmd == "recv":
        recv(a[1], int(a[3]) if len(a) > 3 else 1, a[4] if len(a) > 4 else None)
    elif cmd == "send":
        send(a[1], int(a[2]), int(a[4]), int(a[5]) if len(a) > 5 else 65536)
    elif cmd == "burst":
        burst(a[1], int(a[2]))
    elif cmd == "accept":
        accept(a[1], int(a[3]), a[5], a[4])
    elif cmd == "connects":
        connects(a[1], int(a[2]), int(a[4]), a[5] if len(a) > 5 else "close")
    elif cmd == "echo":
        echo(a[1], a[3])
    elif cmd == "pingpong":
        pingpong(a[1], int(a[2]), int(a[4]))
    elif cmd == "messages":
        messages(a[1], int(a[2]), int(a[4]), int(a[5]), float(a[6]))
    elif cmd == "httpd":
        httpd(a[1], a[3], int(a[4]), int(a[5]))
    elif cmd == "fromeach":
        fromeach(a[1], int(a[2]), a[4], int(a[5]))
    elif cmd == "duplexd":
        duplexd(a[1], a[3], int(a[4]), a[5])
    elif cmd == "duplex":
        duplex(a[1], int(a[2]), int(a[4]), int(a[5]))
    elif cmd == "udpflood":
        udpflood(a[1], int(a[2]), float(a[4]))
    else:
        sys.exit(f"unknown mode {cmd}")
