"""Request batching for the Transformers engine: one model thread runs batches of rows, and model jobs between them.

Requests arriving within `batch_window_ms` of the oldest waiting one (or while a batch runs) go into the next
batch, up to `max_batch` rows, when their sampling is compatible (`batch_key`): one batched `generate()` serves
them all, each row with its own adapter (PEFT's mixed-adapter batches). Adapter loads and evictions are jobs on
the same thread, in arrival order with the rows: a job waits for every row queued before it, the rows after it
wait for the job, so the model never changes under a running batch and an eviction never strands a queued row.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from gateway.request import SamplingParams


def batch_key(params: SamplingParams) -> tuple[Any, ...]:
    """Rows share a batch only when their keys are equal (max_tokens and stop are per row; sampling is not).

    A seeded sampling request runs alone: its seed sets the generator of the whole batch.
    """
    if params.temperature <= 0:
        return ("greedy", params.min_tokens)
    if params.seed is not None:
        return ("seeded", object())  # equal to no other key
    return ("sample", params.temperature, params.top_p, params.min_tokens)


@dataclass(eq=False)
class Row:
    """One request in the batcher: its prompt ids, sampling, adapter, and where its output goes (`emit`)."""

    ids: list[int]
    params: SamplingParams
    adapter: str | None
    emit: Callable[[Any], None]
    cancel: threading.Event = field(default_factory=threading.Event)
    key: tuple[Any, ...] = ()
    queued_at: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.key = batch_key(self.params)


@dataclass(frozen=True, slots=True)
class BatchStats:
    """Counters of one batcher (batches run, rows served, the largest batch, adapter jobs run)."""

    batches: int
    rows: int
    largest: int
    jobs: int


class _Job:
    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.future: Future[Any] = Future()


class Batcher:
    """The model thread: `submit(row)` queues a row, `run_job(fn)` a model change; `run_batch(rows)` is the engine's.

    `run_batch` must finish every row it is given (emit its end or its error); rows cancelled while queued are
    dropped unserved. `close()` fails the rows still queued with `on_close(row)` and stops the thread.
    """

    def __init__(self, run_batch: Callable[[list[Row]], None], on_close: Callable[[Row], None], *,
                 max_batch: int, window_s: float, name: str = "tf-batcher") -> None:
        self._run_batch = run_batch
        self._on_close = on_close
        self.max_batch = max_batch
        self.window_s = window_s
        self._queue: deque[Row | _Job] = deque()  # bounded by the engine's max_concurrency rows + adapter jobs
        self._cond = threading.Condition()
        self._closed = False
        self._batches = self._rows = self._largest = self._jobs = 0
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def stats(self) -> BatchStats:
        return BatchStats(self._batches, self._rows, self._largest, self._jobs)

    def submit(self, row: Row) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._queue.append(row)
            self._cond.notify()

    def run_job(self, fn: Callable[[], Any]) -> Future[Any]:
        """Run `fn` on the model thread once every row queued before it is served; its result as a future."""
        job = _Job(fn)
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._queue.append(job)
            self._cond.notify()
        return job.future

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _next(self) -> list[Row] | _Job | None:
        """Wait for work: a job at the head, or a batch of compatible rows (after the window); None when closed."""
        with self._cond:
            while True:
                while self._queue and isinstance(self._queue[0], Row) and self._queue[0].cancel.is_set():
                    self._queue.popleft()  # abandoned before its turn: nothing to serve
                if self._closed:
                    return None
                if not self._queue:
                    self._cond.wait()
                    continue
                head = self._queue[0]
                if isinstance(head, _Job):
                    return self._queue.popleft()  # type: ignore[return-value]
                batch = self._compatible(head)
                wait = head.queued_at + self.window_s - time.monotonic()
                if wait > 0 and len(batch) < self.max_batch and not self._job_waiting():
                    self._cond.wait(wait)  # more rows may arrive within the window
                    continue
                for row in batch:
                    self._queue.remove(row)
                return batch

    def _compatible(self, head: Row) -> list[Row]:
        """Rows with `head`'s key, in order, up to the first job and `max_batch`."""
        batch: list[Row] = []
        for item in self._queue:
            if isinstance(item, _Job) or len(batch) == self.max_batch:
                break
            if item.key == head.key and not item.cancel.is_set():
                batch.append(item)
        return batch

    def _job_waiting(self) -> bool:
        return any(isinstance(item, _Job) for item in self._queue)

    def _work(self) -> None:
        while (work := self._next()) is not None:
            if isinstance(work, _Job):
                self._jobs += 1
                try:
                    work.future.set_result(work.fn())
                except BaseException as e:  # handed to whoever awaits the job
                    work.future.set_exception(e)
                continue
            self._batches += 1
            self._rows += len(work)
            self._largest = max(self._largest, len(work))
            self._run_batch(work)
        with self._cond:
            left = list(self._queue)
            self._queue.clear()
        for item in left:
            if isinstance(item, _Job):
                item.future.set_exception(RuntimeError("the batcher is closed"))
            else:
                self._on_close(item)
