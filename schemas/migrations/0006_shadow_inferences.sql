-- Shadow inferences (gateway/shadow.py): a sampled served request replayed to a candidate or canary arm after
-- the client had its answer. The shadow answer is stored as its own inference row, flagged, and points at the
-- served inference it mirrors, so graders and monitors can pair the two; it was never returned to anyone.

ALTER TABLE inferences ADD COLUMN IF NOT EXISTS shadow Bool DEFAULT false AFTER cost_usd;
ALTER TABLE inferences ADD COLUMN IF NOT EXISTS shadow_of String AFTER shadow;
