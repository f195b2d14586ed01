"""Errors a user can cause or fix. Each carries one line: what is wrong, what to do."""


class SondeError(Exception):
    """A problem reported to the user as one line, with no traceback."""


class ConfigError(SondeError):
    pass


class ProbeError(SondeError):
    pass


class SinkError(SondeError):
    """Writing to the time-series store failed."""

    def __init__(self, message: str, *, transient: bool):
        super().__init__(message)
        self.transient = transient


class CatalogError(SondeError):
    """A producer emitted, or a consumer referenced, something the catalog does not declare."""
