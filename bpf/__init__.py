"""Sonde's probes: one folder each (bpf/<probe>/), found by discovery; sonde.h is their shared header."""
