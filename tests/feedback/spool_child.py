"""A gateway stand-in for the crash test: publishes numbered events forever and prints how many are durable.

`python -m tests.feedback.spool_child SPOOL_DIR BOOTSTRAP PREFIX` — the parent SIGKILLs it mid-flight. Event i
has request_id str(i) and lands at spool seq i, so `durable_seq` printed = "events 0..n-1 are safe".
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from feedback.kafka import ConfluentDownstream
from feedback.sink import DurableEventSink
from feedback.spool import Spool
from schemas.events import InferenceEvent


async def main(spool_dir: Path, bootstrap: str, prefix: str) -> None:
    spool = Spool(spool_dir, fsync_interval_s=0.01, memory_max_records=500)
    sink = DurableEventSink(spool, ConfluentDownstream(bootstrap, delivery_timeout_s=2), topic_prefix=prefix)
    await sink.start()
    i = 0
    while True:
        for _ in range(50):
            sink.publish(InferenceEvent(tenant=f"tenant-{i % 4}", request_id=str(i)))
            i += 1
        print(spool.durable_seq, flush=True)
        await asyncio.sleep(0.002)


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2], sys.argv[3]))
