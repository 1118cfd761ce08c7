-- How many runs of a job its server died under (a crash, a kill -9, a lost lease), counted apart from failed
-- attempts, so that a job that kills its server goes dead after max_interruptions instead of looping for ever.
ALTER TABLE jobs ADD COLUMN interruptions BIGINT NOT NULL DEFAULT 0;
