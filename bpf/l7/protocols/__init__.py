"""L7 protocol parsers: pure functions of captured bytes, no kernel and no I/O.

`pairing.Connection` is the entry point: feed it one connection's capture events
and it returns completed `Exchange`s. See README.md for what is counted and how.
"""
