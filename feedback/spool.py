"""Durable local spool: an append-only, CRC-framed log with a memory tail, replayed in order from a cursor.

Every record gets the next sequence number. Two durability modes:

- `write_ahead` (the default): `append` also writes the record's frame to the active segment file (one
  `write`, no fsync: ~1.5 µs), so a record is in the OS page cache before `append` returns and survives a
  crash or SIGKILL of the process. The writer thread fsyncs, in group commits every `fsync_interval_s`, the
  records still unacknowledged after a whole interval (so a healthy downstream never waits on the disk, and
  segments acknowledged within seconds are deleted before the kernel writes them back).
- memory (`write_ahead=False`): `append` only touches memory; the writer thread writes and fsyncs the records
  still unacknowledged after a whole interval, all of them under memory pressure, or all with `write_through`.
  A crash loses what was accepted in the last interval and not yet acknowledged.

Records on disk may leave memory under memory pressure; the reader then reads them back from their segment
files, in order. If a write on the caller's thread fails (disk full), the record stays in memory and the
writer thread takes over writing (with retries) until it has caught up. `ack(seq)` moves the cursor (persisted by the writer);
segments wholly below it are deleted. On open, a torn or corrupt tail record is found by its CRC and truncated;
everything before it replays. At-least-once: after a crash, records acknowledged since the last persisted
cursor replay again (consumers deduplicate by event id).

The file formats, recovery and the segment reader live in `feedback.segments`.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from enum import StrEnum
from itertools import islice
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from feedback.segments import (
    HEADER,
    MAX_RECORD_BYTES,
    FrameScan,
    SegmentReader,
    SpoolRecord,
    encode_frame,
    encode_frames,
    fsync_dir,
    list_segments,
    read_cursor,
    recover_tail,
    scan_frames,
    segment_name,
    write_cursor,
)
from schemas.errors import ErrorKind, ServoloopError

__all__ = [
    "HEADER", "MAX_RECORD_BYTES", "FrameScan", "Spool", "SpoolClosed", "SpoolError", "SpoolFull", "SpoolHealth",
    "SpoolLocked", "SpoolRecord", "encode_frame", "scan_frames",
]

log = logging.getLogger(__name__)


class SpoolError(ServoloopError):
    kind = ErrorKind.UNAVAILABLE
    code = "spool_error"


class SpoolFull(SpoolError):
    """Over the disk cap (or the writer cannot keep up): the record was refused, nothing was dropped silently."""

    kind = ErrorKind.RESOURCE_EXHAUSTED
    code = "spool_full"


class SpoolClosed(SpoolError):
    kind = ErrorKind.FAILED_PRECONDITION
    code = "spool_closed"


class SpoolLocked(SpoolError):
    """Another spool (in this or another process) holds the directory."""

    kind = ErrorKind.FAILED_PRECONDITION
    code = "spool_locked"


class SpoolHealth(StrEnum):
    OK = "ok"  # no backlog on disk
    SPILLING = "spilling"  # a backlog is on disk, waiting for the downstream
    FULL = "full"  # appends are refused (over the cap), or the disk fails writes


# ---- the spool -------------------------------------------------------------------------------------------


class Spool:
    """A durable FIFO of byte records with one reader. Thread-safe; `append` never does I/O.

    Raises SpoolLocked when another spool holds `directory`. Call `close()` (or use it as a context manager):
    it writes every unacknowledged record to disk and persists the cursor.
    """

    def __init__(
        self,
        directory: Path | str,
        *,
        max_bytes: int = 2 * 1024**3,
        segment_bytes: int = 16 * 1024**2,
        fsync_interval_s: float = 0.05,
        memory_max_records: int = 100_000,
        memory_max_bytes: int = 64 * 1024**2,
        write_through: bool = False,
        write_ahead: bool = True,
        registry: CollectorRegistry | None = None,
    ):
        self._dir = Path(directory)
        self._dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self._dir / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise SpoolLocked(f"spool directory {self._dir} is in use by another spool") from None
        self.max_bytes, self._segment_bytes = max_bytes, segment_bytes
        self._interval, self._write_through = fsync_interval_s, write_through
        self.write_ahead = write_ahead
        # True while the caller's thread writes frames (write-ahead mode and no failed write to catch up on).
        self._caller_writes = write_ahead
        self._mem_max_records, self._mem_max_bytes = memory_max_records, memory_max_bytes

        cursor = read_cursor(self._dir)
        segments = list_segments(self._dir)
        for i in range(len(segments) - 1):  # segments wholly acknowledged before the last run ended
            if segments[i + 1] <= cursor:
                (self._dir / segment_name(segments[i])).unlink()
        segments = list_segments(self._dir)
        last_seq, self.recovered_cut_bytes = recover_tail(self._dir, segments)

        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._written_cv = threading.Condition(self._lock)
        self._segments = segments
        self._sizes = {s: (self._dir / segment_name(s)).stat().st_size for s in segments}
        self._disk_total = sum(self._sizes.values())
        self._cursor = self._persisted_cursor = cursor
        self._next_seq = max(cursor, last_seq + 1)
        self._written_upto = self._boundary = self._next_seq  # unacked records below written_upto are on disk
        self._last_written_seq = last_seq
        self._synced_upto = self._next_seq  # records below it are fsynced or acknowledged
        self._spilled_seq = last_seq  # last record a group commit had to make durable (backlog while >= cursor)
        self._retired_fds: list[tuple[int, int]] = []  # (fd, its last seq): rolled segments, not yet fsynced+closed
        self._dir_dirty = False  # a segment was created on the caller's thread: the directory needs an fsync
        self._last_commit = time.monotonic()
        self._mem: deque[SpoolRecord] = deque()
        self._mem_start = self._next_seq
        self._mem_bytes = 0
        self._read_seq = cursor
        self._reader = SegmentReader(self._dir)
        self._active_fd: int | None = None
        self._pressure = self._force = self._closing = self._closed = False
        self._io_error: str | None = None
        self.appended = self.acked = self.refused = self.written = self.fsyncs = 0
        self._full = False
        self._writer = threading.Thread(target=self._run, name=f"spool-writer:{self._dir.name}", daemon=True)
        self._writer.start()
        if registry is not None:
            registry.register(_SpoolCollector(self))

    # -- the caller's side --------------------------------------------------------------------------------

    def append(self, payload: bytes) -> int:
        """Queue one record; returns its seq. Raises SpoolFull over the cap, SpoolClosed after close()."""
        return self.append_many((payload,))

    def append_many(self, payloads: Sequence[bytes]) -> int:
        """Queue records in order (all or none; one write in write-ahead mode); returns the last one's seq."""
        size = sum(map(len, payloads))
        with self._lock:
            if self._closing:
                raise SpoolClosed("spool is closed")
            # Memory beyond twice its budget means the writer cannot keep up (a stalled disk): refuse.
            held = self._disk_bytes() + (size if self._caller_writes else self._mem_bytes)
            if held > self.max_bytes or self._mem_bytes > 2 * self._mem_max_bytes:
                self._full = True
                self.refused += len(payloads)
                raise SpoolFull(
                    f"spool {self._dir} refused {len(payloads)} record(s): {self._disk_bytes() + self._mem_bytes} "
                    f"bytes held (cap {self.max_bytes}), {len(self._mem)} records in memory",
                    details={"max_bytes": self.max_bytes},
                )
            self._full = False
            first = self._next_seq
            self._next_seq = first + len(payloads)
            self._mem.extend(map(SpoolRecord, range(first, self._next_seq), payloads))
            self._mem_bytes += size
            self.appended += len(payloads)
            if self._caller_writes:
                self._write_ahead(first, payloads)
            if (len(self._mem) > self._mem_max_records or self._mem_bytes > self._mem_max_bytes) and not self._pressure:
                self._pressure = True
                self._wake.notify()
            return self._next_seq - 1

    def _write_ahead(self, first: int, payloads: Sequence[bytes]) -> None:
        """Write the frames to the active segment on the caller's thread (lock held): page cache, no fsync."""
        data = encode_frames(first, payloads)
        try:
            if self._active_fd is None or (self._sizes[self._segments[-1]] + len(data) > self._segment_bytes
                                           and self._sizes[self._segments[-1]] > 0):
                self._roll_on_caller(first)
            fd, segment = self._active_fd, self._segments[-1]
            assert fd is not None
            before = self._sizes[segment]
            n = os.write(fd, data)
            if n != len(data):
                os.ftruncate(fd, before)  # never leave a half frame for the next one to follow
                raise OSError(f"short write ({n} of {len(data)} bytes)")
        except OSError as e:
            # The records stay in memory; the writer thread writes them (and everything after) with retries.
            self._caller_writes = False
            self._io_error = f"write-ahead failed: {e!r}"
            self._wake.notify()
            return
        self._sizes[segment] = before + len(data)
        self._disk_total += len(data)
        self._last_written_seq = self._next_seq - 1
        self._written_upto = self._next_seq
        self.written += len(payloads)

    def _roll_on_caller(self, first_seq: int) -> None:
        """Start a new segment from the caller's thread: an open, no fsync (the writer thread syncs it later)."""
        fd = os.open(self._dir / segment_name(first_seq), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if self._active_fd is not None:
            self._retired_fds.append((self._active_fd, self._last_written_seq))
        self._active_fd = fd
        self._segments.append(first_seq)
        self._sizes[first_seq] = 0
        self._dir_dirty = True

    def needs_disk_read(self) -> bool:
        """True when the next `read` reads segment files (call it off the event loop then)."""
        with self._lock:
            return max(self._read_seq, self._cursor) < self._mem_start

    def read(self, max_records: int = 10_000, max_bytes: int = 8 * 1024**2) -> list[SpoolRecord]:
        """The next records in order after those already read (and not rewound). May read from disk."""
        with self._lock:
            if self._closed:
                raise SpoolClosed("spool is closed")
            self._read_seq = max(self._read_seq, self._cursor)
            out: list[SpoolRecord] = []
            if self._read_seq < self._mem_start:
                until, segments, from_seq = self._mem_start, list(self._segments), self._read_seq
            else:
                return self._read_memory(max_records, max_bytes, out)
        out = self._reader.read(from_seq, until, segments, max_records, max_bytes)
        with self._lock:
            if out:
                self._read_seq = max(self._read_seq, out[-1].seq + 1)
            elif self._read_seq == from_seq:
                # nothing on disk in [from_seq, until): records lost in a crash; continue from memory
                self._read_seq = max(self._read_seq, until)
            if len(out) < max_records and self._read_seq >= self._mem_start:
                return self._read_memory(max_records, max_bytes, out)
            return out

    def _read_memory(self, max_records: int, max_bytes: int, out: list[SpoolRecord]) -> list[SpoolRecord]:
        size = sum(len(r.payload) for r in out)
        for rec in islice(self._mem, self._read_seq - self._mem_start, None):
            if len(out) >= max_records or (out and size + len(rec.payload) > max_bytes):
                break
            out.append(rec)
            size += len(rec.payload)
        if out:
            self._read_seq = out[-1].seq + 1
        return out

    def ack(self, seq: int) -> None:
        """Every record up to and including `seq` is delivered: never replayed again (once the cursor is persisted)."""
        with self._lock:
            if seq < self._cursor:
                return
            self.acked += max(0, min(seq + 1, self._next_seq) - self._cursor)
            self._cursor = seq + 1
            mem = self._mem
            while mem and mem[0].seq <= seq:
                self._mem_bytes -= len(mem.popleft().payload)
            self._mem_start = mem[0].seq if mem else self._next_seq

    def rewind(self) -> None:
        """Read again from the first unacknowledged record (after a failed delivery)."""
        with self._lock:
            self._read_seq = self._cursor

    def spill(self) -> None:
        """Write every unacknowledged record at the next group commit (the downstream is unavailable)."""
        with self._lock:
            self._force = True
            self._wake.notify()

    def flush(self, timeout: float | None = None) -> bool:
        """Block until every record appended so far is on disk or acknowledged; False on timeout."""
        with self._lock:
            target = self._next_seq
            self._force = True
            self._wake.notify()
            return self._written_cv.wait_for(
                lambda: self._closed or max(self._synced_upto, self._cursor) >= target, timeout
            )

    @property
    def pending(self) -> int:
        """Records appended and not yet acknowledged (those lost in a crash included until acked past)."""
        return self._next_seq - self._cursor

    @property
    def durable_seq(self) -> int:
        """Every record with a seq below this is in a segment file (safe from a crash of this process) or acknowledged."""
        with self._lock:
            return max(self._written_upto, self._cursor)

    @property
    def synced_seq(self) -> int:
        """Every record with a seq below this is fsynced (safe from a power loss) or acknowledged."""
        with self._lock:
            return max(self._synced_upto, self._cursor)

    @property
    def health(self) -> SpoolHealth:
        with self._lock:
            if self._full or self._io_error:
                return SpoolHealth.FULL
            return SpoolHealth.SPILLING if self._mem_start > self._cursor or self._disk_backlog() else SpoolHealth.OK

    def _disk_backlog(self) -> bool:
        return self._spilled_seq >= self._cursor

    def _disk_bytes(self) -> int:
        return self._disk_total

    def close(self) -> None:
        """Write what is unacknowledged, persist the cursor, stop the writer, release the directory. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closing = True
            self._wake.notify()
        self._writer.join()
        with self._lock:
            self._closed = True
            self._written_cv.notify_all()
        self._reader.close()
        if self._active_fd is not None:
            os.close(self._active_fd)
            self._active_fd = None
        os.close(self._lock_fd)

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the writer thread ------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                if not (self._closing or self._pressure or self._force):
                    self._wake.wait(max(0.0, self._last_commit + self._interval - time.monotonic()))
                closing = self._closing
                force = closing or self._force or self._write_through
                pressure, self._force, self._pressure = self._pressure, False, False
                # A group commit (once per interval, or forced): records appended before the previous one and
                # still unacknowledged must be made durable now. A round woken by memory pressure between
                # commits only writes (memory mode) and evicts: in write-ahead mode it never fsyncs.
                now = time.monotonic()
                if force or now - self._last_commit >= self._interval:
                    due = self._next_seq if force else min(self._boundary, self._next_seq)
                    self._boundary, self._last_commit = self._next_seq, now
                else:
                    due = 0
                cursor = self._cursor
                writes = not self._caller_writes
                if writes:  # memory mode, or catching up after a failed write on the caller's thread
                    start = max(self._written_upto, cursor)
                    end = self._next_seq if (force or pressure or self.write_ahead) else due
                    batch = list(islice(self._mem, max(0, start - self._mem_start), max(0, end - self._mem_start)))
                sync = self.write_ahead and max(self._synced_upto, cursor) < due
                retired, self._retired_fds = self._retired_fds, []
                active, dir_dirty, self._dir_dirty = self._active_fd, self._dir_dirty, False
            try:
                if writes and batch:
                    self._write(batch)
                self._sync_retired(retired, cursor, force=sync)
                if sync and active is not None:
                    os.fsync(active)
                    self.fsyncs += 1
                if dir_dirty:
                    fsync_dir(self._dir)
                self._collect_garbage(cursor)
                failed = None
            except Exception as e:  # a full or failing disk: keep the records in memory, retry, say so
                failed = f"disk write failed: {e!r}"
                log.error("spool %s: %s", self._dir, failed)
                if writes:
                    end = max(start, self._last_written_seq + 1)  # what was not written is retried next round
                sync = False
            with self._lock:
                self._io_error = failed
                if writes:
                    self._written_upto = max(self._written_upto, end)
                    if not self._caller_writes:
                        self._synced_upto = max(self._synced_upto, end)
                    if self.write_ahead and failed is None and self._written_upto >= self._next_seq:
                        self._caller_writes = True  # caught up: appends write ahead again
                    if batch and not self.write_ahead:
                        self._spilled_seq = max(self._spilled_seq, end - 1)
                if sync:
                    self._synced_upto = max(self._synced_upto, due)
                    self._spilled_seq = max(self._spilled_seq, due - 1)
                self._evict()
                self._written_cv.notify_all()
                if failed and not closing:
                    self._wake.wait(min(1.0, 10 * self._interval + 0.01))  # no busy loop against a failing disk
            if closing:
                return

    def _sync_retired(self, retired: list[tuple[int, int]], cursor: int, *, force: bool) -> None:
        """fsync (when any of their records is unacknowledged, or `force`) and close segments rolled by appends."""
        try:
            for fd, last_seq in retired:
                if force or last_seq >= cursor:
                    os.fsync(fd)
                    self.fsyncs += 1
        finally:
            for fd, _ in retired:
                os.close(fd)

    def _evict(self) -> None:
        mem = self._mem
        while mem and mem[0].seq < self._written_upto and (
            len(mem) > self._mem_max_records or self._mem_bytes > self._mem_max_bytes
        ):
            self._mem_bytes -= len(mem.popleft().payload)
        self._mem_start = mem[0].seq if mem else self._next_seq

    def _write(self, batch: list[SpoolRecord]) -> None:
        frames: list[bytes] = []
        pending = 0
        for rec in batch:
            frame = encode_frame(rec.seq, rec.payload)
            if self._active_fd is None or (self._sizes[self._segments[-1]] + pending + len(frame) > self._segment_bytes
                                           and self._sizes[self._segments[-1]] + pending > 0):
                self._append_to_active(frames, pending)
                frames, pending = [], 0
                self._roll(rec.seq)
            frames.append(frame)
            pending += len(frame)
        self._append_to_active(frames, pending)

    def _append_to_active(self, frames: list[bytes], size: int) -> None:
        if not frames or self._active_fd is None:
            return
        segment = self._segments[-1]
        before = self._sizes[segment]
        data = memoryview(b"".join(frames))
        try:
            while data:
                data = data[os.write(self._active_fd, data) :]
            os.fsync(self._active_fd)
        except OSError:
            os.ftruncate(self._active_fd, before)  # never leave a half frame followed by good ones
            raise
        with self._lock:
            self._sizes[segment] = before + size
            self._disk_total += size
        self._last_written_seq = HEADER.unpack_from(frames[-1])[2]
        self.written += len(frames)
        self.fsyncs += 1

    def _roll(self, first_seq: int) -> None:
        if self._active_fd is not None:
            os.close(self._active_fd)
        path = self._dir / segment_name(first_seq)
        self._active_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        fsync_dir(self._dir)
        with self._lock:
            self._segments.append(first_seq)
            self._sizes[first_seq] = size = os.fstat(self._active_fd).st_size
            self._disk_total += size

    def _collect_garbage(self, cursor: int) -> None:
        if cursor != self._persisted_cursor:
            write_cursor(self._dir, cursor)
            self._persisted_cursor = cursor
        with self._lock:  # the caller's thread may be appending to the active segment: decide and close under the lock
            segs = self._segments
            dead = [s for i, s in enumerate(segs[:-1]) if segs[i + 1] <= cursor]
            if segs and self._last_written_seq < cursor:
                dead.append(segs[-1])  # the active one too: everything on disk is acknowledged
                if self._active_fd is not None:
                    os.close(self._active_fd)
                    self._active_fd = None
            for s in dead:
                segs.remove(s)
                self._disk_total -= self._sizes.pop(s)
        for s in dead:
            (self._dir / segment_name(s)).unlink(missing_ok=True)


class _SpoolCollector:
    """Prometheus view of one spool, read at scrape time (nothing on the append path)."""

    def __init__(self, spool: Spool):
        self._spool = spool

    def collect(self) -> Iterator[Metric]:
        s = self._spool
        yield CounterMetricFamily("servoloop_spool_appended_records", "Records appended", value=s.appended)
        yield CounterMetricFamily("servoloop_spool_acked_records", "Records acknowledged by the downstream", value=s.acked)
        yield CounterMetricFamily("servoloop_spool_refused_records", "Appends refused (over the cap)", value=s.refused)
        yield CounterMetricFamily("servoloop_spool_written_records", "Records written to disk", value=s.written)
        yield CounterMetricFamily("servoloop_spool_fsyncs", "Group commits (fsync of a segment)", value=s.fsyncs)
        yield CounterMetricFamily("servoloop_spool_corrupt_segments", "Segments with a corrupt record found on replay",
                                  value=s._reader.corrupt_segments)
        yield CounterMetricFamily("servoloop_spool_recovered_cut_bytes", "Torn/corrupt tail bytes truncated on open",
                                  value=s.recovered_cut_bytes)
        yield GaugeMetricFamily("servoloop_spool_pending_records", "Records not yet acknowledged", value=s.pending)
        yield GaugeMetricFamily("servoloop_spool_memory_bytes", "Payload bytes held in memory", value=s._mem_bytes)
        yield GaugeMetricFamily("servoloop_spool_disk_bytes", "Bytes in segment files", value=s._disk_bytes())
        yield GaugeMetricFamily("servoloop_spool_max_bytes", "Disk cap", value=s.max_bytes)
        health = s.health
        g = GaugeMetricFamily("servoloop_spool_health", "1 for the current health state", labels=["state"])
        for state in SpoolHealth:
            g.add_metric([state.value], 1.0 if state == health else 0.0)
        yield g
