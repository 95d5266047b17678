-- Automatic grades of inferences (feedback/graders): append-only like feedback, keyed like the other
-- event tables (the key ends in event_id, so a redelivered grade collapses under FINAL). The key leads
-- with what the grade monitors filter on (tenant, grader, model, version) and then time; lookups of
-- one inference's grades use the target_id bloom filter.

CREATE TABLE IF NOT EXISTS grades
(
    event_id        String,
    schema_version  UInt16,
    ts              DateTime64(3, 'UTC'),
    tenant          LowCardinality(String),
    grader          LowCardinality(String),
    grader_version  LowCardinality(String),
    target_id       String,
    model           LowCardinality(String),
    model_version   LowCardinality(String),
    score           Float64,
    label           LowCardinality(String),
    explanation     String CODEC(ZSTD(1)),
    other_id        String,
    other_version   LowCardinality(String),
    inference_ts    DateTime64(3, 'UTC'),
    inserted_at     DateTime64(3, 'UTC') DEFAULT now64(3),
    INDEX target_id_bf target_id TYPE bloom_filter(0.001) GRANULARITY 1
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (tenant, grader, model, model_version, ts, event_id);
