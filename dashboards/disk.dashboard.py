"""Disk: the latency split as heatmaps, throughput, utilisation, by I/O class."""
from sonde.dashboards.house import BUSY_PCT, HOST_VAR, Grid, dashboard, heatmap, timeseries, variable
from sonde.ingest.analysis.queries import Query

DISK = variable("disk", "Disk", 'SHOW TAG VALUES FROM "block_io" WITH KEY = "disk" WHERE "host" =~ /^$host$/')
D = (("host", "$host"), ("disk", "$disk"))
grid = Grid()
dashboard = dashboard("sonde-disk", "Sonde / Disk", [
    heatmap(grid, "Queue latency: start to issue (µs)", Query("block_queue_latency_hist", ("sum(count)",), D, ("le",),
                                                               extra="fill(0)"), w=8),
    heatmap(grid, "Device latency: issue to complete (µs)", Query("block_device_latency_hist", ("sum(count)",), D,
                                                                   ("le",), extra="fill(0)"), w=8),
    heatmap(grid, "Total latency (µs)", Query("block_total_latency_hist", ("sum(count)",), D, ("le",),
                                              extra="fill(0)"), w=8),
    timeseries(grid, "Throughput by class", [
        (Query("block_io", ("sum(bytes)",), D, ("disk", "op"), per_second=True, alias="bytes", extra="fill(0)"),
         "$tag_disk $tag_op")], unit="Bps"),
    timeseries(grid, "IOPS by class", [
        (Query("block_io", ("sum(requests)",), D, ("disk", "op"), per_second=True, alias="iops", extra="fill(0)"),
         "$tag_disk $tag_op")], unit="iops"),
    timeseries(grid, "Utilisation", [
        (Query("disk_busy", (BUSY_PCT,), D, ("disk",), alias="util", extra="fill(0)"), "$tag_disk")],
        unit="percent"),
    timeseries(grid, "Errors", [
        (Query("block_io", ("sum(errors)",), D, ("disk", "op"), alias="errors", extra="fill(0)"),
         "$tag_disk $tag_op")]),
    timeseries(grid, "Total latency p99 by class", [
        (Query("block_total_latency", ("max(p99_us)",), D, ("disk", "op"), extra="fill(none)"),
         "$tag_disk $tag_op")], unit="µs"),
    timeseries(grid, "I/O submitted by process", [
        (Query("process_io", ("sum(bytes)",), (("host", "$host"),), ("comm",), per_second=True, alias="bytes",
               extra="fill(0)"), "$tag_comm")], unit="Bps"),
], [HOST_VAR, DISK], "Block I/O per disk and class; writeback shows under kernel threads.")
