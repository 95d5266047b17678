"""The event pipeline of one process: store, broker (embedded, external or none), durable sink, ingester.

    pipeline = EventPipeline(settings.events, data_dir=settings.data_dir)
    await pipeline.start()
    gateway = Gateway(..., events=pipeline.sink)    # publish() only enqueues
    ...
    await pipeline.aclose()                          # after the gateway drained

Broker modes:
- `embedded`: a tansu child process. On its default `memory://` storage the broker loses what it holds
  when it restarts, so the sink keeps every event in its spool until the ingester reports it stored
  (`retain_until_stored`), and a watchdog restarts a dead broker and has the sink send the unstored
  events again. With `embedded_storage: s3://…` the broker itself is durable and the sink releases
  events on the broker's acknowledgement, as with an external cluster.
- `external`: any Kafka-protocol cluster at `bootstrap_servers` (acks=all is the durability point).
  `ingest: false` leaves consuming to separate `servoloop ingest` processes.
- `none`: the sink writes batches straight to the store through the same spool; no ingester.

The store is opened and migrated here, so in the embedded default this process is its one owner.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from feedback.broker import EmbeddedBroker
from feedback.ingest import Ingester, Source
from feedback.settings import EventSettings
from feedback.sink import DurableEventSink, build_event_sink
from feedback.store import Store, ingest_batch, migrate, open_store
from schemas.topics import all_topics, dead_letter_topic, validate_prefix

log = logging.getLogger(__name__)


class EventPipeline:
    def __init__(self, settings: EventSettings, *, data_dir: Path, registry: CollectorRegistry | None = None,
                 store: Store | None = None, ingest: bool = True, with_store: bool = True,
                 watchdog_interval_s: float = 0.5):
        self.settings = settings
        self.data_dir = data_dir
        self._registry = registry
        self._ingest = ingest and settings.broker.mode != "none"
        # A gateway-only process publishing to an external broker opens no store (it may belong to another process).
        self._with_store = with_store or self._ingest or settings.broker.mode == "none"
        self._watchdog_interval = watchdog_interval_s
        self._given_store = store
        self.store: Store | None = store
        self.broker: EmbeddedBroker | None = None
        self.sink: DurableEventSink | None = None
        self.ingester: Ingester | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self.broker_restarts = 0

    @property
    def _pidfile(self) -> Path:
        return broker_file(self.data_dir)

    def _record_broker(self) -> None:
        assert self.broker is not None
        self._pidfile.write_text(json.dumps({"pid": self.broker.pid, "bootstrap_servers": self.broker.bootstrap_servers}))

    @property
    def bootstrap_servers(self) -> str:
        if self.broker is not None:
            return self.broker.bootstrap_servers
        return self.settings.broker.bootstrap_servers

    @property
    def topics(self) -> tuple[str, ...]:
        return all_topics(validate_prefix(self.settings.broker.topic_prefix))

    @property
    def retains_until_stored(self) -> bool:
        """True when the broker may lose acknowledged events (embedded on memory storage)."""
        b = self.settings.broker
        return b.mode == "embedded" and not b.embedded_storage.startswith("s3://")

    async def start(self) -> None:
        """Open and migrate the store, start the broker, the sink and the ingester. Raises on failure."""
        s = self.settings
        if self.store is None and self._with_store:
            self.store = await open_store(s.store, data_dir=self.data_dir)
        if self.store is not None:
            await migrate(self.store)
        if s.broker.mode == "embedded":
            self.broker = EmbeddedBroker(storage=s.broker.embedded_storage or "memory://tansu/",
                                         log_path=self.data_dir / "logs" / "tansu.log")
            _reap_orphaned_broker(self._pidfile)
            await asyncio.to_thread(self.broker.start)
            self._record_broker()
            await asyncio.to_thread(self.broker.create_topics, self.topics)
        elif s.broker.mode == "external" and not s.broker.bootstrap_servers:
            from schemas.errors import ConfigError

            raise ConfigError("events.broker.bootstrap_servers is required when events.broker.mode is 'external'")
        self.sink = build_event_sink(s, spool_dir=self.data_dir / "spool", bootstrap_servers=self.bootstrap_servers,
                                     store=self.store, registry=self._registry,
                                     retain_until_stored=self.retains_until_stored)
        await self.sink.start()
        if self._ingest:
            self.ingester = Ingester(self.bootstrap_servers, self.topics, self._handle, settings=s.ingest,
                                     registry=self._registry)
            await self.ingester.start()
        if self.broker is not None:
            self._watchdog = asyncio.create_task(self._watch_broker(), name="embedded-broker-watchdog")
        log.info("event pipeline: broker %s%s, store %s, ingester %s", s.broker.mode,
                 f" ({self.bootstrap_servers})" if s.broker.mode != "none" else "", s.store.kind,
                 "on" if self.ingester else "off")

    async def _handle(self, values: list[bytes], source: list[Source]) -> object:
        assert self.store is not None and self.sink is not None
        result = await ingest_batch(self.store, values, source=source)
        self.sink.confirm(result.event_ids)
        dead_topic = dead_letter_topic(self.settings.broker.topic_prefix)
        for dead in result.dead_letters:  # to the dead-letter topic too, for inspection and replay
            if dead.source_topic != dead_topic:
                self.sink.publish(dead)
        return result

    async def _watch_broker(self) -> None:
        """Restart the embedded broker when it dies; a memory broker comes back empty, so resend."""
        assert self.broker is not None and self.sink is not None
        while True:
            await asyncio.sleep(self._watchdog_interval)
            if self.broker.running:
                continue
            log.warning("embedded broker exited; restarting it (log: %s)", self.broker.log_path)
            try:
                await asyncio.to_thread(self.broker.start)
            except Exception as e:
                log.error("embedded broker did not restart: %s; retrying", e)
                continue
            self.broker_restarts += 1
            self._record_broker()
            if self.retains_until_stored:
                self.sink.redeliver()

    def health(self) -> dict[str, Any]:
        out: dict[str, Any] = {"broker": self.settings.broker.mode}
        if self.broker is not None:
            out["broker_running"] = self.broker.running
            out["broker_restarts"] = self.broker_restarts
        if self.sink is not None:
            out["sink"] = self.sink.health().value
            out["sink_pending"] = self.sink.pending
        if self.ingester is not None:
            out["ingester_running"] = self.ingester.running
            out["ingest_lag"] = sum(self.ingester.lag().values())
        return out

    async def wait_stored(self, timeout_s: float) -> bool:
        """Wait until every event published so far is in the store (embedded/none) or acknowledged by the
        broker (external/durable). False on timeout."""
        assert self.sink is not None
        return await self.sink.wait_delivered(timeout_s)

    async def aclose(self, *, drain_timeout_s: float = 10.0) -> None:
        """Deliver what can be delivered within the timeout (the rest stays in the spool), then stop everything."""
        started = time.monotonic()
        if self._watchdog is not None:
            self._watchdog.cancel()
            await asyncio.gather(self._watchdog, return_exceptions=True)
        if self.sink is not None:
            if self.sink.pending:
                await self.sink.wait_delivered(drain_timeout_s)
            await self.sink.aclose()
        if self.ingester is not None:
            await self.ingester.stop()
        if self.broker is not None:
            await asyncio.to_thread(self.broker.stop)
            self._pidfile.unlink(missing_ok=True)
        if self.store is not None and self._given_store is None:
            await self.store.aclose()
        log.info("event pipeline stopped in %.1fs", time.monotonic() - started)


def broker_file(data_dir: Path) -> Path:
    """Where a running `servoloop up` records its embedded broker: {"pid": …, "bootstrap_servers": "host:port"}."""
    return data_dir / "broker.json"


def embedded_broker_address(data_dir: Path) -> str | None:
    """The bootstrap address of the embedded broker a `servoloop up` on `data_dir` runs, if one is running."""
    try:
        info = json.loads(broker_file(data_dir).read_text())
        alive = Path(f"/proc/{int(info['pid'])}/cmdline").read_bytes()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return str(info["bootstrap_servers"]) if b"tansu" in alive else None


def _reap_orphaned_broker(pidfile: Path) -> None:
    """Kill the broker an earlier run of this data directory left behind (that process was SIGKILLed)."""
    try:
        pid = int(json.loads(pidfile.read_text())["pid"])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError, KeyError, TypeError):
        return
    if b"tansu" in cmdline:
        log.warning("killing the embedded broker (pid %d) an earlier run left behind", pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
