"""A durable, bounded disk spool between the poller and the sink.

Points are appended as encoded line-protocol lines, one SQLite row each, and
delivered oldest first. Every committed append survives a crash or `kill -9`
(SQLite's WAL). Past `max_points` the oldest rows are deleted and counted: the
bound is what keeps a long outage from filling the disk, and the count is what
tells the operator exactly how much was lost.
"""
from __future__ import annotations

import sqlite3
import threading
from pathlib import Path


class Spool:
    def __init__(self, path: Path, max_points: int):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_points = max_points
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS points (id INTEGER PRIMARY KEY AUTOINCREMENT, line TEXT NOT NULL)")
        self._db.execute("CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)")
        self._count = self._db.execute("SELECT COUNT(*) FROM points").fetchone()[0]

    def __len__(self) -> int:
        return self._count

    def put(self, lines: list[str]) -> int:
        """Append lines; return how many of the oldest were dropped to stay in bound."""
        if not lines:
            return 0
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                cur.executemany("INSERT INTO points(line) VALUES (?)", ((l,) for l in lines))
                count = self._count + len(lines)
                dropped = max(0, count - self.max_points)
                if dropped:
                    cur.execute(
                        "DELETE FROM points WHERE id IN (SELECT id FROM points ORDER BY id LIMIT ?)", (dropped,))
                    cur.execute(
                        "INSERT INTO counters VALUES ('dropped_points', ?) "
                        "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value", (dropped,))
                cur.execute("COMMIT")
            except BaseException:
                try:
                    cur.execute("ROLLBACK")
                except sqlite3.Error:  # SQLite may have rolled back itself (a full disk)
                    pass
                raise
            self._count = count - dropped
            return dropped

    def peek(self, n: int) -> list[tuple[int, str]]:
        """The oldest n lines, with their ids, left in place until `ack`."""
        with self._lock:
            return self._db.execute("SELECT id, line FROM points ORDER BY id LIMIT ?", (n,)).fetchall()

    def ack(self, last_id: int) -> None:
        """Delete every line up to and including last_id: they were delivered."""
        with self._lock:
            cur = self._db.execute("DELETE FROM points WHERE id <= ?", (last_id,))
            self._count -= cur.rowcount

    def dropped_total(self) -> int:
        """Points dropped for the bound over the spool's whole life, across restarts."""
        with self._lock:
            row = self._db.execute("SELECT value FROM counters WHERE name='dropped_points'").fetchone()
            return row[0] if row else 0

    def close(self) -> None:
        with self._lock:
            self._db.close()
