"""Process facts from /proc, read through the config's injectable root."""
from __future__ import annotations

from pathlib import Path


class Procfs:
    def __init__(self, root: Path):
        self.root = Path(root)

    def alive(self, tgid: int) -> bool:
        return (self.root / str(tgid)).exists()

    def comm(self, tgid: int) -> bytes | None:
        """The process's name (its main thread's comm), or None once it has exited."""
        try:
            return (self.root / str(tgid) / "comm").read_bytes().removesuffix(b"\n")
        except (FileNotFoundError, ProcessLookupError):
            return None
