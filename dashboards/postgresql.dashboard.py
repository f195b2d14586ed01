"""PostgreSQL (L7): statements by class, ErrorResponses and duration of opted-in servers and clients."""
from sonde.dashboards.l7 import family

dashboard = family("sonde-l7-postgresql", "Sonde / PostgreSQL", "pgwire",
                   "ErrorResponses (and the Executes their batch then skipped)")
