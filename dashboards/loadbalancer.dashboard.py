"""Load balancer: one service (nginx by default), frontends against backends.

Frontend flows are the service's accepted connections (role=server: clients ->
listening port); backend flows are those it opened (role=client: worker ->
upstream). Per-backend shares show whether balancing is fair. Where probe l7 is opted in
on the service, its requests sit beside the L4 panels: per upstream the requests it
answered, those that failed (a 5xx, or no response: the backend reset or closed the
connection first), and the p99 duration; per frontend the error statuses it answered."""
from sonde.dashboards.house import CPU_PCT, HOST_VAR, Grid, dashboard, heatmap, table, timeseries, variable
from sonde.ingest.analysis.queries import Query

SERVICE = variable("service", "Service", 'SHOW TAG VALUES FROM "tcp_flow" WITH KEY = "comm" WHERE "host" =~ /^$host$/',
                   include_all=False)
FRONT = (("host", "$host"), ("comm", "$service"), ("role", "server"))
BACK = (("host", "$host"), ("comm", "$service"), ("role", "client"))
grid = Grid()
dashboard = dashboard("sonde-lb", "Sonde / Load balancer", [
    timeseries(grid, "Frontend: bytes per second by listening port", [
        (Query("tcp_flow", ("sum(rx_bytes)",), FRONT, ("port",), per_second=True, alias="in", extra="fill(0)"),
         "in :$tag_port"),
        (Query("tcp_flow", ("sum(tx_bytes)",), FRONT, ("port",), per_second=True, alias="out", extra="fill(0)"),
         "out :$tag_port")], unit="Bps"),
    timeseries(grid, "Backend: bytes per second by upstream", [
        (Query("tcp_flow", ("sum(tx_bytes)",), BACK, ("peer", "port"), per_second=True, alias="to",
               extra="fill(0)"), "→ $tag_peer:$tag_port"),
        (Query("tcp_flow", ("sum(rx_bytes)",), BACK, ("peer", "port"), per_second=True, alias="from",
               extra="fill(0)"), "← $tag_peer:$tag_port")], unit="Bps"),
    timeseries(grid, "Backend: connects by upstream", [
        (Query("tcp_flow", ("sum(active_opens)",), BACK, ("peer", "port"), alias="connects", extra="fill(0)"),
         "$tag_peer:$tag_port")]),
    timeseries(grid, "Backend: failed connects and resets by upstream", [
        (Query("tcp_flow", ("sum(connect_refused)",), BACK, ("peer", "port"), alias="refused", extra="fill(0)"),
         "refused $tag_peer:$tag_port"),
        (Query("tcp_flow", ("sum(connect_timeouts)",), BACK, ("peer", "port"), alias="timeouts", extra="fill(0)"),
         "timeouts $tag_peer:$tag_port"),
        (Query("tcp_flow", ("sum(resets_received)",), BACK, ("peer", "port"), alias="resets", extra="fill(0)"),
         "resets $tag_peer:$tag_port")]),
    timeseries(grid, "Backend: srtt p99 by upstream", [
        (Query("tcp_srtt", ("max(p99_us)",), BACK, ("peer",), extra="fill(none)"), "$tag_peer")], unit="µs"),
    timeseries(grid, "Backend: connect latency p99 by upstream", [
        (Query("tcp_connect_latency", ("max(p99_us)",), BACK, ("peer",), extra="fill(none)"), "$tag_peer")],
        unit="µs"),
    table(grid, "Per-backend share in range (connections and bytes)", [
        (Query("tcp_flow", ("sum(active_opens)", "sum(tx_bytes)", "sum(rx_bytes)", "sum(resets_received)",
                            "sum(connect_refused)", "sum(connect_timeouts)"), BACK, ("peer", "port"),
               time_bucket=False), "")]),
    timeseries(grid, "Backend: requests per second by upstream (L7)", [
        (Query("l7_requests", ("sum(requests)",), BACK, ("peer", "port"), per_second=True, alias="answered",
               extra="fill(0)"), "$tag_peer:$tag_port")], unit="reqps",
        description="Requests the service sent each upstream that got a response (probe l7, opted in on the "
                    "service)."),
    timeseries(grid, "Backend: failed requests by upstream (L7)", [
        (Query("l7_requests", ("sum(errors)",), BACK, ("peer", "port"), alias="5xx", extra="fill(0)"),
         "5xx $tag_peer:$tag_port"),
        (Query("l7_requests", ("sum(no_response)",), BACK, ("peer", "port"), alias="no_response", extra="fill(0)"),
         "no response $tag_peer:$tag_port")],
        description="Per interval: responses with an error status from the upstream, and requests whose "
                    "connection ended before any response (a reset: the balancer answers those itself, "
                    "nginx with 502)."),
    timeseries(grid, "Backend: request p99 by upstream (L7)", [
        (Query("l7_duration", ("max(p99_us)",), BACK, ("peer", "port"), extra="fill(none)"),
         "$tag_peer:$tag_port")], unit="µs",
        description="Each interval's p99 from its duration histogram (the slowest worker's, where several "
                    "talk to one upstream), from the request's first byte to the response's last."),
    timeseries(grid, "Frontend: error responses by status (L7)", [
        (Query("l7_http_errors", ("sum(responses)",), FRONT, ("port", "status"), alias="responses",
               extra="fill(0)"), ":$tag_port $tag_status")],
        description="4xx and 5xx the service answered its clients, by exact status."),
    heatmap(grid, "Backend: request duration (µs, L7)", Query("l7_duration_hist", ("sum(count)",), BACK, ("le",),
                                                                extra="fill(0)")),
    table(grid, "Per-backend requests in range (L7)", [
        (Query("l7_requests", ("sum(requests)", "sum(errors)", "sum(no_response)"), BACK, ("peer", "port"),
               time_bucket=False), "")], w=12),
    timeseries(grid, "Service CPU by worker (% of one core)", [
        (Query("process_cpu", (CPU_PCT,), (("host", "$host"), ("comm", "$service")), ("pid",), alias="cpu",
               extra="fill(0)"), "pid $tag_pid")], unit="percent"),
], [HOST_VAR, SERVICE], "Frontends (clients -> service) against backends (service -> upstreams).")
