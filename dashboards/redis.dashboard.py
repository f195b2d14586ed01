"""Redis (L7): commands, error replies and duration of opted-in Redis servers and clients."""
from sonde.dashboards.l7 import family

dashboard = family("sonde-l7-redis", "Sonde / Redis", "resp", "error replies (-ERR, -WRONGTYPE, ...)")
