"""Sonde's user side: config, probe runtime, scheduling, spool, sinks, CLI."""
