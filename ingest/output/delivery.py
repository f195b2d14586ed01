"""The deliverer: drains the spool to the sink, oldest first, in its own thread.

Transient failures (server down, unauthorised, 5xx) are retried with jittered
exponential backoff from tenacity, and the points stay spooled meanwhile. The
first failure and the recovery are logged once each, not every retry.
"""
from __future__ import annotations

import logging
import threading

from tenacity import Retrying, retry_if_exception, stop_when_event_set, wait_exponential_jitter

from sonde.ingest.errors import SinkError
from sonde.ingest.output.sinks import Sink, rejected_count
from sonde.ingest.output.spool import Spool

log = logging.getLogger("sonde.delivery")


def _transient(e: BaseException) -> bool:
    return isinstance(e, SinkError) and e.transient


class Deliverer:
    def __init__(self, spool: Spool, sink: Sink, batch_points: int, *, max_backoff: float = 30.0):
        self.spool = spool
        self.sink = sink
        self.batch_points = batch_points
        self.max_backoff = max_backoff
        self.stop_event = threading.Event()
        self.draining = threading.Event()
        self.wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False
        self._lock = threading.Lock()
        self.written = self.rejected = self.write_errors = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sonde-deliver", daemon=True)
        self._thread.start()

    def stop(self, drain_seconds: float = 5.0) -> None:
        """Give a last chance to deliver, then stop; undelivered points stay on disk."""
        self.draining.set()
        self.wake.set()
        if self._thread:
            self._thread.join(timeout=drain_seconds)
        self.stop_event.set()
        self.wake.set()
        if self._thread:
            self._thread.join(timeout=self.sink_timeout() + 5)

    def sink_timeout(self) -> float:
        return getattr(getattr(self.sink, "cfg", None), "timeout_seconds", 10.0)

    def _note_error(self, retry_state) -> None:
        with self._lock:
            self.write_errors += 1
        if not self._failing:
            self._failing = True
            log.warning("%s; %d points spooled, retrying with backoff",
                        retry_state.outcome.exception(), len(self.spool))

    def deliver_once(self) -> int:
        """Deliver one batch; return how many lines left the spool.

        Each retry re-reads the oldest batch, so points the spool dropped for its
        bound during an outage are never delivered as well as counted as dropped.
        """
        sent: list[tuple[int, str]] = []
        try:
            for attempt in Retrying(retry=retry_if_exception(_transient),
                                    wait=wait_exponential_jitter(multiplier=0.2, max=self.max_backoff, jitter=0.2),
                                    stop=stop_when_event_set(self.stop_event),
                                    before_sleep=self._note_error, reraise=True,
                                    sleep=self.stop_event.wait):
                with attempt:
                    sent = self.spool.peek(self.batch_points)
                    if sent:
                        self.sink.write([line for _, line in sent])
        except SinkError as e:
            if e.transient:  # stopping while the server is down: keep them spooled
                return 0
            n = rejected_count(e, len(sent))
            with self._lock:
                self.rejected += n
            log.error("%s; dropped %d of %d points", e, n, len(sent))
        else:
            if not sent:
                return 0
            with self._lock:
                self.written += len(sent)
            if self._failing:
                self._failing = False
                log.warning("InfluxDB writes recovered; %d points still spooled", len(self.spool) - len(sent))
        self.spool.ack(sent[-1][0])
        return len(sent)

    def _run(self) -> None:
        while not self.stop_event.is_set():
            try:
                moved = self.deliver_once()
            except Exception:
                log.exception("deliverer: unexpected error; retrying in 5 s")
                self.stop_event.wait(5)
                continue
            if moved == 0:
                if self.draining.is_set():
                    return
                self.wake.wait(1.0)
                self.wake.clear()

    def take_counts(self) -> tuple[int, int, int]:
        """(written, rejected, write_errors) since the last call."""
        with self._lock:
            counts = (self.written, self.rejected, self.write_errors)
            self.written = self.rejected = self.write_errors = 0
        return counts
