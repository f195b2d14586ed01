"""L7 parsers on literal captures: pairing, splits, truncation, losses, hostile bytes.

No kernel: a capture is a list of events (ts, direction, captured bytes[, true_len]),
or (ts, direction, None) for events the kernel lost. The observed process is the
client unless a test says otherwise, so requests go "out" and responses come "in".
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sonde.bpf.l7.protocols import http, pairing, sql
from sonde.bpf.l7.protocols.pairing import OPS, PROTOCOLS, STATUS_CLASSES, Connection, Exchange, detect

pytestmark = pytest.mark.l7

OUT, IN = "out", "in"


def run(events, protocol=None, **kw):
    """Feed a capture, close the connection; (exchanges, counters as a dict)."""
    conn = Connection(protocol, **kw)
    done: list[Exchange] = []
    last = 0
    for ev in events:
        ts, direction, data = ev[:3]
        last = ts
        if data is None:
            done += conn.gap(ts, direction)
        else:
            done += conn.feed(ts, direction, data, ev[3] if len(ev) > 3 else len(data))
    done += conn.close(last + 1)
    return done, conn.counters.as_dict()


def brief(exchanges):
    return [(e.op, e.error, e.status_class, e.duration_ns) for e in exchanges]


def clean(counters, **expected):
    """Counters with every loss at zero except those expected."""
    losses = {k: 0 for k in ("unanswered", "orphan_responses", "lost_events", "desyncs",
                             "truncated", "aborted", "undetected")}
    losses.update(expected)
    return {k: counters[k] for k in losses} == losses


# -- HTTP/1.x -----------------------------------------------------------------

CURL_GET = (b"GET /index.html HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
            b"User-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n")
NGINX_200 = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Mon, 06 May 2024 10:00:00 GMT\r\n"
             b"Content-Type: text/html\r\nContent-Length: 6\r\n"
             b"Last-Modified: Mon, 06 May 2024 09:00:00 GMT\r\nConnection: keep-alive\r\n"
             b"ETag: \"6638a0b0-6\"\r\nAccept-Ranges: bytes\r\n\r\nhello\n")
WRK_GET = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"
CHUNKED_200 = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"7\r\n{\"a\":1}\r\n"
               b"1a;name=value\r\nabcdefghijklmnopqrstuvwxyz\r\n"
               b"0\r\nX-Checksum: 1\r\n\r\n")
NOT_MODIFIED = b"HTTP/1.1 304 Not Modified\r\nServer: nginx/1.22.1\r\nETag: \"6638a0b0-6\"\r\n\r\n"
NO_CONTENT = b"HTTP/1.1 204 No Content\r\nServer: nginx/1.22.1\r\n\r\n"
HEAD_200 = b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nContent-Length: 612\r\n\r\n"
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nnot found"
UNAVAILABLE = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"

HTTP_CAPTURES = {
    "curl": [(100, OUT, CURL_GET), (350, IN, NGINX_200)],
    "wrk_pipelined": [(100, OUT, WRK_GET * 3), (400, IN, NGINX_200 * 2), (450, IN, NGINX_200)],
    "chunked_then_304": [
        (100, OUT, CURL_GET), (200, IN, CHUNKED_200[:90]), (260, IN, CHUNKED_200[90:]),
        (300, OUT, CURL_GET.replace(b"Accept:", b"If-None-Match: \"6638a0b0-6\"\r\nAccept:")),
        (330, IN, NOT_MODIFIED),
    ],
    "head_204_404_503": [
        (100, OUT, WRK_GET.replace(b"GET", b"HEAD") + b"DELETE /x HTTP/1.1\r\nHost: a\r\n\r\n"
         + b"GET /missing HTTP/1.1\r\nHost: a\r\n\r\n" + b"POST /api HTTP/1.1\r\nContent-Length: 4\r\n\r\nbody"),
        (200, IN, HEAD_200 + NO_CONTENT + NOT_FOUND + UNAVAILABLE),
    ],
}


def test_curl_get_is_one_2xx_exchange():
    done, counters = run(HTTP_CAPTURES["curl"])
    assert brief(done) == [("GET", False, "2xx", 250)]
    assert done[0].protocol == "http" and done[0].path is None
    assert counters["requests"] == counters["exchanges"] == 1
    assert clean(counters)


def test_pipelined_gets_are_each_paired_in_order():
    done, counters = run(HTTP_CAPTURES["wrk_pipelined"])
    assert brief(done) == [("GET", False, "2xx", 300)] * 2 + [("GET", False, "2xx", 350)]
    assert clean(counters)


def test_chunked_body_is_skipped_and_304_has_no_body():
    done, counters = run(HTTP_CAPTURES["chunked_then_304"])
    # The chunked response ends with its trailer (in the second read), not the first read.
    assert brief(done) == [("GET", False, "2xx", 160), ("GET", False, "3xx", 30)]
    assert clean(counters)


def test_head_204_have_no_body_and_classes_split_client_from_server_errors():
    done, counters = run(HTTP_CAPTURES["head_204_404_503"])
    assert [(e.op, e.error, e.status_class) for e in done] == [
        ("HEAD", False, "2xx"), ("DELETE", False, "2xx"), ("GET", False, "4xx"), ("POST", True, "5xx")]
    assert clean(counters)


def test_interim_100_continue_does_not_complete_the_request():
    events = [(0, OUT, b"PUT /f HTTP/1.1\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n"),
              (10, IN, b"HTTP/1.1 100 Continue\r\n\r\n"), (20, OUT, b"abc"),
              (50, IN, b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")]
    done, counters = run(events)
    assert brief(done) == [("PUT", False, "2xx", 50)]
    assert clean(counters)


def test_close_delimited_body_ends_at_the_last_byte_before_close():
    events = [(0, OUT, b"GET /old HTTP/1.0\r\n\r\n"),
              (10, IN, b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nsome"),
              (30, IN, b"more", 5000)]
    conn = Connection()
    assert [x for ev in events for x in conn.feed(*ev[:3], ev[3] if len(ev) > 3 else len(ev[2]))] == []
    assert brief(conn.close(99)) == [("GET", False, "2xx", 30)]
    # Lost events cannot cut a body that runs until the close.
    conn = Connection()
    for ev in events[:2]:
        conn.feed(*ev, len(ev[2]))
    assert conn.gap(40, IN) == []
    assert brief(conn.close(99)) == [("GET", False, "2xx", 10)]
    assert conn.counters.lost_events == 1 and conn.counters.unanswered == 0


def test_ten_megabyte_bodies_are_skipped_from_prefixes():
    """Bodies far larger than the capture: only 4 KiB of each 64 KiB read is captured."""
    size, read, cap = 10 * 1024 * 1024, 64 * 1024, 4096
    conn = Connection()
    done = []
    post = b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % size
    done += conn.feed(1_000, OUT, post, len(post))
    for i in range(size // read):
        done += conn.feed(2_000 + i, OUT, b"\xab" * cap, read)
    created = b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"
    done += conn.feed(9_000, IN, created, len(created))
    done += conn.feed(10_000, OUT, WRK_GET, len(WRK_GET))
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size
    first = head + b"x" * (cap - len(head))
    done += conn.feed(11_000, IN, first, read)  # the head and the first body bytes
    left = size + len(head) - read
    ts = 11_000
    while left:
        ts += 1
        n = min(read, left)
        done += conn.feed(ts, IN, b"x" * min(cap, n), n)
        left -= n
    done += conn.feed(20_000, OUT, WRK_GET, len(WRK_GET))
    done += conn.feed(20_100, IN, NGINX_200, len(NGINX_200))
    assert brief(done) == [("POST", False, "2xx", 8_000), ("GET", False, "2xx", ts - 10_000),
                           ("GET", False, "2xx", 100)]
    counters = conn.counters.as_dict()
    assert clean(counters)


def test_request_head_beyond_the_captured_prefix_is_counted_lost():
    # The last body write also carries the next request, past the captured prefix.
    post = b"POST /a HTTP/1.1\r\nContent-Length: 8000\r\n\r\n"
    tail = b"b" * 8000 + WRK_GET
    created = b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"
    events = [(0, OUT, post), (1, OUT, tail[:4096], len(tail)),
              (5, IN, created), (6, IN, NGINX_200),  # answers to the POST and the lost GET
              (10, OUT, WRK_GET), (12, IN, NGINX_200)]
    done, counters = run(events)
    assert brief(done) == [("GET", False, "2xx", 2)]
    assert clean(counters, desyncs=1, truncated=1, unanswered=1, orphan_responses=2)


def test_response_head_longer_than_the_capture_still_completes_its_request():
    big = b"HTTP/1.1 502 Bad Gateway\r\nX-Pad: " + b"p" * 6000 + b"\r\nContent-Length: 0\r\n\r\n"
    events = [(0, OUT, WRK_GET), (7, IN, big[:4096], len(big)),
              (10, OUT, WRK_GET), (15, IN, NGINX_200)]
    done, counters = run(events)
    assert brief(done) == [("GET", True, "5xx", 7), ("GET", False, "2xx", 5)]
    assert clean(counters, desyncs=1, truncated=1)


def test_lost_chunk_size_line_completes_the_response_and_rescans():
    body = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2000\r\n" + b"z" * 8192 + b"\r\n0\r\n\r\n"
    events = [(0, OUT, WRK_GET), (5, IN, body[:4096], len(body)),
              (10, OUT, WRK_GET), (20, IN, NGINX_200)]
    done, counters = run(events)
    assert brief(done) == [("GET", False, "2xx", 5), ("GET", False, "2xx", 10)]
    assert clean(counters, desyncs=1, truncated=1)


def test_gap_flushes_outstanding_requests_and_rescans():
    events = [(0, OUT, CURL_GET), (5, IN, NGINX_200[:60]), (6, IN, None),
              (10, OUT, WRK_GET), (13, IN, NGINX_200)]
    done, counters = run(events)
    assert brief(done) == [("GET", False, "2xx", 3)]
    assert clean(counters, lost_events=1, unanswered=1)


def test_garbage_is_a_desync_and_the_next_request_line_resyncs():
    events = [(0, OUT, b"\x16\x03\x01\x02\x00garbage\r\n\r\n" + WRK_GET), (4, IN, NGINX_200)]
    done, counters = run(events, "http", requests=OUT)
    assert brief(done) == [("GET", False, "2xx", 4)]
    assert clean(counters, desyncs=1)


def test_bytes_that_cannot_start_a_message_desync_at_once():
    conn = Connection("http", requests=OUT)
    conn.feed(0, OUT, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc", 9)  # no line end to wait for
    assert conn.counters.desyncs == 1


def test_unlisted_methods_are_other():
    events = [(0, OUT, b"PROPFIND /dav/ HTTP/1.1\r\nDepth: 1\r\nContent-Length: 0\r\n\r\n"),
              (5, IN, b"HTTP/1.1 207 Multi-Status\r\nContent-Length: 0\r\n\r\n")]
    done, counters = run(events, "http", requests=OUT)
    assert brief(done) == [("OTHER", False, "2xx", 5)]
    assert clean(counters)


def test_switching_protocols_stops_parsing():
    upgrade = b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    events = [(0, OUT, upgrade), (3, IN, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"),
              (5, OUT, b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58"), (6, IN, b"\x81\x05hello")]
    done, counters = run(events)
    assert brief(done) == [("GET", False, "1xx", 3)]
    assert clean(counters)


def test_paths_are_withheld_unless_asked_and_then_normalised():
    get = b"GET /users/12345/orders/9f86d081884c7d65?token=secret HTTP/1.1\r\nHost: a\r\n\r\n"
    events = [(0, OUT, get), (1, IN, NGINX_200)]
    done, _ = run(events)
    assert done[0].path is None and "secret" not in repr(done) and "12345" not in repr(done)
    done, _ = run(events, keep_path=True)
    assert done[0].path == "/users/:id/orders/:id"
    assert http.normalise_path(b"http://example.com/a/550e8400-e29b-41d4-a716-446655440000?q") == "/a/:id"
    assert http.normalise_path(b"/static/app.js") == "/static/app.js"
    assert len(http.normalise_path(b"/" + b"a/" * 500)) == http.PATH_LIMIT


# -- Redis RESP -----------------------------------------------------------------

SET_GET_INCR = (b"*3\r\n$3\r\nSET\r\n$7\r\nuser:42\r\n$5\r\nalice\r\n"
                b"*2\r\n$3\r\nGET\r\n$7\r\nuser:42\r\n"
                b"*2\r\n$4\r\nINCR\r\n$7\r\nuser:42\r\n"
                b"*2\r\n$5\r\nLPUSH\r\n$7\r\nuser:42\r\n")
SET_GET_INCR_REPLIES = (b"+OK\r\n$5\r\nalice\r\n-ERR value is not an integer or out of range\r\n"
                        b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n")
RESP_CAPTURES = {
    "pipeline_with_errors": [(0, OUT, SET_GET_INCR), (90, IN, SET_GET_INCR_REPLIES)],
    "benchmark_inline_P16": [(0, OUT, b"PING\r\n" * 16), (40, IN, b"+PONG\r\n" * 16)],
    "nested_and_resp3": [
        (0, OUT, b"*4\r\n$6\r\nLRANGE\r\n$4\r\nlist\r\n$1\r\n0\r\n$2\r\n-1\r\n"
                 b"*1\r\n$4\r\nEXEC\r\n*2\r\n$5\r\nHELLO\r\n$1\r\n3\r\n"
                 b"*3\r\n$6\r\nCLIENT\r\n$7\r\nSETNAME\r\n$3\r\napp\r\n*2\r\n$3\r\nGET\r\n$4\r\nnone\r\n"),
        (50, IN, b"*3\r\n$1\r\na\r\n$1\r\nb\r\n*2\r\n:1\r\n*0\r\n"
                 b"*2\r\n+OK\r\n-ERR inside a transaction is not the reply's error\r\n"
                 b">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$2\r\nhi\r\n"  # a RESP3 push: no request
                 b"%2\r\n+server\r\n+redis\r\n+proto\r\n:3\r\n"
                 b"|1\r\n+ttl\r\n:3600\r\n+OK\r\n"  # an attribute, then the reply
                 b"_\r\n"),
    ],
}


def test_resp_pipeline_pairs_each_command_and_flags_error_replies():
    done, counters = run(RESP_CAPTURES["pipeline_with_errors"])
    assert [(e.op, e.error, e.status_class) for e in done] == [
        ("SET", False, "ok"), ("GET", False, "ok"), ("INCR", True, "error"), ("LPUSH", True, "error")]
    assert all(e.duration_ns == 90 for e in done)
    assert "user:42" not in repr(done) and "alice" not in repr(done)
    assert clean(counters)


def test_redis_benchmark_pipeline_counts_all_sixteen():
    done, counters = run(RESP_CAPTURES["benchmark_inline_P16"])
    assert brief(done) == [("PING", False, "ok", 40)] * 16
    assert clean(counters)


def test_resp_nested_replies_resp3_push_and_attributes():
    done, counters = run(RESP_CAPTURES["nested_and_resp3"])
    assert [(e.op, e.error) for e in done] == [
        ("LRANGE", False), ("EXEC", False), ("HELLO", False), ("CLIENT", False), ("GET", False)]
    assert clean(counters)


def test_unknown_commands_are_other_and_subscribe_stops_pairing():
    events = [(0, OUT, b"*2\r\n$6\r\nMYCMD1\r\n$1\r\nx\r\n*2\r\n$9\r\nSUBSCRIBE\r\n$4\r\nnews\r\n"),
              (5, IN, b"-ERR unknown command 'MYCMD1'\r\n*3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n"),
              (9, IN, b"*3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$2\r\nhi\r\n")]
    done, counters = run(events)
    assert [(e.op, e.error) for e in done] == [("OTHER", True), ("SUBSCRIBE", False)]
    assert clean(counters)


def test_resp_large_value_skipped_beyond_the_capture():
    value = 1_000_000
    cmd = b"*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n$%d\r\n" % value
    events = [(0, OUT, cmd + b"v" * (4096 - len(cmd)), len(cmd) + value + 2),
              (7, IN, b"+OK\r\n"), (8, OUT, b"*2\r\n$3\r\nGET\r\n$3\r\nbig\r\n"),
              (9, IN, b"$%d\r\n" % value + b"v" * 4000, value + 12), (20, IN, b"", 0)]
    done, counters = run(events)
    assert brief(done) == [("SET", False, "ok", 7), ("GET", False, "ok", 1)]
    assert clean(counters)


def test_resp_bulk_string_without_its_crlf_is_a_desync():
    events = [(0, OUT, b"*1\r\n$4\r\nPINGxx*1\r\n$4\r\nPING\r\n"), (3, IN, b"+PONG\r\n+PONG\r\n")]
    done, counters = run(events, "resp", requests=OUT)
    assert done == []
    assert clean(counters, desyncs=1, orphan_responses=2)


def test_resp_gap_and_desync_then_resync():
    events = [(0, OUT, b"*2\r\n$3\r\nGET\r\n$1\r\na\r\n"), (1, IN, None),
              (2, OUT, b"*2\r\n$3\r\nGET\r\n$1\r\nb\r\n"), (3, IN, b"$1\r\nb\r\n"),
              (4, OUT, b"*1\r\n$4\r\nPING\r\n"), (5, IN, b"?not resp\r\n"),  # a desync
              (6, IN, b"+PONG\r\n"),  # dropped: the PING was given up on
              (7, OUT, b"*1\r\n$4\r\nPING\r\n"), (9, IN, b"+PONG\r\n")]
    done, counters = run(events)
    assert brief(done) == [("GET", False, "ok", 1), ("PING", False, "ok", 2)]
    assert clean(counters, lost_events=1, desyncs=1, unanswered=2)


# -- PostgreSQL -----------------------------------------------------------------

def pg(kind: bytes, body: bytes) -> bytes:
    return kind + (len(body) + 4).to_bytes(4, "big") + body


_PARAMS = b"user\x00postgres\x00database\x00bench\x00application_name\x00pgbench\x00\x00"
PG_STARTUP = (8 + len(_PARAMS)).to_bytes(4, "big") + (196608).to_bytes(4, "big") + _PARAMS
PG_READY = (b"R\x00\x00\x00\x08\x00\x00\x00\x00"  # AuthenticationOk
            + pg(b"S", b"server_version\x0015.6\x00") +
            b"K\x00\x00\x00\x0c\x00\x00\x30\x39\x5e\x1f\x2a\x77"
            b"Z\x00\x00\x00\x05I")
PG_SELECT_1 = b"Q\x00\x00\x00\x0dSELECT 1\x00"
PG_SELECT_1_RESULT = (b"T\x00\x00\x00\x21\x00\x01?column?\x00\x00\x00\x00\x00\x00\x00"
                      b"\x00\x00\x00\x17\x00\x04\xff\xff\xff\xff\x00\x00"
                      b"D\x00\x00\x00\x0b\x00\x01\x00\x00\x00\x011"
                      b"C\x00\x00\x00\x0dSELECT 1\x00"
                      b"Z\x00\x00\x00\x05I")
PG_ERROR = pg(b"E", b"SERROR\x00VERROR\x00C42P01\x00Mrelation \"nope\" does not exist\x00"
                    b"P15\x00Fparse_relation.c\x00L1392\x00RparserOpenTable\x00\x00")
UPDATE_SQL = b"UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2;"


def pg_batch(*statements: bytes) -> bytes:
    """Unnamed Parse/Bind/Describe/Execute per statement, then one Sync (libpq extended)."""
    out = b""
    for text in statements:
        out += (pg(b"P", b"\x00" + text + b"\x00\x00\x00")  # names, text, no parameter types
                + pg(b"B", b"\x00\x00\x00\x00\x00\x00\x00\x00")
                + pg(b"D", b"P\x00") + pg(b"E", b"\x00\x00\x00\x00\x00"))
    return out + pg(b"S", b"")


PG_CAPTURES = {
    "startup_simple_query": [(0, OUT, PG_STARTUP), (10, IN, PG_READY),
                             (100, OUT, PG_SELECT_1), (180, IN, PG_SELECT_1_RESULT)],
    "extended_two_executes": [
        (0, OUT, pg_batch(UPDATE_SQL, b"SELECT abalance FROM pgbench_accounts WHERE aid = $1")),
        (40, IN, b"1\x00\x00\x00\x042\x00\x00\x00\x04n\x00\x00\x00\x04" + pg(b"C", b"UPDATE 1\x00")
                 + b"1\x00\x00\x00\x042\x00\x00\x00\x04" + pg(b"T", b"\x00\x00")
                 + pg(b"D", b"\x00\x01\x00\x00\x00\x010") + pg(b"C", b"SELECT 1\x00")),
        (45, IN, b"Z\x00\x00\x00\x05T"),
    ],
    "extended_error_aborts_batch": [
        (0, OUT, pg_batch(b"INSERT INTO nope VALUES (1)", b"SELECT 2", b"DELETE FROM t")),
        (30, IN, PG_ERROR + b"Z\x00\x00\x00\x05I"),
        (50, OUT, pg_batch(b"BEGIN")), (55, IN, b"1\x00\x00\x00\x042\x00\x00\x00\x04n\x00\x00\x00\x04"
                                        + pg(b"C", b"BEGIN\x00") + b"Z\x00\x00\x00\x05T"),
    ],
}


def test_pg_startup_is_not_a_request_and_simple_query_ends_at_ready():
    done, counters = run(PG_CAPTURES["startup_simple_query"])
    assert done[0].protocol == "pgwire"
    assert brief(done) == [("SELECT", False, "ok", 80)]
    assert clean(counters)


def test_pg_each_execute_is_a_request_completed_by_its_command_complete():
    done, counters = run(PG_CAPTURES["extended_two_executes"], "pgwire", requests=OUT)
    assert brief(done) == [("UPDATE", False, "ok", 40), ("SELECT", False, "ok", 40)]
    assert clean(counters)


def test_pg_error_fails_its_execute_and_aborts_the_rest_of_the_batch():
    done, counters = run(PG_CAPTURES["extended_error_aborts_batch"], "pgwire", requests=OUT)
    assert brief(done) == [("INSERT", True, "error", 30), ("SELECT", True, "error", 30),
                           ("DELETE", True, "error", 30), ("BEGIN", False, "ok", 5)]
    assert clean(counters, aborted=2)
    assert counters["exchanges"] == 4


def test_pg_pipelined_batches_an_error_aborts_only_its_own_batch():
    """libpq pipeline mode: batches sent before any reply; the Sync bounds the abort."""
    events = [(0, OUT, pg_batch(b"INSERT INTO nope VALUES (1)", b"SELECT 1") + pg_batch(b"UPDATE t SET a = 2")),
              (20, IN, PG_ERROR + b"Z\x00\x00\x00\x05I"
               + b"1\x00\x00\x00\x042\x00\x00\x00\x04n\x00\x00\x00\x04"),
              (30, IN, pg(b"C", b"UPDATE 1\x00") + b"Z\x00\x00\x00\x05I")]
    done, counters = run(events, "pgwire", requests=OUT)
    assert brief(done) == [("INSERT", True, "error", 20), ("SELECT", True, "error", 20),
                           ("UPDATE", False, "ok", 30)]
    assert clean(counters, aborted=1)


def test_pg_named_statement_gives_its_keyword_to_later_executes():
    parse = pg(b"P", b"P0_1\x00" + UPDATE_SQL + b"\x00\x00\x00")
    bind_exec_sync = pg(b"B", b"\x00P0_1\x00\x00\x00\x00\x00\x00\x00") + pg(b"E", b"\x00\x00\x00\x00\x00") + pg(b"S", b"")
    ok = b"2\x00\x00\x00\x04" + pg(b"C", b"UPDATE 1\x00") + b"Z\x00\x00\x00\x05I"
    events = [(0, OUT, parse + pg(b"S", b"")), (1, IN, b"1\x00\x00\x00\x04Z\x00\x00\x00\x05I"),
              (2, OUT, bind_exec_sync), (5, IN, ok), (6, OUT, bind_exec_sync), (10, IN, ok),
              (11, OUT, pg(b"C", b"SP0_1\x00") + bind_exec_sync),  # closed: no longer known
              (12, IN, b"3\x00\x00\x00\x04" + PG_ERROR + b"Z\x00\x00\x00\x05I")]
    done, counters = run(events, "pgwire", requests=OUT)
    assert brief(done) == [("UPDATE", False, "ok", 3), ("UPDATE", False, "ok", 4), ("UNKNOWN", True, "error", 1)]
    assert "pgbench_accounts" not in repr(done)
    assert clean(counters)


def test_pg_simple_query_error_and_multi_statement_query():
    events = [(0, OUT, pg(b"Q", b"SELEC 1;\x00")),
              (3, IN, pg(b"E", b"SERROR\x00C42601\x00Msyntax error\x00\x00") + b"Z\x00\x00\x00\x05I"),
              (5, OUT, pg(b"Q", b"/* app=web */ BEGIN; UPDATE t SET a = 1; COMMIT\x00")),
              (9, IN, pg(b"C", b"BEGIN\x00") + pg(b"C", b"UPDATE 1\x00") + pg(b"C", b"COMMIT\x00")
               + b"Z\x00\x00\x00\x05I")]
    done, counters = run(events, "pgwire", requests=OUT)
    assert brief(done) == [("OTHER", True, "error", 3), ("BEGIN", False, "ok", 4)]
    assert clean(counters)


def test_pg_ssl_request_refused_then_startup_accepted_means_tls():
    ssl = b"\x00\x00\x00\x08\x04\xd2\x16\x2f"
    done, counters = run([(0, OUT, ssl), (1, IN, b"N"), (2, OUT, PG_STARTUP), (3, IN, PG_READY),
                          (4, OUT, PG_SELECT_1), (6, IN, PG_SELECT_1_RESULT)])
    assert brief(done) == [("SELECT", False, "ok", 2)]
    assert clean(counters)
    done, counters = run([(0, OUT, ssl), (1, IN, b"S"), (2, OUT, b"\x16\x03\x01\x00\xf4\x01"),
                          (3, IN, b"\x16\x03\x03\x00\x7a\x02")])
    assert done == [] and clean(counters)


def test_pg_large_data_row_beyond_the_capture_keeps_framing():
    row = pg(b"D", b"\x00\x01" + (1_000_000).to_bytes(4, "big") + b"r" * 1_000_000)
    events = [(0, OUT, pg(b"Q", b"SELECT payload FROM blobs\x00")),
              (5, IN, row[:4096], len(row)),
              (6, IN, pg(b"C", b"SELECT 1\x00") + b"Z\x00\x00\x00\x05I")]
    done, counters = run(events, "pgwire", requests=OUT)
    assert brief(done) == [("SELECT", False, "ok", 6)]
    assert clean(counters)


def test_pg_gap_then_resync_at_the_next_chunk():
    events = [(0, OUT, PG_SELECT_1), (1, IN, None),
              (2, IN, b"Z\x00\x00\x00\x05I"),  # the tail of the lost response: nothing pending
              (3, OUT, pg(b"Q", b"DELETE FROM t\x00")), (8, IN, pg(b"C", b"DELETE 3\x00") + b"Z\x00\x00\x00\x05I")]
    done, counters = run(events, "pgwire", requests=OUT)
    assert brief(done) == [("DELETE", False, "ok", 5)]
    assert clean(counters, lost_events=1, unanswered=1)


def test_pg_observed_from_the_server_side():
    events = [(0, IN, PG_STARTUP), (10, OUT, PG_READY), (100, IN, PG_SELECT_1), (180, OUT, PG_SELECT_1_RESULT)]
    done, counters = run(events)
    assert brief(done) == [("SELECT", False, "ok", 80)]
    assert clean(counters)
    conn = Connection()
    conn.feed(0, IN, PG_STARTUP, len(PG_STARTUP))
    assert conn.request_direction == IN


# -- MySQL / MariaDB --------------------------------------------------------------

def my(seq: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "little") + bytes([seq]) + payload


MY_GREETING = my(0, b"\x0a5.5.5-10.11.6-MariaDB-0+deb12u1\x00\x25\x00\x00\x00Kx;A8y&o\x00\xfe\xf7\x2d\x02\x00"
                    b"\xff\x81\x15\x00\x00\x00\x00\x00\x00\x1d\x00\x00\x00N3ph0Z<c&lS.\x00"
                    b"mysql_native_password\x00")
_CAPS = 0x1 | 0x4 | 0x8 | 0x200 | 0x2000 | 0x8000 | 0x10000 | 0x20000 | 0x40000 | 0x80000 | 0x200000


def my_hello(deprecate_eof: bool) -> bytes:
    caps = _CAPS | (1 << 24 if deprecate_eof else 0)
    return my(1, caps.to_bytes(4, "little") + b"\x00\x00\x00\x01\x2d" + b"\x00" * 23 + b"sbtest\x00\x14"
              + b"\x8f\x13\x9a\x01\x22\x5e\x71\x0b\x3c\x44\x90\xaa\x0e\x17\x63\x21\x05\x7d\x3b\x19"
              + b"sbtest\x00mysql_native_password\x00")


MY_AUTH_OK = my(2, b"\x00\x00\x00\x02\x00\x00\x00")
COLDEF_1 = b"\x03def\x00\x00\x00\x011\x00\x0c\x3f\x00\x01\x00\x00\x00\x08\x81\x00\x00\x00\x00"
COLDEF_C = b"\x03def\x06sbtest\x07sbtest1\x07sbtest1\x01c\x01c\x0c\x08\x00\x78\x00\x00\x00\xfe\x00\x00\x00\x00\x00"
MY_EOF = b"\xfe\x00\x00\x02\x00"
MY_OK_EOF = b"\xfe\x00\x00\x02\x00\x00\x00"  # the OK that ends a result under DEPRECATE_EOF
MY_SELECT_1 = my(0, b"\x03SELECT 1")
MY_RESULT_EOF = my(1, b"\x01") + my(2, COLDEF_1) + my(3, MY_EOF) + my(4, b"\x011") + my(5, MY_EOF)
MY_RESULT_DEPRECATE = my(1, b"\x01") + my(2, COLDEF_1) + my(3, b"\x011") + my(4, MY_OK_EOF)
MY_ERR = my(1, b"\xff\x7a\x04#42S02Table 'sbtest.nope' doesn't exist")


def my_session(deprecate_eof: bool, result: bytes):
    return [(0, IN, MY_GREETING), (1, OUT, my_hello(deprecate_eof)), (2, IN, MY_AUTH_OK),
            (10, OUT, MY_SELECT_1), (25, IN, result),
            (30, OUT, my(0, b"\x03SELECT * FROM nope")), (34, IN, MY_ERR),
            (40, OUT, my(0, b"\x0e")), (41, IN, my(1, b"\x00\x00\x00\x02\x00\x00\x00")),
            (50, OUT, my(0, b"\x01"))]


PARAM_DEF = b"\x03def\x00\x00\x00\x01?\x00\x0c\x3f\x00\x00\x00\x00\x00\xfd\x80\x00\x00\x00\x00"


def my_prepared(deprecate_eof: bool):
    sql_text = b"\x16SELECT c FROM sbtest1 WHERE id=?"
    param = PARAM_DEF
    if deprecate_eof:
        prepared = my(1, b"\x00\x01\x00\x00\x00\x01\x00\x01\x00\x00\x00\x00") + my(2, param) + my(3, COLDEF_C)
        rows = my(1, b"\x01") + my(2, COLDEF_C) + my(3, b"\x00\x00\x03abc") + my(4, MY_OK_EOF)
    else:
        prepared = (my(1, b"\x00\x01\x00\x00\x00\x01\x00\x01\x00\x00\x00\x00") + my(2, param) + my(3, MY_EOF)
                    + my(4, COLDEF_C) + my(5, MY_EOF))
        rows = my(1, b"\x01") + my(2, COLDEF_C) + my(3, MY_EOF) + my(4, b"\x00\x00\x03abc") + my(5, MY_EOF)
    execute = my(0, b"\x17\x01\x00\x00\x00\x00\x01\x00\x00\x00\x00\x01\x03\x00\x2a\x00\x00\x00")
    return [(0, IN, MY_GREETING), (1, OUT, my_hello(deprecate_eof)), (2, IN, MY_AUTH_OK),
            (10, OUT, my(0, sql_text)), (12, IN, prepared),
            (20, OUT, execute), (23, IN, rows), (30, OUT, execute), (34, IN, rows),
            (40, OUT, my(0, b"\x19\x01\x00\x00\x00")),  # COM_STMT_CLOSE: no response
            (41, OUT, execute), (45, IN, my(1, b"\xff\x13\x02#HY000Unknown prepared statement handler"))]


MY_CAPTURES = {
    "query_eof": my_session(False, MY_RESULT_EOF),
    "query_deprecate_eof": my_session(True, MY_RESULT_DEPRECATE),
    "prepared_eof": my_prepared(False),
    "prepared_deprecate_eof": my_prepared(True),
}


@pytest.mark.parametrize("name", ["query_eof", "query_deprecate_eof"])
def test_mysql_query_result_set_err_and_ping(name):
    done, counters = run(MY_CAPTURES[name])
    assert done[0].protocol == "mysql"
    assert brief(done) == [("SELECT", False, "ok", 15), ("SELECT", True, "error", 4), ("PING", False, "ok", 1)]
    assert counters["requests"] == 3  # COM_QUIT gets no response: not a request
    assert clean(counters)


@pytest.mark.parametrize("name", ["prepared_eof", "prepared_deprecate_eof"])
def test_mysql_prepared_statements_take_their_prepare_keyword(name):
    done, counters = run(MY_CAPTURES[name])
    assert brief(done) == [("PREPARE", False, "ok", 2), ("SELECT", False, "ok", 3),
                           ("SELECT", False, "ok", 4), ("UNKNOWN", True, "error", 4)]
    assert clean(counters)


def test_mysql_prepare_ends_at_its_eof_when_the_handshake_said_so():
    """A PREPARE whose last block is parameters: whether an EOF follows is only known
    from the handshake; without one the response ends at the last definition and a
    following EOF is dropped as its tail."""
    tail = [(10, OUT, my(0, b"\x16INSERT INTO t VALUES (?)")),
            (12, IN, my(1, b"\x00\x02\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00") + my(2, PARAM_DEF)),
            (15, IN, my(3, MY_EOF)),
            (20, OUT, my(0, b"\x0e")), (21, IN, my(1, b"\x00\x00\x00\x02\x00\x00\x00"))]
    done, counters = run(my_session(False, b"")[:3] + tail)
    assert brief(done) == [("PREPARE", False, "ok", 5), ("PING", False, "ok", 1)]
    assert clean(counters)
    done, counters = run(tail, "mysql", requests=OUT)
    assert brief(done) == [("PREPARE", False, "ok", 2), ("PING", False, "ok", 1)]
    assert clean(counters)


def test_mysql_without_handshake_learns_eof_mode_from_packets():
    for result in (MY_RESULT_EOF, MY_RESULT_DEPRECATE):
        events = [(0, OUT, MY_SELECT_1), (5, IN, result), (6, OUT, MY_SELECT_1), (9, IN, result)]
        done, counters = run(events, "mysql", requests=OUT)
        assert brief(done) == [("SELECT", False, "ok", 5), ("SELECT", False, "ok", 3)]
        assert clean(counters)


@pytest.mark.parametrize("deprecate_eof", [True, False, None])
def test_mysql_empty_result_set(deprecate_eof):
    """No rows: under DEPRECATE_EOF the 7-byte OK follows the column definitions directly."""
    if deprecate_eof:
        empty = my(1, b"\x01") + my(2, COLDEF_1) + my(3, MY_OK_EOF)
    else:
        empty = my(1, b"\x01") + my(2, COLDEF_1) + my(3, MY_EOF) + my(4, MY_EOF)
    query = my(0, b"\x03SELECT 1 FROM dual WHERE 0")
    events = [(10, OUT, query), (12, IN, empty), (20, OUT, MY_SELECT_1),
              (23, IN, MY_RESULT_DEPRECATE if deprecate_eof else MY_RESULT_EOF)]
    if deprecate_eof is None:  # no handshake seen: learnt from the packets
        done, counters = run(events, "mysql", requests=OUT)
    else:
        done, counters = run(my_session(deprecate_eof, b"")[:3] + events)
    assert brief(done) == [("SELECT", False, "ok", 2), ("SELECT", False, "ok", 3)]
    assert clean(counters)


def test_mysql_multi_results_end_without_more_results_flag():
    more = b"\x00\x01\x00\x0a\x00\x00\x00"  # OK, 1 row, SERVER_MORE_RESULTS_EXISTS | AUTOCOMMIT
    events = [(0, OUT, my(0, b"\x03INSERT INTO t VALUES (1); SELECT 1")),
              (5, IN, my(1, more) + my(2, b"\x01") + my(3, COLDEF_1) + my(4, MY_EOF) + my(5, b"\x011")
               + my(6, MY_EOF)),
              (7, OUT, my(0, b"\x03COMMIT")), (8, IN, my(1, b"\x00\x00\x00\x02\x00\x00\x00"))]
    done, counters = run(events, "mysql", requests=OUT)
    assert brief(done) == [("INSERT", False, "ok", 5), ("COMMIT", False, "ok", 1)]
    assert clean(counters)


def test_mysql_gap_and_large_row_beyond_capture():
    big = 200_000
    row = b"\xfd" + big.to_bytes(3, "little") + b"x" * big
    result = my(1, b"\x01") + my(2, COLDEF_1) + my(3, MY_EOF) + my(4, row) + my(5, MY_EOF)
    # One long read captured only in part, then a short one holding the row's end and the EOF.
    events = [(0, OUT, MY_SELECT_1), (2, IN, result[:4096], len(result) - 1000), (3, IN, result[-1000:]),
              (4, OUT, MY_SELECT_1), (5, IN, None), (6, OUT, MY_SELECT_1), (9, IN, MY_RESULT_EOF)]
    done, counters = run(events, "mysql", requests=OUT)
    assert brief(done) == [("SELECT", False, "ok", 3), ("SELECT", False, "ok", 3)]
    assert clean(counters, lost_events=1, unanswered=1)


def test_mysql_ssl_request_stops_parsing():
    ssl = my(1, (_CAPS | 0x800).to_bytes(4, "little") + b"\x00\x00\x00\x01\x2d" + b"\x00" * 23)
    done, counters = run([(0, IN, MY_GREETING), (1, OUT, ssl), (2, OUT, b"\x16\x03\x01\x02\x00\x01"),
                          (3, IN, b"\x16\x03\x03\x00\x7a\x02")])
    assert done == [] and clean(counters)


# -- Every protocol: splits, detection, hostile bytes -------------------------------

@pytest.mark.parametrize("protocol, ask, reply", [
    ("http", WRK_GET, NGINX_200),
    ("resp", b"*2\r\n$3\r\nGET\r\n$1\r\na\r\n", b"$-1\r\n"),
    ("pgwire", PG_SELECT_1, PG_SELECT_1_RESULT),
    ("mysql", MY_SELECT_1, MY_RESULT_EOF),
])
def test_duration_runs_from_the_requests_first_byte_to_the_replys_last(protocol, ask, reply):
    events = [(100, OUT, ask[:3]), (150, OUT, ask[3:]),
              (400, IN, reply[:-1]), (470, IN, reply[-1:])]
    done, counters = run(events, protocol, requests=OUT)
    assert [e.duration_ns for e in done] == [370]
    assert clean(counters)


@pytest.mark.parametrize("protocol, direction, opening, filler", [
    ("http", OUT, b"GET /", b"a"),  # a request line that never ends
    ("http", IN, b"HTTP/1.1 200 OK\r\nX: ", b"b"),  # a header that never ends
    ("resp", OUT, b"SET k ", b"v"),  # an inline command without its newline
    ("resp", IN, b"+", b"s"),  # a simple string without its CRLF
])
def test_a_message_head_that_never_ends_is_truncated_and_memory_stays_bounded(protocol, direction, opening, filler):
    conn = Connection(protocol, requests=OUT)
    if direction == IN:
        ask = WRK_GET if protocol == "http" else b"PING\r\n"
        conn.feed(0, OUT, ask, len(ask))
    side = "request" if direction == OUT else "response"
    chunk = 4096
    conn.feed(1, direction, opening + filler * (chunk - len(opening)), chunk)
    for ts in range(2, 100):  # 400 KiB
        conn.feed(ts, direction, filler * chunk, chunk)
        assert conn._parser.streams[side].avail <= conn._parser.streams[side].cap + chunk
    assert conn.counters.truncated >= 1 and conn.counters.desyncs >= 1


def test_requests_beyond_the_pending_bound_are_counted_unanswered():
    conn = Connection("resp", requests=OUT)
    n = 100 * (pairing.MAX_PENDING // 100 + 2)
    for i in range(0, n, 100):
        conn.feed(i, OUT, b"PING\r\n" * 100, 600)
    assert len(conn._pairing.pending) == pairing.MAX_PENDING
    assert conn.counters.unanswered == n - pairing.MAX_PENDING
    conn.close(n)
    assert conn.counters.requests == conn.counters.unanswered == n

ALL_CAPTURES = {
    **{f"http_{k}": (v, {}) for k, v in HTTP_CAPTURES.items()},
    **{f"resp_{k}": (v, {}) for k, v in RESP_CAPTURES.items()},
    **{f"pg_{k}": (v, {"protocol": "pgwire", "requests": OUT}) for k, v in PG_CAPTURES.items()},
    **{f"mysql_{k}": (v, {}) for k, v in MY_CAPTURES.items()},
}


def split_variants(events):
    """Each fully captured event split in two at every byte boundary, one at a time."""
    for i, ev in enumerate(events):
        ts, direction, data = ev[:3]
        if data is None or len(ev) > 3:
            continue
        for k in range(1, len(data)):
            yield i, k, events[:i] + [(ts, direction, data[:k]), (ts, direction, data[k:])] + events[i + 1:]


@pytest.mark.parametrize("name", sorted(ALL_CAPTURES))
def test_results_do_not_depend_on_where_reads_split(name):
    events, kw = ALL_CAPTURES[name]
    whole = run(events, **kw)
    assert whole[0], "the capture must produce exchanges for the comparison to mean anything"
    for i, k, variant in split_variants(events):
        assert run(variant, **kw) == whole, f"event {i} split at byte {k}"
    one_byte = [(ev[0], ev[1], ev[2][j:j + 1]) for ev in events for j in range(len(ev[2]))]
    assert run(one_byte, **kw) == whole, "one byte per read"


@pytest.mark.parametrize("name, expected", [
    ("http_curl", ("http", "client")), ("resp_pipeline_with_errors", ("resp", "client")),
    ("resp_benchmark_inline_P16", ("resp", "client")), ("pg_startup_simple_query", ("pgwire", "client")),
    ("mysql_query_eof", ("mysql", "server")),
])
def test_detect_from_the_first_bytes(name, expected):
    events, _ = ALL_CAPTURES[name]
    assert detect(events[0][2]) == expected


def test_detect_other_openings():
    assert detect(NGINX_200) == ("http", "server")
    assert detect(b"\x00\x00\x00\x08\x04\xd2\x16\x2f") == ("pgwire", "client")  # SSLRequest
    assert detect(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03") == ("unknown", None)  # TLS
    assert detect(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n") == ("unknown", None)
    assert detect(b"") == ("unknown", None)


def test_unknown_protocol_is_given_up_and_detection_waits_for_a_split_opening():
    conn = Connection()
    assert conn.feed(0, OUT, b"\x16\x03\x01\x02\x00" + b"\x01" * 100, 105) == []
    assert conn.protocol == "unknown" and conn.counters.undetected == 1
    assert conn.feed(1, OUT, WRK_GET, len(WRK_GET)) == [] and conn.protocol == "unknown"
    conn = Connection()
    for ts in range(Connection.DETECT_EVENTS):
        assert conn.feed(ts, OUT, b"\x00", 1) == []
    assert conn.protocol == "unknown" and conn.counters.undetected == 1
    conn = Connection()  # a short opening the other side answers: over, and unknown
    assert conn.feed(0, OUT, b"EHLO x\r\n", 8) == [] and conn.protocol is None
    assert conn.feed(1, IN, b"250 ok\r\n", 8) == [] and conn.protocol == "unknown"
    conn = Connection()  # a first read of one byte: detection waits, then parses it all
    assert conn.feed(0, OUT, b"G", 1) == [] and conn.protocol is None
    assert conn.feed(0, OUT, WRK_GET[1:], len(WRK_GET) - 1) == [] and conn.protocol == "http"
    assert brief(conn.feed(3, IN, NGINX_200, len(NGINX_200))) == [("GET", False, "2xx", 3)]


def test_bad_arguments_are_refused_at_the_edge():
    with pytest.raises(ValueError, match="protocol"):
        Connection("smtp")
    with pytest.raises(ValueError, match="direction"):
        Connection().feed(0, "sideways", b"", 0)
    with pytest.raises(ValueError, match="true_len"):
        Connection().feed(0, OUT, b"abc", 2)


def test_sql_keywords():
    assert sql.classify(b"  /* trace=1 */ -- x\n (select 1)") == "SELECT"
    assert sql.classify(b"START TRANSACTION READ ONLY") == "BEGIN"
    assert sql.classify(b"START SLAVE") == "OTHER"
    assert sql.classify(b"end") == "COMMIT"
    assert sql.classify(b"WITH x AS (SELECT 1) SELECT * FROM x") == "OTHER"
    assert sql.classify(b"SEL", complete=False) == "UNKNOWN"
    assert sql.classify(b"/* unterminated", complete=False) == "UNKNOWN"


ALLOWED_STATUS = {"http": set(http.STATUS_CLASSES), "resp": {"ok", "error"},
                  "pgwire": {"ok", "error"}, "mysql": {"ok", "error"}}


def check(done, conn, keep_path=False):
    for ex in done:
        assert ex.protocol in PROTOCOLS and ex.protocol == conn.protocol
        assert ex.op in OPS[ex.protocol]
        assert ex.status_class in ALLOWED_STATUS[ex.protocol] and ex.status_class in STATUS_CLASSES
        assert isinstance(ex.error, bool) and isinstance(ex.duration_ns, int) and ex.duration_ns >= 0
        if ex.protocol != "http":
            assert ex.error == (ex.status_class == "error")
        if keep_path and ex.path is not None:
            assert len(ex.path) <= http.PATH_LIMIT and "?" not in ex.path
        else:
            assert ex.path is None
    c = conn.counters
    assert c.requests == c.exchanges + c.unanswered, "every request is answered or counted unanswered"


events_strategy = st.lists(st.tuples(
    st.sampled_from([OUT, IN]),
    st.binary(max_size=80),
    st.integers(min_value=0, max_value=70_000),  # bytes not captured
    st.integers(min_value=0, max_value=9),  # 0: the kernel lost the event instead
), max_size=30)


def feed_random(conn, events, keep_path=False):
    done = []
    for ts, (direction, data, missing, lost) in enumerate(events):
        if lost == 0:
            done += conn.gap(ts, direction)
        else:
            done += conn.feed(ts, direction, data, len(data) + (missing if lost == 1 else 0))
    done += conn.close(len(events))
    check(done, conn, keep_path)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(protocol=st.sampled_from(PROTOCOLS), events=events_strategy, keep_path=st.booleans())
def test_random_bytes_never_raise_or_leave_the_enums(protocol, events, keep_path):
    feed_random(Connection(protocol, requests=OUT, keep_path=keep_path), events, keep_path)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(ALL_CAPTURES)), data=st.data())
def test_mutated_captures_never_raise_or_leave_the_enums(name, data):
    """Real captures with bytes flipped, cut, dropped or lost: parsers get deep and fail."""
    events, kw = ALL_CAPTURES[name]
    conn = Connection(kw.get("protocol"), requests=kw.get("requests"), keep_path=True)
    done = []
    for ts, (_, direction, payload, *rest) in enumerate(events):
        payload = bytearray(payload)
        for _ in range(data.draw(st.integers(0, 3))):
            if payload:
                payload[data.draw(st.integers(0, len(payload) - 1))] = data.draw(st.integers(0, 255))
        action = data.draw(st.sampled_from(["keep", "keep", "keep", "split", "cut", "lose"]))
        if action == "lose":
            done += conn.gap(ts, direction)
        elif action == "cut":
            k = data.draw(st.integers(0, len(payload)))
            done += conn.feed(ts, direction, bytes(payload[:k]), len(payload) + data.draw(st.integers(0, 9)))
        elif action == "split" and len(payload) > 1:
            k = data.draw(st.integers(1, len(payload) - 1))
            done += conn.feed(ts, direction, bytes(payload[:k]), k)
            done += conn.feed(ts, direction, bytes(payload[k:]), len(payload) - k)
        else:
            done += conn.feed(ts, direction, bytes(payload), len(payload))
    done += conn.close(len(events))
    check(done, conn, keep_path=True)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_detect_never_raises(data):
    protocol, sender = detect(data)
    assert protocol in PROTOCOLS + ("unknown",)
    assert sender in ("client", "server") if protocol != "unknown" else sender is None


def test_counters_are_plain_ints_and_add_up():
    total = pairing.Counters()
    for name in ("http_curl", "pg_extended_error_aborts_batch"):
        events, kw = ALL_CAPTURES[name]
        conn = Connection(kw.get("protocol"), requests=kw.get("requests"))
        for ev in events:
            conn.feed(ev[0], ev[1], ev[2], len(ev[2]))
        conn.close(1000)
        total.add(conn.counters)
    assert all(type(v) is int for v in total.as_dict().values())
    assert total.requests == 5 and total.exchanges == 5 and total.aborted == 2
