"""The L7 dashboard of one protocol family (probe l7, opt-in): each `<family>.dashboard.py`
is one call, so the four families show the same panels over their own protocol."""
from sonde.dashboards.house import HOST_VAR, Grid, dashboard, heatmap, table, timeseries, variable
from sonde.ingest.analysis.queries import Query


def family(uid: str, title: str, protocol: str, what: str, http: bool = False):
    process = variable("process", "Process", f'SHOW TAG VALUES FROM "l7_requests" WITH KEY = "comm" '
                                              f'WHERE "host" =~ /^$host$/ AND "protocol" = \'{protocol}\'')
    f = (("host", "$host"), ("comm", "$process"), ("protocol", protocol))
    grid = Grid()
    panels = [
        timeseries(grid, "Requests per second by process and operation", [
            (Query("l7_requests", ("sum(requests)",), f, ("comm", "role", "op"), per_second=True, alias="requests",
                   extra="fill(0)"), "$tag_comm ($tag_role) $tag_op")], unit="reqps",
            description="Requests whose response ended, per second (role server: answered by the process; "
                        "client: sent by it)."),
        timeseries(grid, "Failed requests by process and peer", [
            (Query("l7_requests", ("sum(errors)",), f, ("comm", "role", "peer", "port"), alias="errors",
                   extra="fill(0)"), "errors $tag_comm ($tag_role) $tag_peer:$tag_port"),
            (Query("l7_requests", ("sum(no_response)",), f, ("comm", "role", "peer", "port"), alias="no_response",
                   extra="fill(0)"), "no response $tag_comm ($tag_role) $tag_peer:$tag_port")],
            description=f"Per interval: {what}; and requests whose connection ended before any response."),
        timeseries(grid, "Request p99 by process and peer", [
            (Query("l7_duration", ("max(p99_us)",), f, ("comm", "role", "peer", "port"), extra="fill(none)"),
             "$tag_comm ($tag_role) $tag_peer:$tag_port")], unit="µs",
            description="Each interval's p99 from its duration histogram (the slowest pid's where a name has "
                        "several)."),
        heatmap(grid, "Request duration (µs)", Query("l7_duration_hist", ("sum(count)",), f, ("le",),
                                                      extra="fill(0)")),
    ]
    if http:
        panels.append(timeseries(grid, "Error responses by status", [
            (Query("l7_http_errors", ("sum(responses)",), f, ("comm", "role", "status"), alias="responses",
                   extra="fill(0)"), "$tag_comm ($tag_role) $tag_status")],
            description="4xx and 5xx by exact status (a registered code, else its class)."))
    panels += [
        timeseries(grid, "Capture: what could not be counted", [
            (Query("l7_capture", ("sum(unanswered)",), (("host", "$host"), ("comm", "$process"),
                                                        ("protocol", protocol)), ("comm",), alias="unanswered",
                   extra="fill(0)"), "unanswered $tag_comm"),
            (Query("l7_capture", ("sum(desyncs)",), (("host", "$host"), ("comm", "$process"),
                                                     ("protocol", protocol)), ("comm",), alias="desyncs",
                   extra="fill(0)"), "desyncs $tag_comm"),
            (Query("l7_capture", ("sum(lost_events)",), (("host", "$host"), ("comm", "$process"),
                                                         ("protocol", protocol)), ("comm",), alias="lost_events",
                   extra="fill(0)"), "lost events $tag_comm")],
            description="Requests without a response, lost message boundaries and events the kernel dropped: "
                        "the panels above are short by these."),
        table(grid, "Requests in range", [
            (Query("l7_requests", ("sum(requests)", "sum(errors)", "sum(no_response)"), f,
                   ("comm", "role", "peer", "port", "op"), time_bucket=False), "")]),
    ]
    return dashboard(uid, title, panels, [HOST_VAR, process],
                     f"{title.split(' / ')[1]} requests of opted-in processes (probe l7): rate, errors, duration.")
