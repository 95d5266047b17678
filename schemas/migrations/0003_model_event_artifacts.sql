-- Model lifecycle rows carry what every gateway needs to act on them without another lookup: the
-- adapter artifact's content hash (verified before loading) and, for a canary, its share of traffic.

ALTER TABLE model_events ADD COLUMN IF NOT EXISTS artifact_sha256 String AFTER lineage;
ALTER TABLE model_events ADD COLUMN IF NOT EXISTS canary_share Float64 AFTER artifact_sha256;
