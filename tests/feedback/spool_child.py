"""A gateway stand-in for the crash test: publishes numbered events forever and prints how many it accepted.

`python -m tests.feedback.spool_child SPOOL_DIR BOOTSTRAP PREFIX [memory]` — the parent SIGKILLs it mid-flight.
Event i has request_id str(i); the number printed means "events 0..n-1 were accepted (publish returned)", and
every one of them must replay after the kill. The group commit is slow on purpose (0.5 s): only the write-ahead
append makes a just-accepted event safe; `memory` selects the mode that loses them (to see the test fail).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from feedback.kafka import ConfluentDownstream
from feedback.sink import DurableEventSink
from feedback.spool import Spool
from schemas.events import InferenceEvent


async def main(spool_dir: Path, bootstrap: str, prefix: str, write_ahead: bool) -> None:
    spool = Spool(spool_dir, fsync_interval_s=0.5, memory_max_records=500, write_ahead=write_ahead)
    sink = DurableEventSink(spool, ConfluentDownstream(bootstrap, delivery_timeout_s=2), topic_prefix=prefix)
    await sink.start()
    i = 0
    while True:
        for _ in range(50):
            sink.publish(InferenceEvent(tenant=f"tenant-{i % 4}", request_id=str(i)))
            i += 1
        print(i, flush=True)
        await asyncio.sleep(0.002)


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:] != ["memory"]))
