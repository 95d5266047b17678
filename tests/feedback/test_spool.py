"""The durable spool: CRC framing, crash recovery at any byte, order, acknowledgement, caps, metrics."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from prometheus_client import CollectorRegistry

from feedback.spool import (
    HEADER,
    Spool,
    SpoolClosed,
    SpoolFull,
    SpoolHealth,
    SpoolLocked,
    SpoolRecord,
    encode_frame,
    scan_frames,
)
from feedback.segments import encode_frames

payloads = st.lists(st.binary(min_size=0, max_size=300), min_size=1, max_size=40)
fast = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def stream_of(records: list[bytes], first_seq: int = 0) -> tuple[bytes, list[int]]:
    """Frames back to back, and the offset where each frame ends."""
    out, ends = b"", []
    for i, p in enumerate(records):
        out += encode_frame(first_seq + i, p)
        ends.append(len(out))
    return out, ends


def drain(spool: Spool) -> list[SpoolRecord]:
    got: list[SpoolRecord] = []
    while batch := spool.read(max_records=7, max_bytes=500):
        got.extend(batch)
    return got


def segment_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.seg"))


# ---- the codec ------------------------------------------------------------------------------------------


@fast
@given(payloads)
def test_frames_decode_to_the_records_that_were_encoded(records: list[bytes]) -> None:
    data, _ = stream_of(records, first_seq=5)
    scan = scan_frames(data)
    assert scan.stop == "end" and scan.end == len(data)
    assert scan.records == [SpoolRecord(5 + i, p) for i, p in enumerate(records)]


@fast
@given(payloads, st.integers(0, 2**40))
def test_a_batch_of_frames_is_the_frames_back_to_back(records: list[bytes], first: int) -> None:
    assert encode_frames(first, records) == stream_of(records, first)[0]


@fast
@given(payloads, st.data())
def test_a_stream_cut_at_any_byte_yields_exactly_the_whole_frames_before_the_cut(records: list[bytes], data: st.DataObject) -> None:
    stream, ends = stream_of(records)
    cut = data.draw(st.integers(0, len(stream)))
    scan = scan_frames(stream[:cut])
    whole = [i for i, end in enumerate(ends) if end <= cut]
    assert [r.payload for r in scan.records] == [records[i] for i in whole]
    assert scan.end == (ends[whole[-1]] if whole else 0)
    assert scan.stop == ("end" if scan.end == cut else "partial")


@fast
@given(payloads, st.data())
def test_a_flipped_byte_is_caught_by_the_crc_and_everything_before_its_frame_survives(records: list[bytes], data: st.DataObject) -> None:
    stream, ends = stream_of(records)
    at = data.draw(st.integers(0, len(stream) - 1))
    flip = data.draw(st.integers(1, 255))
    damaged = bytearray(stream)
    damaged[at] ^= flip
    scan = scan_frames(bytes(damaged))
    hit = next(i for i, end in enumerate(ends) if at < end)
    assert [r.payload for r in scan.records] == records[:hit]
    assert scan.stop in ("corrupt", "partial")


def test_garbage_never_raises_and_yields_nothing_valid() -> None:
    assert scan_frames(b"\x00" * 64).records == []
    assert scan_frames(b"\xff" * 64).stop == "corrupt"
    assert scan_frames(b"abc").stop == "partial"


# ---- recovery ----------------------------------------------------------------------------------------------


@fast
@given(payloads, st.data())
def test_after_a_crash_cut_at_any_byte_every_whole_record_before_it_replays_exactly_once_in_order(
    records: list[bytes], data: st.DataObject
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        with Spool(d, segment_bytes=700, write_through=True) as spool:
            for p in records:
                spool.append(p)
            assert spool.flush(timeout=10)
        # The files as one stream; a crash leaves a prefix of it: later segments never got written.
        files = segment_files(d)
        sizes = [f.stat().st_size for f in files]
        cut = data.draw(st.integers(0, sum(sizes)))
        whole: list[bytes] = []
        offset = 0
        for f, size in zip(files, sizes, strict=True):
            if offset >= cut:
                f.unlink()
            elif offset + size > cut:
                content = f.read_bytes()[: cut - offset]
                f.write_bytes(content)
                whole += [r.payload for r in scan_frames(content).records]
            else:
                whole += [r.payload for r in scan_frames(f.read_bytes()).records]
            offset += size
        with Spool(d, segment_bytes=700) as reopened:
            replayed = drain(reopened)
            assert [r.payload for r in replayed] == whole
            assert replayed == sorted(replayed) and len({r.seq for r in replayed}) == len(replayed)
            assert reopened.append(b"after") > (replayed[-1].seq if replayed else -1)


@fast
@given(payloads, st.data())
def test_acknowledged_records_do_not_replay_after_reopen(records: list[bytes], data: st.DataObject) -> None:
    acked = data.draw(st.integers(0, len(records)))
    with tempfile.TemporaryDirectory() as tmp:
        with Spool(tmp, segment_bytes=700) as spool:
            for p in records:
                spool.append(p)
            read = drain(spool)
            if acked:
                spool.ack(read[acked - 1].seq)
        with Spool(tmp, segment_bytes=700) as reopened:
            assert [r.payload for r in drain(reopened)] == records[acked:]


def test_a_corrupt_byte_in_the_tail_truncates_from_that_record_and_keeps_the_rest(tmp_path: Path) -> None:
    with Spool(tmp_path, write_through=True) as spool:
        for i in range(10):
            spool.append(b"record-%d" % i)
    (seg,) = segment_files(tmp_path)
    raw = bytearray(seg.read_bytes())
    frame = HEADER.size + len(b"record-0")
    raw[6 * frame + HEADER.size + 2] ^= 0x40  # inside record 6's payload
    seg.write_bytes(bytes(raw))
    with Spool(tmp_path) as reopened:
        assert [r.payload for r in drain(reopened)] == [b"record-%d" % i for i in range(6)]
        assert reopened.recovered_cut_bytes == 4 * frame
    assert seg.stat().st_size == 6 * frame


# ---- the live spool ------------------------------------------------------------------------------------------


def test_records_replay_in_order_across_memory_and_disk_under_memory_pressure(tmp_path: Path) -> None:
    with Spool(tmp_path, segment_bytes=64 * 1024, memory_max_records=100, fsync_interval_s=0.01) as spool:
        for i in range(3000):
            spool.append(b"%06d" % i)
        assert spool.flush(timeout=10)
        got = drain(spool)
        assert [int(r.payload) for r in got] == list(range(3000))
        assert spool.written >= 2900  # the overflow went to disk, not anywhere else


def test_rewind_reads_the_unacknowledged_records_again(tmp_path: Path) -> None:
    with Spool(tmp_path, memory_max_records=10, fsync_interval_s=0.01) as spool:
        for i in range(50):
            spool.append(b"%d" % i)
        first = spool.read(max_records=20)
        spool.ack(first[9].seq)
        spool.read(max_records=20)
        spool.rewind()
        assert [int(r.payload) for r in drain(spool)] == list(range(10, 50))


def test_a_healthy_downstream_keeps_the_disk_idle(tmp_path: Path) -> None:
    """Memory mode writes nothing; write-ahead writes to the page cache but never fsyncs, and deletes the segments."""
    for write_ahead in (False, True):
        d = tmp_path / str(write_ahead)
        with Spool(d, fsync_interval_s=0.01, write_ahead=write_ahead) as spool:
            for _ in range(20):
                for i in range(100):
                    spool.append(b"%d" % i)
                spool.ack(spool.read()[-1].seq)
                time.sleep(0.005)
            assert spool.fsyncs == 0 and spool.pending == 0
            assert spool.written == (2000 if write_ahead else 0)
            assert spool.health == SpoolHealth.OK
            deadline = time.monotonic() + 2
            while segment_files(d) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert segment_files(d) == []


def test_unacknowledged_records_reach_disk_within_two_group_commits(tmp_path: Path) -> None:
    with Spool(tmp_path, fsync_interval_s=0.02, write_ahead=False) as spool:
        spool.append(b"waiting")
        deadline = time.monotonic() + 2
        while spool.durable_seq < 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert spool.durable_seq == 1 and spool.written == 1


def test_write_ahead_puts_a_record_in_its_segment_before_append_returns_and_fsyncs_it_if_unacknowledged(
    tmp_path: Path,
) -> None:
    with Spool(tmp_path, fsync_interval_s=0.02) as spool:
        seq = spool.append(b"accepted")
        assert spool.durable_seq == seq + 1 and spool.written == 1  # in the file: survives a SIGKILL
        (seg,) = segment_files(tmp_path)
        assert [r.payload for r in scan_frames(seg.read_bytes()).records] == [b"accepted"]
        deadline = time.monotonic() + 2
        while spool.synced_seq < 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert spool.synced_seq == 1 and spool.fsyncs >= 1  # unacknowledged past an interval: fsynced
        assert spool.health == SpoolHealth.SPILLING
        spool.ack(seq)
        assert spool.health == SpoolHealth.OK


def test_write_ahead_rolls_segments_on_the_callers_thread_and_replays_across_them(tmp_path: Path) -> None:
    with Spool(tmp_path, segment_bytes=1024, fsync_interval_s=10) as spool:
        for i in range(300):
            spool.append(b"%04d" % i + b"." * 40)
        assert len(segment_files(tmp_path)) > 5 and spool.written == 300
        first = spool.read(max_records=100)
        spool.ack(first[-1].seq)
    with Spool(tmp_path, segment_bytes=1024) as reopened:
        assert [int(r.payload[:4]) for r in drain(reopened)] == list(range(100, 300))


def test_fully_acknowledged_segments_are_deleted(tmp_path: Path) -> None:
    with Spool(tmp_path, segment_bytes=1024, write_through=True, fsync_interval_s=0.01) as spool:
        for _ in range(200):
            spool.append(b"x" * 50)
        assert spool.flush(timeout=5)
        assert len(segment_files(tmp_path)) > 5
        spool.ack(drain(spool)[-1].seq)
        deadline = time.monotonic() + 2
        while segment_files(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert segment_files(tmp_path) == []


def test_over_the_cap_append_refuses_with_spool_full_and_accepts_again_after_acks(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    with Spool(tmp_path, max_bytes=10_000, registry=registry) as spool:
        accepted = 0
        with pytest.raises(SpoolFull):
            for _ in range(1000):
                spool.append(b"y" * 100)
                accepted += 1
        assert spool.health == SpoolHealth.FULL
        assert registry.get_sample_value("servoloop_spool_refused_records_total") == 1
        assert registry.get_sample_value("servoloop_spool_health", {"state": "full"}) == 1
        spool.ack(drain(spool)[-1].seq)
        spool.append(b"fits again")
        assert spool.health != SpoolHealth.FULL
        assert accepted == registry.get_sample_value("servoloop_spool_acked_records_total")


def test_a_second_spool_on_the_same_directory_is_refused(tmp_path: Path) -> None:
    with Spool(tmp_path), pytest.raises(SpoolLocked):
        Spool(tmp_path)


def test_a_closed_spool_refuses_appends(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.close()
    spool.close()
    with pytest.raises(SpoolClosed):
        spool.append(b"late")


# ---- a model of the spool, driven by hypothesis ------------------------------------------------------------


class SpoolVersusModel(RuleBasedStateMachine):
    """Any interleaving of append, read, ack, rewind, spill and reopen reads like a plain FIFO with a cursor."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp())
        self.spool = self.open()
        self.model: dict[int, bytes] = {}
        self.cursor = 0
        self.read_pos = 0

    write_ahead = True

    def open(self) -> Spool:
        return Spool(self.dir, segment_bytes=256, memory_max_records=3, memory_max_bytes=64 * 1024, fsync_interval_s=0.001,
                     write_ahead=self.write_ahead)

    def unacked(self) -> list[tuple[int, bytes]]:
        return [(s, p) for s, p in sorted(self.model.items()) if s >= self.cursor]

    @rule(payload=st.binary(max_size=60))
    def append(self, payload: bytes) -> None:
        seq = self.spool.append(payload)
        assert all(seq > s for s in self.model)
        self.model[seq] = payload

    @rule(n=st.integers(1, 6))
    def read(self, n: int) -> None:
        got = self.spool.read(max_records=n, max_bytes=10_000)
        expected = [(s, p) for s, p in self.unacked() if s >= self.read_pos][:n]
        assert [(r.seq, r.payload) for r in got] == expected[: len(got)]
        assert got or not expected
        if got:
            self.read_pos = got[-1].seq + 1

    @rule()
    def ack_what_was_read(self) -> None:
        if self.read_pos > self.cursor:
            self.spool.ack(self.read_pos - 1)
            self.cursor = self.read_pos

    @rule()
    def rewind(self) -> None:
        self.spool.rewind()
        self.read_pos = self.cursor

    @rule()
    def spill(self) -> None:
        assert self.spool.flush(timeout=5)

    @precondition(lambda self: self.write_ahead)
    @rule()
    def crash_now(self) -> None:
        """The files as a SIGKILL would leave them, at this instant: every accepted, unacknowledged record replays."""
        snapshot = Path(tempfile.mkdtemp())
        try:
            for f in self.dir.iterdir():
                if f.name != "LOCK":
                    try:
                        shutil.copyfile(f, snapshot / f.name)
                    except FileNotFoundError:
                        pass  # a wholly acknowledged segment, deleted meanwhile
            with Spool(snapshot, segment_bytes=256) as survivor:
                replayed = [(r.seq, r.payload) for r in drain(survivor)]
            assert all(self.model[seq] == payload for seq, payload in replayed)
            assert {seq for seq, _ in replayed} >= {seq for seq, _ in self.unacked()}
        finally:
            shutil.rmtree(snapshot, ignore_errors=True)

    @rule()
    def reopen(self) -> None:
        self.spool.close()
        self.spool = self.open()
        self.read_pos = self.cursor

    @invariant()
    def pending_counts_the_unacknowledged(self) -> None:
        assert self.spool.pending >= len(self.unacked())

    def teardown(self) -> None:
        self.spool.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class MemorySpoolVersusModel(SpoolVersusModel):
    write_ahead = False


TestSpoolVersusModel = SpoolVersusModel.TestCase
TestMemorySpoolVersusModel = MemorySpoolVersusModel.TestCase
for _case in (TestSpoolVersusModel, TestMemorySpoolVersusModel):
    _case.settings = settings(max_examples=40, stateful_step_count=40, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow])
