"""Settings of the data path after the gateway: broker, event sink and spool, ingester, store."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field


class BrokerSettings(BaseModel):
    """Kafka-protocol transport. `embedded` starts a local tansu broker; `none` writes through the spool to the store."""

    mode: Literal["embedded", "external", "none"] = "embedded"
    bootstrap_servers: str = Field("", description="host:port list for an external Kafka cluster")
    embedded_storage: str = Field("", description="tansu storage URL; empty: memory:// (events then also wait in the spool)")
    client: Literal["confluent", "kafka-python"] = "confluent"
    topic_prefix: str = "servoloop."


class SinkSettings(BaseModel):
    queue_max_events: int = Field(100_000, ge=1)
    spool_dir: Path | None = Field(None, description="default: <data_dir>/spool")
    spool_max_bytes: int = Field(2 * 1024**3, ge=1024 * 1024)
    spool_segment_bytes: int = Field(16 * 1024**2, ge=64 * 1024)
    fsync_interval_s: float = Field(0.05, ge=0)
    write_ahead: bool = Field(True, description="write every event to the spool file as it is accepted (page cache, "
                              "~1.5 µs): a crash or SIGKILL of the gateway loses nothing it accepted; off: only "
                              "events unacknowledged for fsync_interval_s reach disk")
    compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "lz4"


class StoreSettings(BaseModel):
    kind: Literal["chdb", "clickhouse"] = "chdb"
    chdb_path: Path | None = Field(None, description="default: <data_dir>/chdb")
    url: str = Field("", description="ClickHouse HTTP URL for kind=clickhouse, e.g. http://clickhouse:8123")
    database: str = "servoloop"
    username: str = "default"
    password: str = Field("", repr=False)


class IngestSettings(BaseModel):
    group_id: str = "servoloop-ingester"
    batch_max_events: int = Field(20_000, ge=1)
    batch_max_wait_s: float = Field(0.3, gt=0, description="a batch closes this long after its first record "
                                    "(or when full); the next one is read while it is stored")


class EventSettings(BaseModel):
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    sink: SinkSettings = Field(default_factory=SinkSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
