"""The spool's files: CRC-framed segment files, the cursor file, recovery of a torn tail, and the segment reader.

Segment file `<first seq, 20 digits>.seg`: frames of `<u32 length><u32 crc32c><u64 seq><payload>`; the CRC
covers length, seq and payload. Cursor file: `<u64 first unacknowledged seq><u32 crc32c>`, replaced atomically.
The functions here are the spool's functional core (frames) and its file plumbing; `feedback.spool` owns state.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO, Literal, NamedTuple

import crc32c

log = logging.getLogger("feedback.spool")

HEADER = struct.Struct("<IIQ")  # payload length, crc32c, seq
_CRC_PREFIX = struct.Struct("<IQ")  # what the CRC covers besides the payload
_CURSOR = struct.Struct("<QI")
MAX_RECORD_BYTES = 64 * 1024 * 1024
_READ_CHUNK = 1024 * 1024


class SpoolRecord(NamedTuple):
    seq: int
    payload: bytes


# ---- functional core: frames ------------------------------------------------------------------------


def encode_frame(seq: int, payload: bytes) -> bytes:
    """One record on disk: header plus payload."""
    n = len(payload)
    crc = crc32c.crc32c(payload, crc32c.crc32c(_CRC_PREFIX.pack(n, seq)))
    return HEADER.pack(n, crc, seq) + payload


def encode_frames(first_seq: int, payloads: Sequence[bytes]) -> bytes:
    """Consecutive records from `first_seq` on, framed back to back (the same bytes as `encode_frame` each)."""
    pack, prefix, crc = HEADER.pack, _CRC_PREFIX.pack, crc32c.crc32c
    parts: list[bytes] = []
    for seq, payload in enumerate(payloads, first_seq):
        n = len(payload)
        parts += (pack(n, crc(payload, crc(prefix(n, seq))), seq), payload)
    return b"".join(parts)


class FrameScan(NamedTuple):
    records: list[SpoolRecord]
    end: int  # offset just past the last valid frame
    stop: Literal["end", "partial", "corrupt"]  # buffer used up exactly / incomplete frame / bad frame
    needed: int  # for "partial": the size of the incomplete frame (header alone when the header is cut)


def scan_frames(buf: bytes, start: int = 0, after_seq: int = -1, max_records: int = -1) -> FrameScan:
    """Decode consecutive frames from `buf[start:]`; stops at the first incomplete or invalid one.

    A frame is invalid when its length is over MAX_RECORD_BYTES, its CRC does not match, or its seq does not
    increase. Stops early (stop "end") after `max_records` when that is >= 0. Never raises on any input.
    """
    records: list[SpoolRecord] = []
    view = memoryview(buf)
    pos, n, last = start, len(buf), after_seq
    while True:
        if pos == n or len(records) == max_records:
            return FrameScan(records, pos, "end", 0)
        if n - pos < HEADER.size:
            return FrameScan(records, pos, "partial", HEADER.size)
        length, crc, seq = HEADER.unpack_from(buf, pos)
        if length > MAX_RECORD_BYTES:
            return FrameScan(records, pos, "corrupt", 0)
        end = pos + HEADER.size + length
        if end > n:
            return FrameScan(records, pos, "partial", HEADER.size + length)
        payload = view[pos + HEADER.size : end]
        if crc32c.crc32c(payload, crc32c.crc32c(_CRC_PREFIX.pack(length, seq))) != crc or seq <= last:
            return FrameScan(records, pos, "corrupt", 0)
        records.append(SpoolRecord(seq, bytes(payload)))
        last, pos = seq, end


def segment_name(first_seq: int) -> str:
    return f"{first_seq:020d}.seg"


def list_segments(directory: Path) -> list[int]:
    return sorted(int(p.stem) for p in directory.glob("*.seg") if p.stem.isdigit())


def read_cursor(directory: Path) -> int:
    try:
        raw = (directory / "cursor").read_bytes()
        seq, crc = _CURSOR.unpack(raw)
        if crc32c.crc32c(raw[:8]) == crc:
            return seq
        log.warning("spool %s: cursor file is corrupt; replaying everything on disk", directory)
    except FileNotFoundError:
        pass
    except (OSError, struct.error):
        log.warning("spool %s: cursor file unreadable; replaying everything on disk", directory)
    return 0


def write_cursor(directory: Path, seq: int) -> None:
    raw = struct.pack("<Q", seq)
    tmp = directory / "cursor.tmp"
    with open(tmp, "wb") as f:
        f.write(raw + struct.pack("<I", crc32c.crc32c(raw)))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / "cursor")
    fsync_dir(directory)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def recover_tail(directory: Path, segments: list[int]) -> tuple[int, int]:
    """Truncate a torn or corrupt tail; drop segments left empty. Returns (last seq on disk or -1, bytes cut)."""
    cut = 0
    while segments:
        path = directory / segment_name(segments[-1])
        data = path.read_bytes()
        scan = scan_frames(data)
        if scan.end < len(data):
            log.warning("spool %s: truncating %d bytes of torn/corrupt tail (%s)", path, len(data) - scan.end, scan.stop)
            cut += len(data) - scan.end
            with open(path, "r+b") as f:
                f.truncate(scan.end)
                os.fsync(f.fileno())
        if scan.records:
            return scan.records[-1].seq, cut
        path.unlink()
        segments.pop()
    return -1, cut


# ---- the reader of segment files ---------------------------------------------------------------------


class SegmentReader:
    """Reads records in seq order from segment files; used only by the spool's one reader."""

    def __init__(self, directory: Path):
        self._dir = directory
        self._segment = -1
        self._file: BinaryIO | None = None
        self._offset = 0
        self._pos_seq = -1  # the from_seq that the current position serves; -1: unknown
        self.corrupt_segments = 0

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file, self._segment, self._pos_seq = None, -1, -1

    def _open(self, segment: int) -> bool:
        self.close()
        try:
            self._file = open(self._dir / segment_name(segment), "rb")
        except FileNotFoundError:
            return False
        self._segment, self._offset = segment, 0
        return True

    def _chunk(self, size: int) -> bytes:
        """About `size` bytes from the current offset: a whole frame at least, when the file holds one."""
        assert self._file is not None
        self._file.seek(self._offset)
        buf = self._file.read(size)
        if len(buf) >= HEADER.size:
            need = HEADER.size + HEADER.unpack_from(buf)[0]
            if len(buf) < need <= HEADER.size + MAX_RECORD_BYTES:
                buf += self._file.read(need - len(buf))
        return buf

    def read(self, from_seq: int, until_seq: int, segments: list[int], max_records: int, max_bytes: int) -> list[SpoolRecord]:
        """Records with from_seq <= seq < until_seq, in order; fewer when the files hold no more (yet)."""
        if self._pos_seq != from_seq or self._file is None:
            at_or_before = [s for s in segments if s <= from_seq]
            first = at_or_before[-1] if at_or_before else next((s for s in segments if s > from_seq), None)
            if first is None or not self._open(first):
                return []
        out: list[SpoolRecord] = []
        size = 0
        while True:
            want = min(_READ_CHUNK, max(64 * 1024, max_bytes - size + HEADER.size * (max_records - len(out))))
            scan = scan_frames(self._chunk(want), max_records=max_records - len(out))
            advance, done = 0, False
            for rec in scan.records:
                if rec.seq >= until_seq:
                    done = True
                    break
                advance += HEADER.size + len(rec.payload)
                if rec.seq >= from_seq:
                    out.append(rec)
                    size += len(rec.payload)
                    from_seq = rec.seq + 1
                    if len(out) >= max_records or size >= max_bytes:
                        done = True
                        break
            self._offset += advance
            self._pos_seq = from_seq
            if done:
                return out
            if scan.records:
                continue
            # Nothing decodable at the offset: the segment is used up, torn or corrupt.
            later = [s for s in segments if s > self._segment]
            if not later:
                return out  # caught up with the writer
            if scan.stop != "end":
                self.corrupt_segments += 1
                log.error("spool %s: %s record in sealed segment %d at byte %d; skipping the rest of it",
                          self._dir, scan.stop, self._segment, self._offset)
            if not self._open(later[0]):
                return out
            self._pos_seq = from_seq
