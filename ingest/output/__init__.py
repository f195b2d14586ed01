"""The delivery path: line protocol, the disk spool, delivery with retry, sinks, the embedded InfluxDB."""
