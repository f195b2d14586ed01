"""Agent: is Sonde itself healthy? Poll durations, drops, spool, write errors."""
from sonde.dashboards.house import HOST_VAR, Grid, dashboard, timeseries
from sonde.ingest.analysis.queries import Query

H = (("host", "$host"),)
grid = Grid()
dashboard = dashboard("sonde-agent", "Sonde / Agent", [
    timeseries(grid, "Poll duration by probe", [
        (Query("sonde_probe", ("max(poll_duration_seconds)",), H, ("probe",), extra="fill(none)"), "$tag_probe")],
        unit="s"),
    timeseries(grid, "Poll failures by probe", [
        (Query("sonde_probe", ("count(poll_success) - sum(poll_success) as failed",), H, ("probe",),
               extra="fill(0)"), "$tag_probe")]),
    timeseries(grid, "Events lost: full maps and kernel recursion skips", [
        (Query("sonde_probe", ("sum(map_full_drops)",), H, ("probe",), alias="map full", extra="fill(0)"),
         "map full $tag_probe"),
        (Query("sonde_probe", ("sum(kernel_misses)",), H, ("probe",), alias="kernel skips", extra="fill(0)"),
         "kernel skips $tag_probe")]),
    timeseries(grid, "Spool", [
        (Query("sonde_spool", ("max(queued_points)",), H, (), alias="queued", extra="fill(none)"), "queued"),
        (Query("sonde_spool", ("sum(dropped_points)",), H, (), alias="dropped", extra="fill(0)"), "dropped")]),
    timeseries(grid, "Writes", [
        (Query("sonde_spool", ("sum(written_points)",), H, (), alias="written", extra="fill(0)"), "written"),
        (Query("sonde_spool", ("sum(write_errors)",), H, (), alias="errors", extra="fill(0)"), "write errors"),
        (Query("sonde_spool", ("sum(rejected_points)",), H, (), alias="rejected", extra="fill(0)"), "rejected")]),
    timeseries(grid, "Map entries by probe", [
        (Query("sonde_probe", ("max(map_entries)",), H, ("probe",), extra="fill(none)"), "$tag_probe")]),
], [HOST_VAR], "Sonde's own health: a gap or a drop here means the other dashboards are short.")
