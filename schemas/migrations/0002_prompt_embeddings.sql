-- Prompt embeddings, cached per inference event id and embedding model, for the drift monitors.
-- Computed once off the request path (monitor cycle or backfill) and shared by every process reading
-- the store. The key is fixed by the event and the model, so a re-embedded prompt collapses under
-- FINAL. event_id is a UUIDv7, so a time window is one contiguous key range per model.

CREATE TABLE IF NOT EXISTS prompt_embeddings
(
    event_id        String,
    embedding_model LowCardinality(String),
    ts              DateTime64(3, 'UTC'),
    embedding       Array(Float32),
    inserted_at     DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (embedding_model, event_id);
