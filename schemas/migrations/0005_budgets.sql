-- Spend and budgets: the cost of each inference (tokens x the price table, computed by the gateway),
-- budgets as append-only rows (the latest per scope, subject and period is in force), and the alerts
-- raised when spend crosses a soft or hard limit (one per period: the event id is derived from it).

ALTER TABLE inferences ADD COLUMN IF NOT EXISTS cost_usd Float64 AFTER guardrail_types;

CREATE TABLE IF NOT EXISTS budgets
(
    event_id        String,
    schema_version  UInt16,
    ts              DateTime64(3, 'UTC'),
    tenant          LowCardinality(String),
    scope           LowCardinality(String),
    subject         String,
    period          LowCardinality(String),
    soft_usd        Float64,
    hard_usd        Float64,
    actor           String,
    reason          String,
    inserted_at     DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
ORDER BY (scope, subject, period, ts, event_id);

CREATE TABLE IF NOT EXISTS budget_alerts
(
    event_id        String,
    schema_version  UInt16,
    ts              DateTime64(3, 'UTC'),
    tenant          LowCardinality(String),
    scope           LowCardinality(String),
    subject         String,
    period          LowCardinality(String),
    level           LowCardinality(String),
    period_start    DateTime64(3, 'UTC'),
    reset           DateTime64(3, 'UTC'),
    spend_usd       Float64,
    limit_usd       Float64,
    inserted_at     DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (tenant, scope, subject, ts, event_id);
