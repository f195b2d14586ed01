"""Process facts from /proc, read through the config's injectable root."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator


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


def socket_links(root) -> Iterator[tuple[int, int]]:
    """(pid, socket inode) for every socket each process holds, from its
    /proc/PID/fd links; a process or fd that goes while it is read is passed over."""
    for d in os.scandir(root):
        if not d.name.isdigit():
            continue
        pid = int(d.name)
        try:
            for fd in os.scandir(f"{d.path}/fd"):
                try:
                    link = os.readlink(fd.path)
                except OSError:
                    continue
                if link.startswith("socket:["):
                    yield pid, int(link[8:-1])
        except OSError:
            continue
