"""HTTP (L7): requests, errors by status, duration of opted-in HTTP/1.x servers and clients, TLS included."""
from sonde.dashboards.l7 import family

dashboard = family("sonde-l7-http", "Sonde / HTTP", "http", "responses with a 5xx status", http=True)
