"""Host overview: CPU by process, disks, network totals, OOM kills, agent health."""
from sonde.dashboards.house import (BUSY_PCT, CPU_PCT, HOST_VAR, PROCESS_VAR, Grid, dashboard, stat, timeseries)
from sonde.ingest.analysis.queries import Query

H = (("host", "$host"),)
grid = Grid()
dashboard = dashboard("sonde-host", "Sonde / Host overview", [
    timeseries(grid, "CPU by process (% of one core)", [
        (Query("process_cpu", (CPU_PCT,), H + (("comm", "$process"),), ("comm",), alias="cpu", extra="fill(0)"),
         "$tag_comm")], unit="percent",
        description="On-CPU time of every process of that name (all pids together) over each interval; "
                    "100 = one core."),
    timeseries(grid, "Disk utilisation", [
        (Query("disk_busy", (BUSY_PCT,), H, ("disk",), alias="util", extra="fill(0)"), "$tag_disk")],
        unit="percent", description="Time the disk had requests in flight, over each interval."),
    timeseries(grid, "TCP bytes per second (host)", [
        (Query("tcp_flow", ("sum(tx_bytes)",), H, (), per_second=True, alias="sent", extra="fill(0)"), "sent"),
        (Query("tcp_flow", ("sum(rx_bytes)",), H, (), per_second=True, alias="received", extra="fill(0)"),
         "received")], unit="Bps"),
    timeseries(grid, "Disk throughput", [
        (Query("block_io", ("sum(bytes)",), H, ("disk",), per_second=True, alias="bytes", extra="fill(0)"),
         "$tag_disk")], unit="Bps"),
    stat(grid, "OOM kills", Query("oom_kills", ("sum(kills)",), H, (), alias="kills", extra="fill(0)"),
         description="OOM kills in the time range."),
    stat(grid, "Probe poll failures", Query("sonde_probe", ("count(poll_success) - sum(poll_success) as failed",),
                                            H, (), extra="fill(0)")),
    stat(grid, "Events lost to full maps", Query("sonde_probe", ("sum(map_full_drops)",), H, (), alias="drops",
                                                 extra="fill(0)")),
    stat(grid, "Points dropped by the spool", Query("sonde_spool", ("sum(dropped_points)",), H, (),
                                                    alias="dropped", extra="fill(0)")),
], [HOST_VAR, PROCESS_VAR], "What the CPUs, disks and network of one host were doing.")
