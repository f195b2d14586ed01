"""MySQL / MariaDB (L7): commands by class, ERR packets and duration of opted-in servers and clients."""
from sonde.dashboards.l7 import family

dashboard = family("sonde-l7-mysql", "Sonde / MySQL", "mysql", "ERR packets")
