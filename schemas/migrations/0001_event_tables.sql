-- One append-only table per event type. ReplacingMergeTree collapses rows with equal sorting keys,
-- and every key below ends in event_id and holds only columns fixed by the event itself, so a
-- redelivered event lands on the same key: read with FINAL (or argMax) and it counts once.
-- Keys lead with what monitors filter on (tenant, model, version) and then time, so a window scan
-- reads one contiguous range per tenant/model/version. Lookups by id use the bloom-filter indexes.

CREATE TABLE IF NOT EXISTS inferences
(
    event_id        String,
    schema_version  UInt16,
    ts              DateTime64(3, 'UTC'),
    tenant          LowCardinality(String),
    request_id      String,
    trace_id        String,
    span_id         String,
    key_id          LowCardinality(String),
    user            String,
    model           LowCardinality(String),
    model_version   LowCardinality(String),
    adapter         LowCardinality(String),
    canary_arm      LowCardinality(String),
    engine          LowCardinality(String),
    operation       LowCardinality(String),
    prompt          String CODEC(ZSTD(1)),
    messages        Array(Tuple(role LowCardinality(String), content String)) CODEC(ZSTD(1)),
    response        String CODEC(ZSTD(1)),
    temperature     Float64,
    top_p           Float64,
    max_tokens      UInt32,
    seed            Nullable(Int64),
    stop            Array(String),
    tokens_in       UInt32,
    tokens_out      UInt32,
    ttft_ms         Float64,
    latency_ms      Float64,
    status          LowCardinality(String),
    error_code      LowCardinality(String),
    finish_reason   LowCardinality(String),
    cache_hit       Bool,
    stream          Bool,
    input_action    LowCardinality(String),
    output_action   LowCardinality(String),
    guardrail_types Array(LowCardinality(String)),
    inserted_at     DateTime64(3, 'UTC') DEFAULT now64(3),
    INDEX event_id_bf event_id TYPE bloom_filter(0.001) GRANULARITY 1,
    INDEX request_id_bf request_id TYPE bloom_filter(0.01) GRANULARITY 1
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (tenant, model, model_version, ts, event_id);

CREATE TABLE IF NOT EXISTS guardrail_verdicts
(
    event_id        String,
    schema_version  UInt16,
    ts              DateTime64(3, 'UTC'),
    tenant          LowCardinality(String),
    request_id      String,
    inference_id    String,
    key_id          LowCardinality(String),
    model           LowCardinality(String),
    side            LowCardinality(String),
    action          LowCardinality(String),
    finding_counts  Map(LowCardinality(String), UInt32),
    detectors       Map(LowCardinality(String), LowCardinality(String)),
    elapsed_us      UInt32,
    policy          LowCardinality(String),
    streamed        Bool,
    inserted_at     DateTime64(3, 'UTC') DEFAULT now64(3),
    INDEX request_id_bf request_id TYPE bloom_filter(0.01) GRANULARITY 1
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (tenant, side, ts, event_id);

CREATE TABLE IF NOT EXISTS feedback
(
    event_id        String,
    schema_version  UInt16,
    ts              DateTime64(3, 'UTC'),
    tenant          LowCardinality(String),
    target_id       String,
    kind            LowCardinality(String),
    metric_name     LowCardinality(String),
    thumbs          Nullable(Bool),
    rating          Nullable(Float64),
    comment         String,
    correction      String CODEC(ZSTD(1)),
    preferred_id    String,
    other_id        String,
    idempotency_key String,
    key_id          LowCardinality(String),
    user            String,
    inserted_at     DateTime64(3, 'UTC') DEFAULT now64(3),
    INDEX target_id_bf target_id TYPE bloom_filter(0.001) GRANULARITY 1
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (tenant, metric_name, ts, event_id);

CREATE TABLE IF NOT EXISTS model_events
(
    event_id        String,
    schema_version  UInt16,
    ts              DateTime64(3, 'UTC'),
    tenant          LowCardinality(String),
    model           LowCardinality(String),
    version_id      String,
    base_model      String,
    adapter_path    String,
    state           LowCardinality(String),
    previous_state  LowCardinality(String),
    reason          String,
    actor           String,
    lineage         String,
    inserted_at     DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (model, version_id, ts, event_id);

CREATE TABLE IF NOT EXISTS monitor_results
(
    event_id        String,
    schema_version  UInt16,
    ts              DateTime64(3, 'UTC'),
    tenant          LowCardinality(String),
    monitor         LowCardinality(String),
    metric          LowCardinality(String),
    model           LowCardinality(String),
    model_version   LowCardinality(String),
    window_start    DateTime64(3, 'UTC'),
    window_end      DateTime64(3, 'UTC'),
    value           Float64,
    threshold       Float64,
    status          LowCardinality(String),
    sample_size     UInt32,
    details         String,
    inserted_at     DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (tenant, monitor, ts, event_id);

CREATE TABLE IF NOT EXISTS retrain_triggers
(
    event_id         String,
    schema_version   UInt16,
    ts               DateTime64(3, 'UTC'),
    tenant           LowCardinality(String),
    model            LowCardinality(String),
    model_version    LowCardinality(String),
    method           LowCardinality(String),
    reason           String,
    monitor_event_id String,
    window_start     DateTime64(3, 'UTC'),
    window_end       DateTime64(3, 'UTC'),
    actor            String,
    params           String,
    inserted_at      DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (model, ts, event_id);

-- Keyed by the source position: a bad record redelivered after a crash is one row, not two.
CREATE TABLE IF NOT EXISTS dead_letters
(
    event_id        String,
    schema_version  UInt16,
    ts              DateTime64(3, 'UTC'),
    tenant          LowCardinality(String),
    source_topic    LowCardinality(String),
    partition       Int64,
    offset          Int64,
    reason          LowCardinality(String),
    detail          String,
    raw_base64      String CODEC(ZSTD(1)),
    inserted_at     DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (source_topic, partition, offset, event_id);
