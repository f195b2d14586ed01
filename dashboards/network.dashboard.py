"""Network (L4): who talks to whom, how much, how slowly, with what failures."""
from sonde.dashboards.house import HOST_VAR, PEER_VAR, PROCESS_VAR, Grid, dashboard, heatmap, table, timeseries
from sonde.ingest.analysis.queries import Query

F = (("host", "$host"), ("comm", "$process"), ("peer", "$peer"))
grid = Grid()
dashboard = dashboard("sonde-network", "Sonde / Network (L4)", [
    timeseries(grid, "Bytes sent per second by process and peer", [
        (Query("tcp_flow", ("sum(tx_bytes)",), F, ("comm", "peer", "port"), per_second=True, alias="tx",
               extra="fill(0)"), "$tag_comm → $tag_peer:$tag_port")], unit="Bps"),
    timeseries(grid, "Bytes received per second by process and peer", [
        (Query("tcp_flow", ("sum(rx_bytes)",), F, ("comm", "peer", "port"), per_second=True, alias="rx",
               extra="fill(0)"), "$tag_comm ← $tag_peer:$tag_port")], unit="Bps"),
    timeseries(grid, "Connects per second", [
        (Query("tcp_flow", ("sum(active_opens)",), F, ("comm", "peer"), per_second=True, alias="active",
               extra="fill(0)"), "$tag_comm → $tag_peer"),
        (Query("tcp_flow", ("sum(passive_opens)",), F, ("comm", "peer"), per_second=True, alias="passive",
               extra="fill(0)"), "$tag_comm ← $tag_peer")], unit="cps"),
    timeseries(grid, "Failed connects", [
        (Query("tcp_flow", ("sum(connect_refused)",), F, ("comm", "peer", "port"), alias="refused",
               extra="fill(0)"), "refused $tag_comm → $tag_peer:$tag_port"),
        (Query("tcp_flow", ("sum(connect_timeouts)",), F, ("comm", "peer", "port"), alias="timeouts",
               extra="fill(0)"), "timed out $tag_comm → $tag_peer:$tag_port")]),
    timeseries(grid, "Resets", [
        (Query("tcp_flow", ("sum(resets_received)",), F, ("comm", "peer"), alias="received", extra="fill(0)"),
         "received $tag_comm ← $tag_peer"),
        (Query("tcp_flow", ("sum(resets_sent)",), F, ("comm", "peer"), alias="sent", extra="fill(0)"),
         "sent $tag_comm → $tag_peer")]),
    timeseries(grid, "Retransmits", [
        (Query("tcp_flow", ("sum(retransmits)",), F, ("comm", "peer"), alias="retransmits", extra="fill(0)"),
         "$tag_comm ↔ $tag_peer")]),
    heatmap(grid, "srtt (µs)", Query("tcp_srtt_hist", ("sum(count)",), F, ("le",), extra="fill(0)")),
    heatmap(grid, "Connect latency (µs)", Query("tcp_connect_latency_hist", ("sum(count)",), F, ("le",),
                                                 extra="fill(0)")),
    timeseries(grid, "srtt p99 by peer", [
        (Query("tcp_srtt", ("max(p99_us)",), F, ("comm", "peer"), extra="fill(none)"), "$tag_comm ↔ $tag_peer")],
        unit="µs"),
    timeseries(grid, "Sockets by state", [
        (Query("tcp_states", ("sum(sockets)",), (("host", "$host"), ("comm", "$process")), ("state",),
               per_poll=True, alias="sockets", extra="fill(none)"), "$tag_state")],
        description="Sockets in each state, all processes of the chosen name together, averaged over the polls "
                    "of each interval."),
    table(grid, "Flows in range", [
        (Query("tcp_flow", ("sum(tx_bytes)", "sum(rx_bytes)", "sum(active_opens)", "sum(passive_opens)",
                            "sum(resets_received)", "sum(retransmits)"), F, ("comm", "role", "peer", "port"),
               time_bucket=False), "")]),
], [HOST_VAR, PROCESS_VAR, PEER_VAR], "Per process and peer endpoint: volumes, connects, failures, latency.")
