"""The agent's own name on the host.

`sonde run` names its process `sonde-agent` (PR_SET_NAME) before any thread starts,
so every thread it starts inherits the name, and its own sockets (writes to InfluxDB,
webhook posts) show under that comm. The alert rules leave that comm out: an InfluxDB
outage makes the agent's connects fail, and those must not page as a failing backend.
"""
from __future__ import annotations

import ctypes
import logging

AGENT_COMM = "sonde-agent"  # at most 15 bytes: the kernel's comm
PR_SET_NAME = 15

log = logging.getLogger("sonde.agent")


def name_this_process(name: str = AGENT_COMM) -> None:
    """Set the calling thread's comm; threads started after inherit it (call it first)."""
    try:
        ok = ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)
    except (OSError, AttributeError) as e:  # not Linux: nothing to name
        log.debug("cannot set the process name: %s", e)
        return
    if ok != 0:
        log.debug("prctl(PR_SET_NAME) failed: errno %d", ctypes.get_errno())
